package main

// OpenAI's Realtime API on GET /v1/realtime, end to end: the official openai package's realtime
// WebSocket client over wss:// against the gateway and a fake algorithm service, and Go clients
// for what the SDK does not do on purpose: broken events, browser subprotocols, a quota used up
// while audio flows, a revocation on another instance.

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/voice"
)

// realtimeAlgo is the fake algorithm service of the realtime tests: a stop (a commit) is
// answered with two asr_partials and an asr_final, two llm_response_chunks, two binary TTS frames
// of ttsBytes each and tts_complete with token usage; a text message the same without the
// recognition. Every text message it receives is kept (fakeAlgo.textReceived).
func realtimeAlgo(t *testing.T, ttsBytes int) *fakeAlgo {
	t.Helper()
	answer := []voiceFrame{
		{Text: `{"type":"llm_response_chunk","content":"Hi "}`},
		{Text: `{"type":"llm_response_chunk","content":"there"}`},
		{Audio: ttsBytes}, {Audio: ttsBytes},
		{Text: `{"type":"tts_complete","usage":{"input_tokens":5,"output_tokens":2}}`},
	}
	return newAlgo(t, algoOptions{Replier: func() voiceReplier {
		return func(typ websocket.MessageType, msg []byte) []voiceFrame {
			if typ != websocket.MessageText {
				return nil
			}
			switch string(upstreamTypeOf(msg)) {
			case "stop":
				return append([]voiceFrame{{Text: `{"type":"asr_partial","text":"hel"}`},
					{Text: `{"type":"asr_partial","text":"hello"}`}, {Text: `{"type":"asr_final","text":"hello"}`}}, answer...)
			case "text":
				return answer
			}
			return nil
		}
	}})
}

func upstreamTypeOf(msg []byte) string {
	var m struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(msg, &m)
	return m.Type
}

// sdkRealtimeResult is what testdata/node/openai_realtime.mjs prints.
type sdkRealtimeResult struct {
	Types                                    []string
	Errors                                   []string
	AudioDeltas, AudioBytes                  int
	Transcript, InputTranscript, InputDeltas string
	Usage                                    map[string]float64
	Status                                   string
	Session                                  map[string]any
	CloseCode                                int
	Protocol                                 string
	TimedOut                                 bool
}

// runRealtimeSDK runs the SDK's realtime client against g (over TLS, trusting certFile).
func runRealtimeSDK(t *testing.T, g *testGateway, certFile, token string, vars ...string) sdkRealtimeResult {
	t.Helper()
	node, _ := nodeTool(t, "openai/realtime/ws.js")
	nodeTool(t, "ws/package.json")
	script, _ := filepath.Abs(filepath.Join(nodeTools, "openai_realtime.mjs"))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, script)
	cmd.Dir = nodeTools
	cmd.Env = append([]string{"VG_BASE_URL=" + g.URL + "/v1", "VG_MODEL=gw-realtime", "VG_TOKEN=" + token,
		"NODE_EXTRA_CA_CERTS=" + certFile}, vars...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the SDK script failed: %v\n%s", err, stderr.String())
	}
	t.Logf("SDK saw: %s", clipText(string(out)))
	var got sdkRealtimeResult
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return got
}

