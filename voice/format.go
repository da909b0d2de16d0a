package voice

import (
	"encoding/json"
	"net/url"

	"github.com/coder/websocket"

	"voicegate/proxy"
	"voicegate/voice/audio"
)

// The session's audio format (package audio has the formats and their meters).
//
// A client agrees its format on the upgrade, with the query parameters format, sample_rate
// and channels, or in a config message before its first audio frame; what it leaves out is
// Options.Audio's (VOICE_AUDIO_FORMAT), or the codec's default once it names another codec.
// An upgrade that asks for anything else is refused with 400 VALIDATION_ERROR naming the
// parameter; a config message that does, or that changes the format once audio has flowed,
// is answered with an error VALIDATION_ERROR and goes no further. session_initialized.config
// says what was agreed on the upgrade, every audio_chunk carries the format it is in, and the
// algorithm service is dialled with it (format, sample_rate, channels in the query).
//
// Invalid audio: a binary frame that is not valid for the agreed format (package audio says
// which are) is answered with an error INVALID_AUDIO, and dropped: not relayed, not charged,
// not paced, counted (Stats.InvalidAudio, the usage record). A session ends (1007, with an
// error INVALID_AUDIO) at maxInvalidRun invalid frames in a row or maxInvalidFrames in all:
// a client that sends that much it cannot mean is broken, or probing the parsers, and each
// frame costs an error message.
//
// TTS: the algorithm service declares the format of its TTS binary frames once, with
// {"type":"tts_format","format":…,"sample_rate":…,"channels":…}, relayed to the client; until
// then they are taken to be in the agreed format. A declaration that is not a supported format
// is relayed but changes nothing, and is counted as an error.

const (
	maxInvalidRun    = 16
	maxInvalidFrames = 256
)

// Error codes of the audio format.
const (
	CodeValidation   = "VALIDATION_ERROR"
	CodeInvalidAudio = "INVALID_AUDIO"
)

// audioFormat is the format part of c.
func (c AudioConfig) audioFormat() audio.Format {
	return audio.Format{Codec: c.Format, SampleRate: c.SampleRate, Channels: c.Channels}
}

func (c AudioConfig) withFormat(f audio.Format) AudioConfig {
	c.Format, c.SampleRate, c.Channels = f.Codec, f.SampleRate, f.Channels
	return c
}

// negotiate applies the upgrade's format parameters to def.
func negotiate(q url.Values, def AudioConfig) (AudioConfig, *proxy.FieldError) {
	f, err := audio.Parse(q.Get("format"), q.Get("sample_rate"), q.Get("channels"), def.audioFormat())
	if err != nil {
		return def, &proxy.FieldError{Field: err.Field, Reason: err.Reason}
	}
	return def.withFormat(f), nil
}

// formatFields are the format fields of a config or tts_format message.
type formatFields struct {
	Format     *string `json:"format"`
	SampleRate *int    `json:"sample_rate"`
	Channels   *int    `json:"channels"`
}

func (ff formatFields) given() bool {
	return ff.Format != nil || ff.SampleRate != nil || ff.Channels != nil
}

func (ff formatFields) over(def audio.Format) (audio.Format, *audio.FieldError) {
	codec, rate, ch := "", 0, 0
	if ff.Format != nil {
		codec = *ff.Format
		if codec == "" {
			return audio.Format{}, &audio.FieldError{Field: "format", Reason: "must not be empty"}
		}
	}
	if ff.SampleRate != nil {
		if rate = *ff.SampleRate; rate == 0 {
			return audio.Format{}, &audio.FieldError{Field: "sample_rate", Reason: "must not be 0"}
		}
	}
	if ff.Channels != nil {
		if ch = *ff.Channels; ch == 0 {
			return audio.Format{}, &audio.FieldError{Field: "channels", Reason: "must not be 0"}
		}
	}
	return audio.Merge(codec, rate, ch, def)
}

// configure applies a client's config message (fromClient only), already validated and with
// its session_id set, and returns what to forward: the message with the agreed format's fields,
// or an error code and reason for the client.
func (s *session) configure(msg []byte) (out []byte, code, reason string) {
	var ff formatFields
	if err := json.Unmarshal(msg, &ff); err != nil {
		return nil, CodeValidation, "config: format must be a string, sample_rate and channels integers"
	}
	if !ff.given() {
		return msg, "", ""
	}
	cur := s.cfg.audioFormat()
	f, ferr := ff.over(cur)
	if ferr != nil {
		return nil, CodeValidation, "config: " + ferr.Field + ": " + ferr.Reason
	}
	// Audio relayed before a resume counts (s.m.in, carried over): the new meter has seen none.
	if f != cur && (s.m.inFrames.Total() > 0 || s.n.invalidAudio.Load() > 0 || s.m.in.Load() > 0) {
		return nil, CodeValidation, "config: the audio format cannot change once audio has been sent"
	}
	if f != cur {
		s.cfg = s.cfg.withFormat(f)
		s.enc = newChunkEncoder(s.info.SessionID, s.info.ConversationID, s.cfg)
		s.m.inFrames = audio.NewMeter(f)
		if !s.m.declared.Load() {
			s.m.tts.Store(&f) // a declaration racing this one wins: it is checked again below
			if s.m.declared.Load() {
				s.m.tts.Store(s.m.declaredFmt.Load())
			}
		}
		s.format.Store(&f)
	}
	var m map[string]json.RawMessage
	_ = json.Unmarshal(msg, &m) // control made it
	m["format"], _ = json.Marshal(f.Codec)
	m["sample_rate"], _ = json.Marshal(f.SampleRate)
	m["channels"], _ = json.Marshal(f.Channels)
	out, _ = json.Marshal(m)
	return out, "", ""
}

// declareTTS applies the algorithm service's tts_format message (fromUpstream only).
func (s *session) declareTTS(msg []byte) {
	var ff formatFields
	if json.Unmarshal(msg, &ff) != nil {
		s.n.errors.Add(1)
		return
	}
	f, err := ff.over(*s.m.tts.Load())
	if err != nil {
		s.n.errors.Add(1)
		s.h.o.Log.Warn("the algorithm service declared a TTS format that is not supported",
			"session_id", s.info.SessionID, "field", err.Field, "reason", err.Reason)
		return
	}
	s.m.declaredFmt.Store(&f)
	s.m.declared.Store(true)
	s.m.tts.Store(&f)
}

// invalidAudio handles a frame from client c that is not valid for the agreed format: false
// when the session must stop reading the client (the error could not be written, or the bound
// was hit).
func (s *session) invalidAudio(c side, err error) bool {
	s.n.invalidAudio.Add(1)
	s.invalidRun++
	reason := "not valid " + s.cfg.audioFormat().String() + " audio: " + err.Error()
	if s.invalidRun >= maxInvalidRun || s.n.invalidAudio.Load() >= maxInvalidFrames {
		s.end(ending{code: websocket.StatusInvalidFramePayloadData, errCode: CodeInvalidAudio,
			reason: "too many invalid audio frames"})
		return true // reading on takes the client's answer to the close
	}
	if s.sendError(CodeInvalidAudio, reason) != nil {
		s.clientWriteFailed(c)
		return false
	}
	return true
}
