package main

// Tests that keep openapi/openapi.json true: it is a valid OpenAPI 3.1 document (checked by
// kin-openapi, an independent implementation), it has exactly the routes of the route table,
// its error codes are the gateway's, the SSE golden files and real voice messages match its
// schemas, and real responses of a running gateway match their operations.

import (
	"bytes"
	"context"
	"encoding/json"
	"go/ast"
	"go/parser"
	gotoken "go/token"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"voicegate/openapi"
	"voicegate/policy"
	"voicegate/voice"
)

// loadOpenAPI loads and validates the document.
func loadOpenAPI(t *testing.T) *openapi3.T {
	t.Helper()
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(openapi.Document())
	if err != nil {
		t.Fatalf("openapi.json does not load: %v", err)
	}
	if err := doc.Validate(loader.Context, openapi3.EnableExamplesValidation()); err != nil {
		t.Fatalf("openapi.json is not a valid OpenAPI document: %v", err)
	}
	return doc
}

// schemaCheck validates values against the document's component schemas.
type schemaCheck struct {
	t   *testing.T
	doc *openapi3.T
}

func (c schemaCheck) err(name string, v any) error {
	ref := c.doc.Components.Schemas[name]
	if ref == nil || ref.Value == nil {
		c.t.Fatalf("openapi.json has no schema %s", name)
	}
	return c.doc.ValidateSchemaJSON(ref.Value, v, openapi3.EnableJSONSchema2020())
}

// valid fails the test unless v (JSON text or a decoded value) matches schema name.
func (c schemaCheck) valid(name string, v any, what string) {
	c.t.Helper()
	if raw, ok := v.(string); ok {
		if err := json.Unmarshal([]byte(raw), &v); err != nil {
			c.t.Fatalf("%s is not JSON: %v: %s", what, err, raw)
		}
	}
	if err := c.err(name, v); err != nil {
		c.t.Errorf("%s does not match %s: %v\n%s", what, name, err, clipText(mustJSON(v)))
	}
}

// invalid fails the test if v matches schema name: the schemas must tell right from wrong.
func (c schemaCheck) invalid(name string, v any, what string) {
	c.t.Helper()
	if raw, ok := v.(string); ok {
		_ = json.Unmarshal([]byte(raw), &v)
	}
	if c.err(name, v) == nil {
		c.t.Errorf("%s matches %s, want it refused: %s", what, name, mustJSON(v))
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestOpenAPIDocument(t *testing.T) {
	doc := loadOpenAPI(t)
	if !doc.IsOpenAPI31OrLater() || !strings.HasPrefix(doc.OpenAPI, "3.1") {
		t.Errorf("openapi = %q, want 3.1.x", doc.OpenAPI)
	}
	// Relative: the document describes whichever gateway serves it.
	if len(doc.Servers) != 1 || doc.Servers[0].URL != "/" {
		t.Errorf("servers = %v, want one, the relative /", doc.Servers)
	}
	bearer := doc.Components.SecuritySchemes["bearer"]
	if bearer == nil || bearer.Value.Type != "http" || bearer.Value.Scheme != "bearer" || bearer.Value.BearerFormat != "JWT" {
		t.Errorf("securitySchemes.bearer = %+v, want http bearer JWT", bearer)
	}
	if len(doc.Security) != 1 || doc.Security[0]["bearer"] == nil {
		t.Errorf("the document's default security = %v, want bearer", doc.Security)
	}
	for _, h := range []string{"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After", "X-Request-ID"} {
		if doc.Components.Headers[h] == nil {
			t.Errorf("components.headers has no %s", h)
		}
	}
	rl := doc.Components.Responses["RateLimited"].Value
	for _, h := range []string{"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} {
		if rl.Headers[h] == nil {
			t.Errorf("the 429 response does not describe %s", h)
		}
	}

	// Every error response of every operation is the Error object, OpenAIError on the routes
	// that speak OpenAI's API; /readyz's 503 is a status for probes, not an error.
	for path, item := range doc.Paths.Map() {
		if path == "/readyz" {
			continue
		}
		for method, op := range item.Operations() {
			for status, ref := range op.Responses.Map() {
				code, err := strconv.Atoi(status)
				if err != nil || code < 400 {
					continue
				}
				want := "#/components/schemas/Error"
				if openAIRoute(path) {
					want = "#/components/schemas/OpenAIError"
				}
				mt := ref.Value.Content.Get("application/json")
				if mt == nil || mt.Schema == nil || mt.Schema.Ref != want {
					t.Errorf("%s %s: response %s is not an application/json %s", method, path, status, want)
				}
			}
		}
	}

	// The chat stream describes its events, and the voice upgrade its subprotocols.
	chat := doc.Paths.Find("/api/v2/chat/stream").Post.Responses.Status(200).Value
	if mt := chat.Content.Get("text/event-stream"); mt == nil || mt.Schema.Ref != "#/components/schemas/ChatEvent" {
		t.Errorf("the chat stream's 200 is not text/event-stream of ChatEvent")
	}
	up := doc.Paths.Find("/api/v2/voice/stream").Get
	ws, _ := up.Extensions["x-websocket"].(map[string]any)
	if protos, _ := ws["subprotocols"].([]any); len(protos) == 0 || protos[0] != "voice-protocol-v2" {
		t.Errorf("the voice upgrade's x-websocket.subprotocols = %v, want voice-protocol-v2 first", ws["subprotocols"])
	}
	if up.Responses.Status(101) == nil {
		t.Error("the voice upgrade has no 101 response")
	}
}

// TestOpenAPIRouteTable: every route of the route table (with every optional route on) has its
// path and methods in the document, no path or method of the document lacks a route, the routes
// served without a token are exactly those the document marks security: [], and the routes that
// declare an upgrade are exactly those it describes as WebSockets (x-websocket).
func TestOpenAPIRouteTable(t *testing.T) {
	doc := loadOpenAPI(t)
	anyMethod := []string{"DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"}
	want := map[string]route{} // "METHOD /doc/path"
	for _, r := range routes(&config{ConsoleEnabled: true, MetricsEnabled: true}, handlers{}) {
		method, path, ok := strings.Cut(r.pattern, " ")
		if !ok {
			method, path = "", r.pattern
		}
		path = strings.ReplaceAll(path, "...}", "}")
		if strings.HasSuffix(path, "/") {
			path += "{path}" // a subtree: the rest of the path, passed on
		}
		methods := []string{method}
		if method == "" {
			methods = anyMethod
		}
		for _, m := range methods {
			want[m+" "+path] = r
		}
	}
	have := map[string]bool{}
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			key := method + " " + path
			have[key] = true
			r, ok := want[key]
			if !ok {
				t.Errorf("openapi.json describes %s, which no route serves", key)
				continue
			}
			public := op.Security != nil && len(*op.Security) == 0
			if public != (r.access == open) {
				t.Errorf("%s: security [] is %v in openapi.json, but the route's access is %v", key, public, r.access)
			}
			_, ws := op.Extensions["x-websocket"]
			if ws != bool(r.upgrade) {
				t.Errorf("%s: x-websocket is %v in openapi.json, but the route declares an upgrade: %v", key, ws, r.upgrade)
			}
		}
	}
	for key := range want {
		if !have[key] {
			t.Errorf("route %s has no operation in openapi.json", key)
		}
	}
}