// TestOpenAISDKRealtime: the SDK's realtime client updates the session, appends, commits and
// asks for a response; it gets the input transcription, the audio deltas, the transcript and
// response.done with usage, on the subprotocol it offered, and the algorithm service gets the
// audio in the format agreed.
func TestOpenAISDKRealtime(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		format, codec string
		rate          float64
		tts           int // bytes of 100 ms
	}{
		{"audio/pcm", "pcm", 24000, 4800},
		{"audio/pcmu", "mulaw", 8000, 800},
	} {
		t.Run(c.codec, func(t *testing.T) {
			algo := realtimeAlgo(t, c.tts)
			env, certFile, _ := tlsFiles(t)
			g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": algo.URL}))
			got := runRealtimeSDK(t, g, certFile, tokenFor(t, "u-rt", []string{"user"}, nil), "VG_FORMAT="+c.format)
			if got.TimedOut || len(got.Errors) > 0 {
				t.Fatalf("timed out %v, errors %v", got.TimedOut, got.Errors)
			}
			for _, want := range []string{"session.created", "session.updated", "input_audio_buffer.committed",
				"conversation.item.input_audio_transcription.delta", "conversation.item.input_audio_transcription.completed",
				"response.created", "response.output_audio_transcript.delta", "response.output_audio.delta",
				"response.output_audio.done", "response.output_audio_transcript.done", "response.done"} {
				if !slices.Contains(got.Types, want) {
					t.Errorf("no %s among %v", want, got.Types)
				}
			}
			// Node's client authenticates with a header and offers no subprotocol; the browser's
			// is TestRealtimeBrowserSubprotocol's.
			if got.Session["type"] != c.format {
				t.Errorf("session format %v", got.Session)
			}
			if got.InputTranscript != "hello" || got.InputDeltas != "hello" || got.Transcript != "Hi there" {
				t.Errorf("input %q (deltas %q), transcript %q", got.InputTranscript, got.InputDeltas, got.Transcript)
			}
			if got.AudioDeltas != 2 || got.AudioBytes != 2*c.tts || got.Status != "completed" {
				t.Errorf("audio deltas %d (%d bytes), status %q", got.AudioDeltas, got.AudioBytes, got.Status)
			}
			u := got.Usage
			if u["input_audio_seconds"] != 0.2 || u["output_audio_seconds"] != 0.2 || u["input_tokens"] != 5 || u["output_tokens"] != 2 {
				t.Errorf("usage %v, want 0.2 s in and out, 5 and 2 tokens", u)
			}
			var chunk, config map[string]any
			for _, m := range algo.textReceived() {
				var v map[string]any
				_ = json.Unmarshal([]byte(m), &v)
				switch v["type"] {
				case "audio_chunk":
					chunk = v
				case "config":
					config = v
				}
			}
			if chunk["format"] != c.codec || chunk["sample_rate"] != c.rate || config["instructions"] != "be brief" {
				t.Errorf("upstream got audio_chunk %v and config %v", chunk["format"], config)
			}
		})
	}
}

// audio24k is how much audio (24 kHz 16-bit mono PCM, the realtime default) the algorithm
// service received.
func audio24k(t *testing.T, algo *fakeAlgo) time.Duration {
	return algo.audioReceived(t) * 2 / 3 // audioReceived counts 16 kHz
}

// realtimeDial opens GET /v1/realtime on g with a Go client: the token as a Bearer header, or
// (browser) as the subprotocol OpenAI's browser clients use, with an Origin.
func realtimeDial(t *testing.T, g *testGateway, token string, browser bool, origin string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	opts := &websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{}}, Subprotocols: []string{"realtime"}}
	if browser {
		opts.Subprotocols = append(opts.Subprotocols, "openai-insecure-api-key."+token)
		opts.HTTPHeader = http.Header{"Origin": {origin}}
	} else {
		opts.HTTPHeader = bearer(token)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, "ws://"+g.Addr+"/v1/realtime?model=m", opts)
	if conn != nil {
		t.Cleanup(func() { conn.CloseNow() })
	}
	return conn, res, err
}

// readEvent reads the next server event.
func readEvent(t *testing.T, c *websocket.Conn) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, msg, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	var ev map[string]any
	if err := json.Unmarshal(msg, &ev); err != nil {
		t.Fatalf("event %s: %v", msg, err)
	}
	return ev
}

func sendEvent(t *testing.T, c *websocket.Conn, ev string) {
	t.Helper()
	if err := c.Write(t.Context(), websocket.MessageText, []byte(ev)); err != nil {
		t.Fatal(err)
	}
}

