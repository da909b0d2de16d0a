package voice_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
)

// fast are the options of the tests on real sockets and real time: their sessions' clock finds
// nothing to do (no keepalive, recheck or idle timeout within a test). The tests of what the
// clock does run on fake time (timing_test.go).
func fast() voice.Options {
	return voice.Options{PingInterval: time.Hour, RecheckInterval: time.Hour}
}

// frame returns a 640-byte audio frame (20 ms of 16 kHz mono PCM) filled from seed.
func frame(seed byte) []byte {
	b := make([]byte, 640)
	for i := range b {
		b[i] = seed + byte(i)
	}
	return b
}

func write(tb testing.TB, c *websocket.Conn, typ websocket.MessageType, b []byte) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.Write(ctx, typ, b); err != nil {
		tb.Fatalf("write: %v", err)
	}
}

func TestSessionHandshake(t *testing.T) {
	tests := []struct {
		name, query, language string
	}{
		{"language from the query", "conversation_id=conv-1&language=en-US", "en-US"},
		{"default language", "conversation_id=conv-1", "zh-CN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := fast()
			o.Outbound.Identity = func(in *http.Request, out http.Header) {
				out.Set("X-User-ID", in.Header.Get("X-Test-User"))
				out.Set("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
			}
			e := newEnv(t, setup{opts: o})
			before := time.Now().UnixMilli()
			cl := e.connect(t, tt.query, &websocket.DialOptions{
				Subprotocols: []string{voice.Subprotocol, "bearer.xyz"},
				HTTPHeader:   http.Header{"X-Request-Id": {"req-voice-1"}, "X-Test-User": {"u-1"}},
			})

			if got := cl.c.Subprotocol(); got != voice.Subprotocol {
				t.Errorf("negotiated subprotocol %q, want %q", got, voice.Subprotocol)
			}
			if got := cl.res.Header.Values("Sec-WebSocket-Protocol"); !slices.Equal(got, []string{voice.Subprotocol}) {
				t.Errorf("Sec-WebSocket-Protocol %q, want exactly %q (the bearer token is never echoed)", got, voice.Subprotocol)
			}

			init := cl.initMsg(t)
			id, _ := init["session_id"].(string)
			if id == "" {
				t.Fatalf("session_initialized without session_id: %v", init)
			}
			cfg, _ := init["config"].(map[string]any)
			for k, want := range map[string]any{"sample_rate": 16000.0, "channels": 1.0, "format": "pcm", "language": tt.language} {
				if cfg[k] != want {
					t.Errorf("config.%s = %v, want %v", k, cfg[k], want)
				}
			}
			for _, k := range []string{"vad_enabled", "noise_suppression", "echo_cancellation"} {
				if _, ok := cfg[k].(bool); !ok {
					t.Errorf("config.%s = %v, want a boolean", k, cfg[k])
				}
			}
			// The origin's server_time is in Unix seconds; server_time_ms beside it.
			if st, _ := init["server_time"].(float64); int64(st) < before/1000 || int64(st) > time.Now().Unix() {
				t.Errorf("server_time %v is not the time of the handshake in seconds", init["server_time"])
			}
			if st, _ := init["server_time_ms"].(float64); int64(st) < before || int64(st) > time.Now().UnixMilli() {
				t.Errorf("server_time_ms %v is not the time of the handshake", init["server_time_ms"])
			}
			if caps, _ := init["capabilities"].(map[string]any); len(caps) == 0 {
				t.Errorf("capabilities %v, want a non-empty object", init["capabilities"])
			}

			fc := e.fake.next(t)
			if fc.url.Path != "/voice/stream" {
				t.Errorf("dialled path %q, want /voice/stream", fc.url.Path)
			}
			q := fc.url.Query()
			for k, want := range map[string]string{"session_id": id, "conversation_id": "conv-1", "language": tt.language} {
				if got := q.Get(k); got != want {
					t.Errorf("dial query %s = %q, want %q", k, got, want)
				}
			}
			for k, want := range map[string]string{
				"X-Request-Id":           "req-voice-1",
				"X-User-Id":              "u-1",
				"Traceparent":            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
				"Sec-Websocket-Protocol": voice.Subprotocol,
			} {
				if got := fc.header.Get(k); got != want {
					t.Errorf("dial header %s = %q, want %q", k, got, want)
				}
			}
			if strings.Contains(strings.ToLower(strings.Join(fc.header.Values("Sec-Websocket-Protocol"), ",")), "bearer") {
				t.Error("the client's bearer subprotocol reached the algorithm service")
			}
		})
	}
}

