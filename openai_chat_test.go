package main

// OpenAI-compatible chat end to end: POST /v1/chat/completions, GET /v1/models and POST
// /api/v2/chat through run in front of a fake algorithm service, read over real connections,
// and the official openai npm package run by node against the gateway.

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"voicegate/policy"
)

// openAIAlgo is the fake algorithm service of the OpenAI tests. It answers by the last
// message: "break-off" sends a chunk and ends without generation_done; "hold" sends a chunk
// and stays silent until the request is cancelled (gone is then closed); "fail" sends an error
// line; anything else a three-chunk answer with usage. queries records every query's body.
type openAIAlgo struct {
	*fakeAlgo
	mu      sync.Mutex
	queries []map[string]any
	gone    chan struct{}
}

func newOpenAIAlgo(t *testing.T) *openAIAlgo {
	a := &openAIAlgo{gone: make(chan struct{}, 16)}
	a.fakeAlgo = newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var q map[string]any
		raw, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(raw, &q)
		a.mu.Lock()
		a.queries = append(a.queries, q)
		a.mu.Unlock()
		last := ""
		if msgs, _ := q["messages"].([]any); len(msgs) > 0 {
			last, _ = msgs[len(msgs)-1].(map[string]any)["content"].(string)
		}
		switch last {
		case "break-off":
			ndjson(w, `{"type":"generation_chunk","content":"half an "}`)
		case "hold":
			ndjson(w, `{"type":"generation_chunk","content":"wait"}`)
			<-r.Context().Done()
			a.gone <- struct{}{}
		case "fail":
			ndjson(w, `{"type":"generation_chunk","content":"a"}`, `{"type":"error","message":"the model is overloaded"}`)
		default:
			ndjson(w, `{"type":"retrieval_start"}`, `{"type":"generation_start"}`,
				`{"type":"generation_chunk","content":"Hel"}`, `{"type":"generation_chunk","content":"lo"}`,
				`{"type":"generation_chunk","content":"!"}`,
				`{"type":"generation_done","finish_reason":"stop","usage":{"prompt_tokens":7,"completion_tokens":3}}`)
		}
	})
	return a
}

func (a *openAIAlgo) lastQuery() map[string]any {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.queries) == 0 {
		return nil
	}
	return a.queries[len(a.queries)-1]
}

// postCompletion posts an OpenAI chat request with token.
func postCompletion(t *testing.T, g *testGateway, token, body string, header map[string]string) *http.Response {
	t.Helper()
	h := map[string]string{"Content-Type": "application/json"}
	for k, v := range header {
		h[k] = v
	}
	return callWith(t, g, http.MethodPost, "/v1/chat/completions", token, body, h)
}

// holdCompletion asks for a stream the fake service holds open after its first content.
const holdCompletion = `{"model":"default","stream":true,"messages":[{"role":"user","content":"hold"}]}`

// streamCompletion posts an OpenAI chat request with token ("": the gateway client's own) and
// header under ctx, which the test may end to go away mid-stream.
func streamCompletion(ctx context.Context, t *testing.T, g *testGateway, token, body string, header map[string]string) *http.Response {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := g.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// openAIError decodes OpenAI's error document and checks its shape.
func openAIError(t *testing.T, res *http.Response, status int) map[string]any {
	t.Helper()
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", res.StatusCode, status, body)
	}
	var doc struct {
		Error map[string]any `json:"error"`
	}
	if err := json.Unmarshal(body, &doc); err != nil || doc.Error == nil {
		t.Fatalf("not OpenAI's error document: %s", body)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := doc.Error[k]; !ok {
			t.Fatalf("error document without %q: %s", k, body)
		}
	}
	return doc.Error
}

// chunks reads an OpenAI stream to its end: the data of each event, "[DONE]" as itself.
func chunks(t *testing.T, body io.Reader) []string {
	t.Helper()
	raw, err := io.ReadAll(body)
	if err != nil {
		t.Fatal(err)
	}
	var datas []string
	for _, block := range strings.Split(string(raw), "\n\n") {
		for _, line := range strings.Split(block, "\n") {
			if v, ok := strings.CutPrefix(line, "data: "); ok {
				datas = append(datas, v)
			}
		}
	}
	if !bytes.HasSuffix(raw, []byte("\n\n")) {
		t.Fatalf("the stream does not end with a blank line: %q", clipTail(string(raw)))
	}
	return datas
}

