package voice

import (
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// TTS pacing and barge-in (Options.TTSPacing).
//
// The algorithm service sends TTS faster than real time. Relayed at once, seconds of an answer
// would sit in the client's buffer, and keep playing after the user interrupts. With pacing on,
// the session holds TTS audio in a queue and releases it to the client at playback rate plus a
// lead (Options.TTSLead, VOICE_TTS_LEAD): the client never has more than the lead buffered, so
// an interrupt can silence the answer at once.
//
// The playback clock. The client is taken to play released audio back to back from the moment
// the first frame of a stretch is released; a stretch ends when the client would have played
// everything released (then the next frame starts a new one). A frame is released once the
// audio released before it, less what the client would have played, is at most the lead.
// Frame lengths are the TTS format's (meter.go): exact for every format. Frames go out in
// batches: once the client holds half the lead, the session tops it up to the lead again, so
// the writer wakes once per half lead of audio rather than once a frame (CPU: see
// docs/benchmarks.md), and the client holds between half the lead and the lead.

//
// The queue. Binary TTS frames, tts_audio messages and tts_complete go through it, in order
// (tts_complete reaches the client after the audio it completes); every other message from the
// service goes to the client at once, as without pacing. The queue holds at most
// Options.TTSQueue bytes (VOICE_TTS_QUEUE) and maxTTSAhead of audio; beyond either the session
// stops reading the algorithm service until a frame is released (its writes back up in TCP), so
// memory never grows with a service that floods. maxTTSAhead also bounds that wait well within
// a ping interval, so a service held back is never taken for dead.
//
// Interrupts. An interrupt is a client message {"type":"interrupt"}, or a message from the
// service that says the user started speaking ({"type":"speech_started"}, its own VAD) or that
// it cancelled its TTS ({"type":"tts_cancelled"}). On one, the session at once drops every
// queued tts_audio message and TTS frame (a frame being written completes: that is the one
// frame time), then sends the client, before anything else queued,
//
//	{"type":"tts_flushed","played_ms":…,"dropped_ms":…,"buffered_ms":…,"session_id":…}
//
// and the service {"type":"interrupt","played_ms":…,"session_id":…} (the client's own interrupt
// message, its fields kept, with played_ms set; for the service's own messages, with "reason"
// naming the message). played_ms is the audio of the answer under way released to the client,
// less what the client could not yet have played of it (what it holds in its buffer, at most
// the lead): while pacing runs ahead, the audio released less the lead; once the answer has all
// been released and its lead played out, all of it. An answer is the TTS audio from the first
// frame after the previous answer's end (tts_complete released, or an interrupt). dropped_ms is
// the audio dropped from the queue, buffered_ms what the client holds and should drop itself.
//
// After an interrupt, audio of the interrupted answer may still be on its way from the service.
// The session drops the service's TTS audio until the service ends the answer with tts_complete
// or tts_cancelled — unless the answer had ended already (its tts_complete read), or the
// interrupt was the service's tts_cancelled. A service that supports barge-in ends an
// interrupted answer so.
//
// TTS audio is charged to the quotas, and counted in AudioOut, as it is released: audio the
// flush drops is neither. Without pacing, TTS is relayed as it comes, the client's interrupt is
// forwarded unchanged, and nothing is flushed.
//
// Who writes. A writer goroutine, started when the queue gets its first message and gone once
// the queue is empty, writes what the queue releases; fromUpstream queues, and writes the
// other messages itself; an interrupt's flush happens on the goroutine that read it.

// maxTTSAhead bounds the audio a session holds in its TTS queue.
const maxTTSAhead = 10 * time.Second

type ttsItem struct {
	typ   websocket.MessageType
	b     *[]byte
	d     time.Duration // of audio, for binary frames
	audio bool          // dropped by a flush: a binary frame or a tts_audio message
	end   bool          // tts_complete: the answer's audio has all been released
	note  bool          // the gateway's tts_flushed
}

// ttsQueue is a session's paced TTS. Its fields are under mu, which is never held across a
// write or a wait.
type ttsQueue struct {
	lead  time.Duration
	limit int

	mu         sync.Mutex
	items      []ttsItem
	bytes      int
	queued     time.Duration // audio in items
	peak       int           // the most bytes items ever held
	playStart  int64         // unix ns the stretch began
	released   time.Duration // audio released in the stretch
	answer     time.Duration // audio of the answer released
	answerOpen bool          // the answer has released audio, and not yet its end
	upOpen     bool          // the service's answer has audio queued and has not ended
	discarding bool          // dropping the service's audio until it ends the interrupted answer
	running    bool          // a writer goroutine is on
	closed     bool          // the session is over: nothing more is queued or written
	flushes    int64
	dropped    time.Duration

	wake chan struct{} // a flush has put its message at the head
	room chan struct{} // a message left the queue, or the writer ended

	// unpaced releases everything queued at once: the session is being handed over to another
	// instance, and what the queue holds must reach the log before its seal (releaseAllTTS).
	unpaced bool
}

func newTTSQueue(lead time.Duration, limit int) *ttsQueue {
	return &ttsQueue{lead: lead, limit: limit, wake: make(chan struct{}, 1), room: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// queueTTS queues a message from the service (fromUpstream only), waiting while the queue is
// full; false once the session is over. It takes b.
func (s *session) queueTTS(it ttsItem) bool {
	q := s.tts
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			s.h.putBuf(it.b)
			return false
		}
		if q.discarding && it.audio {
			q.mu.Unlock()
			s.h.putBuf(it.b)
			return true
		}
		if len(q.items) > 0 && (q.bytes+len(*it.b) > q.limit || q.queued+it.d > maxTTSAhead) {
			q.mu.Unlock()
			select {
			case <-q.room:
			case <-s.ending:
			}
			continue
		}
		q.items = append(q.items, it)
		q.bytes += len(*it.b)
		q.queued += it.d
		q.peak = max(q.peak, q.bytes)
		if it.audio {
			q.upOpen = true
		}
		if it.end {
			q.upOpen = false
		}
		start := !q.running
		q.running = true
		q.mu.Unlock()
		if start {
			s.ttsWG.Add(1)
			go s.ttsWriter()
		}
		return true
	}
}

// answerEnded notes a message from the service that ends its answer (fromUpstream only):
// audio after it is a new answer's.
func (q *ttsQueue) answerEnded() {
	q.mu.Lock()
	q.discarding = false
	q.upOpen = false
	q.mu.Unlock()
}

// next takes the message due at now, or says how long to wait for it; false when there is
// none (the writer then ends).
func (q *ttsQueue) next(now int64) (it ttsItem, wait time.Duration, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || len(q.items) == 0 {
		q.running = false
		q.items = q.items[:0]
		signal(q.room) // for releaseAllTTS: what was taken has been written
		return ttsItem{}, 0, false
	}
	it = q.items[0]
	if it.d > 0 && !q.unpaced {
		end := q.playStart + int64(q.released)
		if end < now { // the client has played everything: a new stretch
			q.playStart, q.released, end = now, 0, now
		}
		if due := end - int64(q.lead); now < due {
			// Not yet: wait until the client holds half the lead, then top it up to the lead
			// in one go (a wake-up per half lead of audio, not per frame).
			return ttsItem{}, time.Duration(end - int64(q.lead/2) - now), true
		}
		q.released += it.d
		if !q.answerOpen {
			q.answer, q.answerOpen = 0, true
		}
		q.answer += it.d
	}
	if it.end {
		q.answerOpen = false
	}
	q.items[0] = ttsItem{}
	q.items = q.items[1:]
	q.bytes -= len(*it.b)
	q.queued -= it.d
	signal(q.room)
	return it, 0, true
}

// ttsWriter writes what the queue releases, until it is empty or the session over.
func (s *session) ttsWriter() {
	defer s.ttsWG.Done()
	q := s.tts
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		it, wait, ok := q.next(time.Now().UnixNano())
		if !ok {
			return
		}
		if wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-timer.C:
			case <-q.wake:
				timer.Stop()
			case <-s.ending:
				s.closeTTS()
				return
			}
			continue
		}
		if it.typ == websocket.MessageBinary && !s.releaseTTS(len(*it.b), it.d) {
			s.h.putBuf(it.b) // no quota left: the session is ending
			continue
		}
		if it.end {
			s.ttsComplete()
		}
		// Through the session's one downlink writer: numbered as it is released, kept for a
		// resume, and, while the client is away, released into the ring and the log on the
		// playback clock as if it had been sent (resume.go).
		failed, err := s.down(it.typ, *it.b)
		s.h.putBuf(it.b)
		if err != nil {
			s.clientWriteFailed(*failed)
			if s.rs != nil && !s.ended.Load() {
				continue // away: the queue goes on being released, into the ring
			}
			s.closeTTS()
			return
		}
	}
}

