package main

// End-to-end tests: each one starts the whole gateway through run, as main does, against fake
// back ends on loopback, and talks to it over real connections.

import (
	"bufio"
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// ---- the gateway under test ----------------------------------------------------------------

// testGateway is one run of the gateway, started by startRun.
type testGateway struct {
	t      *testing.T
	URL    string       // http://127.0.0.1:port
	Addr   string       // the "addr" of the "listening" log line
	Client *http.Client // a client of its own, so its idle connections can be closed
	Stdout *logBuffer
	Stderr *logBuffer

	cancel   context.CancelFunc
	finished chan struct{} // closed when run has returned
	runErr   error         // run's result; read only after finished is closed
	stopOnce sync.Once
}

// startGateway starts the gateway with env as its whole environment and waits until /readyz
// answers 200. stop cancels run's context and fails the test unless run returns nil; it also
// runs at cleanup.
func startGateway(t *testing.T, env map[string]string) (baseURL string, stop func()) {
	t.Helper()
	g := startRun(t, nil, env)
	return g.URL, g.stop
}

// startRun is startGateway with flags and access to the gateway's output. Unless env says
// otherwise it listens on 127.0.0.1:0, logs JSON, and gives streams a short shutdown grace so
// that a test which leaves a stream open does not wait the default 25 s.
func startRun(t *testing.T, args []string, env map[string]string) *testGateway {
	t.Helper()
	vars := map[string]string{
		"LISTEN_ADDR":    "127.0.0.1:0",
		"LOG_FORMAT":     "json",
		"LOG_LEVEL":      "debug",
		"SHUTDOWN_GRACE": "2s",
		"DRAIN_DELAY":    "0s",
		"JWT_SECRET":     testSecret,
		// Generous limits, so tests of other things are never rate limited.
		"POLICY_FILE": "testdata/policy/e2e.json",
	}
	for k, v := range env {
		vars[k] = v
	}
	getenv := func(k string) string { return vars[k] }

	ctx, cancel := context.WithCancel(context.Background())
	g := &testGateway{
		t: t,
		// The client authenticates as an admin unless a test sets its own Authorization.
		Client:   &http.Client{Transport: withToken{&http.Transport{Proxy: nil}, tokenFor(t, "u-admin", []string{"admin"}, nil)}},
		Stdout:   &logBuffer{},
		Stderr:   newLogBuffer(),
		cancel:   cancel,
		finished: make(chan struct{}),
	}
	go func() {
		defer close(g.finished)
		g.runErr = run(ctx, append([]string{"voicegate"}, args...), getenv, g.Stdout, g.Stderr)
	}()
	t.Cleanup(g.stop)

	select {
	case g.Addr = <-g.Stderr.addr:
	case <-g.finished:
		t.Fatalf("run returned before listening: %v\nlog:\n%s", g.runErr, g.Stderr)
	case <-time.After(5 * time.Second):
		t.Fatalf("no \"listening\" log line within 5s\nlog:\n%s", g.Stderr)
	}
	g.URL = "http://" + g.Addr

	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := g.Client.Get(g.URL + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return g
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /readyz did not answer 200 within 5s (last: %v)", describeResult(res, err))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop cancels run's context and waits for it to return nil.
func (g *testGateway) stop() {
	g.t.Helper()
	g.stopOnce.Do(func() {
		g.cancel()
		select {
		case <-g.finished:
			if g.runErr != nil {
				g.t.Errorf("run returned %v, want nil\nlog:\n%s", g.runErr, g.Stderr)
			}
		case <-time.After(10 * time.Second):
			g.t.Errorf("run did not return within 10s of its context ending\nlog:\n%s", g.Stderr)
		}
		g.Client.CloseIdleConnections()
	})
}

// newRunID is a short random text that makes the names a test writes into a shared store its
// own: the package's one Redis Cluster outlives each test, and keeps what a run wrote
// (revocations, quotas, leases, kept streams) for the next run of the same test under -count.
func newRunID() string { return strings.ToLower(crand.Text()[:8]) }

func describeResult(res *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	return res.Status
}

// logBuffer keeps what a process or a gateway wrote (a log, stdout), safe for concurrent use.
// It hands over, on addr, the address of the first JSON "listening" line. The zero value keeps
// everything and hands over nothing.
type logBuffer struct {
	mu      sync.Mutex
	all     bytes.Buffer
	max     int // the bytes kept; 0 keeps everything
	pending []byte
	found   bool
	addr    chan string
}

// newLogBuffer is a logBuffer that hands over the "listening" address.
func newLogBuffer() *logBuffer { return &logBuffer{addr: make(chan string, 1)} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.max == 0 {
		b.all.Write(p)
	} else if room := b.max - b.all.Len(); room > 0 {
		b.all.Write(p[:min(len(p), room)])
	}
	if b.addr == nil || b.found {
		return len(p), nil
	}
	b.pending = append(b.pending, p...)
	for {
		i := bytes.IndexByte(b.pending, '\n')
		if i < 0 {
			break
		}
		var rec struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal(b.pending[:i], &rec) == nil && rec.Msg == "listening" && rec.Addr != "" {
			b.found, b.pending = true, nil
			b.addr <- rec.Addr
			break
		}
		b.pending = b.pending[i+1:]
	}
	return len(p), nil
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.all.String()
}

// ---- fake back ends ------------------------------------------------------------------------

// recordedRequest is what a fake back end received.
type recordedRequest struct {
	Method   string
	Path     string
	RawQuery string
	Header   http.Header
	RawBody  []byte
	Body     map[string]any // RawBody decoded, when it is a JSON object
}

// fakeBackend is an httptest server that records every request and answers with handler.
type fakeBackend struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []recordedRequest
}

// voiceSubprotocol is the subprotocol of voice sessions, to the gateway and to the algorithm
// service.
const voiceSubprotocol = "voice-protocol-v2"

// fakeAlgo is the fake algorithm service. POST /query is answered by its Query handler, whose
// request body has already been read (and recorded). GET /voice/stream accepts voice sessions
// that read until the gateway closes them or the test ends, keeping the text messages and
// answering each message as its Replier says. Every request is recorded (fakeBackend).
type fakeAlgo struct {
	*fakeBackend
	voiceOpen  atomic.Int64  // voice sessions open now
	voiceEnded chan struct{} // one send per voice session that ended, the first 64 kept unread

	mu        sync.Mutex
	voiceText []string // the text messages voice sessions received
}

// algoOptions configures a fakeAlgo. The zero value answers /query 404 and reads voice sessions
// without answering.
type algoOptions struct {
	// Query answers POST /query; nil answers 404.
	Query http.HandlerFunc
	// Replier makes, for each voice session, what answers the messages it receives; nil
	// answers nothing.
	Replier func() voiceReplier
	// Voice, when set, serves GET /voice/stream instead of the sessions above: it accepts,
	// reads and counts on its own.
	Voice http.HandlerFunc
}

// voiceReplier answers one message of a voice session with the frames to send back.
type voiceReplier func(typ websocket.MessageType, msg []byte) []voiceFrame

// voiceFrame is one message the fake algorithm service sends on a voice session: Text, or else a
// binary frame of Audio bytes of silence.
type voiceFrame struct {
	Text  string
	Audio int
}

// newAlgo starts the fake algorithm service; it is closed at cleanup.
func newAlgo(t testing.TB, o algoOptions) *fakeAlgo {
	t.Helper()
	a := &fakeAlgo{voiceEnded: make(chan struct{}, 64)}
	testDone := t.Context()
	a.fakeBackend = newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/query" && o.Query != nil:
			o.Query(w, r)
		case r.URL.Path == "/voice/stream" && o.Voice != nil:
			o.Voice(w, r)
		case r.URL.Path == "/voice/stream":
			var reply voiceReplier
			if o.Replier != nil {
				reply = o.Replier()
			}
			a.session(testDone, w, r, reply)
		default:
			http.NotFound(w, r)
		}
	})
	return a
}