func TestCompletionsStream(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "OPENAI_MODELS": "m1,m2"})
	tok := tokenFor(t, "u-oai", []string{"user"}, nil)
	res := postCompletion(t, g, tok, `{"model":"m2","stream":true,"stream_options":{"include_usage":true},"temperature":0.2,"max_tokens":64,"user":"end-user-1",
		"messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hel"},{"type":"text","text":"lo"}]},
		{"role":"assistant","content":"hi"},{"role":"user","content":"more"}]}`, map[string]string{"X-Request-ID": "client-chosen-1"})
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("status %d, content type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	datas := chunks(t, res.Body)
	if datas[len(datas)-1] != "[DONE]" {
		t.Fatalf("the stream ends with %q, want [DONE]", datas[len(datas)-1])
	}
	var text string
	var usage map[string]any
	for i, d := range datas[:len(datas)-1] {
		var c struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			Model   string `json:"model"`
			Choices []struct {
				Delta        map[string]any `json:"delta"`
				FinishReason *string        `json:"finish_reason"`
			} `json:"choices"`
			Usage map[string]any `json:"usage"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatal(err)
		}
		if c.ID != "chatcmpl-client-chosen-1" || c.Object != "chat.completion.chunk" || c.Model != "m2" {
			t.Fatalf("chunk %d: %s", i, d)
		}
		if i == 0 && c.Choices[0].Delta["role"] != "assistant" {
			t.Fatalf("the first chunk is %s, want the assistant role", d)
		}
		for _, ch := range c.Choices {
			s, _ := ch.Delta["content"].(string)
			text += s
		}
		if c.Usage != nil {
			usage = c.Usage
		}
	}
	if text != "Hello!" || usage["prompt_tokens"] != 7.0 || usage["total_tokens"] != 10.0 {
		t.Fatalf("text %q, usage %v", text, usage)
	}
	// The whole conversation went upstream, roles and all.
	q := algo.lastQuery()
	msgs, _ := json.Marshal(q["messages"])
	if string(msgs) != `[{"content":"be brief","role":"system"},{"content":"hello","role":"user"},{"content":"hi","role":"assistant"},{"content":"more","role":"user"}]` {
		t.Fatalf("upstream messages %s", msgs)
	}
	if q["model"] != "m2" || q["temperature"] != 0.2 || q["max_tokens"] != 64.0 || q["end_user"] != "end-user-1" || q["request_id"] != "chatcmpl-client-chosen-1" {
		t.Fatalf("upstream query %v", q)
	}
}

// TestCompletionsUpstreamFailures: an upstream that ends without generation_done, or with an
// error line, gives an error object in the stream and never [DONE]; the single answer is an
// error document with 502.
func TestCompletionsUpstreamFailures(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-oai", []string{"user"}, nil)
	for msg, code := range map[string]string{"break-off": "upstream_incomplete", "fail": "upstream_error"} {
		res := postCompletion(t, g, tok, `{"model":"default","stream":true,"messages":[{"role":"user","content":"`+msg+`"}]}`, nil)
		datas := chunks(t, res.Body)
		for _, d := range datas {
			if d == "[DONE]" {
				t.Fatalf("%s: [DONE] in a stream that did not end cleanly: %q", msg, datas)
			}
		}
		var last struct {
			Error map[string]any `json:"error"`
		}
		if err := json.Unmarshal([]byte(datas[len(datas)-1]), &last); err != nil || last.Error["code"] != code {
			t.Fatalf("%s: the stream ends with %s, want an error object %s", msg, datas[len(datas)-1], code)
		}
		res = postCompletion(t, g, tok, `{"model":"default","messages":[{"role":"user","content":"`+msg+`"}]}`, nil)
		if e := openAIError(t, res, http.StatusBadGateway); e["code"] != code {
			t.Fatalf("%s: single answer error %v", msg, e)
		}
	}
}

func TestCompletionsRefusesByName(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "OPENAI_MODELS": "m1"})
	tok := tokenFor(t, "u-oai", []string{"user"}, nil)
	user := `[{"role":"user","content":"hi"}]`
	cases := []struct {
		body, param, code string
		status            int
	}{
		{`{"model":"m1","messages":` + user + `,"tools":[{"type":"function"}]}`, "tools", "unsupported_parameter", 400},
		{`{"model":"m1","messages":` + user + `,"n":2}`, "n", "unsupported_parameter", 400},
		{`{"model":"m1","messages":` + user + `,"response_format":{"type":"json_object"}}`, "response_format", "unsupported_parameter", 400},
		{`{"model":"m1","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, "messages[0].content[0].type", "unsupported_parameter", 400},
		{`{"model":"m1","messages":[{"role":"tool","content":"x","tool_call_id":"a"}]}`, "messages[0].tool_call_id", "unsupported_parameter", 400},
		{`{"model":"m1","messages":[{"role":"user","content":"x","name":"bob"}]}`, "messages[0].name", "unsupported_parameter", 400},
		{`{"model":"m1","messages":` + user + `,"stream_options":{"include_usage":true}}`, "stream_options", "invalid_value", 400},
		{`{"model":"m1","messages":` + user + `,"temperature":3}`, "temperature", "invalid_value", 400},
		{`{"model":"m1","messages":` + user + `,"max_tokens":5,"max_completion_tokens":6}`, "max_completion_tokens", "invalid_value", 400},
		{`{"model":"m1","messages":[]}`, "messages", "invalid_value", 400},
		{`{"messages":` + user + `}`, "model", "invalid_value", 400},
		{`{"model":"m1\u0007","messages":` + user + `}`, "model", "invalid_value", 400},
		{`{"model":"other","messages":` + user + `}`, "model", "model_not_found", 404},
		{`{"model":"m1","messages":` + user + `,"user":"a\u2028b"}`, "user", "invalid_value", 400},
	}
	for _, c := range cases {
		res := postCompletion(t, g, tok, c.body, nil)
		e := openAIError(t, res, c.status)
		if e["param"] != c.param || e["code"] != c.code || e["type"] != map[int]string{400: "invalid_request_error", 404: "not_found_error"}[c.status] {
			t.Errorf("%s: error %v, want param %s code %s", c.body, e, c.param, c.code)
		}
	}
	if n := len(algo.queries); n != 0 {
		t.Fatalf("%d refused requests reached the algorithm service", n)
	}
	// Not JSON, and no token: OpenAI's document too.
	openAIError(t, postCompletion(t, g, tok, `{`, nil), http.StatusBadRequest)
	res := postCompletion(t, g, "", `{"model":"m1","messages":`+user+`}`, map[string]string{"Authorization": ""})
	if e := openAIError(t, res, http.StatusUnauthorized); e["type"] != "authentication_error" || res.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("401: %v, WWW-Authenticate %q", e, res.Header.Get("WWW-Authenticate"))
	}
}