// TestRealtimeBrowserSubprotocol: a browser's key, offered as openai-insecure-api-key.<jwt>
// beside realtime, is taken as the token and never echoed; the origin rule is voice's.
func TestRealtimeBrowserSubprotocol(t *testing.T) {
	algo := realtimeAlgo(t, 4800)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example"})
	tok := tokenFor(t, "u-browser", []string{"user"}, nil)
	conn, res, err := realtimeDial(t, g, tok, true, "https://app.example")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if p := res.Header.Get("Sec-WebSocket-Protocol"); p != "realtime" || conn.Subprotocol() != "realtime" {
		t.Fatalf("the 101 answered subprotocol %q, want realtime alone", p)
	}
	for k, vs := range res.Header {
		for _, v := range vs {
			if strings.Contains(v, tok) {
				t.Fatalf("the token is echoed in %s", k)
			}
		}
	}
	if ev := readEvent(t, conn); ev["type"] != "session.created" {
		t.Fatalf("first event %v", ev)
	}
	// Another origin is refused, a wrong key too.
	if _, res, err := realtimeDial(t, g, tok, true, "https://evil.example"); err == nil || res == nil || res.StatusCode != http.StatusForbidden {
		t.Fatalf("another origin: %v", describeResult(res, err))
	}
	if _, res, err := realtimeDial(t, g, "not-a-token", true, "https://app.example"); err == nil || res == nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a wrong key: %v", describeResult(res, err))
	}
}

// TestRealtimeBadEvents: malformed JSON, an unknown event, audio that is not base64, an event
// over the size limit and a binary message each get an error event naming what was wrong, and
// the session goes on.
func TestRealtimeBadEvents(t *testing.T) {
	algo := realtimeAlgo(t, 4800)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	conn, _, err := realtimeDial(t, g, tokenFor(t, "u-bad", []string{"user"}, nil), false, "")
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, conn) // session.created
	big := `{"type":"input_audio_buffer.append","audio":"` + strings.Repeat("A", 1<<20) + `"}`
	for _, c := range []struct{ event, code, mention string }{
		{`{"type":`, "invalid_json", ""},
		{`{"type":"conversation.item.truncate","item_id":"x"}`, "unknown_event", "conversation.item.truncate"},
		{`{"type":"input_audio_buffer.append","audio":"%%%not base64"}`, "invalid_audio", "base64"},
		{big, "invalid_message", "size limit"},
		{`{"type":"session.update","session":{"tools":[{"type":"function"}]}}`, "unsupported_parameter", "session.tools"},
		{`{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":16000}}}}}`, "invalid_value", "24000"},
		{`{"type":"input_audio_buffer.commit"}`, "input_audio_buffer_commit_empty", ""},
		{`{"type":"response.cancel"}`, "response_cancel_not_active", ""},
	} {
		sendEvent(t, conn, c.event)
		ev := readEvent(t, conn)
		e, _ := ev["error"].(map[string]any)
		if ev["type"] != "error" || e["code"] != c.code || !strings.Contains(e["message"].(string), c.mention) {
			t.Errorf("%.60s: %v, want error %s naming %q", c.event, ev, c.code, c.mention)
		}
	}
	if err := conn.Write(t.Context(), websocket.MessageBinary, make([]byte, 480)); err != nil {
		t.Fatal(err)
	}
	if ev := readEvent(t, conn); ev["type"] != "error" {
		t.Errorf("a binary message: %v", ev)
	}
	// The session goes on: a text turn is answered.
	sendEvent(t, conn, `{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}}`)
	sendEvent(t, conn, `{"type":"response.create"}`)
	var types []string
	for len(types) == 0 || types[len(types)-1] != "response.done" {
		if len(types) > 20 {
			t.Fatalf("no response.done: %v", types)
		}
		types = append(types, readEvent(t, conn)["type"].(string))
	}
	if !slices.Contains(types, "conversation.item.added") || !slices.Contains(types, "response.output_audio.delta") {
		t.Errorf("after the bad events, a text turn gave %v", types)
	}
	if !slices.Contains(algo.textReceived(), `{"role":"user","session_id":"`+sessionIDOf(t, g)+`","text":"hi","type":"text"}`) {
		t.Errorf("the algorithm service did not get the text item: %v", algo.textReceived())
	}
	// Once audio has flowed the format cannot change: refused, and the session keeps (and says)
	// the one in force.
	sendEvent(t, conn, `{"type":"input_audio_buffer.append","audio":"`+strings.Repeat("AAAA", 160)+`"}`)
	sendEvent(t, conn, `{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}}`)
	if ev := readEvent(t, conn); ev["type"] != "error" || ev["error"].(map[string]any)["code"] != "validation_error" {
		t.Fatalf("a format change after audio: %v", ev)
	}
	sendEvent(t, conn, `{"type":"session.update","session":{"instructions":"still pcm"}}`)
	ev := readEvent(t, conn)
	in := ev["session"].(map[string]any)["audio"].(map[string]any)["input"].(map[string]any)["format"].(map[string]any)
	if ev["type"] != "session.updated" || in["type"] != "audio/pcm" {
		t.Fatalf("after the refused change: %v", ev)
	}
}