// newFakeAlgo is the fake algorithm service with query answering POST /query.
func newFakeAlgo(t testing.TB, query http.HandlerFunc) *fakeAlgo {
	t.Helper()
	return newAlgo(t, algoOptions{Query: query})
}

// session is one voice session of the fake algorithm service.
func (a *fakeAlgo) session(testDone context.Context, w http.ResponseWriter, r *http.Request, reply voiceReplier) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{voiceSubprotocol}})
	if err != nil {
		return
	}
	a.voiceOpen.Add(1)
	defer func() {
		c.CloseNow()
		a.voiceOpen.Add(-1)
		select {
		case a.voiceEnded <- struct{}{}:
		default:
		}
	}()
	c.SetReadLimit(1 << 20)
	for {
		typ, msg, err := c.Read(testDone)
		if err != nil {
			return
		}
		if typ == websocket.MessageText {
			a.mu.Lock()
			a.voiceText = append(a.voiceText, string(msg))
			a.mu.Unlock()
		}
		if reply == nil {
			continue
		}
		for _, f := range reply(typ, msg) {
			typ, out := websocket.MessageText, []byte(f.Text)
			if f.Text == "" {
				typ, out = websocket.MessageBinary, make([]byte, f.Audio)
			}
			if err := c.Write(testDone, typ, out); err != nil {
				return
			}
		}
	}
}

// textReceived returns the text messages voice sessions received so far.
func (a *fakeAlgo) textReceived() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.voiceText)
}

// dials returns the upgrade requests the gateway sent to /voice/stream.
func (a *fakeAlgo) dials() []recordedRequest {
	var out []recordedRequest
	for _, r := range a.requests() {
		if r.Path == "/voice/stream" {
			out = append(out, r)
		}
	}
	return out
}

// newFakeBackend starts a recording back end; it is closed at cleanup (after a gateway started
// later in the test has stopped).
func newFakeBackend(t testing.TB, h http.HandlerFunc) *fakeBackend {
	t.Helper()
	f := &fakeBackend{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		rec := recordedRequest{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery,
			Header: r.Header.Clone(), RawBody: raw}
		_ = json.Unmarshal(raw, &rec.Body)
		f.mu.Lock()
		f.reqs = append(f.reqs, rec)
		f.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(raw))
		h(w, r)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeBackend) requests() []recordedRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recordedRequest(nil), f.reqs...)
}

// only fails the test unless the back end got exactly one request, and returns it.
func (f *fakeBackend) only(t *testing.T) recordedRequest {
	t.Helper()
	reqs := f.requests()
	if len(reqs) != 1 {
		t.Fatalf("back end received %d requests, want 1", len(reqs))
	}
	return reqs[0]
}

// ndjson writes lines as the fake algorithm service's 200 answer, flushing after each.
func ndjson(w http.ResponseWriter, lines ...string) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	rc := http.NewResponseController(w)
	for _, l := range lines {
		_, _ = io.WriteString(w, l+"\n")
		_ = rc.Flush()
	}
}

// startNDJSON sends the 200 headers of an NDJSON answer at once.
func startNDJSON(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	_ = http.NewResponseController(w).Flush()
}

// sleepCtx waits d or until ctx ends, reporting whether the full time passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// ---- talking to the gateway ----------------------------------------------------------------

// doRequest sends a request with a 10 s budget; the response body is closed at cleanup at the latest.
func doRequest(t *testing.T, c *http.Client, method, url string, body io.Reader, header map[string]string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		if v == "" {
			req.Header.Del(k)
			continue
		}
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// postChat posts body to the chat stream route.
func postChat(t *testing.T, g *testGateway, body string, header map[string]string) *http.Response {
	t.Helper()
	return doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(body), header)
}

// errorDoc is the JSON error document of DESIGN.md.
type errorDoc struct {
	Error     string          `json:"error"`
	Code      string          `json:"code"`
	RequestID string          `json:"request_id"`
	Details   json.RawMessage `json:"details"`
	raw       string
}