// readSSE parses a stream's events as ChatEvent describes them: event, id and the decoded
// data.
func readSSE(t *testing.T, r io.Reader) []map[string]any {
	t.Helper()
	s := newSSEReader(r)
	var out []map[string]any
	for {
		e, err := s.next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("reading the stream: %v", err)
		}
		ev := map[string]any{"event": e.Event, "data": e.fields(t)}
		if e.ID != "" {
			ev["id"] = e.ID
		}
		out = append(out, ev)
	}
}

// TestOpenAPISSEGoldenFiles: every event of every SSE golden file matches ChatEvent, and
// events that break the contract do not.
func TestOpenAPISSEGoldenFiles(t *testing.T) {
	t.Parallel()
	c := schemaCheck{t, loadOpenAPI(t)}
	files, _ := filepath.Glob(filepath.Join("testdata", "sse", "*.sse"))
	if len(files) == 0 {
		t.Fatal("no testdata/sse/*.sse golden files")
	}
	seen := map[string]bool{}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, ev := range readSSE(t, bytes.NewReader(raw)) {
			seen[ev["event"].(string)] = true
			c.valid("ChatEvent", ev, filepath.Base(f)+" event "+strconv.Itoa(i))
		}
	}
	for _, name := range []string{"stream_start", "generation_chunk", "generation_done", "error", "stream_end", "message"} {
		if !seen[name] {
			t.Errorf("no golden file has a %s event to check", name)
		}
	}
	// An error event is the gateway's (StreamErrorEvent) or an upstream line's
	// (UpstreamErrorEvent), never both: ChatEvent's oneOf must tell them apart.
	c.valid("StreamErrorEvent", `{"event":"error","id":"2","data":{"request_id":"r","code":"INVALID_LINE","message":"m","line_number":2,"fatal":false,"timestamp":1,"timestamp_ms":1000}}`, "a skipped line")
	c.invalid("UpstreamErrorEvent", `{"event":"error","id":"2","data":{"request_id":"r","code":"INVALID_LINE","message":"m","line_number":2,"fatal":false,"timestamp":1,"timestamp_ms":1000}}`, "a skipped line")
	c.valid("UpstreamErrorEvent", `{"event":"error","id":"2","data":{"type":"error","code":"MODEL_OVERLOADED","request_id":"r","line_number":2,"timestamp":1,"timestamp_ms":1000}}`, "an upstream error line")
	c.invalid("StreamErrorEvent", `{"event":"error","id":"2","data":{"type":"error","code":"MODEL_OVERLOADED","request_id":"r","line_number":2,"timestamp":1,"timestamp_ms":1000}}`, "an upstream error line")
	for _, bad := range []struct{ what, event string }{
		{"stream_end without its counts", `{"event":"stream_end","data":{"request_id":"r","timestamp":1}}`},
		{"stream_start without request_id", `{"event":"stream_start","data":{"timestamp":1}}`},
		{"an upstream event without its id", `{"event":"generation_chunk","data":{"type":"generation_chunk","content":"x","request_id":"r","line_number":1,"timestamp":1}}`},
		{"an upstream event without line_number", `{"event":"custom","id":"3","data":{"type":"custom","request_id":"r","timestamp":1}}`},
		{"an error event without a code", `{"event":"error","data":{"request_id":"r","message":"m","timestamp":1}}`},
		{"a gateway error event with a code the gateway never sends", `{"event":"error","data":{"request_id":"r","code":"STREAM_ERROR","message":"m","fatal":true,"timestamp":1}}`},
		{"an upstream error line without its id", `{"event":"error","data":{"type":"error","code":"X","request_id":"r","line_number":2,"timestamp":1}}`},
	} {
		c.invalid("ChatEvent", bad.event, bad.what)
	}
}