// sessionIDOf is the ID of the one live voice session of g.
func sessionIDOf(t *testing.T, g *testGateway) string {
	t.Helper()
	l := listVoice(t, g, tokenFor(t, "u-admin", []string{"admin"}, nil))
	if len(l.Sessions) != 1 {
		t.Fatalf("%d live sessions, want 1", len(l.Sessions))
	}
	return l.Sessions[0].SessionID
}

// TestRealtimeQuotaExhausted: the SDK's client asks for a response whose speech is longer than
// what is left of its user's daily audio (1 s): mid-response, the gateway tells it with an
// error event quota_exceeded, then closes 4429; the response never completes, and the quota is
// charged exactly.
func TestRealtimeQuotaExhausted(t *testing.T) {
	t.Parallel()
	// 200 ms of audio in, then 3 s of speech out, in 100 ms frames.
	frames := []voiceFrame{{Text: `{"type":"llm_response_chunk","content":"a long answer"}`}}
	for range 30 {
		frames = append(frames, voiceFrame{Audio: 4800})
	}
	frames = append(frames, voiceFrame{Text: `{"type":"tts_complete"}`})
	algo := newAlgo(t, algoOptions{Replier: func() voiceReplier {
		return func(typ websocket.MessageType, msg []byte) []voiceFrame {
			if typ == websocket.MessageText && upstreamTypeOf(msg) == "stop" {
				return frames
			}
			return nil
		}
	}})
	env, certFile, _ := tlsFiles(t)
	pol := voicePolicy(t, "e2e.json", func(l *policy.Limits) {
		l.VoiceAudioSecondsPerDay = &policy.AudioQuota{PerUser: 1, PerTenant: 100}
		l.Tenants = map[string]policy.TenantLimits{"tenant-a": {}}
	})
	g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": algo.URL, "POLICY_FILE": pol}))
	got := runRealtimeSDK(t, g, certFile, tokenFor(t, "u-rt-quota", []string{"user"}, nil), "VG_MODE=quota")
	if !slices.Contains(got.Errors, "quota_exceeded") || got.CloseCode != int(voice.CloseQuotaExceeded) {
		t.Fatalf("errors %v, close %d: want quota_exceeded then 4429", got.Errors, got.CloseCode)
	}
	delta, failed := slices.Index(got.Types, "response.output_audio.delta"), slices.Index(got.Types, "error")
	if delta < 0 || failed < delta || slices.Contains(got.Types, "response.done") {
		t.Fatalf("events %v: want audio deltas, then the error, and no response.done", got.Types)
	}
	// 200 ms in, so 800 ms out: 8 frames of 100 ms reach the client, no more.
	if got.AudioBytes != 8*4800 {
		t.Errorf("%d bytes of speech reached the client, want the 800 ms left of the quota", got.AudioBytes)
	}
}