// wantError checks that res is a JSON error with status and code, and returns it.
func wantError(t *testing.T, res *http.Response, status int, code string) errorDoc {
	t.Helper()
	raw, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatalf("read error body: %v", err)
	}
	var doc errorDoc
	doc.raw = string(raw)
	if res.StatusCode != status {
		t.Errorf("status = %d, want %d; body %s", res.StatusCode, status, raw)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("error body is not JSON: %v: %s", err, raw)
	}
	if doc.Code != code {
		t.Errorf("code = %q, want %q; body %s", doc.Code, code, raw)
	}
	if doc.Error == "" {
		t.Errorf("error message is empty; body %s", raw)
	}
	if doc.RequestID == "" || doc.RequestID != res.Header.Get("X-Request-ID") {
		t.Errorf("request_id = %q, want the X-Request-ID header %q", doc.RequestID, res.Header.Get("X-Request-ID"))
	}
	return doc
}

// ---- a small SSE parser --------------------------------------------------------------------

// sseEvent is one dispatched Server-Sent Event.
type sseEvent struct {
	ID       string
	Event    string
	Data     string
	Comments []string // comment lines (without the colon) seen since the previous event
}

// fields decodes the event's data as a JSON object.
func (e sseEvent) fields(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(e.Data), &m); err != nil {
		t.Fatalf("event %q: data is not a JSON object: %v: %s", e.Event, err, e.Data)
	}
	return m
}

// sseReader parses an event stream as the HTML living standard describes, keeping the raw text.
type sseReader struct {
	br  *bufio.Reader
	raw bytes.Buffer
}

func newSSEReader(r io.Reader) *sseReader {
	s := &sseReader{}
	s.br = bufio.NewReader(io.TeeReader(r, &s.raw))
	return s
}

// next returns the next event; io.EOF after the last one, io.ErrUnexpectedEOF when the stream
// stops inside an event.
func (s *sseReader) next() (sseEvent, error) {
	var ev sseEvent
	var data []string
	pending := false
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) && (pending || line != "") {
				return ev, io.ErrUnexpectedEOF
			}
			return ev, err
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		switch {
		case line == "":
			if pending {
				ev.Data = strings.Join(data, "\n")
				return ev, nil
			}
		case strings.HasPrefix(line, ":"):
			ev.Comments = append(ev.Comments, strings.TrimPrefix(line[1:], " "))
		default:
			name, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			pending = true
			switch name {
			case "id":
				ev.ID = value
			case "event":
				ev.Event = value
			case "data":
				data = append(data, value)
			}
		}
	}
}

// readEvents reads events until the stream ends cleanly.
func readEvents(t *testing.T, s *sseReader) []sseEvent {
	t.Helper()
	var evs []sseEvent
	for {
		ev, err := s.next()
		if err == io.EOF {
			return evs
		}
		if err != nil {
			t.Fatalf("reading events after %v: %v\nraw:\n%s", eventNames(evs), err, clipText(s.raw.String()))
		}
		evs = append(evs, ev)
	}
}

func nextEvent(t *testing.T, s *sseReader) sseEvent {
	t.Helper()
	ev, err := s.next()
	if err != nil {
		t.Fatalf("reading the next event: %v\nraw:\n%s", err, clipText(s.raw.String()))
	}
	return ev
}

func eventNames(evs []sseEvent) []string {
	var ns []string
	for _, e := range evs {
		ns = append(ns, e.Event)
	}
	return ns
}

func clipText(s string) string {
	if len(s) > 4000 {
		return s[:4000] + "…"
	}
	return s
}

// wantStream checks the headers of a 200 SSE answer and returns a reader of its events.
func wantStream(t *testing.T, res *http.Response) *sseReader {
	t.Helper()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(res.Body)
		t.Fatalf("status = %d, want 200; body %s", res.StatusCode, body)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("Content-Type = %q, want text/event-stream", ct)
	}
	return newSSEReader(res.Body)
}

// numField reads a JSON number field.
func numField(t *testing.T, m map[string]any, key string) float64 {
	t.Helper()
	f, ok := m[key].(float64)
	if !ok {
		t.Fatalf("field %q = %#v, want a number (in %v)", key, m[key], m)
	}
	return f
}

// ---- 1. the happy path ---------------------------------------------------------------------

var happyLines = []string{
	`{"type":"retrieval_start","query":"hi"}`,
	`{"type":"generation_chunk","content":"Hel","index":0}`,
	`{"type":"generation_chunk","content":"lo","index":1}`,
	`{"type":"generation_done","finish_reason":"stop"}`,
}