// TestOpenAPIVoiceMessages: the messages of a real session against -demo, both ways, match
// the voice schemas; so do a browser's in-band refusal and its close code.
func TestOpenAPIVoiceMessages(t *testing.T) {
	t.Parallel()
	c := schemaCheck{t, loadOpenAPI(t)}
	for _, m := range []string{`{"type":"start"}`, `{"type":"stop"}`, `{"type":"ping"}`, `{"type":"config","language":"en-US"}`,
		`{"type":"text","text":"hello"}`, `{"type":"cancel"}`, `{"type":"interrupt"}`, `{"type":"end"}`} {
		c.valid("VoiceClientMessage", m, "client message "+m)
	}
	c.invalid("VoiceClientMessage", `{"type":"launch"}`, "an unknown control type")
	c.invalid("VoiceClientMessage", `{"text":"no type"}`, "a control message without type")

	// What the algorithm service receives: audio_chunk messages.
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	v := openVoice(t, g, "?conversation_id=c-schema", bearer(tokenFor(t, "u-schema", []string{"user"}, nil)))
	c.valid("VoiceServerMessage", v.init, "session_initialized")
	c.valid("VoiceSessionInitialized", v.init, "session_initialized")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for range 3 {
		if err := v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"frobnicate"}`)); err != nil {
		t.Fatal(err)
	}
	_, msg, err := v.conn.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.valid("VoiceServerMessage", string(msg), "the error for an unknown control type")
	c.valid("VoiceError", string(msg), "the error for an unknown control type")
	var chunks []string
	eventually(t, 2*time.Second, "three audio_chunk messages reach the algorithm service", func() bool {
		chunks = algo.textReceived()
		return len(chunks) >= 3
	})
	for i, m := range chunks {
		c.valid("VoiceAudioChunk", m, "audio_chunk "+strconv.Itoa(i))
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "")

	// What a client receives from the demo's algorithm service.
	demo := startRun(t, []string{"-demo"}, nil)
	d := openVoice(t, demo, "?conversation_id=c-demo-schema", bearer(tokenFor(t, "u-demo", []string{"user"}, nil)))
	for _, m := range []string{`{"type":"start"}`} {
		if err := d.conn.Write(ctx, websocket.MessageText, []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	for range 20 {
		if err := d.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	types := map[string]bool{}
	audio := 0
	for !types["tts_complete"] {
		typ, msg, err := d.conn.Read(ctx)
		if err != nil {
			t.Fatalf("reading the demo session after %v: %v", types, err)
		}
		if typ == websocket.MessageBinary {
			audio += len(msg)
			continue
		}
		var m map[string]any
		_ = json.Unmarshal(msg, &m)
		typeName, _ := m["type"].(string)
		types[typeName] = true
		c.valid("VoiceServerMessage", string(msg), typeName+" message")
	}
	for _, want := range []string{"ack", "asr_partial", "asr_final", "llm_response_chunk", "tts_start", "tts_complete"} {
		if !types[want] {
			t.Errorf("the demo session sent no %s (got %v)", want, types)
		}
	}
	if audio < 16000*2/2 {
		t.Errorf("the demo sent %d bytes of TTS audio, want at least half a second at 16 kHz", audio)
	}
	_ = d.conn.Close(websocket.StatusNormalClosure, "")

	// A browser's refusal.
	conn, res, err := voiceDial(t, g, "", http.Header{"Origin": {"https://elsewhere.example"}}, voiceSubprotocol)
	if err != nil {
		t.Fatalf("a browser-style upgrade without a token was not accepted for an in-band refusal: %v (%s)", err, describeResult(res, err))
	}
	_, msg, err = conn.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.valid("VoiceServerMessage", string(msg), "an in-band refusal")
	c.valid("VoiceError", string(msg), "an in-band refusal")
	_, _, err = conn.Read(ctx)
	code := websocket.CloseStatus(err)
	if err := c.err("VoiceCloseCode", float64(code)); err != nil {
		t.Errorf("close code %d does not match VoiceCloseCode: %v", code, err)
	}
	c.invalid("VoiceCloseCode", 1006.0, "1006, which no gateway sends")
}

// TestOpenAPIResponses: real responses of a running gateway, errors included, match the
// operations they answer: status, headers and body (kin-openapi's response validation), and
// the chat stream's events ChatEvent. Every route of the route table is asked at least once.
func TestOpenAPIResponses(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	c := schemaCheck{t, doc}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_start","model":"m"}`, `{"type":"generation_chunk","content":"Hi"}`,
			`{"type":"something_else","x":1}`, `{"type":"generation_done","finish_reason":"stop"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CONSOLE_ENABLED": "true"})
	user := tokenFor(t, "u-oas", []string{"user"}, nil)
	admin := tokenFor(t, "u-oas-admin", []string{"admin"}, nil)
	revoked := tokenFor(t, "u-oas-out", []string{"user"}, nil)
	super := tokenFor(t, "u-oas-root", []string{"super_admin"}, nil)

	// The route table's patterns, to tell which route each request reaches.
	table := http.NewServeMux()
	untried := map[string]bool{}
	for _, r := range routes(&config{ConsoleEnabled: true, MetricsEnabled: true}, handlers{}) {
		table.Handle(r.pattern, http.NotFoundHandler())
		untried[r.pattern] = true
	}

	for _, tt := range []struct {
		method, path, token, body string
		header                    map[string]string
		status                    int
	}{
		{"GET", "/healthz", "", "", nil, 200},
		{"GET", "/readyz", "", "", nil, 200},
		{"GET", "/openapi.json", "", "", nil, 200},
		{"GET", "/console", "", "", nil, 200},
		{"GET", "/console/console.js", "", "", nil, 200},
		{"GET", "/console/nothing.js", "", "", nil, 404},
		{"GET", "/metrics", "", "", nil, 200},
		{"POST", "/api/v2/chat/stream", user, `{"message":"hello"}`, nil, 200},
		{"POST", "/api/v2/chat/stream", "", `{"message":"hello"}`, nil, 401},
		{"POST", "/api/v2/chat/stream", user, `{"message":""}`, nil, 400},
		{"POST", "/api/v2/chat/stream", user, `{"message":`, nil, 400},
		{"POST", "/api/v2/chat/stream", user, `{"message":"hi"}`, map[string]string{"Content-Type": "text/plain"}, 415},
		{"GET", "/api/v2/chat/stream/nobody-runs-this", user, "", nil, 404},
		{"POST", "/api/v2/chat/cancel", user, `{"request_id":"nobody-runs-this"}`, nil, 404},
		{"POST", "/api/v2/chat/cancel", user, `{}`, nil, 400},
		{"POST", "/api/v2/chat/cancel", user, `{"request_id":"r-1","user_id":"someone-else"}`, nil, 403},
		{"POST", "/api/v2/chat/cancel", admin, `{"request_id":"r-1","user_id":"someone-else"}`, nil, 404},
		{"POST", "/api/v2/chat/cancel", admin, `{"request_id":"r-1","user_id":"a\u2028b"}`, nil, 400},
		{"POST", "/api/v2/auth/revoke", revoked, ``, nil, 200},
		{"POST", "/api/v2/auth/revoke", user, `{"user_id":"someone-else"}`, nil, 403},
		{"POST", "/api/v2/auth/revoke", super, `{"user_id":"u-oas-gone","tenant_id":"tenant-b"}`, nil, 200},
		{"POST", "/api/v2/auth/revoke", admin, `{"jti":"j-oas","tenant_id":"tenant-b"}`, nil, 403},
		{"GET", "/api/v2/voice/sessions", admin, "", nil, 200},
		{"GET", "/api/v2/voice/sessions", user, "", nil, 403},
		{"GET", "/api/v2/voice/sessions/no-such-session", admin, "", nil, 404},
		{"DELETE", "/api/v2/voice/sessions/no-such-session", admin, "", nil, 404},
		{"POST", "/api/v2/voice/broadcast", admin, `{"message":"maintenance at noon"}`, nil, 200},
		{"POST", "/api/v2/voice/broadcast", user, `{"message":"hi"}`, nil, 403},
		{"GET", "/api/v2/voice/stream", user, "", nil, 426},
		{"GET", "/api/v2/admin/users", admin, "", nil, 404},
		{"POST", "/api/v2/chat", user, `{"message":"hello"}`, nil, 200},
		{"POST", "/api/v2/chat", user, `{"message":""}`, nil, 400},
		{"POST", "/v1/chat/completions", user, `{"model":"default","messages":[{"role":"user","content":"hi"}]}`, nil, 200},
		{"POST", "/v1/chat/completions", user, `{"model":"default","messages":[{"role":"user","content":"hi"}],"tools":[]}`, nil, 400},
		{"POST", "/v1/chat/completions", user, `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`, nil, 404},
		{"POST", "/v1/chat/completions", "", `{"model":"default","messages":[{"role":"user","content":"hi"}]}`, nil, 401},
		{"GET", "/v1/models", user, "", nil, 200},
		{"GET", "/v1/models", "", "", nil, 401},
		{"GET", "/v1/realtime", user, "", nil, 426},
		{"DELETE", "/api/v2/documents/d1", admin, "", nil, 404},
	} {
		name := tt.method + " " + tt.path + " " + strconv.Itoa(tt.status)
		t.Run(name, func(t *testing.T) {
			var body io.Reader
			if tt.body != "" || tt.method == "POST" {
				body = strings.NewReader(tt.body)
			}
			req, err := http.NewRequestWithContext(t.Context(), tt.method, g.URL+tt.path, body)
			if err != nil {
				t.Fatal(err)
			}
			if _, pattern := table.Handler(req); pattern != "" {
				delete(untried, pattern)
			}
			if tt.method == "POST" {
				req.Header.Set("Content-Type", "application/json")
			}
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			res, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", res.StatusCode, tt.status, clipText(string(raw)))
			}

			sse := checkResponse(t, router, req, res, raw)
			if sse {
				evs := readSSE(t, bytes.NewReader(raw))
				if len(evs) < 5 {
					t.Fatalf("%d events, want stream_start, 4 upstream lines, stream_end", len(evs))
				}
				for i, ev := range evs {
					c.valid("ChatEvent", ev, "event "+strconv.Itoa(i)+" of a real stream")
				}
			}
		})
	}

	for pattern := range untried {
		t.Errorf("route %s is never asked: its responses are not checked against openapi.json", pattern)
	}

	t.Run("rate limited", func(t *testing.T) {
		gr := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "POLICY_FILE": "testdata/policy/e2e-rate.json"})
		limited := false
		for i := 0; i < 40 && !limited; i++ {
			req, _ := http.NewRequestWithContext(t.Context(), "GET", gr.URL+"/api/v2/voice/sessions", nil)
			req.Header.Set("Authorization", "Bearer "+admin)
			res, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.Header.Get("RateLimit-Limit") == "" {
				t.Errorf("answer %d without RateLimit-Limit", res.StatusCode)
			}
			checkResponse(t, router, req, res, raw)
			limited = res.StatusCode == http.StatusTooManyRequests
		}
		if !limited {
			t.Fatal("never rate limited within 40 requests")
		}
	})

	t.Run("voice audio quota used up", func(t *testing.T) {
		// A daily voice audio quota of 1 s: a session that sends more ends 4429, and the next
		// upgrade is refused with 429 QUOTA_EXCEEDED.
		valgo := newAlgo(t, algoOptions{})
		gq := startRun(t, nil, map[string]string{"ALGO_URL": valgo.URL, "POLICY_FILE": voicePolicy(t, "e2e.json", func(l *policy.Limits) {
			l.VoiceAudioSecondsPerDay = &policy.AudioQuota{PerUser: 1}
		})})
		tok := tokenFor(t, "u-oas-quota", []string{"user"}, nil)
		v := openVoice(t, gq, "", bearer(tok))
		ended := v.readToClose(t.Context())
		sendAudioUntilClosed(t, v, 3*time.Second)
		if e := waitEnding(t, ended, 5*time.Second); e.code != voice.CloseQuotaExceeded {
			t.Fatalf("the session closed %v (%v), want 4429", e.code, e.err)
		}
		var res *http.Response
		eventually(t, 5*time.Second, "the next upgrade is refused with 429", func() bool {
			conn, r, err := voiceDial(t, gq, "", bearer(tok))
			if err == nil {
				conn.CloseNow() // the session was settled after this one was admitted
				return false
			}
			res = r
			return r != nil && r.StatusCode == http.StatusTooManyRequests
		})
		raw, _ := io.ReadAll(res.Body)
		res.Body.Close()
		req, err := http.NewRequestWithContext(t.Context(), "GET", gq.URL+"/api/v2/voice/stream", nil)
		if err != nil {
			t.Fatal(err)
		}
		checkResponse(t, router, req, res, raw)
		var e struct{ Code string }
		if json.Unmarshal(raw, &e) != nil || e.Code != voice.CodeQuotaExceeded {
			t.Errorf("429 body %s, want code %s", raw, voice.CodeQuotaExceeded)
		}
	})
}

// checkResponse validates a real response against the operation kin-openapi finds for its
// request: status, headers and (JSON) body. It reports whether the body is an event stream,
// whose events the caller checks.
func checkResponse(t *testing.T, router routers.Router, req *http.Request, res *http.Response, raw []byte) (sse bool) {
	t.Helper()
	route, params, err := router.FindRoute(req)
	if err != nil {
		t.Fatalf("openapi.json has no operation for %s %s: %v", req.Method, req.URL.Path, err)
	}
	ctype := res.Header.Get("Content-Type")
	sse = strings.HasPrefix(ctype, "text/event-stream")
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 res.StatusCode,
		Header:                 res.Header,
		Body:                   io.NopCloser(bytes.NewReader(raw)),
		Options: &openapi3filter.Options{
			IncludeResponseStatus: true,
			// An event stream is not one document: its events are checked on their own.
			ExcludeResponseBody:     !strings.HasPrefix(ctype, "application/json"),
			SchemaValidationOptions: []openapi3.SchemaValidationOption{openapi3.EnableJSONSchema2020()},
		},
	}
	if err := openapi3filter.ValidateResponse(t.Context(), in); err != nil {
		t.Errorf("%s %s %d does not match openapi.json: %v\n%s", req.Method, req.URL.Path, res.StatusCode, err, clipText(string(raw)))
	}
	if mt := route.Operation.Responses.Status(res.StatusCode); mt != nil && mt.Value.Content != nil && len(raw) > 0 &&
		mt.Value.Content.Get(strings.Split(ctype, ";")[0]) == nil {
		t.Errorf("%s %s %d: Content-Type %q is not among the documented ones", req.Method, req.URL.Path, res.StatusCode, ctype)
	}
	return sse
}

// sentCodes are the error codes the gateway can send, read from its source (tests aside), by
// where they go.
type sentCodes struct {
	http   []string // in an Error body: proxy's Code constants, and any other code an Error is built with
	stream []string // in a chat stream's error events: sse's Code constants
	voice  []string // in a voice session's error messages: voice's Code constants
	unused []string // Code constants nothing refers to: declared, never sent
}

// gatewayCodes finds every Code constant of the module's packages (CodeX = "X"), keeps those
// something refers to, and sorts them by the package that sends them; it also takes the Code
// of every proxy.Error built with a constant or a literal, except the 499 that is only logged.
func gatewayCodes(t *testing.T) sentCodes {
	t.Helper()
	fset := gotoken.NewFileSet()
	type pkg struct {
		name  string
		files []*ast.File
	}
	var pkgs []pkg
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		if path != "." && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) {
			return filepath.SkipDir
		}
		parsed, err := parser.ParseDir(fset, path, func(fi os.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
		if err != nil {
			return err
		}
		for name, p := range parsed {
			var files []*ast.File
			for _, f := range p.Files {
				files = append(files, f)
			}
			pkgs = append(pkgs, pkg{name, files})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	isCode := func(name string) bool { return len(name) > 4 && strings.HasPrefix(name, "Code") }
	consts := map[string]string{} // "pkg.CodeX" → its value
	declared := map[*ast.Ident]bool{}
	for _, p := range pkgs {
		for _, f := range p.files {
			ast.Inspect(f, func(n ast.Node) bool {
				vs, ok := n.(*ast.ValueSpec)
				if !ok {
					return true
				}
				for i, id := range vs.Names {
					if i >= len(vs.Values) || !isCode(id.Name) {
						continue
					}
					if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == gotoken.STRING {
						v, _ := strconv.Unquote(lit.Value)
						consts[p.name+"."+id.Name] = v
						declared[id] = true
					}
				}
				return true
			})
		}
	}

	used := map[string]bool{}
	var built []string // codes proxy.Errors are built with
	for _, p := range pkgs {
		for _, f := range p.files {
			imports := map[string]string{} // local name → package name, for the module's packages
			for _, im := range f.Imports {
				path, _ := strconv.Unquote(im.Path.Value)
				if rest, ok := strings.CutPrefix(path, "voicegate/"); ok {
					local := filepath.Base(rest)
					if im.Name != nil {
						local = im.Name.Name
					}
					imports[local] = filepath.Base(rest)
				}
			}
			// resolve names the constant an expression refers to: "pkg.CodeX", or "".
			resolve := func(e ast.Expr) string {
				switch e := e.(type) {
				case *ast.Ident:
					return p.name + "." + e.Name
				case *ast.SelectorExpr:
					if x, ok := e.X.(*ast.Ident); ok && imports[x.Name] != "" {
						return imports[x.Name] + "." + e.Sel.Name
					}
				}
				return ""
			}
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.SelectorExpr:
					if key := resolve(n); key != "" {
						if _, ok := consts[key]; ok {
							used[key] = true
						}
						return false
					}
				case *ast.Ident:
					if _, ok := consts[p.name+"."+n.Name]; ok && !declared[n] {
						used[p.name+"."+n.Name] = true
					}
				case *ast.CompositeLit:
					if typ := resolve(n.Type); typ != "proxy.Error" {
						return true
					}
					var code, status string
					for _, el := range n.Elts {
						kv, ok := el.(*ast.KeyValueExpr)
						if !ok {
							continue
						}
						switch k, _ := kv.Key.(*ast.Ident); {
						case k == nil:
						case k.Name == "Code":
							if lit, ok := kv.Value.(*ast.BasicLit); ok && lit.Kind == gotoken.STRING {
								code, _ = strconv.Unquote(lit.Value)
							} else if v, ok := consts[resolve(kv.Value)]; ok {
								code = v
							}
						case k.Name == "Status":
							status = resolve(kv.Value)
						}
					}
					// 499 is what the access log says of a client that went away: never sent.
					if code != "" && status != "proxy.StatusClientClosed" {
						built = append(built, code)
					}
				}
				return true
			})
		}
	}

	var c sentCodes
	for key, v := range consts {
		if !used[key] {
			c.unused = append(c.unused, key+" ("+v+")")
			continue
		}
		switch strings.Split(key, ".")[0] {
		case "proxy":
			c.http = append(c.http, v)
		case "sse":
			c.stream = append(c.stream, v)
		case "voice":
			c.voice = append(c.voice, v)
		default:
			t.Errorf("%s = %q: a code outside proxy, sse and voice, which this test does not know where it goes", key, v)
		}
	}
	c.http = append(c.http, built...)
	for _, l := range []*[]string{&c.http, &c.stream, &c.voice, &c.unused} {
		slices.Sort(*l)
		*l = slices.Compact(*l)
	}
	if len(c.http) < 20 || len(c.stream) < 4 || len(c.voice) < 8 {
		t.Fatalf("found only %d HTTP, %d stream and %d voice codes in the source: the scan is broken", len(c.http), len(c.stream), len(c.voice))
	}
	return c
}

// notErrorCodes are names in upper case with underscores that the documentation writes in
// backticks and that are neither settings nor error codes.
func notErrorCodes(name string) bool {
	return strings.HasPrefix(name, "OTEL_") || // read by the OpenTelemetry SDK (the README names them in prose)
		strings.Contains(name, "_BENCH_") || strings.HasPrefix(name, "VOICE_SCALE_") || // sizes of the benchmarks
		name == "FIRST_EVENT_STREAMS" || name == "FIRST_EVENT_REDIS" ||
		name == "TCP_NOTSENT_LOWAT" || // a Linux socket option
		name == "RST_STREAM" || name == "ENHANCE_YOUR_CALM" || // an HTTP/2 frame and error code
		name == "NODE_EXTRA_CA_CERTS" // node's setting for a certificate to trust
}

// documentedCodes are the error codes README.md (and docs/, where the README's topics live)
// names: every code of a paragraph that begins "Codes:", and every other name in backticks
// written like a code (upper case with underscores) that is not a setting.
func documentedCodes(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join("docs", "*.md"))
	files = append([]string{"README.md"}, files...)
	settingNames := map[string]bool{}
	for _, s := range settings() {
		settingNames[s.env] = true
	}
	anyName := regexp.MustCompile("`([A-Z][A-Z0-9_]{2,})`")
	codeLike := regexp.MustCompile(`^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$`)
	var codes []string
	listed := 0
	for _, file := range files {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, para := range strings.Split(string(raw), "\n\n") {
			if strings.HasPrefix(para, "Codes:") {
				listed++
				for _, m := range anyName.FindAllStringSubmatch(para, -1) {
					codes = append(codes, m[1])
				}
				continue
			}
			for _, m := range anyName.FindAllStringSubmatch(para, -1) {
				if name := m[1]; codeLike.MatchString(name) && !settingNames[name] && !notErrorCodes(name) {
					codes = append(codes, name)
				}
			}
		}
	}
	if listed == 0 {
		t.Fatalf("no paragraph of %v begins \"Codes:\", the list of error codes", files)
	}
	slices.Sort(codes)
	return slices.Compact(codes)
}

// enumOf returns the values of a string enum schema of the document.
func enumOf(t *testing.T, doc *openapi3.T, name string) []string {
	t.Helper()
	ref := doc.Components.Schemas[name]
	if ref == nil || ref.Value == nil || len(ref.Value.Enum) == 0 {
		t.Fatalf("openapi.json has no enum schema %s", name)
	}
	var out []string
	for _, v := range ref.Value.Enum {
		out = append(out, v.(string))
	}
	slices.Sort(out)
	return out
}

// TestOpenAPIErrorCodes: the document describes exactly the error codes the gateway can send,
// each where it is sent — ErrorCode for Error bodies (and a browser's refused upgrade),
// StreamErrorCode for the chat stream's own error events, VoiceErrorCode for a voice
// session's error messages — and every code README.md names is among them.
func TestOpenAPIErrorCodes(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	sent := gatewayCodes(t)
	for _, tt := range []struct {
		schema string
		sent   []string
		where  string
	}{
		{"ErrorCode", sent.http, "proxy's Code constants and the codes Errors are built with"},
		{"StreamErrorCode", sent.stream, "sse's Code constants in use"},
		{"VoiceErrorCode", sent.voice, "voice's Code constants in use"},
	} {
		described := enumOf(t, doc, tt.schema)
		for _, c := range tt.sent {
			if !slices.Contains(described, c) {
				t.Errorf("%s: the gateway sends %s (%s), which openapi.json does not describe", tt.schema, c, tt.where)
			}
		}
		for _, c := range described {
			if !slices.Contains(tt.sent, c) {
				t.Errorf("%s: openapi.json describes %s, which the gateway never sends (%s)", tt.schema, c, tt.where)
			}
		}
	}
	if len(sent.unused) > 0 {
		t.Logf("code constants nothing sends (and the document rightly does not describe): %v", sent.unused)
	}

	all := slices.Concat(enumOf(t, doc, "ErrorCode"), enumOf(t, doc, "StreamErrorCode"), enumOf(t, doc, "VoiceErrorCode"))
	for _, c := range documentedCodes(t) {
		if !slices.Contains(all, c) {
			t.Errorf("README.md names the error code %s, which openapi.json does not describe "+
				"(if it is no error code, say so in notErrorCodes)", c)
		}
	}
}

// nodeTools is where npm installs the programs the tests run with node (package.json and
// package-lock.json pin them; .ci/run runs npm ci there).
const nodeTools = "testdata/node"

// nodeTool returns the path of a script of an npm package installed in nodeTools, and node's; it
// skips the test with an install hint when either is missing, or fails it when
// VOICEGATE_REQUIRE_TOOLS=1.
func nodeTool(t *testing.T, script string) (node, path string) {
	t.Helper()
	node = requireTool(t, "node", "/usr/bin/node", "nodejs npm")
	path = filepath.Join(nodeTools, "node_modules", script)
	if _, err := os.Stat(path); err != nil {
		if os.Getenv("VOICEGATE_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not found, and these tests are required (VOICEGATE_REQUIRE_TOOLS=1): run npm ci in %s", path, nodeTools)
		}
		t.Skipf("%s not installed; install it with: (cd %s && npm ci)", path, nodeTools)
	}
	return node, path
}

// TestOpenAPILint: an independent linter, Redocly CLI, finds no error in openapi.json under its
// recommended rules (which count a document without servers as one). Its warnings are logged.
func TestOpenAPILint(t *testing.T) {
	t.Parallel()
	node, cli := nodeTool(t, "@redocly/cli/bin/cli.js")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, cli, "lint", "--extends=recommended", "--format=json", "--max-problems=1000",
		filepath.Join("openapi", "openapi.json"))
	cmd.Env = append(os.Environ(), "REDOCLY_SUPPRESS_UPDATE_NOTICE=true", "REDOCLY_SUPPRESS_NOTIFICATIONS=true", "NO_COLOR=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var report struct {
		Totals struct {
			Errors, Warnings int
		}
		Version  string
		Problems []struct {
			RuleID, Severity, Message string
			Location                  []struct {
				Pointer string
			}
		}
	}
	if jerr := json.Unmarshal(out, &report); jerr != nil {
		t.Fatalf("redocly lint: %v (%v)\nstdout: %s\nstderr: %s", err, jerr, clipText(string(out)), clipText(stderr.String()))
	}
	for _, p := range report.Problems {
		where := ""
		if len(p.Location) > 0 {
			where = p.Location[0].Pointer
		}
		if p.Severity == "error" {
			t.Errorf("redocly %s: %s: %s at %s", report.Version, p.RuleID, p.Message, where)
		} else {
			t.Logf("redocly %s (%s): %s: %s at %s", report.Version, p.Severity, p.RuleID, clipText(p.Message), where)
		}
	}
	if report.Totals.Errors > 0 || err != nil {
		t.Errorf("redocly lint: %d errors, %d warnings (exit: %v)", report.Totals.Errors, report.Totals.Warnings, err)
	}
}
