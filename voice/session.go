package voice

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice/audio"
)

// Stats are a session's counters, logged when it ends and exported as metrics.
type Stats struct {
	SessionID     string
	Duration      time.Duration // from the upgrade to the end of the session
	PacketsIn     int64         // client → gateway messages
	BytesIn       int64
	PacketsOut    int64 // gateway → client messages relayed from the algorithm service
	BytesOut      int64
	AudioBytesIn  int64 // client audio
	AudioBytesOut int64 // TTS audio frames
	ASRPartial    int64
	ASRFinal      int64
	LLMChunks     int64
	TTSChunks     int64
	Errors        int64
	FirstASR      time.Duration // first client audio → first recognition event; 0 if none
	CloseCode     websocket.StatusCode
	CloseReason   string
	AudioFormat   string // the agreed format, as codec/rate/channels
	InvalidAudio  int64  // client frames dropped as not valid for it
	// Paced TTS (tts.go): interrupts carried out, the audio they dropped, and the most bytes
	// the queue held.
	TTSFlushes   int64
	TTSDropped   time.Duration
	TTSQueuePeak int
	// Governance (meter.go, govern.go).
	TenantID        string
	AudioIn         time.Duration // audio seconds from the client
	AudioOut        time.Duration // TTS audio seconds to it
	Charged         time.Duration // what the quotas were charged: exactly AudioIn+AudioOut once settled
	BargeIns        int64
	ResponseLatency Latency
	ASRLatency      Latency
}

// counters are a session's live figures. Each is written by one relay goroutine and may be read
// by anyone, hence atomics (a handful of uncontended adds per frame).
type counters struct {
	packetsIn, bytesIn, audioIn    atomic.Int64
	packetsOut, bytesOut, audioOut atomic.Int64
	asrPartial, asrFinal           atomic.Int64
	llmChunks, ttsChunks, errors   atomic.Int64
	firstAudio                     atomic.Int64 // unix ns of the first client audio; 0 none yet
	firstASR                       atomic.Int64 // ns from first audio to first recognition; 0 none
	invalidAudio                   atomic.Int64 // client frames dropped as not valid audio (format.go)
}

// side is one of a session's two connections: the WebSocket, and the socket under it.
type side struct {
	ws   *websocket.Conn
	conn *conn
}

// ending is why and how a session ends.
type ending struct {
	code    websocket.StatusCode // for the client (and the session's log and metrics)
	errCode string               // an error message to send the client first; "" none
	reason  string               // the close reason, and the error message's text
	upCode  websocket.StatusCode // for the algorithm service
	// dropClient and dropUp mark sides that cannot be told anything (gone, or not reading):
	// their sockets are closed without a handshake.
	dropClient, dropUp bool
}

// session is one bridged voice session.
type session struct {
	h       *Handler
	info    Info
	cfg     AudioConfig
	client  side
	up      side
	enc     *chunkEncoder
	recheck func(ctx context.Context) error // nil: none
	release func()                          // the session's concurrency slot
	start   time.Time
	n       counters
	m       *meter
	gov     governor
	pace    pacer // fromClient's

	tr         Translator                   // the client's dialect; nil: the voice protocol
	tts        *ttsQueue                    // nil: TTS is not paced
	ttsWG      sync.WaitGroup               // the TTS writer, while it runs
	format     atomic.Pointer[audio.Format] // the agreed format, for the counters
	invalidRun int                          // invalid audio frames in a row; fromClient's

	// upSeq numbers the audio_chunk messages: a field, not a reader's local, because a resumed
	// client's reader goes on where the last one stopped.
	upSeq   atomic.Int64
	lastIn  atomic.Int64 // unix ns of the last client message
	expiry  time.Time    // when the token stops being accepted; zero: never
	pinging atomic.Bool  // a ping is out (timers.go)

	// The downlink's order and resuming (resume.go). wmu guards seq, ring, client (replaced by
	// a resume), away, replaying and attached.
	wmu       writeLock
	cur       atomic.Pointer[side] // client, for whoever must not wait for wmu (clientNow)
	seq       int64                // the number of the last downlink message
	ring      *downRing            // the recent downlink; nil when resuming is off
	away      bool                 // the client vanished; the session waits for it to resume
	replaying bool                 // a resumed client is being replayed to; the live downlink waits in the ring
	attached  chan struct{}        // closed when a resumed client is attached to an away session
	rs        *resumable           // nil: resuming is off

	endOnce sync.Once
	ended   atomic.Bool
	outcome ending        // set once, in end
	ending  chan struct{} // closed as the session ends, for what waits (the pace, a reservation)
	closed  chan struct{} // closed when the ending has been carried out
	upDone  chan struct{} // closed when the algorithm-service reader has returned
}

