// Package realtime speaks OpenAI's Realtime API (GA event names, as the openai npm package
// types them; the older beta names accepted on input) to clients of GET /v1/realtime, as a
// voice.Dialect: the session underneath is the voice bridge's, with its dial, registry,
// quotas, revocation and close codes. It only translates: client events into audio and the
// voice protocol's control messages, and the algorithm service's messages into server events.
//
// A Translator is used by three goroutines: the session's client reader (Client), its
// algorithm-service reader (Upstream) and whoever reports an error (Error). The state the first
// two share (the session's settings, the response in progress) is under a mutex held for no
// I/O; Error touches nothing but an atomic counter.
package realtime

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
)

// Subprotocol is what OpenAI's clients offer beside their key.
const Subprotocol = "realtime"

// Dialect is OpenAI's Realtime API as a voice.Dialect.
type Dialect struct{}

// New returns the dialect.
func New() Dialect { return Dialect{} }

func (Dialect) Subprotocol() string { return Subprotocol }

// Audio: a session starts in OpenAI's default format, 16-bit PCM at 24 kHz, mono.
func (Dialect) Audio(def voice.AudioConfig) voice.AudioConfig {
	def.Format, def.SampleRate, def.Channels = "pcm", 24000, 1
	return def
}

// Open starts the translation of one session.
func (Dialect) Open(s voice.DialectSession) voice.Translator {
	now := s.Now
	if now == nil {
		now = time.Now
	}
	t := &translator{id: s.SessionID, now: now, input: s.Audio, output: s.Audio,
		modalities: []string{"audio"}}
	return t
}

// Error codes of the events the gateway itself refuses.
const (
	codeInvalidJSON   = "invalid_json"
	codeUnknownEvent  = "unknown_event"
	codeUnsupported   = "unsupported_parameter"
	codeInvalidValue  = "invalid_value"
	codeInvalidAudio  = "invalid_audio"
	codeCommitEmpty   = "input_audio_buffer_commit_empty"
	codeCancelInvalid = "response_cancel_not_active"
)

type translator struct {
	id  string
	now func() time.Time
	seq atomic.Int64 // event ids

	mu           sync.Mutex
	instructions string
	input        voice.AudioConfig // the agreed input format
	output       voice.AudioConfig // what output audio is said to be in
	modalities   []string
	items        int    // item ids made
	inputItem    string // the committed audio's item, which transcriptions belong to
	appended     int    // audio bytes appended since the last commit or clear
	partial      string // the last ASR partial, to send deltas of
	resp         *response
	lastIn       time.Duration // audio in when the last response ended
	// pending: input (a commit, a text item) has come that no response has begun to answer
	// yet. A response.create opens a response only then: the algorithm service answers input
	// by itself, and may have begun before the response.create arrived.
	pending bool
}

// response is the response in progress.
type response struct {
	id, item   string
	transcript strings.Builder
	audioOut   time.Duration // audio out when it began
	audio      bool          // any audio delta sent
}

func (t *translator) eventID() string { return "event_" + strconv.FormatInt(t.seq.Add(1), 10) }

func (t *translator) nextItem() string {
	t.items++
	return "item_" + t.id[:min(len(t.id), 12)] + "_" + strconv.Itoa(t.items)
}

// event encodes a server event: its type and event_id, then fields.
func (t *translator) event(typ string, fields map[string]any) []byte {
	if fields == nil {
		fields = map[string]any{}
	}
	fields["type"] = typ
	fields["event_id"] = t.eventID()
	b, _ := json.Marshal(fields)
	return b
}

// formatObject is a format as the GA protocol says it.
func formatObject(c voice.AudioConfig) map[string]any {
	switch c.Format {
	case "mulaw":
		return map[string]any{"type": "audio/pcmu"}
	case "alaw":
		return map[string]any{"type": "audio/pcma"}
	}
	return map[string]any{"type": "audio/pcm", "rate": c.SampleRate}
}

// settings are what session.update changes.
type settings struct {
	instructions  string
	input, output voice.AudioConfig
	modalities    []string
}