func TestRequestIDGeneratedForDial(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	fc := e.fake.next(t)
	id := cl.res.Header.Get("X-Request-ID")
	if id == "" || fc.header.Get("X-Request-ID") != id {
		t.Errorf("dial X-Request-ID %q, response X-Request-ID %q: want the same, non-empty", fc.header.Get("X-Request-ID"), id)
	}
}

func TestAlgoURLWithBasePath(t *testing.T) {
	f := newFake(t, loopback{}, nil, false)
	o := fast()
	o.AlgoURL = mustURL(t, f.srv.URL+"/algo/v1")
	e := newEnv(t, setup{opts: o})
	e.connect(t, "", nil).initMsg(t)
	if got := f.next(t).url.Path; got != "/algo/v1/voice/stream" {
		t.Errorf("dialled path %q, want /algo/v1/voice/stream", got)
	}
	if n := e.fake.dials.Load(); n != 0 {
		t.Errorf("the unused fake got %d dials", n)
	}
}

func TestAudioBecomesAudioChunks(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "conversation_id=conv-7&language=en-US", nil)
	id := cl.initMsg(t)["session_id"].(string)
	fc := e.fake.next(t)

	before := time.Now().UnixMilli()
	for i := range 3 {
		write(t, cl.c, websocket.MessageBinary, frame(byte(10*i)))
	}
	keys := []string{"audio_chunk", "channels", "conversation_id", "format", "sample_rate", "sequence", "session_id", "timestamp", "type"}
	for i := range 3 {
		m := fc.recvJSON(t)
		if got := slices.Sorted(maps.Keys(m)); !slices.Equal(got, keys) {
			t.Errorf("audio_chunk keys %v, want %v", got, keys)
		}
		audio, err := base64.StdEncoding.DecodeString(m["audio_chunk"].(string))
		if err != nil || !bytes.Equal(audio, frame(byte(10*i))) {
			t.Errorf("chunk %d: audio_chunk does not decode to the frame sent (err %v)", i, err)
		}
		for k, want := range map[string]any{
			"type": "audio_chunk", "session_id": id, "conversation_id": "conv-7", "sequence": float64(i + 1),
			"format": "pcm", "sample_rate": 16000.0, "channels": 1.0,
		} {
			if m[k] != want {
				t.Errorf("chunk %d: %s = %v, want %v", i, k, m[k], want)
			}
		}
		if ts := int64(m["timestamp"].(float64)); ts < before || ts > time.Now().UnixMilli() {
			t.Errorf("chunk %d: timestamp %d is not the time it was relayed", i, ts)
		}
	}
}

func TestRawAudioRelayedUntouched(t *testing.T) {
	o := fast()
	o.RawAudio = true
	e := newEnv(t, setup{opts: o})
	cl := e.connect(t, "", nil)
	init := cl.initMsg(t)
	if caps := init["capabilities"].(map[string]any); caps["raw_audio"] != true {
		t.Errorf("capabilities.raw_audio = %v with RawAudio, want true", caps["raw_audio"])
	}
	fc := e.fake.next(t)
	for i := range 3 {
		write(t, cl.c, websocket.MessageBinary, frame(byte(i)))
	}
	for i := range 3 {
		m := fc.recv(t)
		if m.typ != websocket.MessageBinary || !bytes.Equal(m.data, frame(byte(i))) {
			t.Errorf("frame %d: the fake got %v %d bytes, want the binary frame sent", i, m.typ, len(m.data))
		}
	}
}