// releaseAllTTS releases what the queue holds at once, through the writer, and returns once it
// has all been written (or the session ended): fromUpstream calls it when the algorithm service
// has moved the session to another instance (4100), before the log is sealed, so that TTS held
// here reaches the new instance's replay rather than being lost. Nothing is queued meanwhile:
// fromUpstream, the only one that queues, is here.
func (s *session) releaseAllTTS() {
	q := s.tts
	q.mu.Lock()
	q.unpaced = true
	start := !q.running && len(q.items) > 0 && !q.closed
	if start {
		q.running = true
	}
	q.mu.Unlock()
	if start {
		s.ttsWG.Add(1)
		go s.ttsWriter()
	}
	signal(q.wake)
	for {
		q.mu.Lock()
		done := q.closed || len(q.items) == 0 && !q.running
		q.mu.Unlock()
		if done {
			return
		}
		select {
		case <-q.room:
		case <-s.ending:
			return
		}
	}
}

// closeTTS empties the queue for good: the session is over.
func (s *session) closeTTS() {
	q := s.tts
	q.mu.Lock()
	q.closed = true
	q.running = false
	for i := range q.items {
		q.items[i] = ttsItem{}
	}
	q.items, q.bytes, q.queued = nil, 0, 0
	q.mu.Unlock()
	signal(q.room)
}