func TestChatStreamHappyPath(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		// Odd chunk boundaries, flushed separately: the gateway must reassemble lines.
		w.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(w)
		all := strings.Join(happyLines, "\n") + "\n"
		for len(all) > 0 {
			n := min(7, len(all))
			_, _ = io.WriteString(w, all[:n])
			_ = rc.Flush()
			all = all[n:]
		}
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	tests := []struct {
		name   string
		body   string
		header map[string]string
		wantID string // the request ID expected end to end
	}{
		{"request_id from the body", `{"message":"hi","request_id":"client-req-1"}`,
			map[string]string{"X-Request-ID": "header-req-1"}, "client-req-1"},
		{"request_id from X-Request-ID", `{"message":"hi"}`,
			map[string]string{"X-Request-ID": "header-req-2"}, "header-req-2"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := map[string]string{
				"Accept-Encoding": "gzip", // set by hand, so the client would not hide a Content-Encoding
				"Authorization":   "Bearer " + tokenFor(t, "u-chat", []string{"user"}, map[string]any{"tenant_id": "tenant-c"}),
				"Cookie":          "session=secret",
				"X-User-ID":       "forged-user",
				"X_Tenant_ID":     "forged-tenant",
				"X-Forwarded-For": "203.0.113.9",
			}
			for k, v := range tt.header {
				hdr[k] = v
			}
			res := postChat(t, g, tt.body, hdr)
			s := wantStream(t, res)
			for h, want := range map[string]string{"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} {
				if got := res.Header.Get(h); got != want {
					t.Errorf("%s = %q, want %q", h, got, want)
				}
			}
			if ce := res.Header.Get("Content-Encoding"); ce != "" || res.Uncompressed {
				t.Errorf("Content-Encoding = %q (uncompressed by client: %v), want none", ce, res.Uncompressed)
			}

			evs := readEvents(t, s)
			wantNames := []string{"stream_start", "retrieval_start", "generation_chunk", "generation_chunk", "generation_done", "stream_end"}
			if !reflect.DeepEqual(eventNames(evs), wantNames) {
				t.Fatalf("events = %v, want %v\nraw:\n%s", eventNames(evs), wantNames, s.raw.String())
			}
			start := evs[0].fields(t)
			if start["request_id"] != tt.wantID || numField(t, start, "timestamp") <= 0 {
				t.Errorf("stream_start data = %s, want request_id %q and a timestamp", evs[0].Data, tt.wantID)
			}
			if evs[0].ID != "" {
				t.Errorf("stream_start has id %q, want none", evs[0].ID)
			}
			for j, line := range happyLines {
				ev := evs[j+1]
				if ev.ID != strconv.Itoa(j+1) {
					t.Errorf("event %d id = %q, want %d", j+1, ev.ID, j+1)
				}
				got := ev.fields(t)
				var up map[string]any
				if err := json.Unmarshal([]byte(line), &up); err != nil {
					t.Fatal(err)
				}
				for k, v := range up {
					if !reflect.DeepEqual(got[k], v) {
						t.Errorf("event %d: %s = %#v, want the upstream's %#v", j+1, k, got[k], v)
					}
				}
				if got["request_id"] != tt.wantID {
					t.Errorf("event %d request_id = %#v, want %q", j+1, got["request_id"], tt.wantID)
				}
				if numField(t, got, "line_number") != float64(j+1) {
					t.Errorf("event %d line_number = %v, want %d", j+1, got["line_number"], j+1)
				}
				if numField(t, got, "timestamp") <= 0 {
					t.Errorf("event %d timestamp = %v", j+1, got["timestamp"])
				}
				if len(got) != len(up)+3 {
					t.Errorf("event %d data = %s, want the upstream fields plus request_id, line_number, timestamp", j+1, ev.Data)
				}
			}
			end := evs[len(evs)-1].fields(t)
			if numField(t, end, "lines_processed") != 4 || end["request_id"] != tt.wantID {
				t.Errorf("stream_end data = %s, want lines_processed 4 and request_id %q", evs[len(evs)-1].Data, tt.wantID)
			}

			reqs := algo.requests()
			if len(reqs) != i+1 {
				t.Fatalf("algorithm service received %d requests, want %d", len(reqs), i+1)
			}
			up := reqs[i]
			if up.Method != http.MethodPost || up.Path != "/query" {
				t.Errorf("upstream request = %s %s, want POST /query", up.Method, up.Path)
			}
			for h, want := range map[string]string{
				"Accept":       "application/x-ndjson",
				"Content-Type": "application/json",
				"X-Request-ID": tt.wantID,
			} {
				if got := up.Header.Get(h); got != want {
					t.Errorf("upstream %s = %q, want %q", h, got, want)
				}
			}
			for _, h := range []string{"Authorization", "Cookie"} {
				if v := up.Header.Values(h); len(v) > 0 {
					t.Errorf("client header %s reached the algorithm service: %q", h, v)
				}
			}
			// Identity headers carry the verified token's claims, never the client's.
			for h, want := range map[string]string{"X-User-ID": "u-chat", "X-Tenant-ID": "tenant-c",
				"X-Username": "u-chat-name", "X-User-Roles": "user"} {
				if v := up.Header.Values(h); len(v) != 1 || v[0] != want {
					t.Errorf("upstream %s = %q, want %q from the token", h, v, want)
				}
			}
			if xff := up.Header.Get("X-Forwarded-For"); strings.Contains(xff, "203.0.113.9") {
				t.Errorf("untrusted client's X-Forwarded-For was passed on: %q", xff)
			}
			wantBody := map[string]any{
				"messages":    []any{map[string]any{"role": "user", "content": "hi"}},
				"request_id":  tt.wantID,
				"model":       "default",
				"temperature": 0.7,
				"max_tokens":  float64(2048),
			}
			if !reflect.DeepEqual(up.Body, wantBody) {
				t.Errorf("upstream body = %s\nwant %v", up.RawBody, wantBody)
			}
		})
	}
}

// ---- 2. per-event flushing -----------------------------------------------------------------

// TestChatStreamEventsArriveOneByOne has the upstream wait, after each line, until the client
// has read that line's event: any buffering in the gateway deadlocks it until its timeout.
func TestChatStreamEventsArriveOneByOne(t *testing.T) {
	read := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		for i := 1; i <= 3; i++ {
			ndjson(w, fmt.Sprintf(`{"type":"step","n":%d}`, i))
			select {
			case <-read:
			case <-r.Context().Done():
				return
			}
		}
		ndjson(w, `{"type":"done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hi"}`))
	res, err := g.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	s := wantStream(t, res)
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	for i := 1; i <= 3; i++ {
		ev := nextEvent(t, s) // times out if the gateway held the event back
		if ev.Event != "step" || ev.ID != strconv.Itoa(i) {
			t.Fatalf("event = %q id %q, want step id %d", ev.Event, ev.ID, i)
		}
		select {
		case read <- struct{}{}:
		case <-ctx.Done():
			t.Fatalf("upstream never waited for event %d", i)
		}
	}
	if got := eventNames(readEvents(t, s)); !reflect.DeepEqual(got, []string{"done", "stream_end"}) {
		t.Errorf("last events = %v, want [done stream_end]", got)
	}
}

// ---- 3. bad input --------------------------------------------------------------------------