// sessionObject is the session as session.created and session.updated describe it, with v.
func (t *translator) sessionObject(v settings) map[string]any {
	return map[string]any{
		"type": "realtime", "object": "realtime.session", "id": t.id,
		"instructions": v.instructions, "output_modalities": v.modalities,
		"audio": map[string]any{
			"input":  map[string]any{"format": formatObject(v.input)},
			"output": map[string]any{"format": formatObject(v.output)},
		},
	}
}

// current are the settings in force. Caller holds mu.
func (t *translator) current() settings {
	return settings{instructions: t.instructions, input: t.input, output: t.output, modalities: t.modalities}
}

func (t *translator) Greeting() [][]byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return [][]byte{t.event("session.created", map[string]any{"session": t.sessionObject(t.current())})}
}

// Error is an error event. Codes of the voice bridge (TOKEN_REVOKED, QUOTA_EXCEEDED, …) are
// said in lower case, as OpenAI's are.
func (t *translator) Error(code, message string) []byte {
	return t.event("error", map[string]any{"error": map[string]any{
		"type": errorType(code), "code": strings.ToLower(code), "message": message, "param": nil, "event_id": nil,
	}})
}

func errorType(code string) string {
	switch c := strings.ToUpper(code); {
	case strings.HasPrefix(c, "TOKEN_"), c == "USER_DISABLED":
		return "authentication_error"
	case strings.Contains(c, "QUOTA"), strings.Contains(c, "RATE"):
		return "rate_limit_error"
	case c == "SERVER_SHUTDOWN", c == "ALGO_SERVICE_ERROR", c == "SLOW_CONSUMER", c == "IDLE_TIMEOUT",
		c == "SESSION_TOO_LONG", c == "INTERNAL_ERROR":
		return "server_error"
	}
	return "invalid_request_error"
}

func refuse(code, msg string) voice.ClientAction {
	return voice.ClientAction{ErrorCode: code, ErrorMessage: msg}
}

// clientEvent is what the gateway reads of a client event.
type clientEvent struct {
	Type     string          `json:"type"`
	Audio    *string         `json:"audio"`
	Session  json.RawMessage `json:"session"`
	Item     json.RawMessage `json:"item"`
	Response json.RawMessage `json:"response"`
}

// appendPrefix is how an append event usually begins: such an event is read without
// encoding/json (the hot path: every audio frame).
const appendPrefix = `{"type":"input_audio_buffer.append","audio":"`