// flushTTS carries out an interrupt: drops the queued audio, puts tts_flushed at the head of
// the queue, and returns played_ms. fromService says the service itself stopped its TTS
// (tts_cancelled): nothing of the answer is still to come.
func (s *session) flushTTS(fromService bool) (playedMS int64) {
	q := s.tts
	now := time.Now().UnixNano()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return 0
	}
	var dropped time.Duration
	kept := q.items[:0]
	for _, it := range q.items {
		if it.audio {
			dropped += it.d
			q.bytes -= len(*it.b)
			s.h.putBuf(it.b)
			continue
		}
		kept = append(kept, it)
	}
	for i := len(kept); i < len(q.items); i++ {
		q.items[i] = ttsItem{}
	}
	q.items = kept
	q.queued = 0
	buffered := max(time.Duration(q.playStart+int64(q.released)-now), 0)
	played := max(q.answer-buffered, 0)
	q.playStart, q.released, q.answer, q.answerOpen = 0, 0, 0, false
	q.discarding = q.upOpen && !fromService
	q.upOpen = false
	q.flushes++
	q.dropped += dropped
	msg := s.h.getBuf()
	*msg = appendFlushed(*msg, s.info.SessionID, played, dropped, buffered)
	if len(q.items) > 0 && q.items[0].note {
		// The last flush's message has not gone out yet: this one replaces it, so a client
		// that sends interrupts and reads nothing holds one message here, not one each.
		q.bytes -= len(*q.items[0].b)
		s.h.putBuf(q.items[0].b)
		q.items[0].b = msg
	} else {
		q.items = append(q.items, ttsItem{})
		copy(q.items[1:], q.items)
		q.items[0] = ttsItem{typ: websocket.MessageText, b: msg, note: true}
	}
	q.bytes += len(*msg)
	q.peak = max(q.peak, q.bytes)
	start := !q.running
	q.running = true
	q.mu.Unlock()
	signal(q.room)
	if start {
		s.ttsWG.Add(1)
		go s.ttsWriter()
	} else {
		signal(q.wake)
	}
	return played.Milliseconds()
}

func appendFlushed(dst []byte, sessionID string, played, dropped, buffered time.Duration) []byte {
	dst = append(dst, `{"type":"tts_flushed","played_ms":`...)
	dst = strconv.AppendInt(dst, played.Milliseconds(), 10)
	dst = append(dst, `,"dropped_ms":`...)
	dst = strconv.AppendInt(dst, dropped.Milliseconds(), 10)
	dst = append(dst, `,"buffered_ms":`...)
	dst = strconv.AppendInt(dst, buffered.Milliseconds(), 10)
	dst = append(dst, `,"session_id":`...)
	id, _ := json.Marshal(sessionID)
	dst = append(dst, id...)
	return append(dst, '}')
}

// withPlayed sets played_ms in an interrupt message for the service (one the client sent,
// validated, or one the gateway makes: msg nil).
func withPlayed(msg []byte, sessionID string, playedMS int64, reason string) []byte {
	m := map[string]json.RawMessage{}
	if msg != nil {
		_ = json.Unmarshal(msg, &m) // control made it
	}
	m["type"] = json.RawMessage(`"interrupt"`)
	m["session_id"], _ = json.Marshal(sessionID)
	m["played_ms"] = json.RawMessage(strconv.FormatInt(playedMS, 10))
	if reason != "" {
		m["reason"], _ = json.Marshal(reason)
	}
	out, _ := json.Marshal(m)
	return out
}

// serviceInterrupt carries out an interrupt the service announced (fromUpstream only): the
// flush, and the interrupt with played_ms back to the service.
func (s *session) serviceInterrupt(typ string) bool {
	played := s.flushTTS(typ == "tts_cancelled")
	if typ == "tts_cancelled" {
		s.tts.answerEnded()
	}
	if err := s.up.ws.Write(unbounded(), websocket.MessageText, withPlayed(nil, s.info.SessionID, played, typ)); err != nil {
		s.upWriteFailed()
		return false
	}
	return true
}

// ttsStats are the queue's figures for Stats.
func (q *ttsQueue) stats() (flushes int64, dropped time.Duration, peak int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.flushes, q.dropped, q.peak
}
