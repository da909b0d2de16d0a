package voice

import (
	"errors"
	"io"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// readMsg reads one message from ws into a pooled buffer, which the caller must put back. The
// buffer is taken only once a message has begun, so a silent side holds none.
func (s *session) readMsg(ws *websocket.Conn) (websocket.MessageType, *[]byte, error) {
	typ, rd, err := ws.Reader(unbounded())
	if err != nil {
		return 0, nil, err
	}
	b := s.h.getBuf()
	buf := *b
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := rd.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			*b = buf
			s.h.putBuf(b)
			return 0, nil, err
		}
	}
	*b = buf
	return typ, b, nil
}

// fromClient relays the client's messages to the algorithm service, each written by this
// goroutine as soon as it is read: audio as audio_chunk messages (or raw), control messages
// validated. It returns when the client side is finished.
func (s *session) fromClient() {
	c := s.clientNow() // a resume replaces it; this reader stays with its own
	for {
		typ, b, err := s.readMsg(c.ws)
		if err != nil {
			s.clientReadFailed(c, err)
			return
		}
		now := time.Now()
		s.lastIn.Store(now.UnixNano())
		s.n.packetsIn.Add(1)
		s.n.bytesIn.Add(int64(len(*b)))
		var d time.Duration // of audio, relayed
		switch typ {
		case websocket.MessageBinary:
			if s.tr != nil {
				s.h.putBuf(b)
				if s.sendError(CodeInvalidMessage, "this protocol sends audio in JSON events, not binary messages") != nil {
					s.clientWriteFailed(c)
					return
				}
				continue
			}
			var stop bool
			if d, err, stop = s.relayAudio(c, b, now); stop {
				return
			}
			if d < 0 {
				continue
			}
		case websocket.MessageText:
			if !utf8.Valid(*b) {
				s.h.putBuf(b)
				s.end(ending{code: websocket.StatusInvalidFramePayloadData, errCode: CodeInvalidMessage,
					reason: "text messages must be UTF-8"})
				return
			}
			if s.tr != nil {
				var stop bool
				if d, stop = s.dialectMessage(c, b, now); stop {
					return
				}
				break
			}
			out, ctype, code, reason := control(*b, s.info.SessionID)
			s.h.putBuf(b)
			if code == "" && ctype == "config" {
				out, code, reason = s.configure(out)
			}
			if code != "" {
				if s.sendError(code, reason) != nil {
					s.clientWriteFailed(c)
					return
				}
				continue
			}
			s.clientControl(ctype, now.UnixNano())
			if ctype == "interrupt" && s.tts != nil {
				out = withPlayed(out, s.info.SessionID, s.flushTTS(false), "")
			}
			err = s.up.ws.Write(unbounded(), websocket.MessageText, out)
		}
		if err != nil {
			s.upWriteFailed()
			return
		}
		if wait := s.pace.wait(d, now.UnixNano()); wait > 0 {
			s.paced(wait)
		}
	}
}

// relayAudio relays one frame of client audio (b, which it puts back) from client c to the
// algorithm service: validated for the agreed format, charged, metered, and written as an
// audio_chunk message (or raw). d is the audio relayed, negative when the frame went no further
// (invalid, or no quota left); err is the upstream write's; stop means the client's reader must
// return.
func (s *session) relayAudio(c side, b *[]byte, now time.Time) (d time.Duration, err error, stop bool) {
	d, ferr := s.m.clientFrame(*b)
	if ferr != nil {
		s.h.putBuf(b)
		return -1, nil, !s.invalidAudio(c, ferr)
	}
	s.invalidRun = 0
	if !s.spend(d) {
		// The quota is used up: the session is ending, and this frame goes no further.
		// Reading on takes the client's answer to the close.
		s.h.putBuf(b)
		return -1, nil, false
	}
	s.m.in.Add(int64(d))
	s.n.audioIn.Add(int64(len(*b)))
	s.n.firstAudio.CompareAndSwap(0, now.UnixNano())
	s.clientAudio(now.UnixNano())
	out, typ := b, websocket.MessageBinary
	if !s.h.o.RawAudio {
		out = s.h.getBuf()
		*out = s.enc.appendChunk(*out, *b, s.upSeq.Add(1), now)
		s.h.putBuf(b)
		typ = websocket.MessageText
	}
	err = s.up.ws.Write(unbounded(), typ, *out)
	s.h.putBuf(out)
	return d, err, false
}

// clientReadFailed handles the end of the messages of client c.
func (s *session) clientReadFailed(c side, err error) {
	var ce websocket.CloseError
	switch {
	case s.clientNow().conn != c.conn || s.isAway():
		// A resume replaced this connection (resume.go): the session goes on with the new one.
	case s.ended.Load():
		// The session is ending already; this is the client's answer to our close, or its
		// socket being dropped.
	case errors.As(err, &ce):
		s.end(ending{code: ce.Code, reason: "client closed: " + ce.Reason})
	case errors.Is(err, websocket.ErrMessageTooBig):
		s.end(ending{code: websocket.StatusMessageTooBig, reason: "message too big"})
	case c.conn.slow():
		// The library writes pongs from the reader: one the client did not take ends here.
		s.clientWriteFailed(c)
	default:
		// Vanished without a close frame, or silent past its read deadline.
		s.clientGone(c, "client gone")
	}
}

