package voice

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strconv"
	"time"
)

// Subprotocol is the voice protocol's WebSocket subprotocol.
const Subprotocol = "voice-protocol-v2"

// Message types the gateway itself sends to the client.
const (
	TypeSessionInitialized = "session_initialized"
	TypeError              = "error"
)

// Error codes of error messages to the client.
const (
	CodeInvalidMessage = "INVALID_MESSAGE"
	CodeUnknownType    = "UNKNOWN_MESSAGE_TYPE"
	CodeAlgoService    = "ALGO_SERVICE_ERROR"
	CodeSlowConsumer   = "SLOW_CONSUMER"
	CodeTokenInvalid   = "TOKEN_INVALID"
	CodeTokenRevoked   = "TOKEN_REVOKED"
	CodeShutdown       = "SERVER_SHUTDOWN"
	CodeIdle           = "IDLE_TIMEOUT"
)

// controlTypes are the client control messages the gateway forwards.
var controlTypes = map[string]bool{
	"start": true, "stop": true, "cancel": true, "config": true, "ping": true,
	"interrupt": true, "text": true, "end": true,
}

// AudioConfig is the session's audio format, sent in session_initialized and with every chunk.
type AudioConfig struct {
	SampleRate       int    `json:"sample_rate"`
	Channels         int    `json:"channels"`
	Format           string `json:"format"`
	Language         string `json:"language"`
	VADEnabled       bool   `json:"vad_enabled"`
	NoiseSuppression bool   `json:"noise_suppression"`
	EchoCancellation bool   `json:"echo_cancellation"`
}

// The wire follows the origin document where it defines a field: server_time in Unix seconds
// (server_time_ms beside it), its five capability keys (more beside them), an "error" field in
// error messages ("message" beside it, the same text), and every other timestamp but
// audio_chunk's (milliseconds, as the origin's) in seconds with timestamp_ms beside it.
type sessionInitialized struct {
	Type         string          `json:"type"`
	SessionID    string          `json:"session_id"`
	Config       AudioConfig     `json:"config"`
	ServerTime   int64           `json:"server_time"`
	ServerTimeMS int64           `json:"server_time_ms"`
	Capabilities map[string]bool `json:"capabilities"`
	Resume       *resumeInfo     `json:"resume,omitempty"` // resume.go; none when resuming is off
}

type errorMessage struct {
	Type        string `json:"type"`
	Error       string `json:"error"`
	Code        string `json:"code"`
	Message     string `json:"message"`
	SessionID   string `json:"session_id"`
	Timestamp   int64  `json:"timestamp"`
	TimestampMS int64  `json:"timestamp_ms"`
}

// encodeResumeError is an error message that tells the client to resume ("resume": true).
func encodeResumeError(sessionID, code, msg string) []byte {
	now := time.Now()
	b, _ := json.Marshal(struct {
		errorMessage
		Resume bool `json:"resume"`
	}{errorMessage{Type: TypeError, Error: msg, Code: code, Message: msg, SessionID: sessionID,
		Timestamp: now.Unix(), TimestampMS: now.UnixMilli()}, true})
	return b
}

func encodeError(sessionID, code, msg string) []byte {
	now := time.Now()
	b, _ := json.Marshal(errorMessage{Type: TypeError, Error: msg, Code: code, Message: msg, SessionID: sessionID,
		Timestamp: now.Unix(), TimestampMS: now.UnixMilli()})
	return b
}

// capabilities are session_initialized's: the origin's five keys, then voicegate's.
func (h *Handler) capabilities() map[string]bool {
	return map[string]bool{
		"real_time_asr": true, "voice_activity": true, "noise_suppression": true, "stream_tts": true,
		"cancel_request": true,
		"asr":            true, "tts": true, "llm_streaming": true, "retrieval": true,
		"raw_audio": h.o.RawAudio, "control": true, "tts_pacing": h.o.TTSPacing, "barge_in": true,
		"audio_formats": true,
	}
}

// chunkEncoder turns raw client audio into audio_chunk messages without allocating: the parts
// that never change within a session are encoded once.
type chunkEncoder struct {
	prefix []byte // `{"type":"audio_chunk","session_id":…,"conversation_id":…,"audio_chunk":"`
	suffix []byte // `,"format":…,"sample_rate":…,"channels":…}`
}

func newChunkEncoder(sessionID, conversationID string, cfg AudioConfig) *chunkEncoder {
	q := func(s string) []byte { b, _ := json.Marshal(s); return b }
	var p bytes.Buffer
	p.WriteString(`{"type":"audio_chunk","session_id":`)
	p.Write(q(sessionID))
	p.WriteString(`,"conversation_id":`)
	p.Write(q(conversationID))
	p.WriteString(`,"audio_chunk":"`)
	var s bytes.Buffer
	s.WriteString(`,"format":`)
	s.Write(q(cfg.Format))
	s.WriteString(`,"sample_rate":`)
	s.WriteString(strconv.Itoa(cfg.SampleRate))
	s.WriteString(`,"channels":`)
	s.WriteString(strconv.Itoa(cfg.Channels))
	s.WriteString("}")
	return &chunkEncoder{prefix: p.Bytes(), suffix: s.Bytes()}
}

// appendChunk appends the audio_chunk message for audio to dst.
func (e *chunkEncoder) appendChunk(dst, audio []byte, seq int64, now time.Time) []byte {
	dst = append(dst, e.prefix...)
	dst = base64.StdEncoding.AppendEncode(dst, audio)
	dst = append(dst, `","timestamp":`...)
	dst = strconv.AppendInt(dst, now.UnixMilli(), 10)
	dst = append(dst, `,"sequence":`...)
	dst = strconv.AppendInt(dst, seq, 10)
	dst = append(dst, e.suffix...)
	return dst
}

// control validates a client control message and returns it with session_id set, or an error
// code and message for the client.
func control(msg []byte, sessionID string) (out []byte, typ, code, reason string) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(msg, &m); err != nil || m == nil {
		return nil, "", CodeInvalidMessage, "control messages are JSON objects"
	}
	if err := json.Unmarshal(m["type"], &typ); err != nil || typ == "" {
		return nil, "", CodeInvalidMessage, `a control message needs a string "type"`
	}
	if !controlTypes[typ] {
		return nil, typ, CodeUnknownType, "unknown control message type"
	}
	id, _ := json.Marshal(sessionID)
	m["session_id"] = id
	out, _ = json.Marshal(m)
	return out, typ, "", ""
}

// upstreamType peeks at the "type" of an algorithm-service message for the session's counters,
// without decoding or copying the message. It may be fooled by a "type" key nested before the
// top-level one; the counters are statistics, and the message is relayed unchanged either way.
func upstreamType(msg []byte) []byte {
	i := bytes.Index(msg, []byte(`"type"`))
	if i < 0 {
		return nil
	}
	rest := bytes.TrimLeft(msg[i+len(`"type"`):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return nil
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	if len(rest) < 2 || rest[0] != '"' {
		return nil
	}
	end := bytes.IndexByte(rest[1:], '"')
	if end < 0 || end > 64 {
		return nil
	}
	return rest[1 : 1+end]
}