func TestChatStreamRejectsBadInput(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CHAT_MAX_BODY_BYTES": "1024"})

	big := `{"message":"` + strings.Repeat("a", 2048) + `"}`
	tests := []struct {
		name        string
		method      string
		path        string
		body        io.Reader
		contentType string
		status      int
		code        string
		field       string // a field named in details, when set
	}{
		{"missing message", "POST", "", strings.NewReader(`{"model":"x"}`), "", 400, "VALIDATION_ERROR", "message"},
		{"blank message", "POST", "", strings.NewReader(`{"message":"  "}`), "", 400, "VALIDATION_ERROR", "message"},
		{"temperature too high", "POST", "", strings.NewReader(`{"message":"hi","temperature":3}`), "", 400, "VALIDATION_ERROR", "temperature"},
		{"max_tokens zero", "POST", "", strings.NewReader(`{"message":"hi","max_tokens":0}`), "", 400, "VALIDATION_ERROR", "max_tokens"},
		{"message of the wrong type", "POST", "", strings.NewReader(`{"message":5}`), "", 400, "VALIDATION_ERROR", "message"},
		{"not JSON", "POST", "", strings.NewReader(`hello there`), "", 400, "INVALID_JSON", ""},
		{"JSON array", "POST", "", strings.NewReader(`[{"message":"hi"}]`), "", 400, "INVALID_JSON", ""},
		{"body over the limit", "POST", "", strings.NewReader(big), "", 413, "PAYLOAD_TOO_LARGE", ""},
		{"body over the limit, chunked", "POST", "", struct{ io.Reader }{strings.NewReader(big)}, "", 413, "PAYLOAD_TOO_LARGE", ""},
		{"text/plain", "POST", "", strings.NewReader(`{"message":"hi"}`), "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE", ""},
		{"invalid request_id", "POST", "", strings.NewReader(`{"message":"hi","request_id":"no spaces allowed"}`), "", 400, "VALIDATION_ERROR", "request_id"},
		{"wrong method", "GET", "", nil, "", 405, "METHOD_NOT_ALLOWED", ""},
		{"unknown path", "GET", "/api/v2/nope", nil, "", 404, "NOT_FOUND", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path
			if path == "" {
				path = "/api/v2/chat/stream"
			}
			res := doRequest(t, g.Client, tt.method, g.URL+path, tt.body, map[string]string{"Content-Type": tt.contentType})
			doc := wantError(t, res, tt.status, tt.code)
			if tt.field != "" {
				var details []struct{ Field, Reason string }
				if err := json.Unmarshal(doc.Details, &details); err != nil || len(details) == 0 {
					t.Fatalf("details = %s, want a list of field errors", doc.Details)
				}
				if details[0].Field != tt.field || details[0].Reason == "" {
					t.Errorf("details = %s, want field %q with a reason", doc.Details, tt.field)
				}
			}
			if tt.status == 405 {
				if allow := res.Header.Get("Allow"); allow != "POST" {
					t.Errorf("Allow = %q, want POST", allow)
				}
			}
		})
	}
	if n := len(algo.requests()); n != 0 {
		t.Errorf("the algorithm service received %d requests for bad input, want 0", n)
	}
}

// ---- 4. upstream faults --------------------------------------------------------------------

func TestChatStreamUpstreamRefused(t *testing.T) {
	// 127.0.0.2: no test server binds there, so the freed port stays refused.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + addr})

	doc := wantError(t, postChat(t, g, `{"message":"hi"}`, nil), http.StatusBadGateway, "ALGO_SERVICE_ERROR")
	for _, secret := range []string{port, "127.0.0."} {
		if strings.Contains(doc.raw, secret) {
			t.Errorf("error body leaks the upstream address (%q): %s", secret, doc.raw)
		}
	}
	g.stop() // flushes the access log line
	if log := g.Stderr.String(); strings.Contains(log, addr) {
		t.Errorf("the log shows the upstream address %s:\n%s", addr, log)
	}
}

// TestChatStreamUpstreamFaults drives one gateway against an algorithm service that misbehaves
// in the way the message asks for.
func TestChatStreamUpstreamFaults(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var q struct {
			Messages []struct{ Content string }
		}
		_ = json.NewDecoder(r.Body).Decode(&q)
		ctx := r.Context()
		switch q.Messages[0].Content {
		case "503":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "429":
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
		case "slow":
			sleepCtx(ctx, 3*time.Second)
			ndjson(w, `{"type":"done"}`)
		case "die":
			ndjson(w, `{"type":"a"}`, `{"type":"b"}`, `{"type":"c"}`)
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(http.ErrAbortHandler)
			}
			conn.Close()
		case "no-done":
			ndjson(w, `{"type":"generation_chunk","content":"x"}`, `{"type":"generation_chunk","content":"y"}`)
		case "invalid-line":
			ndjson(w, `{"type":"a"}`, `{not json`, `{"type":"c"}`, `{"type":"generation_done"}`)
		case "long-line":
			ndjson(w, `{"type":"a"}`, `{"type":"huge","pad":"`+strings.Repeat("x", 2<<20)+`"}`,
				`{"type":"after"}`, `{"type":"generation_done"}`)
		case "silent":
			ndjson(w, `{"type":"a"}`)
			if sleepCtx(ctx, 450*time.Millisecond) {
				ndjson(w, `{"type":"generation_done"}`)
			}
		default:
			http.Error(w, "unknown mode", http.StatusBadRequest)
		}
	})
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":          algo.URL,
		"UPSTREAM_TIMEOUT":  "200ms",
		"SSE_PING_INTERVAL": "100ms",
	})
	chat := func(t *testing.T, mode string) *http.Response {
		return postChat(t, g, `{"message":"`+mode+`"}`, nil)
	}
	// errorEvent returns the data of the only error event, checking its code.
	errorEvent := func(t *testing.T, evs []sseEvent, code string) map[string]any {
		t.Helper()
		var found []map[string]any
		for _, e := range evs {
			if e.Event == "error" {
				found = append(found, e.fields(t))
			}
		}
		if len(found) != 1 || found[0]["code"] != code {
			t.Fatalf("error events = %v, want one with code %s", found, code)
		}
		return found[0]
	}

	t.Run("503 is passed on", func(t *testing.T) {
		wantError(t, chat(t, "503"), http.StatusServiceUnavailable, "ALGO_SERVICE_ERROR")
	})
	t.Run("429 becomes RATE_LIMITED with Retry-After", func(t *testing.T) {
		res := chat(t, "429")
		wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
		if ra := res.Header.Get("Retry-After"); ra != "7" {
			t.Errorf("Retry-After = %q, want 7", ra)
		}
	})
	t.Run("slow headers time out", func(t *testing.T) {
		start := time.Now()
		wantError(t, chat(t, "slow"), http.StatusGatewayTimeout, "UPSTREAM_TIMEOUT")
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("the timeout took %v, want about 200ms", d)
		}
	})
	t.Run("upstream dies mid-stream", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "die")))
		want := []string{"stream_start", "a", "b", "c", "error", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "UPSTREAM_INCOMPLETE")
		if end := evs[5].fields(t); numField(t, end, "lines_processed") != 3 {
			t.Errorf("stream_end = %s, want lines_processed 3", evs[5].Data)
		}
	})
	t.Run("upstream ends without a terminal event", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "no-done")))
		want := []string{"stream_start", "generation_chunk", "generation_chunk", "error", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "UPSTREAM_INCOMPLETE")
	})
	t.Run("invalid line is skipped", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "invalid-line")))
		want := []string{"stream_start", "a", "error", "c", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		e := errorEvent(t, evs, "INVALID_LINE")
		if numField(t, e, "line_number") != 2 {
			t.Errorf("error event = %v, want line_number 2", e)
		}
		if evs[3].ID != "3" {
			t.Errorf("the line after the invalid one has id %q, want 3", evs[3].ID)
		}
		end := evs[5].fields(t)
		if numField(t, end, "lines_skipped") != 1 || numField(t, end, "lines_processed") != 3 {
			t.Errorf("stream_end = %s, want lines_skipped 1, lines_processed 3", evs[5].Data)
		}
	})
	t.Run("over-long line is dropped", func(t *testing.T) {
		s := wantStream(t, chat(t, "long-line"))
		evs := readEvents(t, s)
		want := []string{"stream_start", "a", "error", "after", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "LINE_TOO_LONG")
		if s.raw.Len() > 64<<10 {
			t.Errorf("the client received %d bytes: the over-long line leaked through", s.raw.Len())
		}
		if end := evs[5].fields(t); numField(t, end, "lines_skipped") != 1 {
			t.Errorf("stream_end = %s, want lines_skipped 1", evs[5].Data)
		}
	})
	t.Run("pings while the upstream is silent", func(t *testing.T) {
		s := wantStream(t, chat(t, "silent"))
		evs := readEvents(t, s)
		want := []string{"stream_start", "a", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		if len(evs[2].Comments) == 0 || evs[2].Comments[0] != "ping" {
			t.Errorf("comments before generation_done = %q, want pings", evs[2].Comments)
		}
		raw := s.raw.String()
		ping, done := strings.Index(raw, "\n: ping\n\n"), strings.Index(raw, "event: generation_done")
		if ping < 0 || ping > done {
			t.Errorf("no \": ping\" comment before generation_done in\n%s", raw)
		}
	})
}

