package realtime_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
	"voicegate/voice/realtime"
)

func open(t *testing.T) voice.Translator {
	t.Helper()
	d := realtime.New()
	return d.Open(voice.DialectSession{SessionID: "S1", Audio: d.Audio(voice.AudioConfig{Language: "en"}),
		Now: func() time.Time { return time.Unix(1, 0) }})
}

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return m
}

func client(tr voice.Translator, ev string) voice.ClientAction {
	return tr.Client(websocket.MessageText, []byte(ev), voice.Relayed{})
}

// TestSessionUpdateFormats: GA and beta formats map onto the formats voicegate meters; other
// formats are refused naming what is supported.
func TestSessionUpdateFormats(t *testing.T) {
	for _, c := range []struct {
		session, codec string
		rate           float64
	}{
		{`{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcm","rate":24000}}}}`, "pcm", 24000},
		{`{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}`, "mulaw", 8000},
		{`{"audio":{"input":{"format":{"type":"audio/pcma"}}}}`, "alaw", 8000},
		{`{"input_audio_format":"pcm16"}`, "pcm", 24000},
		{`{"input_audio_format":"g711_ulaw","output_audio_format":"g711_alaw"}`, "mulaw", 8000},
		{`{"input_audio_format":"g711_alaw"}`, "alaw", 8000},
	} {
		tr := open(t)
		act := client(tr, `{"type":"session.update","session":`+c.session+`}`)
		if act.ErrorCode != "" || len(act.Control) != 1 || len(act.Reply) != 1 {
			t.Fatalf("%s: %+v", c.session, act)
		}
		cfg := decode(t, act.Control[0])
		if cfg["type"] != "config" || cfg["format"] != c.codec || cfg["sample_rate"] != c.rate || cfg["channels"] != 1.0 {
			t.Errorf("%s: config %v", c.session, cfg)
		}
		if up := decode(t, act.Reply[0]); up["type"] != "session.updated" {
			t.Errorf("%s: reply %v", c.session, up)
		}
	}
	for _, bad := range []string{`{"audio":{"input":{"format":{"type":"audio/pcm","rate":16000}}}}`,
		`{"input_audio_format":"opus"}`, `{"tools":[{"type":"function"}]}`, `{"type":"transcription"}`, `[]`} {
		if act := client(open(t), `{"type":"session.update","session":`+bad+`}`); act.ErrorCode == "" {
			t.Errorf("%s was accepted: %+v", bad, act)
		}
	}
}

// TestClientEvents: append decodes base64 (and refuses what is not), commit needs audio,
// unknown and malformed events are refused by name.
func TestClientEvents(t *testing.T) {
	tr := open(t)
	if act := client(tr, `{"type":"input_audio_buffer.commit"}`); act.ErrorCode != "input_audio_buffer_commit_empty" {
		t.Errorf("an empty commit: %+v", act)
	}
	audio := []byte{1, 2, 3, 4}
	act := client(tr, `{"type":"input_audio_buffer.append","audio":"`+base64.StdEncoding.EncodeToString(audio)+`"}`)
	if string(act.Audio) != string(audio) || act.ErrorCode != "" {
		t.Errorf("append: %+v", act)
	}
	act = client(tr, `{"type":"input_audio_buffer.commit"}`)
	if len(act.Control) != 1 || string(act.Control[0]) != `{"type":"stop"}` || decode(t, act.Reply[0])["type"] != "input_audio_buffer.committed" {
		t.Errorf("commit: %+v", act)
	}
	for ev, code := range map[string]string{
		`{"type":"input_audio_buffer.append","audio":"@@"}`: "invalid_audio",
		`{"type":"conversation.item.delete"}`:               "unknown_event",
		`{"type"`:                                           "invalid_json",
		`{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_image"}]}}`: "unsupported_parameter",
		`{"type":"response.cancel"}`: "response_cancel_not_active",
	} {
		if act := client(tr, ev); act.ErrorCode != code || !strings.Contains(string(tr.Error(act.ErrorCode, act.ErrorMessage)), `"code":"`+code+`"`) {
			t.Errorf("%s: %+v, want %s", ev, act, code)
		}
	}
}