func (t *translator) Client(typ websocket.MessageType, msg []byte, u voice.Relayed) voice.ClientAction {
	if b64, ok := bytes.CutPrefix(msg, []byte(appendPrefix)); ok {
		if b64, ok = bytes.CutSuffix(b64, []byte(`"}`)); ok && len(b64) > 0 && bytes.IndexAny(b64, `"\`) < 0 {
			audio := make([]byte, base64.StdEncoding.DecodedLen(len(b64)))
			n, err := base64.StdEncoding.Decode(audio, b64)
			if err != nil {
				return refuse(codeInvalidAudio, "input_audio_buffer.append: audio is not valid base64")
			}
			t.mu.Lock()
			t.appended += n
			t.mu.Unlock()
			return voice.ClientAction{Audio: audio[:n]}
		}
	}
	var ev clientEvent
	if err := json.Unmarshal(msg, &ev); err != nil {
		return refuse(codeInvalidJSON, "the event is not valid JSON, or a field has the wrong type: "+err.Error())
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch ev.Type {
	case "session.update":
		return t.sessionUpdate(ev.Session)
	case "input_audio_buffer.append":
		if ev.Audio == nil || *ev.Audio == "" {
			return refuse(codeInvalidValue, "input_audio_buffer.append: audio is required")
		}
		audio, err := base64.StdEncoding.DecodeString(*ev.Audio)
		if err != nil {
			return refuse(codeInvalidAudio, "input_audio_buffer.append: audio is not valid base64")
		}
		t.appended += len(audio)
		return voice.ClientAction{Audio: audio}
	case "input_audio_buffer.commit":
		if t.appended == 0 {
			return refuse(codeCommitEmpty, "input_audio_buffer.commit: the buffer holds no audio")
		}
		prev := t.inputItem
		t.inputItem, t.appended, t.partial, t.pending = t.nextItem(), 0, "", true
		return voice.ClientAction{Control: [][]byte{[]byte(`{"type":"stop"}`)},
			Reply: [][]byte{t.event("input_audio_buffer.committed", map[string]any{"previous_item_id": nilIfEmpty(prev), "item_id": t.inputItem})}}
	case "input_audio_buffer.clear":
		t.appended = 0
		return voice.ClientAction{Control: [][]byte{[]byte(`{"type":"cancel"}`)},
			Reply: [][]byte{t.event("input_audio_buffer.cleared", nil)}}
	case "conversation.item.create":
		return t.itemCreate(ev.Item)
	case "response.create":
		if ev.Response != nil {
			var r struct {
				Tools            []json.RawMessage `json:"tools"`
				OutputModalities []string          `json:"output_modalities"`
				Modalities       []string          `json:"modalities"`
			}
			if err := json.Unmarshal(ev.Response, &r); err != nil {
				return refuse(codeInvalidValue, "response.create: response must be an object")
			}
			if len(r.Tools) > 0 {
				return refuse(codeUnsupported, "response.create: response.tools is not supported by this gateway")
			}
			if m := cmpModalities(r.OutputModalities, r.Modalities); m != nil {
				t.modalities = m
			}
		}
		// The algorithm service answers every committed turn and text item by itself: nothing
		// goes upstream, and the response it gives is this one. One under way, or begun
		// already for the last input, is not opened twice.
		if t.resp != nil || !t.pending {
			return voice.ClientAction{}
		}
		return voice.ClientAction{Reply: [][]byte{t.open(u)}}
	case "response.cancel":
		if t.resp == nil {
			return refuse(codeCancelInvalid, "response.cancel: no response is in progress")
		}
		return voice.ClientAction{Control: [][]byte{[]byte(`{"type":"interrupt"}`)},
			Reply: t.finish("cancelled", u, nil)}
	case "":
		return refuse(codeInvalidValue, `the event has no "type"`)
	}
	return refuse(codeUnknownEvent, "the event type '"+clip(ev.Type)+"' is not supported by this gateway")
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64]
	}
	return s
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func cmpModalities(ms ...[]string) []string {
	for _, m := range ms {
		if len(m) > 0 {
			out := []string{"audio"}
			if len(m) == 1 && m[0] == "text" {
				out = []string{"text"}
			}
			return out
		}
	}
	return nil
}

// sessionSettings are the fields of session.update the gateway reads, GA and beta.
type sessionSettings struct {
	Type             string            `json:"type"`
	Instructions     *string           `json:"instructions"`
	OutputModalities []string          `json:"output_modalities"`
	Modalities       []string          `json:"modalities"` // beta
	Voice            *string           `json:"voice"`
	Tools            []json.RawMessage `json:"tools"`
	Audio            *struct {
		Input *struct {
			Format json.RawMessage `json:"format"`
		} `json:"input"`
		Output *struct {
			Format json.RawMessage `json:"format"`
			Voice  *string         `json:"voice"`
		} `json:"output"`
	} `json:"audio"`
	InputAudioFormat  json.RawMessage `json:"input_audio_format"`  // beta
	OutputAudioFormat json.RawMessage `json:"output_audio_format"` // beta
}

// parseFormat reads a format, GA ({"type":"audio/pcm","rate":24000}) or beta ("pcm16"), as
// the format voicegate meters.
func parseFormat(raw json.RawMessage, param string) (voice.AudioConfig, string) {
	var c voice.AudioConfig
	var name string
	rate := 0
	if json.Unmarshal(raw, &name) != nil {
		var f struct {
			Type string `json:"type"`
			Rate int    `json:"rate"`
		}
		if json.Unmarshal(raw, &f) != nil {
			return c, param + " must be a format object or name"
		}
		name, rate = f.Type, f.Rate
	}
	switch name {
	case "audio/pcm", "pcm16":
		if rate != 0 && rate != 24000 {
			return c, param + ": audio/pcm is 24000 Hz"
		}
		c.Format, c.SampleRate = "pcm", 24000
	case "audio/pcmu", "g711_ulaw":
		c.Format, c.SampleRate = "mulaw", 8000
	case "audio/pcma", "g711_alaw":
		c.Format, c.SampleRate = "alaw", 8000
	default:
		return c, param + ": '" + clip(name) + "' is not supported (audio/pcm at 24 kHz, audio/pcmu, audio/pcma)"
	}
	c.Channels = 1
	return c, ""
}

// sessionUpdate applies session.update: the input format as a config message for the bridge
// (which refuses a change once audio has flowed), instructions and the output settings passed
// on with it. Caller holds mu.
func (t *translator) sessionUpdate(raw json.RawMessage) voice.ClientAction {
	var s sessionSettings
	if raw == nil || json.Unmarshal(raw, &s) != nil {
		return refuse(codeInvalidValue, "session.update: session must be an object")
	}
	if len(s.Tools) > 0 {
		return refuse(codeUnsupported, "session.update: session.tools is not supported by this gateway")
	}
	if s.Type != "" && s.Type != "realtime" {
		return refuse(codeUnsupported, "session.update: session.type '"+clip(s.Type)+"' is not supported (realtime)")
	}
	v := t.current()
	var inRaw, outRaw json.RawMessage = s.InputAudioFormat, s.OutputAudioFormat
	if s.Audio != nil && s.Audio.Input != nil && s.Audio.Input.Format != nil {
		inRaw = s.Audio.Input.Format
	}
	if s.Audio != nil && s.Audio.Output != nil && s.Audio.Output.Format != nil {
		outRaw = s.Audio.Output.Format
	}
	if inRaw != nil {
		c, bad := parseFormat(inRaw, "session.audio.input.format")
		if bad != "" {
			return refuse(codeInvalidValue, "session.update: "+bad)
		}
		v.input.Format, v.input.SampleRate, v.input.Channels = c.Format, c.SampleRate, c.Channels
	}
	if outRaw != nil {
		c, bad := parseFormat(outRaw, "session.audio.output.format")
		if bad != "" {
			return refuse(codeInvalidValue, "session.update: "+bad)
		}
		v.output.Format, v.output.SampleRate, v.output.Channels = c.Format, c.SampleRate, c.Channels
	}
	config := map[string]any{"type": "config", "format": v.input.Format, "sample_rate": v.input.SampleRate,
		"channels": v.input.Channels, "output_format": v.output.Format, "output_sample_rate": v.output.SampleRate}
	if s.Instructions != nil {
		v.instructions = *s.Instructions
		config["instructions"] = v.instructions
	}
	voiceName := s.Voice
	if s.Audio != nil && s.Audio.Output != nil && s.Audio.Output.Voice != nil {
		voiceName = s.Audio.Output.Voice
	}
	if voiceName != nil {
		config["voice"] = *voiceName
	}
	if m := cmpModalities(s.OutputModalities, s.Modalities); m != nil {
		v.modalities = m
	}
	b, _ := json.Marshal(config)
	return voice.ClientAction{Control: [][]byte{b},
		Reply: [][]byte{t.event("session.updated", map[string]any{"session": t.sessionObject(v)})},
		// Only once the bridge took the config (a format cannot change once audio has flowed).
		Accepted: func() {
			t.mu.Lock()
			t.instructions, t.input, t.output, t.modalities = v.instructions, v.input, v.output, v.modalities
			t.mu.Unlock()
		}}
}

// itemCreate handles conversation.item.create: a text message, passed on as a text control
// message. Caller holds mu.
func (t *translator) itemCreate(raw json.RawMessage) voice.ClientAction {
	var item struct {
		Type    string `json:"type"`
		Role    string `json:"role"`
		Content []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		} `json:"content"`
	}
	if raw == nil || json.Unmarshal(raw, &item) != nil {
		return refuse(codeInvalidValue, "conversation.item.create: item must be an object")
	}
	if item.Type != "message" {
		return refuse(codeUnsupported, "conversation.item.create: item.type '"+clip(item.Type)+"' is not supported (message)")
	}
	switch item.Role {
	case "user", "system":
	default:
		return refuse(codeUnsupported, "conversation.item.create: item.role '"+clip(item.Role)+"' is not supported (user, system)")
	}
	var text strings.Builder
	for i, c := range item.Content {
		if c.Type != "input_text" && c.Type != "text" {
			return refuse(codeUnsupported, "conversation.item.create: item.content["+strconv.Itoa(i)+"].type '"+clip(c.Type)+"' is not supported (input_text)")
		}
		text.WriteString(c.Text)
	}
	if text.Len() == 0 {
		return refuse(codeInvalidValue, "conversation.item.create: the item has no text")
	}
	id := t.nextItem()
	t.pending = item.Role == "user"
	ctl, _ := json.Marshal(map[string]any{"type": "text", "text": text.String(), "role": item.Role})
	obj := map[string]any{"id": id, "object": "realtime.item", "type": "message", "role": item.Role, "status": "completed",
		"content": []any{map[string]any{"type": "input_text", "text": text.String()}}}
	return voice.ClientAction{Control: [][]byte{ctl}, Reply: [][]byte{
		t.event("conversation.item.added", map[string]any{"item": obj}),
		t.event("conversation.item.done", map[string]any{"item": obj}),
	}}
}

// open starts a response and returns its response.created. Caller holds mu.
func (t *translator) open(u voice.Relayed) []byte {
	t.pending = false
	t.resp = &response{id: "resp_" + t.eventID(), item: t.nextItem(), audioOut: u.AudioOut}
	return t.event("response.created", map[string]any{"response": map[string]any{
		"id": t.resp.id, "object": "realtime.response", "status": "in_progress", "output": []any{},
		"output_modalities": t.modalities}})
}

// upstreamMessage is what the gateway reads of an algorithm-service message.
type upstreamMessage struct {
	Type       string          `json:"type"`
	Text       string          `json:"text"`
	Content    string          `json:"content"`
	Audio      string          `json:"audio"`
	AudioChunk string          `json:"audio_chunk"`
	Message    string          `json:"message"`
	Error      json.RawMessage `json:"error"`
	Code       string          `json:"code"`
	Usage      *struct {
		InputTokens  int64 `json:"input_tokens"`
		OutputTokens int64 `json:"output_tokens"`
		PromptTokens int64 `json:"prompt_tokens"`
		Completion   int64 `json:"completion_tokens"`
	} `json:"usage"`
}

func (t *translator) Upstream(typ websocket.MessageType, msg []byte, u voice.Relayed) [][]byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if typ == websocket.MessageBinary {
		// The hot path, a frame of TTS audio: encoded without encoding/json.
		out := t.ensureOpen(u)
		t.resp.audio = true
		return append(out, t.appendAudioDelta(make([]byte, 0, 160+base64.StdEncoding.EncodedLen(len(msg))), msg))
	}
	var m upstreamMessage
	if json.Unmarshal(msg, &m) != nil {
		return nil
	}
	switch m.Type {
	case "asr_partial":
		delta := m.Text
		if strings.HasPrefix(m.Text, t.partial) {
			delta = m.Text[len(t.partial):]
		}
		t.partial = m.Text
		if delta == "" {
			return nil
		}
		return [][]byte{t.event("conversation.item.input_audio_transcription.delta", map[string]any{
			"item_id": t.inputItemID(), "content_index": 0, "delta": delta})}
	case "asr_final":
		t.partial = ""
		return [][]byte{t.event("conversation.item.input_audio_transcription.completed", map[string]any{
			"item_id": t.inputItemID(), "content_index": 0, "transcript": m.Text})}
	case "llm_response_chunk":
		text := m.Content
		if text == "" {
			text = m.Text
		}
		if text == "" {
			return nil
		}
		out := t.ensureOpen(u)
		t.resp.transcript.WriteString(text)
		name := "response.output_audio_transcript.delta"
		if t.modalities[0] == "text" {
			name = "response.output_text.delta"
		}
		return append(out, t.event(name, t.where(map[string]any{"delta": text})))
	case "tts_audio":
		a := m.Audio
		if a == "" {
			a = m.AudioChunk
		}
		if a == "" {
			return nil
		}
		return t.audioDelta(a, u)
	case "tts_complete", "llm_response_done", "response_done":
		if t.resp == nil {
			return nil
		}
		var usage map[string]any
		if m.Usage != nil {
			in, out := max(m.Usage.InputTokens, m.Usage.PromptTokens), max(m.Usage.OutputTokens, m.Usage.Completion)
			usage = map[string]any{"input_tokens": in, "output_tokens": out, "total_tokens": in + out}
		}
		return t.finish("completed", u, usage)
	case "error":
		msgText := m.Message
		if msgText == "" {
			_ = json.Unmarshal(m.Error, &msgText)
		}
		if msgText == "" {
			msgText = "the algorithm service reported an error"
		}
		code := m.Code
		if code == "" {
			code = "ALGO_SERVICE_ERROR"
		}
		return [][]byte{t.event("error", map[string]any{"error": map[string]any{
			"type": "server_error", "code": strings.ToLower(code), "message": msgText, "param": nil, "event_id": nil}})}
	}
	// retrieval_progress, tts_format, notices and the rest have no Realtime event.
	return nil
}

func (t *translator) inputItemID() string {
	if t.inputItem == "" {
		t.inputItem = t.nextItem()
	}
	return t.inputItem
}

// ensureOpen opens a response for output that comes without a response.create. Caller holds
// mu.
func (t *translator) ensureOpen(u voice.Relayed) [][]byte {
	if t.resp != nil {
		return nil
	}
	return [][]byte{t.open(u)}
}

// where adds the response's coordinates to an output event's fields.
func (t *translator) where(f map[string]any) map[string]any { return t.whereOf(t.resp, f) }

// appendAudioDelta appends the response.output_audio.delta event of audio to dst, as event
// would encode it. Caller holds mu, with a response open.
func (t *translator) appendAudioDelta(dst, audio []byte) []byte {
	dst = append(dst, `{"content_index":0,"delta":"`...)
	dst = base64.StdEncoding.AppendEncode(dst, audio)
	dst = append(dst, `","event_id":"event_`...)
	dst = strconv.AppendInt(dst, t.seq.Add(1), 10)
	dst = append(dst, `","item_id":`...)
	dst = strconv.AppendQuote(dst, t.resp.item)
	dst = append(dst, `,"output_index":0,"response_id":`...)
	dst = strconv.AppendQuote(dst, t.resp.id)
	return append(dst, `,"type":"response.output_audio.delta"}`...)
}

func (t *translator) audioDelta(b64 string, u voice.Relayed) [][]byte {
	out := t.ensureOpen(u)
	t.resp.audio = true
	return append(out, t.event("response.output_audio.delta", t.where(map[string]any{"delta": b64})))
}

// finish ends the response in progress with status: the done events of its parts, then
// response.done with its usage: audio seconds in (since the last response) and out (since
// this one began), and the tokens the algorithm service reported. Caller holds mu.
func (t *translator) finish(status string, u voice.Relayed, tokens map[string]any) [][]byte {
	r := t.resp
	t.resp = nil
	var out [][]byte
	transcript := r.transcript.String()
	if r.audio {
		out = append(out, t.event("response.output_audio.done", t.whereOf(r, map[string]any{})))
	}
	if transcript != "" {
		name, field := "response.output_audio_transcript.done", "transcript"
		if t.modalities[0] == "text" {
			name, field = "response.output_text.done", "text"
		}
		out = append(out, t.event(name, t.whereOf(r, map[string]any{field: transcript})))
	}
	usage := map[string]any{"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
	for k, v := range tokens {
		usage[k] = v
	}
	in, outAudio := u.AudioIn-t.lastIn, u.AudioOut-r.audioOut
	t.lastIn = u.AudioIn
	usage["input_audio_seconds"] = in.Seconds()
	usage["output_audio_seconds"] = outAudio.Seconds()
	content := map[string]any{"type": "output_audio", "transcript": transcript}
	if t.modalities[0] == "text" {
		content = map[string]any{"type": "output_text", "text": transcript}
	}
	out = append(out, t.event("response.done", map[string]any{"response": map[string]any{
		"id": r.id, "object": "realtime.response", "status": status, "output_modalities": t.modalities,
		"output": []any{map[string]any{"id": r.item, "object": "realtime.item", "type": "message", "role": "assistant",
			"status": status, "content": []any{content}}},
		"usage": usage,
	}}))
	return out
}

func (t *translator) whereOf(r *response, f map[string]any) map[string]any {
	f["response_id"], f["item_id"], f["output_index"], f["content_index"] = r.id, r.item, 0, 0
	return f
}