// TestRealtimeRevokedOnAnotherInstance: sessions on B whose tokens are revoked through A get an
// error event token_revoked and close 4401; the p99 from sending the revocation to A to the
// client's error event is within 100 ms.
func TestRealtimeRevokedOnAnotherInstance(t *testing.T) {
	r := startRedis(t)
	algo := realtimeAlgo(t, 4800)
	env := redisEnv(r, algo, okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	const n = 100 // so that p99 is the 99th of them
	var took []time.Duration
	for i := range n {
		tok := w.token(t, "u-rt-revoke-"+strconv.Itoa(i), []string{"user"}, nil)
		conn, _, err := realtimeDial(t, b, tok, false, "")
		if err != nil {
			t.Fatal(err)
		}
		readEvent(t, conn) // session.created: the session runs
		type ending struct {
			errAt time.Time
			code  string
			close websocket.StatusCode
		}
		done := make(chan ending, 1)
		go func() {
			var e ending
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for {
				_, msg, err := conn.Read(ctx)
				if err != nil {
					e.close = websocket.CloseStatus(err)
					done <- e
					return
				}
				var ev struct {
					Type  string
					Error struct{ Code string }
				}
				_ = json.Unmarshal(msg, &ev)
				if ev.Type == "error" && e.code == "" {
					e.errAt, e.code = time.Now(), ev.Error.Code
				}
			}
		}()
		sent := time.Now()
		res := call(t, a, "POST", "/api/v2/auth/revoke", tok, "")
		wantStatus(t, res, http.StatusOK)
		e := <-done
		if e.close != 4401 || (e.code != "token_revoked" && e.code != "token_invalid") {
			t.Fatalf("session %d: error %q, close %d; want token_revoked then 4401", i, e.code, e.close)
		}
		took = append(took, e.errAt.Sub(sent))
	}
	slices.Sort(took)
	p99 := percentile(took, 0.99)
	t.Logf("revocation to error event: median %v, p99 %v, max %v", took[n/2], p99, took[n-1])
	if p99 > 100*time.Millisecond {
		t.Errorf("p99 %v from the revocation to the client's error event, want within 100 ms", p99)
	}
}

// TestRealtimeInBrowser: a page in Chromium, on an origin of its own that CORS_ORIGINS allows,
// talks to GET /v1/realtime as OpenAI's browser client does (testdata/realtime/page.html): its
// key as a subprotocol, a session.update, 200 ms of audio, commit, response.create; it gets the
// transcription, the audio and response.done, and the algorithm service the audio.
func TestRealtimeInBrowser(t *testing.T) {
	t.Parallel()
	b := startBrowser(t)
	pageSrv := httptest.NewServer(http.FileServer(http.Dir("testdata/realtime")))
	t.Cleanup(pageSrv.Close)
	algo := realtimeAlgo(t, 4800)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": pageSrv.URL})
	tok := tokenFor(t, "u-rt-browser", []string{"user"}, nil)
	p := b.open(t, pageSrv.URL+"/page.html#"+url.QueryEscape("ws://"+g.Addr+"&"+tok))
	p.waitFor("response.done", `window.voicegate.done === true`)
	var got struct {
		Types, Errors     []string
		AudioBytes        int
		Transcript, Input string
		Protocol          string
		Usage             map[string]float64
	}
	p.eval(`window.voicegate`, &got)
	if got.Protocol != "realtime" || len(got.Errors) > 0 || got.Input != "hello" || got.Transcript != "Hi there" || got.AudioBytes != 9600 {
		t.Fatalf("the page saw %+v", got)
	}
	if got.Usage["input_audio_seconds"] != 0.2 {
		t.Errorf("usage %v, want 0.2 s of input audio", got.Usage)
	}
	if a := audio24k(t, algo); a != 200*time.Millisecond {
		t.Errorf("the algorithm service got %v of audio, want the page's 200 ms", a)
	}
}

// TestRealtimeDrained: a gateway that shuts down tells its realtime clients with an error event
// server_shutdown, then closes 1012, as it does voice clients.
func TestRealtimeDrained(t *testing.T) {
	t.Parallel()
	algo := realtimeAlgo(t, 4800)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	conn, _, err := realtimeDial(t, g, tokenFor(t, "u-rt-drain", []string{"user"}, nil), false, "")
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, conn) // session.created
	stopped := make(chan struct{})
	go func() { defer close(stopped); g.cancel() }()
	var codes []string
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var closeErr error
	for {
		_, msg, err := conn.Read(ctx)
		if err != nil {
			closeErr = err
			break
		}
		var ev struct {
			Type  string
			Error struct{ Code string }
		}
		_ = json.Unmarshal(msg, &ev)
		if ev.Type == "error" {
			codes = append(codes, ev.Error.Code)
		}
	}
	<-stopped
	if !slices.Contains(codes, "server_shutdown") || websocket.CloseStatus(closeErr) != websocket.StatusServiceRestart {
		t.Fatalf("errors %v, close %v: want server_shutdown, then 1012", codes, closeErr)
	}
}