func newSession(h *Handler, info Info, cfg AudioConfig, client, up side) *session {
	now := time.Now()
	s := &session{h: h, info: info, cfg: cfg, client: client, up: up, start: now, release: func() {},
		enc: newChunkEncoder(info.SessionID, info.ConversationID, cfg), m: newMeter(cfg),
		pace:   newPacer(h.o.Pace, h.o.PaceBurst),
		ending: make(chan struct{}), closed: make(chan struct{}), upDone: make(chan struct{})}
	s.lastIn.Store(now.UnixNano())
	f := cfg.audioFormat()
	s.format.Store(&f)
	if h.o.Dialect != nil {
		// A dialect's client is sent audio in events as it comes: not paced.
		s.tr = h.o.Dialect.Open(DialectSession{SessionID: info.SessionID, Audio: cfg, Now: time.Now})
	} else if h.o.TTSPacing {
		s.tts = newTTSQueue(h.o.TTSLead, h.o.TTSQueue)
	}
	s.cur.Store(&client)
	s.wmu = make(writeLock, 1)
	return s
}

// run relays until the session has ended: the algorithm service in its own goroutine, the
// client here. Once both readers and the ending are finished it lets go of everything the
// session held — registry entry, concurrency slot — and reports the session's end.
func (s *session) run() {
	go s.fromUpstream()
	s.h.timers.add(s)
	for {
		s.fromClient()
		if !s.awaitClient() { // a client that vanished may come back (resume.go)
			break
		}
	}
	s.finish()
}

// finish lets go of what the session held, once both readers have returned, and reports its
// end. It is a function of its own, never inlined, so that its locals (the stats, the usage
// record, the log line's attributes) are not part of run's frame: that frame is on the stack
// for the whole session, under fromClient, and a bigger one keeps an idle session's stack at
// twice the size.
//
//go:noinline
func (s *session) finish() {
	<-s.upDone
	<-s.closed
	if s.tts != nil {
		s.closeTTS()
		s.ttsWG.Wait()
	}
	s.h.timers.remove(s)
	// Both sockets are closed; this releases the library's side of each at once.
	s.clientNow().ws.CloseNow()
	s.up.ws.CloseNow()
	s.release()
	handedOver := s.rs != nil && s.rs.sealed.Load()
	if s.rs != nil {
		s.h.o.Registry.forget(s, handedOver)
	}
	st := s.stats()
	if handedOver {
		// The session goes on elsewhere, with its counters, its quota account and its usage
		// record: none of them ends here.
		s.h.o.Registry.handedOver(s)
		s.h.o.Log.Info("voice session handed over", "session_id", s.info.SessionID, "user_id", s.info.UserID)
		if s.h.o.OnEnd != nil {
			s.h.o.OnEnd(st)
		}
		return
	}
	// Settled before the registry lets go, so that shutdown, which waits for the registry to
	// empty, waits for this bounded charge too.
	s.settle()
	st = s.stats()
	s.h.o.Registry.remove(s, usageOf(s.live(), time.Now(), int(st.CloseCode), st.CloseReason))

	s.h.o.Log.Info("voice session ended", "session_id", s.info.SessionID, "user_id", s.info.UserID,
		"duration", st.Duration, "packets_in", st.PacketsIn, "bytes_in", st.BytesIn,
		"packets_out", st.PacketsOut, "bytes_out", st.BytesOut, "asr_partial", st.ASRPartial,
		"asr_final", st.ASRFinal, "tts_chunks", st.TTSChunks, "errors", st.Errors,
		"first_asr", st.FirstASR, "close_code", int(st.CloseCode), "close_reason", st.CloseReason)
	if s.h.o.OnEnd != nil {
		s.h.o.OnEnd(st)
	}
}

// stats reads the counters; the close code and reason are final once the session ended.
func (s *session) stats() Stats {
	st := Stats{
		SessionID: s.info.SessionID, Duration: time.Since(s.start),
		PacketsIn: s.n.packetsIn.Load(), BytesIn: s.n.bytesIn.Load(), AudioBytesIn: s.n.audioIn.Load(),
		PacketsOut: s.n.packetsOut.Load(), BytesOut: s.n.bytesOut.Load(), AudioBytesOut: s.n.audioOut.Load(),
		ASRPartial: s.n.asrPartial.Load(), ASRFinal: s.n.asrFinal.Load(), LLMChunks: s.n.llmChunks.Load(),
		TTSChunks: s.n.ttsChunks.Load(), Errors: s.n.errors.Load(),
		FirstASR: time.Duration(s.n.firstASR.Load()),
		TenantID: s.info.TenantID, AudioIn: time.Duration(s.m.in.Load()),
		AudioOut: time.Duration(s.m.out.Load()), Charged: time.Duration(s.gov.held.Load()),
		BargeIns: s.m.bargeIns.Load(), AudioFormat: s.format.Load().String(), InvalidAudio: s.n.invalidAudio.Load(),
	}
	st.ResponseLatency, st.ASRLatency = s.m.latencies()
	if s.tts != nil {
		st.TTSFlushes, st.TTSDropped, st.TTSQueuePeak = s.tts.stats()
	}
	if s.ended.Load() {
		st.CloseCode, st.CloseReason = s.outcome.code, s.outcome.reason
	}
	return st
}