// ---- 5. client disconnect ------------------------------------------------------------------

func TestChatStreamClientDisconnectCancelsUpstream(t *testing.T) {
	upstreamDone := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_start"}`)
		<-r.Context().Done()
		close(upstreamDone)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hi"}`))
	res, err := g.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	s := wantStream(t, res)
	nextEvent(t, s)
	if ev := nextEvent(t, s); ev.Event != "generation_start" {
		t.Fatalf("event = %q, want generation_start", ev.Event)
	}
	cancel()
	select {
	case <-upstreamDone:
	case <-time.After(time.Second):
		t.Fatal("the upstream request was still running 1s after the client went away")
	}
}

// TestChatStreamsActiveWhenClientsVanishMidWrite lets clients vanish while the gateway is writing
// to them (the upstream never pauses), and checks that every stream is counted out again and its
// upstream request cancelled.
func TestChatStreamsActiveWhenClientsVanishMidWrite(t *testing.T) {
	const streams = 50
	var cancelled atomic.Int64
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		line := `{"type":"generation_chunk","content":"` + strings.Repeat("x", 8000) + `"}` + "\n"
		rc := http.NewResponseController(w)
		for r.Context().Err() == nil {
			if _, err := io.WriteString(w, line); err != nil || rc.Flush() != nil {
				break
			}
		}
		cancelled.Add(1)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "POLICY_FILE": "testdata/policy/bench.json"})
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream",
				strings.NewReader(fmt.Sprintf(`{"message":"hi","request_id":"vanish-%d"}`, i)))
			res, err := g.Client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer res.Body.Close()
			io.ReadFull(res.Body, make([]byte, 1<<10)) // mid-stream; then the client is gone
		})
	}
	wg.Wait()
	eventually(t, 5*time.Second, "every upstream request cancelled", func() bool { return cancelled.Load() == streams })
	eventually(t, 5*time.Second, "sse_streams_active back to 0", func() bool {
		v, _ := sample(scrape(t, g.URL+"/metrics"), "sse_streams_active", nil)
		return v == 0
	})
}

// ---- 6. cancel -----------------------------------------------------------------------------