// fromUpstream relays the algorithm service's messages to the client unchanged, each written by
// this goroutine as soon as it is read.
func (s *session) fromUpstream() {
	defer close(s.upDone)
	for {
		typ, b, err := s.readMsg(s.up.ws)
		if err != nil {
			s.upReadFailed(err)
			return
		}
		if s.tts != nil {
			queued, ok := s.paceUpstream(typ, b)
			if !ok {
				return
			}
			if queued {
				continue
			}
		}
		if !s.count(typ, *b) {
			// TTS audio the quota has no room for: the session is ending.
			s.h.putBuf(b)
			continue
		}
		var failed *side
		if s.tr != nil {
			failed, err = s.writeTranslated(typ, b)
		} else {
			failed, err = s.down(typ, *b)
		}
		s.h.putBuf(b)
		if err != nil {
			s.clientWriteFailed(*failed)
			if s.rs == nil || s.ended.Load() {
				return
			}
			// Away: the upstream goes on, into the ring and the log, until the client resumes.
		}
	}
}

// paceUpstream handles a message from the service when TTS is paced (tts.go): queued (b
// taken) or to be relayed at once as without pacing; ok false when fromUpstream must return.
func (s *session) paceUpstream(typ websocket.MessageType, b *[]byte) (queued, ok bool) {
	if typ == websocket.MessageBinary {
		d, _ := s.m.ttsFrame(*b)
		return true, s.queueTTS(ttsItem{typ: typ, b: b, d: d, audio: true})
	}
	switch t := string(upstreamType(*b)); t {
	case "tts_audio", "tts_complete":
		s.count(typ, *b)
		if t == "tts_complete" {
			s.tts.answerEnded()
		}
		return true, s.queueTTS(ttsItem{typ: typ, b: b, audio: t == "tts_audio", end: t == "tts_complete"})
	case "speech_started", "tts_cancelled":
		return false, s.serviceInterrupt(t)
	}
	return false, true
}

// upReadFailed handles the end of the algorithm service's messages.
func (s *session) upReadFailed(err error) {
	var ce websocket.CloseError
	switch {
	case s.ended.Load():
	case errors.As(err, &ce) && ce.Code == CloseMoved && s.rs != nil:
		// The session moved to another instance: the log gets what this upstream sent, and its
		// seal; the session then ends here without a usage record (resume.go). TTS the pacer
		// still holds is released into the log first: the new instance replays it.
		if s.tts != nil {
			s.releaseAllTTS()
		}
		if s.sealLog() {
			s.end(ending{code: CloseMoved, reason: "moved", dropClient: s.isAway(), upCode: websocket.StatusNormalClosure})
			return
		}
		s.end(ending{code: websocket.StatusInternalError, errCode: CodeResumeFailed,
			reason: "the session could not be handed over"})
	case errors.As(err, &ce):
		s.end(upstreamClosed(ce))
	case s.up.conn.slow():
		s.upWriteFailed() // a pong it did not take
	default:
		s.upstreamGone("the algorithm service went away")
	}
}

// count updates the per-session counters for a message from the algorithm service, and
// charges TTS audio to the session's quota: false when there is no room for it, and the message
// must not be relayed.
func (s *session) count(typ websocket.MessageType, msg []byte) bool {
	if typ == websocket.MessageBinary {
		// TTS audio that is not valid for its format is the service's to get right: it is
		// relayed as it is, and plays for no time here.
		d, _ := s.m.ttsFrame(msg)
		return s.releaseTTS(len(msg), d)
	}
	s.n.packetsOut.Add(1)
	s.n.bytesOut.Add(int64(len(msg)))
	switch string(upstreamType(msg)) {
	case "asr_partial":
		s.n.asrPartial.Add(1)
		s.firstASR()
		s.asrPartial(time.Now().UnixNano())
	case "asr_final":
		s.n.asrFinal.Add(1)
		s.firstASR()
		s.endUtterance(time.Now().UnixNano())
	case "llm_response_chunk":
		s.n.llmChunks.Add(1)
	case "tts_audio":
		s.n.ttsChunks.Add(1)
		s.ttsAudio()
	case "tts_complete":
		if s.tts == nil {
			s.ttsComplete() // paced: once it is released (tts.go)
		}
	case "tts_format":
		s.declareTTS(msg)
	case "error":
		s.n.errors.Add(1)
	}
	return true
}

// releaseTTS charges and counts a TTS frame of n bytes and d on its way to the client: false
// when there is no room for it in the quota, and it must not be relayed.
func (s *session) releaseTTS(n int, d time.Duration) bool {
	if !s.spend(d) {
		return false
	}
	s.m.out.Add(int64(d))
	s.n.packetsOut.Add(1)
	s.n.bytesOut.Add(int64(n))
	s.n.audioOut.Add(int64(n))
	s.n.ttsChunks.Add(1)
	s.ttsAudio()
	return true
}

func (s *session) firstASR() {
	if s.n.firstASR.Load() != 0 {
		return
	}
	if fa := s.n.firstAudio.Load(); fa != 0 {
		s.n.firstASR.CompareAndSwap(0, max(time.Now().UnixNano()-fa, 1))
	}
}
