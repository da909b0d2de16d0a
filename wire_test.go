package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The origin's wire: what a client written for the origin document reads from voicegate. The
// golden files in testdata/wire hold one full voice session and one full chat stream, as the
// client reads them, with what changes from run to run (IDs, times) replaced by placeholders;
// the tests also decode every message into the origin document's own types and check the
// fields it defines: times in Unix seconds, its capability keys, echo_cancellation false, an
// "error" field in errors.

var updateWire = flag.Bool("update-wire", false, "rewrite the golden files in testdata/wire")

// originSessionInit is the origin document's session_initialized (VoiceSessionConfig and the
// init message of v2_voice.go).
type originSessionInit struct {
	Type      string `json:"type"`
	SessionID string `json:"session_id"`
	Config    struct {
		SampleRate              int    `json:"sample_rate"`
		Channels                int    `json:"channels"`
		Format                  string `json:"format"`
		Language                string `json:"language"`
		VADEnabled              bool   `json:"vad_enabled"`
		NoiseSuppressionEnabled bool   `json:"noise_suppression"`
		EchoCancellationEnabled bool   `json:"echo_cancellation"`
	} `json:"config"`
	ServerTime   int64           `json:"server_time"`
	Capabilities map[string]bool `json:"capabilities"`
}

// originVoiceError is the origin document's voice error message.
type originVoiceError struct {
	Type      string `json:"type"`
	Error     string `json:"error"`
	Code      string `json:"code"`
	SessionID string `json:"session_id"`
}

// volatile are the values that differ from run to run, replaced in the golden files.
var volatile = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`"session_id":"[^"]*"`), `"session_id":"<session_id>"`},
	{regexp.MustCompile(`"request_id":"[^"]*"`), `"request_id":"<request_id>"`},
	{regexp.MustCompile(`"(server_time|timestamp)":\d+`), `"$1":<unix_s>`},
	{regexp.MustCompile(`"(server_time_ms|timestamp_ms)":\d+`), `"$1":<unix_ms>`},
	{regexp.MustCompile(`"duration_ms":\d+`), `"duration_ms":<ms>`},
	{regexp.MustCompile(`"resume":\{"token":"[^"]*"`), `"resume":{"token":"<resume_token>"`},
	{regexp.MustCompile(`"(played_ms|buffered_ms)":\d+`), `"$1":<ms>`},
}