// TestCompletionsClientCancelCancelsUpstream: a client that goes away mid-stream cancels the
// upstream request at once.
func TestCompletionsClientCancelCancelsUpstream(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	res := streamCompletion(ctx, t, g, "", holdCompletion, nil)
	defer res.Body.Close()
	buf := make([]byte, 4096)
	var got []byte
	for !bytes.Contains(got, []byte(`"content":"wait"`)) {
		n, err := res.Body.Read(buf)
		if err != nil {
			t.Fatalf("stream ended before the first content chunk: %v (%q)", err, got)
		}
		got = append(got, buf[:n]...)
	}
	cancel()
	select {
	case <-algo.gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was still running 5 s after the client went away")
	}
}

// TestCompletionsCancelByRequestID: POST /api/v2/chat/cancel names an OpenAI stream by its
// completion ID; the stream ends with an error object, never [DONE], and the upstream request
// is cancelled. Another user's cancel finds nothing.
func TestCompletionsCancelByRequestID(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-oai", []string{"user"}, nil)
	res := streamCompletion(t.Context(), t, g, tok, holdCompletion, map[string]string{"X-Request-ID": "to-cancel"})
	defer res.Body.Close()
	eventually(t, 5*time.Second, "the stream is running", func() bool { return len(algo.queries) == 1 })
	other := tokenFor(t, "u-other", []string{"user"}, nil)
	if r := cancelStream(t, g, other, "chatcmpl-to-cancel", nil); r.StatusCode != http.StatusNotFound {
		t.Fatalf("another user's cancel: %d", r.StatusCode)
	}
	if r := cancelStream(t, g, tok, "chatcmpl-to-cancel", nil); r.StatusCode/100 != 2 {
		t.Fatalf("cancel: %d", r.StatusCode)
	}
	datas := chunks(t, res.Body)
	if last := datas[len(datas)-1]; !strings.Contains(last, `"code":"stream_cancelled"`) {
		t.Fatalf("the stream ends with %s, want stream_cancelled", last)
	}
	select {
	case <-algo.gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was still running after the cancel")
	}
}