// TestUpstreamEvents: recognition, answer text, TTS audio and its end become the GA server
// events, response.done with the audio seconds of the response and the service's tokens.
func TestUpstreamEvents(t *testing.T) {
	tr := open(t)
	client(tr, `{"type":"input_audio_buffer.append","audio":"AAAA"}`)
	client(tr, `{"type":"input_audio_buffer.commit"}`)
	var types []string
	var last map[string]any
	up := func(typ websocket.MessageType, msg string, in, out time.Duration) {
		for _, b := range tr.Upstream(typ, []byte(msg), voice.Relayed{AudioIn: in, AudioOut: out}) {
			last = decode(t, b)
			types = append(types, last["type"].(string))
		}
	}
	up(websocket.MessageText, `{"type":"asr_partial","text":"he"}`, time.Second, 0)
	up(websocket.MessageText, `{"type":"asr_partial","text":"hello"}`, time.Second, 0)
	if last["delta"] != "llo" {
		t.Errorf("the second partial's delta %v, want what it adds", last["delta"])
	}
	up(websocket.MessageText, `{"type":"asr_final","text":"hello"}`, time.Second, 0)
	up(websocket.MessageText, `{"type":"llm_response_chunk","content":"Hi"}`, time.Second, 0)
	up(websocket.MessageBinary, "\x00\x00", time.Second, 100*time.Millisecond)
	up(websocket.MessageText, `{"type":"retrieval_progress"}`, time.Second, 100*time.Millisecond)
	up(websocket.MessageText, `{"type":"tts_complete","usage":{"prompt_tokens":3,"completion_tokens":4}}`, time.Second, 300*time.Millisecond)
	want := []string{"conversation.item.input_audio_transcription.delta", "conversation.item.input_audio_transcription.delta",
		"conversation.item.input_audio_transcription.completed", "response.created", "response.output_audio_transcript.delta",
		"response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done", "response.done"}
	if fmt.Sprint(types) != fmt.Sprint(want) {
		t.Fatalf("events %v\nwant %v", types, want)
	}
	u := last["response"].(map[string]any)["usage"].(map[string]any)
	if u["input_audio_seconds"] != 1.0 || u["output_audio_seconds"] != 0.3 || u["input_tokens"] != 3.0 || u["total_tokens"] != 7.0 {
		t.Errorf("usage %v", u)
	}
}

// TestResponseCreateOncePerInput: response.create opens a response for input not yet answered;
// one the algorithm service began first, or none since the last answer, opens nothing.
func TestResponseCreateOncePerInput(t *testing.T) {
	tr := open(t)
	if act := client(tr, `{"type":"response.create"}`); len(act.Reply) != 0 {
		t.Fatalf("a response without input: %+v", act)
	}
	client(tr, `{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}}`)
	if act := client(tr, `{"type":"response.create"}`); len(act.Reply) != 1 || decode(t, act.Reply[0])["type"] != "response.created" {
		t.Fatalf("a response for a text item: %+v", act)
	}
	tr.Upstream(websocket.MessageText, []byte(`{"type":"llm_response_chunk","content":"yo"}`), voice.Relayed{})
	tr.Upstream(websocket.MessageText, []byte(`{"type":"tts_complete"}`), voice.Relayed{})
	// The service answered the next item before its response.create arrived.
	client(tr, `{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"again"}]}}`)
	out := tr.Upstream(websocket.MessageText, []byte(`{"type":"llm_response_chunk","content":"so"}`), voice.Relayed{})
	if decode(t, out[0])["type"] != "response.created" {
		t.Fatalf("an answer without response.create: %s", out[0])
	}
	tr.Upstream(websocket.MessageText, []byte(`{"type":"tts_complete"}`), voice.Relayed{})
	if act := client(tr, `{"type":"response.create"}`); len(act.Reply) != 0 {
		t.Fatalf("a second response for one input: %+v", act)
	}
}