func normalize(s string) string {
	for _, v := range volatile {
		s = v.re.ReplaceAllString(s, v.with)
	}
	return s
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "wire", name)
	if *updateWire {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update-wire to write it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from what the client read:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// inSeconds checks that v is a Unix time in seconds between before and after.
func inSeconds(t *testing.T, what string, v int64, before, after time.Time) {
	t.Helper()
	if v < before.Unix() || v > after.Unix() {
		t.Errorf("%s = %d, want Unix seconds between %d and %d", what, v, before.Unix(), after.Unix())
	}
}

// TestWireVoiceSession: one full session, in the default format, as the origin's client reads
// it: session_initialized, an error for a message it cannot parse, the service's recognition,
// answer and TTS (declared 24 kHz PCM, paced), the flush that an interrupt causes, and the
// close.
func TestWireVoiceSession(t *testing.T) {
	algo := newAlgo(t, algoOptions{Replier: func() voiceReplier {
		return func(typ websocket.MessageType, msg []byte) []voiceFrame {
			switch {
			case typ == websocket.MessageText && bytes.Contains(msg, []byte(`"type":"stop"`)):
				return []voiceFrame{
					{Text: `{"type":"asr_final","text":"你好","confidence":0.98}`},
					{Text: `{"type":"llm_response_chunk","content":"你好！"}`},
					{Text: `{"type":"tts_format","format":"pcm","sample_rate":24000,"channels":1}`},
					{Audio: 960}, {Audio: 960},
					{Text: `{"type":"tts_complete"}`},
				}
			case typ == websocket.MessageText && bytes.Contains(msg, []byte(`"type":"audio_chunk"`)) && bytes.Contains(msg, []byte(`"sequence":1,`)):
				return []voiceFrame{{Text: `{"type":"asr_partial","text":"你"}`}}
			}
			return nil
		}
	}})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	before := time.Now()
	conn, _, err := voiceDial(t, g, "?conversation_id=c-1", bearer(tokenFor(t, "u-voice", []string{"user"}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	v := &voiceClient{conn: conn}
	var lines []string
	read := func() (websocket.MessageType, []byte) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("read: %v (so far %q)", err, lines)
		}
		if typ == websocket.MessageBinary {
			lines = append(lines, fmt.Sprintf("< binary %d bytes", len(msg)))
		} else {
			lines = append(lines, "< "+normalize(string(msg)))
		}
		return typ, msg
	}
	send := func(typ websocket.MessageType, msg []byte) {
		t.Helper()
		if typ == websocket.MessageBinary {
			lines = append(lines, fmt.Sprintf("> binary %d bytes", len(msg)))
		} else {
			lines = append(lines, "> "+string(msg))
		}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		if err := v.conn.Write(ctx, typ, msg); err != nil {
			t.Fatal(err)
		}
	}
	_, initMsg := read()
	var init originSessionInit
	if err := json.Unmarshal(initMsg, &init); err != nil {
		t.Fatal(err)
	}
	v.id = init.SessionID
	inSeconds(t, "server_time", init.ServerTime, before, time.Now())
	for _, k := range []string{"real_time_asr", "voice_activity", "noise_suppression", "stream_tts", "cancel_request"} {
		if !init.Capabilities[k] {
			t.Errorf("capabilities.%s missing or false: %v", k, init.Capabilities)
		}
	}
	if init.Config.EchoCancellationEnabled || init.Config.SampleRate != 16000 || init.Config.Format != "pcm" || !init.Config.VADEnabled {
		t.Errorf("config %+v, want the origin's defaults", init.Config)
	}

	send(websocket.MessageText, []byte(`{"type":"start"`))
	_, msg := read()
	var e originVoiceError
	if err := json.Unmarshal(msg, &e); err != nil || e.Type != "error" || e.Error == "" || e.Code == "" || e.SessionID != v.id {
		t.Errorf("error message %s, want the origin's type, error, code and session_id", msg)
	}
	send(websocket.MessageBinary, make([]byte, 640))
	read() // asr_partial
	send(websocket.MessageText, []byte(`{"type":"stop"}`))
	for {
		_, msg := read()
		if bytes.Contains(msg, []byte(`"tts_complete"`)) {
			break
		}
	}
	send(websocket.MessageText, []byte(`{"type":"interrupt"}`))
	_, msg = read()
	var flushed struct {
		Type      string `json:"type"`
		PlayedMS  *int64 `json:"played_ms"`
		DroppedMS *int64 `json:"dropped_ms"`
	}
	if json.Unmarshal(msg, &flushed) != nil || flushed.Type != "tts_flushed" || flushed.PlayedMS == nil || *flushed.DroppedMS != 0 {
		t.Errorf("after the answer, an interrupt got %s, want tts_flushed with nothing dropped", msg)
	}
	lines = append(lines, "> close 1000")
	// Every text message the client read matches the OpenAPI description.
	c := schemaCheck{t, loadOpenAPI(t)}
	for i, l := range lines {
		if m, ok := strings.CutPrefix(l, "< {"); ok {
			m = "{" + m
			// The placeholders back to values of the right type.
			m = strings.NewReplacer(`"<session_id>"`, `"s"`, "<unix_s>", "1", "<unix_ms>", "1000", "<ms>", "0",
				"<resume_token>", "ABCDEFGHIJKLMNOPQRSTUVWXYZ").Replace(m)
			c.valid("VoiceServerMessage", m, "message "+strconv.Itoa(i))
		}
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	golden(t, "session.txt", strings.Join(lines, "\n")+"\n")

	// The service was dialled with the format and labelled the audio with it.
	dial := algo.dials()[0]
	if q, _ := url.ParseQuery(dial.RawQuery); q.Get("format") != "pcm" || q.Get("sample_rate") != "16000" || q.Get("channels") != "1" {
		t.Errorf("the service was dialled with %s, want format=pcm&sample_rate=16000&channels=1", dial.RawQuery)
	}
	for _, m := range algo.textReceived() {
		var c struct {
			Type       string `json:"type"`
			Timestamp  int64  `json:"timestamp"`
			Format     string `json:"format"`
			SampleRate int    `json:"sample_rate"`
		}
		_ = json.Unmarshal([]byte(m), &c)
		if c.Type == "audio_chunk" && (c.Format != "pcm" || c.SampleRate != 16000 || c.Timestamp < before.UnixMilli()) {
			t.Errorf("audio_chunk %s: want pcm/16000 and a timestamp in milliseconds, as the origin's", m)
		}
		if c.Type == "interrupt" && !strings.Contains(m, `"played_ms":`) {
			t.Errorf("the service got %s, want played_ms", m)
		}
	}
}

// TestWireChatStream: one full chat stream as the origin's client reads it, every timestamp in
// Unix seconds with timestamp_ms beside it.
func TestWireChatStream(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w,
			`{"type":"retrieval_start","query":"voicegate"}`,
			`{"type":"retrieval_result","documents":[{"id":"d1","score":0.9}]}`,
			`{"type":"generation_start"}`,
			`{"type":"generation_chunk","content":"Hello"}`,
			`{"type":"generation_done","total_tokens":2}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	before := time.Now()
	res := postChat(t, g, `{"message":"hi"}`, map[string]string{"Content-Type": "application/json"})
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d", res.StatusCode)
	}
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	golden(t, "stream.sse", normalize(string(body)))
	sc := bufio.NewScanner(bytes.NewReader(body))
	n := 0
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var ev struct {
			Timestamp   int64 `json:"timestamp"`
			TimestampMS int64 `json:"timestamp_ms"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			t.Fatal(err)
		}
		inSeconds(t, "timestamp", ev.Timestamp, before, after)
		if ev.TimestampMS/1000 != ev.Timestamp {
			t.Errorf("timestamp_ms %d is not the timestamp %d in milliseconds", ev.TimestampMS, ev.Timestamp)
		}
		n++
	}
	if n != 7 {
		t.Errorf("%d events, want stream_start, five lines and stream_end", n)
	}
}