func TestChatAnswer(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-v2", []string{"user"}, nil)
	res := callWith(t, g, http.MethodPost, "/api/v2/chat", tok, `{"message":"hello","conversation_id":"c-1"}`,
		map[string]string{"Content-Type": "application/json"})
	var a struct {
		RequestID, ConversationID, Model, Content, FinishReason string
		Usage                                                   map[string]float64
	}
	body, _ := io.ReadAll(res.Body)
	if err := json.Unmarshal(body, &struct {
		RequestID      *string             `json:"request_id"`
		ConversationID *string             `json:"conversation_id"`
		Model          *string             `json:"model"`
		Content        *string             `json:"content"`
		FinishReason   *string             `json:"finish_reason"`
		Usage          *map[string]float64 `json:"usage"`
	}{&a.RequestID, &a.ConversationID, &a.Model, &a.Content, &a.FinishReason, &a.Usage}); err != nil || res.StatusCode != 200 {
		t.Fatalf("status %d: %s", res.StatusCode, body)
	}
	if a.Content != "Hello!" || a.ConversationID != "c-1" || a.Model != "default" || a.FinishReason != "stop" || a.Usage["total_tokens"] != 10 || a.RequestID == "" {
		t.Fatalf("answer %s", body)
	}
	res = callWith(t, g, http.MethodPost, "/api/v2/chat", tok, `{"message":"break-off"}`, map[string]string{"Content-Type": "application/json"})
	wantError(t, res, http.StatusBadGateway, "UPSTREAM_INCOMPLETE")
	res = callWith(t, g, http.MethodPost, "/api/v2/chat", tok, `{"message":""}`, map[string]string{"Content-Type": "application/json"})
	wantError(t, res, http.StatusBadRequest, "VALIDATION_ERROR")
}

func TestModelsList(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "OPENAI_MODELS": "alpha, beta"})
	res := call(t, g, http.MethodGet, "/v1/models", tokenFor(t, "u-m", []string{"user"}, nil), "")
	var list struct {
		Object string `json:"object"`
		Data   []struct{ ID, Object string }
	}
	if err := json.NewDecoder(res.Body).Decode(&list); err != nil || list.Object != "list" || len(list.Data) != 2 ||
		list.Data[0].ID != "alpha" || list.Data[1].ID != "beta" || list.Data[0].Object != "model" {
		t.Fatalf("list %+v (%v)", list, err)
	}
	// Without OPENAI_MODELS: CHAT_DEFAULT_MODEL alone.
	g2 := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CHAT_DEFAULT_MODEL": "house"})
	res = call(t, g2, http.MethodGet, "/v1/models", tokenFor(t, "u-m", []string{"user"}, nil), "")
	body, _ := io.ReadAll(res.Body)
	if !strings.Contains(string(body), `"id":"house"`) {
		t.Fatalf("default list %s", body)
	}
}