func TestControlForwardedWithSessionID(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	id := cl.initMsg(t)["session_id"].(string)
	fc := e.fake.next(t)

	write(t, cl.c, websocket.MessageText, []byte(`{"type":"start","x":1,"nested":{"a":[1,"b"]}}`))
	m := fc.recvJSON(t)
	want := map[string]any{"type": "start", "x": 1.0, "nested": map[string]any{"a": []any{1.0, "b"}}, "session_id": id}
	if !jsonEqual(m, want) {
		t.Errorf("the fake got %v, want %v", m, want)
	}

	// A client cannot speak for another session.
	write(t, cl.c, websocket.MessageText, []byte(`{"type":"stop","session_id":"someone-else"}`))
	if m := fc.recvJSON(t); m["session_id"] != id || m["type"] != "stop" {
		t.Errorf("the fake got %v, want type stop with session_id %q", m, id)
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

func TestEventsAndTTSRelayedInOrder(t *testing.T) {
	// The fake talks first, before the gateway has even accepted the client: session_initialized
	// must still come first.
	script := []wsMsg{
		{websocket.MessageText, []byte(`{"type":"ready"}`)},
		{websocket.MessageText, []byte(`{"type":"asr_partial","text":"hel"}`)},
		{websocket.MessageText, []byte(`{"type":"asr_final","text":"hello", "confidence": 0.98}`)},
		{websocket.MessageText, []byte(`{"type":"retrieval_progress","n":1}`)},
		{websocket.MessageText, []byte(`{"type":"llm_response_chunk","text":"Hi ✓"}`)},
		{websocket.MessageBinary, bytes.Repeat([]byte{1, 2, 3}, 700)},
		{websocket.MessageText, []byte(`{"type":"tts_audio","seq":1}`)},
		{websocket.MessageBinary, []byte{0, 0xff, 0xfe}},
		{websocket.MessageText, []byte(`{"type":"tts_complete"}`)},
		{websocket.MessageText, []byte(`{"type":"error","code":"ASR_FAILED"}`)},
	}
	e := newEnv(t, setup{opts: fast(), serve: converse(script)})
	cl := e.connect(t, "", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	write(t, cl.c, websocket.MessageBinary, frame(1)) // the fake answers audio with the rest

	for i, want := range script {
		got := cl.next(t)
		if got.typ != want.typ || !bytes.Equal(got.data, want.data) {
			t.Fatalf("message %d: client got %v %q, want %v %q (unchanged, in order)", i, got.typ, got.data, want.typ, want.data)
		}
	}

	if err := cl.c.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("client close: %v", err)
	}
	if code := websocket.CloseStatus(fc.ended(t, time.Second)); code != websocket.StatusNormalClosure {
		t.Errorf("the fake saw close %v, want 1000", code)
	}

	// The session's counters.
	var st voice.Stats
	select {
	case st = <-e.ends:
	case <-time.After(wait):
		t.Fatal("OnEnd was not called")
	}
	if st.CloseCode != websocket.StatusNormalClosure || st.PacketsIn != 1 || st.AudioBytesIn != 640 ||
		st.PacketsOut != int64(len(script)) || st.AudioBytesOut != 2103 || st.ASRPartial != 1 || st.ASRFinal != 1 ||
		st.LLMChunks != 1 || st.TTSChunks != 3 || st.Errors != 1 || st.FirstASR <= 0 || st.Duration <= 0 {
		t.Errorf("stats %+v", st)
	}
}

// converse sends msgs[0] as soon as the connection is open (before the gateway has accepted
// its client) and the rest in answer to the first message it reads, recording everything read.
func converse(msgs []wsMsg) behaviour {
	return func(fc *fakeConn) {
		if err := fc.conn.Write(context.Background(), msgs[0].typ, msgs[0].data); err != nil {
			fc.err = err
			return
		}
		for i := 0; ; i++ {
			typ, b, err := fc.conn.Read(context.Background())
			if err != nil {
				fc.err = err
				return
			}
			fc.msgs <- wsMsg{typ, b}
			if i > 0 {
				continue
			}
			for _, m := range msgs[1:] {
				if err := fc.conn.Write(context.Background(), m.typ, m.data); err != nil {
					fc.err = err
					return
				}
			}
		}
	}
}