func TestChatCancel(t *testing.T) {
	upstreamDone := make(chan struct{}, 1)
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		<-r.Context().Done()
		upstreamDone <- struct{}{}
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	cancelReq := func(t *testing.T, id string) *http.Response {
		return doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/cancel", strings.NewReader(`{"request_id":"`+id+`"}`), nil)
	}

	s := wantStream(t, postChat(t, g, `{"message":"hi","request_id":"cancel-me-1"}`, nil))
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}

	t.Run("same request_id while running is 409", func(t *testing.T) {
		wantError(t, postChat(t, g, `{"message":"again","request_id":"cancel-me-1"}`, nil), http.StatusConflict, "CONFLICT")
	})
	t.Run("unknown request_id is 404", func(t *testing.T) {
		wantError(t, cancelReq(t, "no-such-stream"), http.StatusNotFound, "NOT_FOUND")
	})
	t.Run("cancel ends the stream", func(t *testing.T) {
		res := cancelReq(t, "cancel-me-1")
		if res.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(res.Body)
			t.Fatalf("cancel: status %d, want 200; body %s", res.StatusCode, body)
		}
		var ack map[string]string
		if err := json.NewDecoder(res.Body).Decode(&ack); err != nil || ack["request_id"] != "cancel-me-1" {
			t.Errorf("cancel answer = %v (%v), want the request_id", ack, err)
		}
		evs := readEvents(t, s)
		if len(evs) == 0 || evs[len(evs)-1].Event != "stream_cancelled" {
			t.Fatalf("events after cancel = %v, want stream_cancelled last", eventNames(evs))
		}
		if got := evs[len(evs)-1].fields(t)["request_id"]; got != "cancel-me-1" {
			t.Errorf("stream_cancelled request_id = %v", got)
		}
		select {
		case <-upstreamDone:
		case <-time.After(time.Second):
			t.Fatal("the upstream request was still running 1s after the cancel")
		}
	})
	t.Run("request_id is free again", func(t *testing.T) {
		// The stream is gone from the registry once it ended.
		deadline := time.Now().Add(time.Second)
		for {
			res := cancelReq(t, "cancel-me-1")
			res.Body.Close()
			if res.StatusCode == http.StatusNotFound {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("cancel of a finished stream answers %d, want 404", res.StatusCode)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	if n := len(algo.requests()); n != 1 {
		t.Errorf("algorithm service received %d requests, want 1 (the 409 must not reach it)", n)
	}
}

// TestChatCancelBeforeUpstreamAnswers cancels a stream whose upstream has not answered its
// headers yet: the cancel says "cancelled", so the upstream request must end at once rather
// than whenever the upstream answers or UPSTREAM_TIMEOUT passes.
func TestChatCancelBeforeUpstreamAnswers(t *testing.T) {
	var upstreamCalled atomic.Bool
	upstreamDone := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		upstreamCalled.Store(true)
		sleepCtx(r.Context(), 5*time.Second) // thinking, no headers yet
		close(upstreamDone)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "UPSTREAM_TIMEOUT": "4s"})

	answered := make(chan int, 1)
	var body []byte
	go func() {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, g.URL+"/api/v2/chat/stream",
			strings.NewReader(`{"message":"hi","request_id":"early-cancel"}`))
		res, err := g.Client.Do(req)
		if err != nil {
			answered <- -1
			return
		}
		body, _ = io.ReadAll(res.Body)
		res.Body.Close()
		answered <- res.StatusCode
	}()
	deadline := time.Now().Add(2 * time.Second)
	for {
		res := doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/cancel", strings.NewReader(`{"request_id":"early-cancel"}`), nil)
		res.Body.Close()
		if res.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream never became cancellable (last status %d)", res.StatusCode)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The cancel may land before the request even left the gateway; if it did leave, it must
	// end at once.
	select {
	case <-upstreamDone:
	case <-time.After(time.Second):
		if upstreamCalled.Load() {
			t.Error("the upstream request was still running 1s after a successful cancel")
		}
	}
	select {
	case status := <-answered:
		// The client gets the stream it asked for, opened and cancelled at once.
		if status != http.StatusOK || !strings.Contains(string(body), "event: stream_start\n") ||
			!strings.HasSuffix(strings.TrimSpace(string(body)), "}") ||
			!strings.Contains(string(body), "event: stream_cancelled\n") {
			t.Errorf("client got %d %q, want 200 with stream_start then stream_cancelled", status, body)
		}
	case <-time.After(time.Second):
		t.Error("the client's request was still open 1s after a successful cancel")
		<-answered
	}
	if upstreamCalled.Load() {
		select {
		case <-upstreamDone:
		case <-time.After(5 * time.Second):
			t.Error("the upstream request never ended")
		}
	}
}

// ---- 7. health and request IDs -------------------------------------------------------------

func TestHealthAndRequestID(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) { ndjson(w, `{"type":"done"}`) })
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	for _, path := range []string{"/healthz", "/readyz"} {
		t.Run(path, func(t *testing.T) {
			res := doRequest(t, g.Client, http.MethodGet, g.URL+path, nil, nil)
			if res.StatusCode != http.StatusOK {
				t.Errorf("GET %s = %d, want 200", path, res.StatusCode)
			}
		})
	}

	requests := []struct {
		name, method, path, body string
	}{
		{"healthz", "GET", "/healthz", ""},
		{"readyz", "GET", "/readyz", ""},
		{"not found", "GET", "/nope", ""},
		{"wrong method", "PUT", "/healthz", ""},
		{"bad chat", "POST", "/api/v2/chat/stream", "{}"},
		{"chat stream", "POST", "/api/v2/chat/stream", `{"message":"hi"}`},
		{"cancel unknown", "POST", "/api/v2/chat/cancel", `{"request_id":"x"}`},
		{"admin unset", "GET", "/api/v2/admin/users", ""},
	}
	for _, rq := range requests {
		t.Run("X-Request-ID on "+rq.name, func(t *testing.T) {
			send := func(id string) string {
				var body io.Reader
				if rq.body != "" {
					body = strings.NewReader(rq.body)
				}
				res := doRequest(t, g.Client, rq.method, g.URL+rq.path, body, map[string]string{"X-Request-ID": id})
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				return res.Header.Get("X-Request-ID")
			}
			if got := send(""); got == "" {
				t.Error("no X-Request-ID in the response")
			}
			if got := send("abc-123_x.y:z"); got != "abc-123_x.y:z" {
				t.Errorf("X-Request-ID = %q, want the sane incoming one kept", got)
			}
			if got := send("bad id\twith junk"); got == "" || strings.ContainsAny(got, " \t") {
				t.Errorf("X-Request-ID = %q, want a fresh one replacing the insane incoming one", got)
			}
		})
	}
}

// ---- 8. admin and documents proxies --------------------------------------------------------

