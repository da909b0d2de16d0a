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
			d = s.m.clientFrame(len(*b), now.UnixNano())
			if !s.spend(d) {
				// The quota is used up: the session is ending, and this frame goes no further.
				// Reading on takes the client's answer to the close.
				s.h.putBuf(b)
				continue
			}
			s.m.in.Add(int64(d))
			s.n.audioIn.Add(int64(len(*b)))
			s.n.firstAudio.CompareAndSwap(0, now.UnixNano())
			s.clientAudio(now.UnixNano())
			out := b
			if !s.h.o.RawAudio {
				out = s.h.getBuf()
				*out = s.enc.appendChunk(*out, *b, s.upSeq.Add(1), now)
				s.h.putBuf(b)
				typ = websocket.MessageText
			}
			err = s.up.ws.Write(unbounded(), typ, *out)
			s.h.putBuf(out)
		case websocket.MessageText:
			if !utf8.Valid(*b) {
				s.h.putBuf(b)
				s.end(ending{code: websocket.StatusInvalidFramePayloadData, errCode: CodeInvalidMessage,
					reason: "text messages must be UTF-8"})
				return
			}
			out, ctype, code, reason := control(*b, s.info.SessionID)
			s.h.putBuf(b)
			if code != "" {
				if s.sendError(code, reason) != nil {
					s.clientWriteFailed(c)
					return
				}
				continue
			}
			s.clientControl(ctype, now.UnixNano())
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
		if !s.count(typ, *b) {
			// TTS audio the quota has no room for: the session is ending.
			s.h.putBuf(b)
			continue
		}
		failed, err := s.down(typ, *b)
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

// upReadFailed handles the end of the algorithm service's messages.
func (s *session) upReadFailed(err error) {
	var ce websocket.CloseError
	switch {
	case s.ended.Load():
	case errors.As(err, &ce) && ce.Code == CloseMoved && s.rs != nil:
		// The session moved to another instance: the log gets what this upstream sent, and its
		// seal; the session then ends here without a usage record (resume.go).
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
		d := s.m.ttsFrame(len(msg))
		if !s.spend(d) {
			return false
		}
		s.m.out.Add(int64(d))
		s.n.packetsOut.Add(1)
		s.n.bytesOut.Add(int64(len(msg)))
		s.n.audioOut.Add(int64(len(msg)))
		s.n.ttsChunks.Add(1)
		s.ttsAudio()
		return true
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
		s.ttsComplete()
	case "error":
		s.n.errors.Add(1)
	}
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