// TestOpenAISDKChat runs the official openai package (testdata/node, pinned) against the
// gateway: chat streaming and not, a stream broken off upstream raised as an error, an
// unsupported parameter refused by name, models.list, and its AuthenticationError and
// RateLimitError for the gateway's own 401 and 429.
func TestOpenAISDKChat(t *testing.T) {
	t.Parallel()
	node, _ := nodeTool(t, "openai/package.json")
	algo := newOpenAIAlgo(t)
	pol := voicePolicy(t, "e2e.json", func(l *policy.Limits) {
		l.Classes = map[string]policy.Rate{"chat": {Requests: 1, Per: policy.Duration(time.Hour), Burst: 8}}
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "OPENAI_MODELS": "gw-model", "POLICY_FILE": pol})
	script, _ := filepath.Abs(filepath.Join(nodeTools, "openai_chat.mjs"))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, script)
	cmd.Dir = nodeTools
	cmd.Env = []string{"VG_BASE_URL=" + g.URL + "/v1", "VG_MODEL=gw-model",
		"VG_TOKEN=" + tokenFor(t, "u-sdk", []string{"user"}, nil),
		"VG_LIMITED_TOKEN=" + tokenFor(t, "u-sdk-limited", []string{"user"}, nil)}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the SDK script failed: %v\n%s", err, stderr.String())
	}
	var got struct {
		Stream struct {
			Text, Finish, Role string
			Usage              map[string]float64
		}
		Completion struct {
			ID, Object, Text, Finish string
			Usage                    map[string]float64
		}
		BreakOff struct {
			Raised     bool
			Name, Code string
		}
		Unsupported struct {
			Raised      bool
			Status      int
			Param, Code string
		}
		Models []string
		Auth   struct {
			Raised, IsAuthenticationError bool
			Status                        int
		}
		Rate struct {
			Raised, IsRateLimitError bool
			Status                   int
			RetryAfter               string
		}
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Logf("SDK saw: %s", out)
	if got.Stream.Text != "Hello!" || got.Stream.Role != "assistant" || got.Stream.Finish != "stop" || got.Stream.Usage["total_tokens"] != 10 {
		t.Errorf("streaming: %+v", got.Stream)
	}
	if got.Completion.Text != "Hello!" || got.Completion.Object != "chat.completion" || !strings.HasPrefix(got.Completion.ID, "chatcmpl-") || got.Completion.Usage["completion_tokens"] != 3 {
		t.Errorf("completion: %+v", got.Completion)
	}
	if !got.BreakOff.Raised || got.BreakOff.Code != "upstream_incomplete" {
		t.Errorf("a broken-off stream: %+v, want an APIError upstream_incomplete", got.BreakOff)
	}
	if !got.Unsupported.Raised || got.Unsupported.Status != 400 || got.Unsupported.Param != "tools" || got.Unsupported.Code != "unsupported_parameter" {
		t.Errorf("tools: %+v", got.Unsupported)
	}
	if len(got.Models) != 1 || got.Models[0] != "gw-model" {
		t.Errorf("models.list: %v", got.Models)
	}
	if !got.Auth.IsAuthenticationError || got.Auth.Status != 401 {
		t.Errorf("401: %+v", got.Auth)
	}
	if !got.Rate.IsRateLimitError || got.Rate.Status != 429 || got.Rate.RetryAfter == "" {
		t.Errorf("429: %+v", got.Rate)
	}
}