func TestBackendProxies(t *testing.T) {
	backend := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Backend", "yes")
		w.WriteHeader(http.StatusAccepted)
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":       "http://127.0.0.1:1",
		"ADMIN_URL":      backend.URL,
		"DOCS_URL":       backend.URL,
		"MAX_BODY_BYTES": "100",
	})

	for _, path := range []string{"/api/v2/admin/users?x=1", "/api/v2/documents/d-1?x=1"} {
		t.Run("GET "+path, func(t *testing.T) {
			n := len(backend.requests())
			res := doRequest(t, g.Client, http.MethodGet, g.URL+path, nil, nil)
			body, _ := io.ReadAll(res.Body)
			p, q, _ := strings.Cut(path, "?")
			if res.StatusCode != http.StatusAccepted || res.Header.Get("X-Backend") != "yes" ||
				string(body) != fmt.Sprintf(`{"path":%q}`, p) {
				t.Errorf("answer = %d %q X-Backend=%q, want the back end's 202 passed through",
					res.StatusCode, body, res.Header.Get("X-Backend"))
			}
			reqs := backend.requests()
			if len(reqs) != n+1 {
				t.Fatalf("back end received %d new requests, want 1", len(reqs)-n)
			}
			if got := reqs[n]; got.Method != "GET" || got.Path != p || got.RawQuery != q {
				t.Errorf("back end saw %s %s?%s, want GET %s", got.Method, got.Path, got.RawQuery, path)
			}
		})
	}
	t.Run("body over MAX_BODY_BYTES", func(t *testing.T) {
		n := len(backend.requests())
		res := doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/admin/users", strings.NewReader(strings.Repeat("x", 1024)), nil)
		wantError(t, res, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE")
		if got := len(backend.requests()); got != n {
			t.Errorf("back end received %d requests for an over-limit body, want 0", got-n)
		}
	})

	t.Run("unset back ends answer 404", func(t *testing.T) {
		base, stop := startGateway(t, map[string]string{"ALGO_URL": "http://127.0.0.1:1"})
		client := &http.Client{Transport: withToken{&http.Transport{}, tokenFor(t, "u-admin", []string{"admin"}, nil)}}
		for _, path := range []string{"/api/v2/admin/users?x=1", "/api/v2/documents/d-1"} {
			wantError(t, doRequest(t, client, http.MethodGet, base+path, nil, nil), http.StatusNotFound, "NOT_FOUND")
		}
		client.CloseIdleConnections()
		stop()
	})
}

// TestBackendProxyDropsClientIdentityHeaders: DESIGN.md ("Identity to upstreams") says client-sent
// identity headers never reach an upstream, which trusts them; the gateway sets them from the
// verified token, also when the client lists them in Connection to have them dropped.
func TestBackendProxyDropsClientIdentityHeaders(t *testing.T) {
	backend := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL})
	forged := map[string]string{
		"X-User-ID": "root", "X-Username": "root", "X-Tenant-ID": "tenant-a", "X-User-Roles": "super_admin",
		"X-Session-ID": "s-1", "X_User_ID": "root", "x-user_roles": "super_admin",
		"Connection": "X-User-ID, X-User-Roles",
	}
	res := doRequest(t, g.Client, http.MethodGet, g.URL+"/api/v2/admin/users", nil, forged)
	res.Body.Close()
	got := backend.only(t)
	want := map[string]string{"X-User-Id": "u-admin", "X-Username": "u-admin-name", "X-Tenant-Id": "tenant-a",
		"X-User-Roles": "admin"}
	for h, v := range want {
		if vals := got.Header.Values(h); len(vals) != 1 || vals[0] != v {
			t.Errorf("back end got %s = %q, want only %q from the token", h, vals, v)
		}
	}
	for h := range got.Header {
		if strings.Contains(strings.ToLower(h), "_") || strings.EqualFold(h, "X-Session-Id") {
			t.Errorf("forged header %s = %q reached the admin back end", h, got.Header[h])
		}
	}
}

// ---- 10. demo ------------------------------------------------------------------------------

func TestDemo(t *testing.T) {
	g := startRun(t, []string{"-demo"}, map[string]string{})

	want := "curl -N http://" + g.Addr + "/api/v2/chat/stream"
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(g.Stdout.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("stdout does not show %q:\n%s", want, g.Stdout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(g.Stderr.String(), "DEMO MODE") {
		t.Errorf("no DEMO MODE warning in the log:\n%s", g.Stderr)
	}

	evs := readEvents(t, wantStream(t, postChat(t, g, `{"message":"what is voicegate?"}`, nil)))
	n := len(evs)
	if n < 4 || evs[0].Event != "stream_start" || evs[n-2].Event != "generation_done" || evs[n-1].Event != "stream_end" {
		t.Fatalf("events = %v, want stream_start … generation_done stream_end", eventNames(evs))
	}
	var answer strings.Builder
	chunks := 0
	for _, e := range evs {
		if e.Event == "generation_chunk" {
			chunks++
			answer.WriteString(e.fields(t)["content"].(string))
		}
	}
	if chunks < 2 || !strings.Contains(answer.String(), "what is voicegate?") {
		t.Errorf("%d generation_chunk events with answer %q, want several quoting the question", chunks, answer.String())
	}
}

// ---- 11. shutdown --------------------------------------------------------------------------

func TestShutdownEndsStreams(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		<-r.Context().Done()
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SHUTDOWN_GRACE": "1s"})

	s := wantStream(t, postChat(t, g, `{"message":"hi"}`, nil))
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	rest := make(chan []sseEvent, 1)
	go func() {
		var evs []sseEvent
		for {
			ev, err := s.next()
			if err != nil {
				rest <- evs
				return
			}
			evs = append(evs, ev)
		}
	}()

	start := time.Now()
	g.cancel()

	// Readiness fails from the start of the shutdown (503 while draining, or refused once the
	// listener is closed).
	probe := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 200 * time.Millisecond}
	for ready := true; ready; {
		res, err := probe.Get(g.URL + "/readyz")
		ready = err == nil && res.StatusCode == http.StatusOK
		if err == nil {
			res.Body.Close()
		}
		if ready && time.Since(start) > 500*time.Millisecond {
			t.Error("/readyz still answers 200 500ms into the shutdown")
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	probe.CloseIdleConnections()

	select {
	case <-g.finished:
	case <-time.After(3 * time.Second):
		t.Fatal("run did not return within 3s of its context ending")
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("run took %v to return with SHUTDOWN_GRACE=1s, want at most ~1.5s", d)
	}
	if g.runErr != nil {
		t.Errorf("run returned %v, want nil", g.runErr)
	}
	evs := <-rest
	if len(evs) == 0 || evs[0].Event != "server_shutdown" {
		t.Fatalf("events after shutdown = %v, want server_shutdown", eventNames(evs))
	}
	if f := evs[0].fields(t); numField(t, f, "retry_after_ms") <= 0 {
		t.Errorf("server_shutdown = %s, want a retry hint", evs[0].Data)
	}
}