func (s *session) sendInit() {
	if s.tr != nil {
		// Under wmu, as session_initialized below: the greeting comes before anything else. A
		// dialect's session is not resumable; its messages are numbered all the same (down).
		s.wmu.Lock()
		c := s.client
		var err error
		for _, m := range s.tr.Greeting() {
			if err = c.ws.Write(unbounded(), websocket.MessageText, m); err != nil {
				break
			}
		}
		s.wmu.Unlock()
		if err != nil {
			s.clientWriteFailed(c)
		}
		return
	}
	now := time.Now()
	msg, _ := json.Marshal(sessionInitialized{
		Type: TypeSessionInitialized, SessionID: s.info.SessionID,
		Config: AudioConfig{SampleRate: s.cfg.SampleRate, Channels: s.cfg.Channels, Format: s.cfg.Format,
			Language: s.cfg.Language, VADEnabled: true, NoiseSuppression: true, EchoCancellation: s.cfg.EchoCancellation},
		ServerTime: now.Unix(), ServerTimeMS: now.UnixMilli(),
		Capabilities: s.h.capabilities(),
		Resume:       s.resumeInfo(),
	})
	// Under wmu: session_initialized comes before any numbered message (a broadcast's notice).
	s.wmu.Lock()
	c := s.client
	err := c.ws.Write(unbounded(), websocket.MessageText, msg)
	s.wmu.Unlock()
	if err != nil {
		s.clientWriteFailed(c)
	}
}

// sendError writes an error message to the client, in the client's dialect, through the
// numbered downlink (down). Any goroutine may call it: down serialises writes, and the socket's
// deadline bounds this one.
func (s *session) sendError(code, msg string) error {
	s.n.errors.Add(1)
	m := encodeError(s.info.SessionID, code, msg)
	if s.tr != nil {
		m = s.tr.Error(code, msg)
	}
	_, err := s.down(websocket.MessageText, m)
	return err
}

// end finishes the session, once, without blocking: whoever calls it (a relay, the timers,
// the registry) goes on at once, while a goroutine of its own carries the ending out.
func (s *session) end(e ending) {
	s.endOnce.Do(func() {
		if e.upCode == 0 {
			e.upCode = websocket.StatusNormalClosure
		}
		s.outcome = e
		s.ended.Store(true)
		close(s.ending)
		go s.close(e)
	})
}

// close tells each side that can still hear why the session ends, drops the others, and after
// closeWait drops whatever has not finished its close handshake.
func (s *session) close(e ending) {
	defer close(s.closed)
	force := time.AfterFunc(closeWait, s.dropAll)
	defer force.Stop()
	var wg sync.WaitGroup
	client := s.clientNow()
	if e.dropClient || s.isAway() {
		client.conn.drop()
	} else {
		wg.Go(func() {
			if e.errCode != "" {
				_ = s.sendError(e.errCode, e.reason)
			}
			// Close waits for the client's answer, which the client's reader reads.
			_ = client.ws.Close(e.code, clip(e.reason))
		})
	}
	if e.dropUp {
		s.up.conn.drop()
	} else {
		wg.Go(func() { _ = s.up.ws.Close(e.upCode, "session ended") })
	}
	wg.Wait()
}

func (s *session) dropAll() {
	s.clientNow().conn.drop()
	s.up.conn.drop()
}

// kill drops both sockets at once (shutdown overtime).
func (s *session) kill() {
	s.end(ending{code: websocket.StatusGoingAway, reason: "killed", dropClient: true, dropUp: true})
	s.dropAll()
}

// clientGone ends the session for a client c that vanished: nothing more is said to it. A
// resumable session waits for the client to come back instead (resume.go).
func (s *session) clientGone(c side, reason string) {
	if s.detach(c, reason) {
		return
	}
	s.end(ending{code: websocket.StatusGoingAway, reason: reason, dropClient: true})
}

// upstreamGone ends the session for an algorithm service that vanished: the client is told.
func (s *session) upstreamGone(reason string) {
	s.end(ending{code: websocket.StatusInternalError, errCode: CodeAlgoService, reason: reason, dropUp: true})
}

// clientWriteFailed handles a write the client did not take: in time (it is not reading: a
// slow consumer, which cannot be told so), or at all (gone).
func (s *session) clientWriteFailed(c side) {
	if s.ended.Load() {
		return // the ending closed it
	}
	if c.conn.slow() {
		s.end(ending{code: websocket.StatusTryAgainLater, reason: "the client is not reading fast enough",
			dropClient: true})
		return
	}
	s.clientGone(c, "client gone")
}

// upWriteFailed is clientWriteFailed for the algorithm service; the client is told.
func (s *session) upWriteFailed() {
	if s.ended.Load() {
		return
	}
	if s.up.conn.slow() {
		s.end(ending{code: websocket.StatusTryAgainLater, errCode: CodeSlowConsumer,
			reason: "the algorithm service is not keeping up", dropUp: true})
		return
	}
	s.upstreamGone("the algorithm service connection failed")
}