// TestOpenAPIOpenAIEvents: real chat.completion.chunk data lines (a clean stream, [DONE]
// included, and a broken-off one) match ChatCompletionChunk, and real Realtime server events
// match RealtimeServerEvent; a chunk with a made-up finish reason does not.
func TestOpenAPIOpenAIEvents(t *testing.T) {
	c := schemaCheck{t, loadOpenAPI(t)}
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-oas-oai", []string{"user"}, nil)
	for _, msg := range []string{"hi", "break-off", "fail"} {
		res := postCompletion(t, g, tok, `{"model":"default","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"`+msg+`"}]}`, nil)
		for i, d := range chunks(t, res.Body) {
			if d == "[DONE]" {
				d = `"[DONE]"` // the literal, as a JSON string
			}
			c.valid("ChatCompletionChunk", d, msg+": data line "+itoa(i))
		}
	}
	c.invalid("ChatCompletionChunk", `{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"bored"}]}`, "a made-up finish reason")

	rt := realtimeAlgo(t, 4800)
	g2 := startRun(t, nil, map[string]string{"ALGO_URL": rt.URL})
	conn, _, err := realtimeDial(t, g2, tok, false, "")
	if err != nil {
		t.Fatal(err)
	}
	sendEvent(t, conn, `{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}}`)
	sendEvent(t, conn, `{"type":"bogus"}`)
	for i := 0; ; i++ {
		ev := readEvent(t, conn)
		c.valid("RealtimeServerEvent", ev, "realtime event "+ev["type"].(string))
		if ev["type"] == "response.done" || i > 30 {
			break
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestCompletionsResume: with SSE_RESUME_WINDOW, an OpenAI stream whose client went away after
// ten content chunks goes on; the same request again with its X-Request-ID and Last-Event-ID
// gets exactly the rest, ending in [DONE], and the answer is generated once.
func TestCompletionsResume(t *testing.T) {
	algo := newResumeAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SSE_RESUME_WINDOW": "30s"})
	tok := tokenFor(t, "u-oai-resume", []string{"user"}, nil)
	body := `{"model":"default","stream":true,"messages":[{"role":"user","content":"gated"}]}`
	ctx, cancel := context.WithCancel(t.Context())
	res := streamCompletion(ctx, t, g, tok, body, map[string]string{"X-Request-ID": "resume-me"})
	// The role chunk (id 1) and parts 1 to 10 (ids 2 to 11); the upstream holds part 11.
	var got []byte
	buf := make([]byte, 4096)
	for !bytes.Contains(got, []byte(`"content":"part 10"`)) {
		n, err := res.Body.Read(buf)
		if err != nil {
			t.Fatalf("%v before part 10 (%q)", err, got)
		}
		got = append(got, buf[:n]...)
	}
	cancel()
	res.Body.Close()
	close(algo.release)
	res = postCompletion(t, g, tok, body, map[string]string{"X-Request-ID": "resume-me", "Last-Event-ID": "11"})
	datas := chunks(t, res.Body)
	var text string
	for _, d := range datas[:len(datas)-1] {
		var c struct {
			Choices []struct{ Delta map[string]any }
		}
		_ = json.Unmarshal([]byte(d), &c)
		for _, ch := range c.Choices {
			s, _ := ch.Delta["content"].(string)
			text += s
		}
	}
	var want string
	for i := 11; i < resumeLines; i++ {
		want += "part " + strconv.Itoa(i)
	}
	if text != want || datas[len(datas)-1] != "[DONE]" {
		t.Fatalf("resumed text %q, last %q; want parts 11 to %d, then [DONE]", text, datas[len(datas)-1], resumeLines-1)
	}
	if n := algo.calls.Load(); n != 1 {
		t.Fatalf("the algorithm service was asked %d times, want once", n)
	}
	// The request ID is its user's: another user naming it resumes nothing, and learns nothing.
	other := tokenFor(t, "u-oai-other", []string{"user"}, nil)
	res = postCompletion(t, g, other, body, map[string]string{"X-Request-ID": "resume-me", "Last-Event-ID": "11"})
	if e := openAIError(t, res, http.StatusNotFound); e["code"] != "not_found" {
		t.Fatalf("another user's resume: %v", e)
	}
}

// TestCompletionsRevoked: revoking the caller's token ends its running OpenAI stream with an
// error object token_revoked, never [DONE], and cancels the upstream request.
func TestCompletionsRevoked(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-oai-revoked", []string{"user"}, nil)
	res := streamCompletion(t.Context(), t, g, tok, holdCompletion, nil)
	defer res.Body.Close()
	eventually(t, 5*time.Second, "the stream is running", func() bool { return algo.lastQuery() != nil })
	wantStatus(t, call(t, g, "POST", "/api/v2/auth/revoke", tok, ""), http.StatusOK)
	datas := chunks(t, res.Body)
	if last := datas[len(datas)-1]; !strings.Contains(last, `"code":"token_revoked"`) {
		t.Fatalf("the stream ends with %s, want token_revoked", last)
	}
	select {
	case <-algo.gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was still running after the revocation")
	}
}

// TestCompletionsHeartbeat: an OpenAI stream whose upstream is silent gets ": ping" comments
// every SSE_PING_INTERVAL, which the SDKs skip, as the v2 stream does.
func TestCompletionsHeartbeat(t *testing.T) {
	algo := newOpenAIAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SSE_PING_INTERVAL": "50ms"})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	res := streamCompletion(ctx, t, g, "", holdCompletion, nil)
	defer res.Body.Close()
	var got []byte
	buf := make([]byte, 4096)
	for bytes.Count(got, []byte(": ping\n\n")) < 2 || !bytes.Contains(got, []byte(`"content":"wait"`)) {
		n, err := res.Body.Read(buf)
		if err != nil {
			t.Fatalf("%v before two pings (%q)", err, got)
		}
		got = append(got, buf[:n]...)
	}
	// The pings do not end or break the stream: the chunks before and between them stand.
	if !bytes.HasPrefix(got, []byte("id: 1\ndata: ")) || !bytes.Contains(got, []byte(`"content":"wait"`)) {
		t.Fatalf("the stream around the pings: %q", got)
	}
}
