package voice

import (
	"time"

	"github.com/coder/websocket"
)

// A Dialect lets clients written for another voice protocol (OpenAI's Realtime API, package
// voice/realtime) use the voice bridge: the same dial, session, registry, governance (quotas
// charged as audio flows, pace, maximum length), revocation, drain and close codes, with the
// client's messages translated to the bridge's and the algorithm service's back. The bridge
// keeps what it does with audio (metering, charging, pacing, the audio_chunk messages
// upstream); the dialect only says what the client's messages mean and how the bridge's
// messages are said to it.
//
// A session of a dialect has one Translator. Its Client method is called by the session's
// client reader only, Upstream by its algorithm-service reader only, Error by whoever tells
// the client of an error (a reader, the ending, the clock): a Translator must let Error run
// beside the other two, and Client beside Upstream. None of them may block.
type Dialect interface {
	// Subprotocol is the WebSocket subprotocol the dialect's clients offer and are answered
	// with; a token offered as a subprotocol beside it is never echoed (auth.SubprotocolTokens).
	Subprotocol() string
	// Audio is the format a session starts with, before the client names one.
	Audio(def AudioConfig) AudioConfig
	// Open starts the translation of one session.
	Open(s DialectSession) Translator
}

// DialectSession is what a Translator knows of its session.
type DialectSession struct {
	SessionID string
	Audio     AudioConfig
	Now       func() time.Time
}

// Relayed is what a session has relayed so far, for a Translator's reports (OpenAI's
// response.done carries it): audio seconds each way, as the quotas are charged.
type Relayed struct {
	AudioIn, AudioOut time.Duration
}

// Translator translates one session's messages.
type Translator interface {
	// Greeting is what the client is sent once the session runs, instead of
	// session_initialized.
	Greeting() [][]byte
	// Client translates one text message from the client. Binary messages are the dialect's
	// to refuse (ClientAction.Error).
	Client(typ websocket.MessageType, msg []byte, u Relayed) ClientAction
	// Upstream translates one message from the algorithm service, after the bridge has counted
	// and charged it: what the client is sent (nothing, or several messages).
	Upstream(typ websocket.MessageType, msg []byte, u Relayed) [][]byte
	// Error is the error message for code and message, as the client reads errors.
	Error(code, message string) []byte
}

// ClientAction is what the bridge does with one client message, in this order: audio relayed
// as a binary frame of the agreed format would be (metered, charged, paced), control messages
// of the voice protocol validated and forwarded as a client's would be (a config message
// changes the agreed format), then the replies written to the client. An Error is sent to the
// client instead of all of it.
type ClientAction struct {
	Audio   []byte
	Control [][]byte
	Reply   [][]byte
	// ErrorCode and ErrorMessage, when set, are an error for the client: the message goes no
	// further, the session goes on.
	ErrorCode, ErrorMessage string
	// Accepted, if set, is called once the bridge has accepted every control message (a
	// config may be refused: the format cannot change once audio has flowed), before the
	// replies go out: what the Translator keeps of the message takes effect only then.
	Accepted func()
}

// relayed is what s has relayed so far, for its Translator.
func (s *session) relayed() Relayed {
	return Relayed{AudioIn: time.Duration(s.m.in.Load()), AudioOut: time.Duration(s.m.out.Load())}
}

// dialectMessage carries out what the Translator makes of one text message (b, which it puts
// back) from client c, on c's reader: d is the audio relayed, stop means the reader must
// return.
func (s *session) dialectMessage(c side, b *[]byte, now time.Time) (d time.Duration, stop bool) {
	if int64(len(*b)) > s.h.o.ReadLimit {
		// The socket's limit is above the events' (dialectReadLimit): the session goes on.
		s.h.putBuf(b)
		return 0, s.sendError(CodeInvalidMessage, "the event is over the size limit") != nil && s.failClient(c)
	}
	act := s.tr.Client(websocket.MessageText, *b, s.relayed())
	s.h.putBuf(b)
	if act.ErrorCode != "" {
		return 0, s.sendError(act.ErrorCode, act.ErrorMessage) != nil && s.failClient(c)
	}
	if act.Audio != nil {
		ab := s.h.getBuf()
		*ab = append((*ab)[:0], act.Audio...)
		var err error
		if d, err, stop = s.relayAudio(c, ab, now); stop {
			return 0, true
		}
		if err != nil {
			s.upWriteFailed()
			return 0, true
		}
		d = max(d, 0)
	}
	// The controls are checked (and a config applied) first, the replies written next, and the
	// controls forwarded last: the client hears its acknowledgement (committed, item added)
	// before anything the algorithm service answers, and none for a message that failed.
	outs := make([][]byte, 0, len(act.Control))
	for _, ctl := range act.Control {
		out, ctype, code, reason := control(ctl, s.info.SessionID)
		if code == "" && ctype == "config" {
			out, code, reason = s.configure(out)
		}
		if code != "" {
			return d, s.sendError(code, reason) != nil && s.failClient(c)
		}
		s.clientControl(ctype, now.UnixNano())
		if ctype == "interrupt" && s.tts != nil {
			out = withPlayed(out, s.info.SessionID, s.flushTTS(false), "")
		}
		outs = append(outs, out)
	}
	if act.Accepted != nil {
		act.Accepted()
	}
	for _, r := range act.Reply {
		if failed, err := s.down(websocket.MessageText, r); err != nil {
			s.clientWriteFailed(*failed)
			return d, true
		}
	}
	for _, out := range outs {
		if err := s.up.ws.Write(unbounded(), websocket.MessageText, out); err != nil {
			s.upWriteFailed()
			return d, true
		}
	}
	return d, false
}

// failClient handles a write to client c that failed, for c's reader, which must return.
func (s *session) failClient(c side) bool {
	s.clientWriteFailed(c)
	return true
}

// writeTranslated writes what the Translator makes of one algorithm-service message to the
// client, on the algorithm service's reader, through the session's one downlink writer (down):
// it returns the client a write failed on, if any. A dialect's session is not resumable
// (Handler: its Options.ResumeWindow is taken as zero), so a failed write ends it.
func (s *session) writeTranslated(typ websocket.MessageType, b *[]byte) (failed *side, err error) {
	if s.ended.Load() {
		// The ending's error is the client's last event: a response.done after it would say
		// the answer completed when the session cut it short.
		return nil, nil
	}
	for _, m := range s.tr.Upstream(typ, *b, s.relayed()) {
		if failed, err = s.down(websocket.MessageText, m); err != nil {
			return failed, err
		}
	}
	return nil, nil
}

// dialectReadLimit is the client socket's read limit for a dialect's session: above the
// events' (Options.ReadLimit), so that an event over it is answered with an error and the
// session goes on, as OpenAI's protocol has it, rather than closed 1009.
func dialectReadLimit(eventLimit int64) int64 { return 4 * eventLimit }
