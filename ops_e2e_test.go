package main

// Operations end to end (issue 6): draining on SIGTERM, a dead algorithm replica, Prometheus
// metrics after mixed traffic, OTLP tracing, the container health check, and what telemetry
// costs. Every test drives the whole gateway through run.

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"voicegate/policy"
)

// ---- helpers -------------------------------------------------------------------------------

// waitNoVoice waits until g lists no live voice session, so that stopping g does not wait for
// one still tearing down.
func waitNoVoice(t *testing.T, g *testGateway) {
	t.Helper()
	eventually(t, 5*time.Second, "voice session gone from the registry", func() bool {
		var list struct {
			Count int `json:"count"`
		}
		res := call(t, g, "GET", "/api/v2/voice/sessions", tokenFor(t, "u-ops-admin", []string{"admin"}, nil), "")
		return res.StatusCode == http.StatusOK && json.NewDecoder(res.Body).Decode(&list) == nil && list.Count == 0
	})
}

// deadAddr returns a loopback address where nothing listens (for now). It is on 127.0.0.2,
// where no test server binds, so the port cannot be handed to another listener meanwhile.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// serveOn starts an httptest server on addr (a port freed earlier), closed at cleanup.
func serveOn(t *testing.T, addr string, h http.Handler) *httptest.Server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen again on %s: %v", addr, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// scrape fetches url (a /metrics endpoint) and parses it with the Prometheus text parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %d, want 200", url, res.StatusCode)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("GET %s: Content-Type = %q, want the Prometheus text format", url, ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(res.Body)
	if err != nil {
		t.Fatalf("GET %s: not Prometheus text: %v", url, err)
	}
	return fams
}

// labelsOf returns a metric's labels as a map.
func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// sample returns the value of the series of family name whose labels include want (counter,
// gauge or untyped; a histogram's sample count), and whether there is one; several matching
// series are summed.
func sample(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
	sum, found := 0.0, false
	for _, m := range f.GetMetric() {
		ls := labelsOf(m)
		match := true
		for k, v := range want {
			if ls[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum, found
}

// readmeMetrics are the metrics of README.md's "Metrics" table with their label names.
func readmeMetrics(t *testing.T) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(raw), "\n## Metrics\n")
	if !ok {
		t.Fatal(`README.md has no "## Metrics" section`)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	paren := regexp.MustCompile(`\([^)]*\)`)
	tick := regexp.MustCompile("`([^`]+)`")
	out := map[string][]string{}
	for _, line := range strings.Split(sec, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		name := strings.Trim(strings.TrimSpace(cells[1]), "`")
		labels := []string{}
		for _, m := range tick.FindAllStringSubmatch(paren.ReplaceAllString(cells[2], ""), -1) {
			labels = append(labels, m[1])
		}
		slices.Sort(labels)
		out[name] = labels
	}
	return out
}

// newTraceID returns a random W3C trace ID and span ID in hex.
func newTraceID() (traceID, spanID string) {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b[:16]), hex.EncodeToString(b[16:])
}

// fakeCollector is an OTLP/HTTP trace collector: it decodes every export and keeps the spans.
type fakeCollector struct {
	*httptest.Server
	mu      sync.Mutex
	spans   []*tracepb.Span
	exports int
	bytes   int64
	errs    []string
}

func newFakeCollector(t testing.TB, keep bool) *fakeCollector {
	t.Helper()
	c := &fakeCollector{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
			http.NotFound(w, r)
			return
		}
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = zr
		}
		raw, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		c.exports++
		c.bytes += int64(len(raw))
		if keep {
			var req collectortrace.ExportTraceServiceRequest
			if err := proto.Unmarshal(raw, &req); err != nil {
				c.errs = append(c.errs, fmt.Sprintf("%s: %v", r.Header.Get("Content-Type"), err))
			}
			for _, rs := range req.GetResourceSpans() {
				for _, ss := range rs.GetScopeSpans() {
					c.spans = append(c.spans, ss.GetSpans()...)
				}
			}
		}
		c.mu.Unlock()
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *fakeCollector) received() ([]*tracepb.Span, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.spans), slices.Clone(c.errs)
}

// ---- 1. SIGTERM with a stream and a voice session open -------------------------------------

// TestOpsShutdownDrains: cancelling run's context (what SIGTERM does through
// signal.NotifyContext in main) with a chat stream and a voice session open: readiness answers
// 503 at once while requests are still served for DRAIN_DELAY, then the listener closes; near
// the end of SHUTDOWN_GRACE the stream gets server_shutdown and stream_end and the voice
// session an error SERVER_SHUTDOWN and close 1012 (its upstream connection closed too); run
// returns nil within the grace plus 1 s.
func TestOpsShutdownDrains(t *testing.T) {
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		<-r.Context().Done() // silent until the gateway lets go
	}})
	const grace, drain = 2 * time.Second, 500 * time.Millisecond
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SHUTDOWN_GRACE": "2s", "DRAIN_DELAY": "500ms"})

	s := wantStream(t, postChat(t, g, `{"message":"hi"}`, nil))
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	type streamEnd struct {
		evs []sseEvent
		err error
		at  time.Time
	}
	streamDone := make(chan streamEnd, 1)
	go func() {
		var evs []sseEvent
		for {
			ev, err := s.next()
			if err != nil {
				streamDone <- streamEnd{evs, err, time.Now()}
				return
			}
			evs = append(evs, ev)
		}
	}()

	type voiceEnd struct {
		msgs []map[string]any
		code websocket.StatusCode
		at   time.Time
	}
	voiceDone := make(chan voiceEnd, 1)
	v := dialVoice(t, g, nil)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		msgs, code, _ := v.readAll(ctx)
		voiceDone <- voiceEnd{msgs, code, time.Now()}
	}()
	// The fake counts its side once its own accept returns, which may come a moment after the
	// client has its session_initialized.
	eventually(t, 2*time.Second, "the upstream voice connection open", func() bool { return algo.voiceOpen.Load() == 1 })

	probe := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Second}
	defer probe.CloseIdleConnections()
	get := func(path string) (int, error) {
		res, err := probe.Get(g.URL + path)
		if err != nil {
			return 0, err
		}
		res.Body.Close()
		return res.StatusCode, nil
	}

	start := time.Now()
	g.cancel()

	// Readiness fails at once, on a listener that still accepts.
	for {
		status, err := get("/readyz")
		if err != nil {
			t.Fatalf("GET /readyz %v into the shutdown: %v; want 503 from a listener still open", time.Since(start), err)
		}
		if status == http.StatusServiceUnavailable {
			break
		}
		if status != http.StatusOK || time.Since(start) > 100*time.Millisecond {
			t.Fatalf("GET /readyz = %d %v into the shutdown, want 503 at once", status, time.Since(start))
		}
		time.Sleep(2 * time.Millisecond)
	}
	if d := time.Since(start); d < drain-100*time.Millisecond {
		if status, err := get("/healthz"); err != nil || status != http.StatusOK {
			t.Errorf("GET /healthz %v into the drain delay = %d %v, want 200: traffic is still served", d, status, err)
		}
	} else {
		t.Logf("too slow to probe /healthz within the drain delay (%v)", d)
	}
	// Then the listener closes, not before the drain delay.
	for {
		_, err := get("/healthz")
		if err != nil {
			if d := time.Since(start); d < drain-20*time.Millisecond {
				t.Errorf("listener closed %v into the shutdown, want after DRAIN_DELAY=%v", d, drain)
			}
			break
		}
		if time.Since(start) > grace {
			t.Fatal("the listener still accepts at the end of the grace period")
		}
		time.Sleep(10 * time.Millisecond)
	}

	var se streamEnd
	select {
	case se = <-streamDone:
	case <-time.After(grace + time.Second):
		t.Fatal("the chat stream did not end within the grace period")
	}
	if names := eventNames(se.evs); len(se.evs) != 2 || names[0] != "server_shutdown" || names[1] != "stream_end" {
		t.Errorf("events after the shutdown began = %v (then %v), want [server_shutdown stream_end]", names, se.err)
	} else if f := se.evs[0].fields(t); numField(t, f, "retry_after_ms") <= 0 {
		t.Errorf("server_shutdown = %s, want a retry hint", se.evs[0].Data)
	}
	if se.err != io.EOF {
		t.Errorf("stream ended with %v, want a clean end", se.err)
	}
	if d := se.at.Sub(start); d < drain || d > grace {
		t.Errorf("stream ended %v into the shutdown, want after the drain delay and within the grace %v", d, grace)
	}

	var ve voiceEnd
	select {
	case ve = <-voiceDone:
	case <-time.After(grace + time.Second):
		t.Fatal("the voice session did not end within the grace period")
	}
	if ve.code != websocket.StatusServiceRestart {
		t.Errorf("voice session closed with %d, want 1012 (service restart)", ve.code)
	}
	shutdownMsg := false
	for _, m := range ve.msgs {
		if m["type"] == "error" && m["code"] == "SERVER_SHUTDOWN" {
			shutdownMsg = true
		}
	}
	if !shutdownMsg {
		t.Errorf("voice messages before the close = %v, want an error with code SERVER_SHUTDOWN", ve.msgs)
	}
	if d := ve.at.Sub(start); d > grace {
		t.Errorf("voice session closed %v into the shutdown, want within the grace %v", d, grace)
	}

	select {
	case <-g.finished:
	case <-time.After(grace + time.Second - time.Since(start)):
		t.Fatalf("run did not return within SHUTDOWN_GRACE + 1s\nlog:\n%s", clipText(g.Stderr.String()))
	}
	t.Logf("run returned %v after its context ended", time.Since(start))
	if g.runErr != nil {
		t.Errorf("run returned %v, want nil (exit 0)", g.runErr)
	}
	select {
	case <-algo.voiceEnded:
	case <-time.After(time.Second):
		t.Error("the upstream voice connection is still open after run returned")
	}
}

// TestOpsShutdownVoiceEndsEarly: a voice session open when the shutdown begins but ended by its
// client soon after does not hold the process until the grace period is nearly over: run
// returns once nothing is left open, as it does for chat streams.
func TestOpsShutdownVoiceEndsEarly(t *testing.T) {
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, `{"type":"done"}`) }})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SHUTDOWN_GRACE": "4s", "DRAIN_DELAY": "0s"})
	v := dialVoice(t, g, nil)
	g.cancel()
	time.Sleep(100 * time.Millisecond)
	closed := time.Now()
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	select {
	case <-g.finished:
		if d := time.Since(closed); d > time.Second {
			t.Errorf("run returned %v after the last voice session ended, want promptly (grace 4s)", d)
		}
	case <-time.After(time.Second):
		<-g.finished
		t.Errorf("run returned %v after the last voice session ended, want within 1s (grace 4s)", time.Since(closed))
	}
	if g.runErr != nil {
		t.Errorf("run returned %v, want nil", g.runErr)
	}
}

// ---- 2. one of two algorithm replicas down -------------------------------------------------

// TestOpsReplicaDown: with one of two replicas of the algorithm service (and of the admin back
// end) refusing connections, every chat request succeeds after at most one failure and every
// admin GET succeeds (retried); the refusals are counted; once the dead replicas come back and
// their ejection (5 s) is over, they receive requests again.
func TestOpsReplicaDown(t *testing.T) {
	deadAlgo, deadAdmin := deadAddr(t), deadAddr(t)
	liveAlgo := doneAlgo(t)
	liveAdmin := okBackend(t)
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":  "http://" + deadAlgo + "," + liveAlgo.URL,
		"ADMIN_URL": "http://" + deadAdmin + "," + liveAdmin.URL,
	})
	tok := tokenFor(t, "u-ops", []string{"admin"}, nil)

	chat := func() (int, string) {
		res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":"hi"}`)
		if res.StatusCode != http.StatusOK {
			return res.StatusCode, errorCode(res)
		}
		evs := readEvents(t, newSSEReader(res.Body))
		if n := len(evs); n == 0 || evs[n-1].Event != "stream_end" || evs[n-2].Event != "generation_done" {
			t.Errorf("chat events = %v, want a complete answer", eventNames(evs))
		}
		return res.StatusCode, ""
	}

	chatStart := time.Now()
	var failed []int
	for i := range 20 {
		status, code := chat()
		if status == http.StatusOK {
			continue
		}
		failed = append(failed, i+1)
		if status != http.StatusBadGateway || code != "ALGO_SERVICE_ERROR" {
			t.Errorf("chat %d = %d %s, want 200, or 502 ALGO_SERVICE_ERROR from the dead replica", i+1, status, code)
		}
	}
	// The pool alternates between equally loaded replicas, so the dead one is tried by the
	// second request; a POST is never retried (it might have been sent), so that one fails.
	if len(failed) > 1 || (len(failed) == 1 && failed[0] > 2) {
		t.Errorf("chat requests %v failed, want at most one of the first two", failed)
	}

	adminStart := time.Now()
	for i := range 20 {
		res := call(t, g, "GET", fmt.Sprintf("/api/v2/admin/users/%d", i), tok, "")
		if res.StatusCode != http.StatusOK {
			t.Errorf("admin GET %d = %d %s, want 200 (retried on the live replica)", i+1, res.StatusCode, errorCode(res))
		}
	}
	if n := len(liveAdmin.requests()); n != 20 {
		t.Errorf("live admin replica received %d requests, want 20", n)
	}

	// An attempt is counted when its response body is closed, a moment after the client has
	// the answer.
	var fams map[string]*dto.MetricFamily
	counted := func(up, outcome string) float64 {
		v, _ := sample(fams, "upstream_requests_total", map[string]string{"upstream": up, "outcome": outcome})
		return v
	}
	eventually(t, 2*time.Second, "upstream attempts counted", func() bool {
		fams = scrape(t, g.URL+"/metrics")
		return counted("algo", "ok")+counted("algo", "refused") >= 20 && counted("admin", "ok") >= 20
	})
	for _, up := range []string{"algo", "admin"} {
		if v := counted(up, "refused"); v < 1 {
			t.Errorf(`upstream_requests_total{upstream=%q,outcome="refused"} = %v, want ≥ 1`, up, v)
		}
		if v := counted(up, "ok"); v < 19 {
			t.Errorf(`upstream_requests_total{upstream=%q,outcome="ok"} = %v, want ≥ 19`, up, v)
		}
	}

	// The dead replicas come back on their ports. They stay ejected for 5 s from their refusal,
	// then the pool tries them again, and they answer.
	var algoFirst, adminFirst atomic.Int64 // unix nanoseconds of the first request each received
	firstHit := func(at *atomic.Int64, h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			at.CompareAndSwap(0, time.Now().UnixNano())
			h(w, r)
		}
	}
	serveOn(t, deadAlgo, firstHit(&algoFirst, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		ndjson(w, `{"type":"generation_chunk","content":"back"}`, `{"type":"generation_done"}`)
	}))
	serveOn(t, deadAdmin, firstHit(&adminFirst, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"revived":true}`)
	}))
	deadline := time.Now().Add(8 * time.Second)
	for algoFirst.Load() == 0 || adminFirst.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("8s after the replicas came back: algo re-admitted %v, admin %v; want both",
				algoFirst.Load() != 0, adminFirst.Load() != 0)
		}
		if status, code := chat(); status != http.StatusOK {
			t.Fatalf("chat while the replica comes back = %d %s, want 200", status, code)
		}
		if res := call(t, g, "GET", "/api/v2/admin/users", tok, ""); res.StatusCode != http.StatusOK {
			t.Fatalf("admin GET while the replica comes back = %d, want 200", res.StatusCode)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, c := range []struct {
		name  string
		first int64
		from  time.Time
	}{{"algo", algoFirst.Load(), chatStart}, {"admin", adminFirst.Load(), adminStart}} {
		if d := time.Unix(0, c.first).Sub(c.from); d < 5*time.Second-50*time.Millisecond {
			t.Errorf("%s replica tried again %v after its refusal, want after the 5s ejection", c.name, d)
		} else {
			t.Logf("%s replica re-admitted %v after the first request that could have found it dead", c.name, d)
		}
	}
}

// ---- 3. metrics ----------------------------------------------------------------------------

// wantMetrics are README.md's metrics and their label names.
var wantMetrics = map[string][]string{
	"http_requests_total":               {"method", "route", "status"},
	"http_request_duration_seconds":     {"method", "route"},
	"websocket_connections_active":      {"type"},
	"sse_streams_active":                {},
	"sse_events_total":                  {"event"},
	"sse_time_to_first_event_seconds":   {},
	"sse_replay_pipelines_total":        {},
	"sse_replay_batches_total":          {},
	"voice_audio_bytes_total":           {"direction"},
	"voice_sessions_total":              {"code"},
	"voice_session_duration_seconds":    {"close_code"},
	"upstream_requests_total":           {"outcome", "upstream"},
	"upstream_request_duration_seconds": {"outcome", "upstream"},
	"redis_command_duration_seconds":    {"command_class"},
	"auth_failures_total":               {"code"},
	"rate_limited_total":                {},
	"redis_errors_total":                {},
	"voicegate_ready":                   {},
	"voicegate_build_info":              {"go_version", "version"},
	"voice_response_latency_seconds":    {"tenant"},
	"voice_asr_latency_seconds":         {"tenant"},
	"voice_barge_ins_total":             {"tenant"},
}

// checkFamily fails the test unless fams has name with exactly labels on every series.
func checkFamily(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels []string) {
	t.Helper()
	f := fams[name]
	if f == nil || len(f.GetMetric()) == 0 {
		t.Errorf("metric %s is missing", name)
		return
	}
	for _, m := range f.GetMetric() {
		got := slices.Sorted(maps.Keys(labelsOf(m)))
		if !slices.Equal(got, labels) {
			t.Errorf("%s series %v has labels %v, want %v", name, labelsOf(m), got, labels)
			return
		}
	}
}

// TestOpsMetrics: after a mix of traffic — chat streams, 404s, 401s, a 429, admin GETs of 1,000
// distinct users, a voice session — /metrics parses as Prometheus text, has every metric of the
// README with exactly its labels, labels routes by pattern, and stays small.
func TestOpsMetrics(t *testing.T) {
	if got := readmeMetrics(t); !maps.EqualFunc(got, wantMetrics, slices.Equal) {
		t.Errorf("README.md's metrics table = %v, want %v", got, wantMetrics)
	}

	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, append([]string{`{"type":"made_up_type"}`}, happyLines...)...)
	}})
	backend := okBackend(t)
	pol := e2ePolicy(t)
	pol.Limits.Classes = map[string]policy.Rate{"documents": {Requests: 1, Per: policy.Duration(time.Hour), Burst: 1}}
	polFile := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, polFile, pol)
	g := startRun(t, nil, map[string]string{
		"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL, "POLICY_FILE": polFile,
	})
	tok := tokenFor(t, "u-metrics", []string{"admin"}, nil)

	const streams = 3
	for range streams {
		res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":"hi"}`)
		wantStatus(t, res, http.StatusOK)
		if evs := readEvents(t, newSSEReader(res.Body)); len(evs) != len(happyLines)+3 {
			t.Fatalf("chat events = %v", eventNames(evs))
		}
	}
	for i := range 20 {
		wantStatus(t, call(t, g, "GET", fmt.Sprintf("/no/such/page/%d", i), tok, ""), http.StatusNotFound)
	}
	wantStatus(t, call(t, g, "PUT", "/healthz", tok, ""), http.StatusMethodNotAllowed)
	const missing, invalid = 4, 2
	for range missing {
		res := call(t, g, "GET", "/api/v2/admin/users", "", "")
		wantError(t, res, http.StatusUnauthorized, "TOKEN_MISSING")
	}
	for range invalid {
		wantStatus(t, call(t, g, "GET", "/api/v2/admin/users", "not.a.token", ""), http.StatusUnauthorized)
	}
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/d-1", tok, ""), http.StatusOK)
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/d-2", tok, ""), http.StatusTooManyRequests)

	// 1,000 distinct user IDs, 8 at a time.
	const users = 1000
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, users)
	for range 8 {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > users {
					return
				}
				res, err := try(t.Context(), g, "GET", fmt.Sprintf("/api/v2/admin/users/%d-%s", i, rand.Text()[:6]), tok, "", nil)
				if err == nil && res.StatusCode != http.StatusOK {
					err = fmt.Errorf("admin GET = %d", res.StatusCode)
				}
				if err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	// A voice session with some audio, closed by the client.
	v := dialVoice(t, g, nil)
	audio := bytes.Repeat([]byte{1, 2}, 1600)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := v.conn.Write(ctx, websocket.MessageBinary, audio); err != nil {
		t.Fatal(err)
	}
	v.turn(t)
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	var fams map[string]*dto.MetricFamily
	eventually(t, 5*time.Second, "websocket_connections_active back to 0", func() bool {
		fams = scrape(t, g.URL+"/metrics")
		n, ok := sample(fams, "websocket_connections_active", nil)
		_, ended := sample(fams, "voice_sessions_total", nil)
		// The upgrade request is counted once its handler returns, a moment after the 101.
		_, counted := sample(fams, "http_requests_total", map[string]string{"route": "GET /api/v2/voice/stream"})
		return ok && n == 0 && ended && counted
	})

	// Names and labels as documented. The Redis metrics need a Redis (a failing one for
	// redis_errors_total): they have their own tests.
	for name, labels := range wantMetrics {
		if name == "redis_errors_total" || name == "redis_command_duration_seconds" {
			continue
		}
		checkFamily(t, fams, name, labels)
	}

	// Routes are patterns, and few series despite 1,000 IDs.
	routes := map[string]bool{}
	for _, m := range fams["http_requests_total"].GetMetric() {
		routes[labelsOf(m)["route"]] = true
	}
	for r := range routes {
		if strings.Contains(r, "/users/") || strings.Contains(r, "/no/such") || regexp.MustCompile(`/\d`).MatchString(r) {
			t.Errorf("http_requests_total has route %q: a raw path, not a pattern", r)
		}
	}
	for _, r := range []string{"/api/v2/admin/", "POST /api/v2/chat/stream", "GET /api/v2/voice/stream", "unmatched"} {
		if !routes[r] {
			t.Errorf("http_requests_total has no route %q (routes: %v)", r, slices.Sorted(maps.Keys(routes)))
		}
	}
	if v, _ := sample(fams, "http_requests_total", map[string]string{"route": "/api/v2/admin/", "method": "GET", "status": "200"}); v < users {
		t.Errorf(`http_requests_total{route="/api/v2/admin/",method="GET",status="200"} = %v, want ≥ %d`, v, users)
	}
	total := 0
	for name, f := range fams {
		n := len(f.GetMetric())
		total += n
		if n >= 50 {
			t.Errorf("%s has %d series after 1,000 distinct IDs, want < 50", name, n)
		}
	}
	t.Logf("%d metric families, %d series; http_requests_total: %d series, routes %v",
		len(fams), total, len(fams["http_requests_total"].GetMetric()), slices.Sorted(maps.Keys(routes)))

	// Values.
	for ev, want := range map[string]float64{"stream_start": streams, "stream_end": streams,
		"generation_chunk": 2 * streams, "generation_done": streams, "other": streams} {
		if got, _ := sample(fams, "sse_events_total", map[string]string{"event": ev}); got != want {
			t.Errorf(`sse_events_total{event=%q} = %v, want %v`, ev, got, want)
		}
	}
	for _, f := range fams["sse_events_total"].GetMetric() {
		if ev := labelsOf(f)["event"]; ev == "made_up_type" {
			t.Errorf("sse_events_total has event %q: unknown upstream types must count as other", ev)
		}
	}
	if got, _ := sample(fams, "sse_streams_active", nil); got != 0 {
		t.Errorf("sse_streams_active = %v after every stream ended, want 0", got)
	}
	if got, _ := sample(fams, "sse_time_to_first_event_seconds", nil); got != streams {
		t.Errorf("sse_time_to_first_event_seconds count = %v, want %d", got, streams)
	}
	for _, typ := range []string{"client", "upstream"} {
		if got, ok := sample(fams, "websocket_connections_active", map[string]string{"type": typ}); !ok || got != 0 {
			t.Errorf(`websocket_connections_active{type=%q} = %v (present %v), want 0 after the session`, typ, got, ok)
		}
	}
	if got, _ := sample(fams, "voice_audio_bytes_total", map[string]string{"direction": "in"}); got < float64(len(audio)) {
		t.Errorf(`voice_audio_bytes_total{direction="in"} = %v, want ≥ %d`, got, len(audio))
	}
	for code, want := range map[string]float64{"TOKEN_MISSING": missing, "TOKEN_INVALID": invalid} {
		if got, _ := sample(fams, "auth_failures_total", map[string]string{"code": code}); got != want {
			t.Errorf(`auth_failures_total{code=%q} = %v, want %v`, code, got, want)
		}
	}
	if got, _ := sample(fams, "rate_limited_total", nil); got != 1 {
		t.Errorf("rate_limited_total = %v, want 1", got)
	}
	if got, _ := sample(fams, "http_requests_total", map[string]string{"route": "unmatched", "status": "404"}); got != 20 {
		t.Errorf(`http_requests_total{route="unmatched",status="404"} = %v, want 20`, got)
	}

	t.Run("METRICS_ADDR", func(t *testing.T) {
		g2 := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "METRICS_ADDR": "127.0.0.1:0"})
		wantError(t, call(t, g2, "GET", "/metrics", "", ""), http.StatusNotFound, "NOT_FOUND")
		addr := ""
		for _, rec := range logRecords(t, g2) {
			if rec["msg"] == "metrics listening" {
				addr, _ = rec["addr"].(string)
			}
		}
		if addr == "" {
			t.Fatalf(`no "metrics listening" log line with the address:\n%s`, g2.Stderr)
		}
		// The 404 is counted once its handler has returned, a moment after the client has it.
		eventually(t, 2*time.Second, "the main listener's 404 for /metrics counted on METRICS_ADDR", func() bool {
			got, _ := sample(scrape(t, "http://"+addr+"/metrics"), "http_requests_total",
				map[string]string{"route": "unmatched", "status": "404"})
			return got == 1
		})
	})
}

// TestOpsMetricsAtStart: metrics without labels, and the fixed label sets of
// websocket_connections_active, are exported as 0 from the start. A series that only appears
// at its first increment hides that increment from rate() and increase(), and an alert on
// "absent" cannot tell "no errors" from "not exported".
func TestOpsMetricsAtStart(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + deadAddr(t)})
	fams := scrape(t, g.URL+"/metrics")
	for _, want := range []struct {
		name   string
		labels map[string]string
	}{
		{"rate_limited_total", nil},
		{"redis_errors_total", nil},
		{"sse_streams_active", nil},
		{"websocket_connections_active", map[string]string{"type": "client"}},
		{"websocket_connections_active", map[string]string{"type": "upstream"}},
	} {
		if v, ok := sample(fams, want.name, want.labels); !ok || v != 0 {
			t.Errorf("%s%v = %v (present %v) on a fresh gateway, want 0", want.name, want.labels, v, ok)
		}
	}
}

// processMetrics are the process and Go runtime metrics README.md names, with the standard
// names of the Prometheus client's collectors.
var processMetrics = []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
	"process_max_fds", "process_start_time_seconds", "go_goroutines", "go_threads", "go_gc_duration_seconds",
	"go_memstats_heap_inuse_bytes"}

// TestOpsMetricsProcess: /metrics describes the box it runs on, under the names leak and
// saturation alerts are written against: the process's CPU, memory and file descriptors, and
// the Go runtime's goroutines, threads, heap and GC. The figures are this process's own: its
// open descriptors grow by the connections a test holds open, and its goroutines too.
func TestOpsMetricsProcess(t *testing.T) {
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, happyLines...) }})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	fams := scrape(t, g.URL+"/metrics")
	for _, name := range processMetrics {
		if fams[name] == nil {
			t.Errorf("%s is not exported", name)
		}
		if !strings.Contains(string(raw), "`"+name+"`") {
			t.Errorf("README.md does not name %s", name)
		}
	}
	value := func(fams map[string]*dto.MetricFamily, name string) float64 {
		v, _ := sample(fams, name, nil)
		return v
	}
	if rss := value(fams, "process_resident_memory_bytes"); rss < 1<<20 {
		t.Errorf("process_resident_memory_bytes = %v, want this process's resident memory", rss)
	}
	if fds, most := value(fams, "process_open_fds"), value(fams, "process_max_fds"); fds < 3 || most < fds {
		t.Errorf("process_open_fds = %v of process_max_fds %v", fds, most)
	}

	// Voice sessions hold two sockets each (client and upstream) and two goroutines: the
	// process's figures follow. The gateway runs in this process, as do the test's clients and
	// the fake algorithm service, which hold a socket and goroutines per session too.
	const sessions = 5
	fdsBefore, goBefore := value(fams, "process_open_fds"), value(fams, "go_goroutines")
	for range sessions {
		dialVoice(t, g, nil)
	}
	fams = scrape(t, g.URL+"/metrics")
	if fds := value(fams, "process_open_fds"); fds < fdsBefore+2*sessions {
		t.Errorf("process_open_fds = %v with %d voice sessions open, %v before: want at least %d more", fds, sessions, fdsBefore, 2*sessions)
	}
	if gs := value(fams, "go_goroutines"); gs < goBefore+2*sessions {
		t.Errorf("go_goroutines = %v with %d voice sessions open, %v before: want at least %d more", gs, sessions, goBefore, 2*sessions)
	}
}

// TestOpsMetricsRedisErrors: a failing Redis is counted in redis_errors_total, which has no
// labels.
func TestOpsMetricsRedisErrors(t *testing.T) {
	r := startRedis(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), okBackend(t), map[string]string{"AUTH_BUDGET": "75ms"}))
	tok := tokenFor(t, "u-redis", []string{"user"}, nil)
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/x", tok, ""), http.StatusOK)
	r.Kill()
	// A token of another user: the first one's revocation answers may still be in the client
	// library's cache until it notices the connection is gone, and would be served from there.
	fresh := tokenFor(t, "u-redis-2", []string{"user"}, nil)
	wantError(t, call(t, g, "GET", "/api/v2/documents/x", fresh, ""), http.StatusServiceUnavailable, "AUTH_SERVICE_ERROR")
	fams := scrape(t, g.URL+"/metrics")
	checkFamily(t, fams, "redis_errors_total", nil)
	if got, _ := sample(fams, "redis_errors_total", nil); got < 1 {
		t.Errorf("redis_errors_total = %v after a failed revocation check, want ≥ 1", got)
	}
}

// histogramOf returns the sample count and sum of the series of histogram name whose labels
// include want, summed over the matching series.
func histogramOf(fams map[string]*dto.MetricFamily, name string, want map[string]string) (count uint64, sum float64) {
	for _, m := range fams[name].GetMetric() {
		ls := labelsOf(m)
		match := true
		for k, v := range want {
			match = match && ls[k] == v
		}
		if match && m.Histogram != nil {
			count += m.GetHistogram().GetSampleCount()
			sum += m.GetHistogram().GetSampleSum()
		}
	}
	return count, sum
}

// redisClasses is the fixed set of redis_command_duration_seconds's command_class.
var redisClasses = []string{"auth", "control", "leases", "limits", "other", "registry", "replay"}

// TestOpsMetricsDependencies: /metrics tells the dependencies apart, so that slow answers can
// be laid at the right door. With Redis, a user service, the admin and documents back ends
// and the algorithm service behind one gateway:
//   - upstream_request_duration_seconds has each upstream, recorded as its answer's headers
//     arrive: a chat stream still open upstream is counted already, at the set-up time;
//   - redis_command_duration_seconds has the classes of what ran, within the fixed set;
//   - a voice session's length is voice_session_duration_seconds{close_code}, once it ends,
//     while http_request_duration_seconds counted its upgrade as soon as the session started.
func TestOpsMetricsDependencies(t *testing.T) {
	r := startRedis(t)
	release := make(chan struct{})
	const setUp = 50 * time.Millisecond
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, req *http.Request) {
		// A slow set-up, then a stream that stays open until the test has looked.
		if !sleepCtx(req.Context(), setUp) {
			return
		}
		ndjson(w, happyLines[0])
		select {
		case <-release:
		case <-req.Context().Done():
			return
		}
		ndjson(w, happyLines[1:]...)
	}})
	users := newFakeBackend(t, func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"active"}`)
	})
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, algo, backend, map[string]string{"USER_SERVICE_URL": users.URL}))
	tok := tokenFor(t, "u-deps", []string{"admin"}, nil)
	wantStatus(t, call(t, g, "GET", "/api/v2/admin/users", tok, ""), http.StatusOK)
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/d-1", tok, ""), http.StatusOK)

	stream := wantStream(t, postChat(t, g, `{"message":"hi"}`, map[string]string{"Authorization": "Bearer " + tok}))
	for _, want := range []string{"stream_start", "retrieval_start"} {
		if ev := nextEvent(t, stream); ev.Event != want {
			t.Fatalf("event %q, want %s", ev.Event, want)
		}
	}
	fams := scrape(t, g.URL+"/metrics")
	if n, sum := histogramOf(fams, "upstream_request_duration_seconds", map[string]string{"upstream": "algo", "outcome": "ok"}); n != 1 || sum < setUp.Seconds() {
		t.Errorf(`upstream_request_duration_seconds{upstream="algo",outcome="ok"} = %d samples, sum %vs while the stream is open, want 1 of at least %v`, n, sum, setUp)
	}
	close(release)
	if evs := readEvents(t, stream); len(evs) == 0 || evs[len(evs)-1].Event != "stream_end" {
		t.Fatalf("chat events = %v", eventNames(evs))
	}

	beforeDial := time.Now()
	v := dialVoice(t, g, nil)
	opened := time.Now()
	voiceRoute := map[string]string{"route": "GET /api/v2/voice/stream"}
	eventually(t, 5*time.Second, "the voice upgrade counted while its session runs", func() bool {
		fams = scrape(t, g.URL+"/metrics")
		n, _ := histogramOf(fams, "http_request_duration_seconds", voiceRoute)
		return n == 1
	})
	if n, _ := histogramOf(fams, "voice_session_duration_seconds", nil); n != 0 {
		t.Errorf("voice_session_duration_seconds has %d samples while the only session runs, want 0", n)
	}
	v.turn(t)
	closing := time.Now()
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	eventually(t, 5*time.Second, "the voice session's length recorded", func() bool {
		fams = scrape(t, g.URL+"/metrics")
		n, _ := histogramOf(fams, "voice_session_duration_seconds", nil)
		return n == 1
	})
	ended := time.Now()
	n, length := histogramOf(fams, "voice_session_duration_seconds", map[string]string{"close_code": "1000"})
	if n != 1 || length < closing.Sub(opened).Seconds() || length > ended.Sub(beforeDial).Seconds() {
		t.Errorf(`voice_session_duration_seconds{close_code="1000"} = %d samples, sum %vs; want 1 between %v (open to close) and %v (dial to recorded)`,
			n, length, closing.Sub(opened), ended.Sub(beforeDial))
	}

	for _, up := range []string{"algo", "admin", "docs", "user"} {
		n, _ := histogramOf(fams, "upstream_request_duration_seconds", map[string]string{"upstream": up, "outcome": "ok"})
		c, _ := sample(fams, "upstream_requests_total", map[string]string{"upstream": up, "outcome": "ok"})
		if n == 0 || float64(n) != c {
			t.Errorf("upstream %s: %d timed attempts, %v counted; want the same, at least one", up, n, c)
		}
	}
	if n, _ := histogramOf(fams, "upstream_request_duration_seconds", map[string]string{"upstream": "algo"}); n != 2 {
		t.Errorf("algo: %d timed attempts, want 2: the chat request and the voice dial", n)
	}
	checkFamily(t, fams, "redis_command_duration_seconds", []string{"command_class"})
	classes := map[string]uint64{}
	for _, m := range fams["redis_command_duration_seconds"].GetMetric() {
		classes[labelsOf(m)["command_class"]] += m.GetHistogram().GetSampleCount()
	}
	for c := range classes {
		if !slices.Contains(redisClasses, c) {
			t.Errorf("redis_command_duration_seconds has command_class %q, outside %v", c, redisClasses)
		}
	}
	for _, c := range []string{"auth", "registry", "other"} { // revocations and user status, the session registry, readiness pings
		if classes[c] == 0 {
			t.Errorf("redis_command_duration_seconds has no %s calls (classes %v)", c, classes)
		}
	}
	t.Logf("Redis calls by class: %v", classes)
}

// ---- 4. tracing ----------------------------------------------------------------------------

// TestOpsTracing: with an OTLP/HTTP collector configured, a chat request that arrives with a
// traceparent continues that trace: the algorithm service receives the same trace ID, the
// collector a server span named by the route pattern and a client span for the upstream call,
// and the request's log line carries the trace_id. The voice dial carries the trace too.
func TestOpsTracing(t *testing.T) {
	collector := newFakeCollector(t, true)
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, happyLines...) }})
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":                    algo.URL,
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL,
		"OTEL_SERVICE_NAME":           "voicegate-test",
	})
	traceID, parentID := newTraceID()
	evs := readEvents(t, wantStream(t, postChat(t, g, `{"message":"hi"}`,
		map[string]string{"traceparent": "00-" + traceID + "-" + parentID + "-01"})))
	if len(evs) == 0 || evs[len(evs)-1].Event != "stream_end" {
		t.Fatalf("events = %v", eventNames(evs))
	}
	voiceTrace, voiceParent := newTraceID()
	v := dialVoice(t, g, http.Header{"Traceparent": {"00-" + voiceTrace + "-" + voiceParent + "-01"}})
	_ = v.conn.Close(websocket.StatusNormalClosure, "")
	waitNoVoice(t, g)

	var sent, voiceSent []string // traceparent fields the algorithm service received
	for _, r := range algo.requests() {
		tp := strings.Split(r.Header.Get("Traceparent"), "-")
		switch r.Path {
		case "/query":
			sent = tp
		case "/voice/stream":
			voiceSent = tp
		}
	}
	if len(sent) != 4 || sent[1] != traceID || sent[2] == parentID {
		t.Fatalf("algorithm service got traceparent %q, want trace %s with the gateway's own span", strings.Join(sent, "-"), traceID)
	}
	if len(voiceSent) != 4 || voiceSent[1] != voiceTrace {
		t.Errorf("voice dial carried traceparent %q, want trace %s", strings.Join(voiceSent, "-"), voiceTrace)
	}

	g.stop() // spans are batched: stopping flushes them
	spans, errs := collector.received()
	if len(errs) > 0 {
		t.Fatalf("collector could not decode exports: %v", errs)
	}
	var server, client *tracepb.Span
	for _, s := range spans {
		if hex.EncodeToString(s.GetTraceId()) != traceID {
			continue
		}
		switch s.GetKind() {
		case tracepb.Span_SPAN_KIND_SERVER:
			server = s
		case tracepb.Span_SPAN_KIND_CLIENT:
			client = s
		}
	}
	if server == nil || client == nil {
		var got []string
		for _, s := range spans {
			got = append(got, fmt.Sprintf("%s %s trace %x", s.GetKind(), s.GetName(), s.GetTraceId()))
		}
		t.Fatalf("collector got spans %v, want a server and a client span of trace %s", got, traceID)
	}
	if server.GetName() != "POST /api/v2/chat/stream" {
		t.Errorf("server span name = %q, want the route pattern %q", server.GetName(), "POST /api/v2/chat/stream")
	}
	if got := hex.EncodeToString(server.GetParentSpanId()); got != parentID {
		t.Errorf("server span's parent = %s, want the incoming traceparent's span %s", got, parentID)
	}
	if got := hex.EncodeToString(client.GetSpanId()); got != sent[2] {
		t.Errorf("client span = %s, want the span the algorithm service was told of (%s)", got, sent[2])
	}
	if hex.EncodeToString(client.GetParentSpanId()) != hex.EncodeToString(server.GetSpanId()) {
		t.Errorf("client span's parent = %x, want the server span %x", client.GetParentSpanId(), server.GetSpanId())
	}
	for _, s := range spans {
		if strings.Contains(s.GetName(), "/users/") || strings.Contains(s.GetName(), "?") {
			t.Errorf("span name %q carries a raw path", s.GetName())
		}
	}

	logged := false
	for _, rec := range logRecords(t, g) {
		if rec["msg"] == "request" && rec["route"] == "POST /api/v2/chat/stream" {
			logged = true
			if rec["trace_id"] != traceID {
				t.Errorf("request log line has trace_id %v, want %s: %v", rec["trace_id"], traceID, rec)
			}
		}
	}
	if !logged {
		t.Errorf("no request log line for the chat stream:\n%s", clipText(g.Stderr.String()))
	}
}

// ---- 5. -healthcheck -----------------------------------------------------------------------

// TestOpsHealthcheck: voicegate -healthcheck (the image's HEALTHCHECK) succeeds against a
// running gateway on LISTEN_ADDR and fails against a closed port.
func TestOpsHealthcheck(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + deadAddr(t)})
	_, port, _ := net.SplitHostPort(g.Addr)
	check := func(addr string) error {
		env := map[string]string{"LISTEN_ADDR": addr}
		var out bytes.Buffer
		return run(t.Context(), []string{"voicegate", "-healthcheck"}, func(k string) string { return env[k] }, &out, &out)
	}
	for _, addr := range []string{g.Addr, ":" + port, "0.0.0.0:" + port} {
		if err := check(addr); err != nil {
			t.Errorf("-healthcheck with LISTEN_ADDR=%s: %v, want nil", addr, err)
		}
	}
	if err := check(deadAddr(t)); err == nil {
		t.Error("-healthcheck against a closed port returned nil, want an error")
	}
	g.stop()
	if err := check(g.Addr); err == nil {
		t.Error("-healthcheck against a stopped gateway returned nil, want an error")
	}
}

// ---- 6. what telemetry costs ---------------------------------------------------------------

// BenchmarkTelemetryOverhead compares small proxied GETs on the admin route through a gateway
// with metrics and tracing on (OTLP to a collector that accepts and discards the spans, every
// request sampled) and one with both off (METRICS_ENABLED=false, no OTLP endpoint), in the same
// run. benchGateway logs without the trace_id handler run adds.
func BenchmarkTelemetryOverhead(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	collector := newFakeCollector(b, false)
	off, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"METRICS_ENABLED": "false"})
	on, gwOn := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL, "OTEL_TRACES_SAMPLER_ARG": "1"})
	if !gwOn.tel.tracing {
		b.Fatal("tracing is not on in the \"on\" gateway")
	}
	// What most deployments run: every request measured, one trace in ten kept.
	sampled, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL, "OTEL_TRACES_SAMPLER_ARG": "0.1"})
	client := benchClient(b)
	targets := []struct{ name, url string }{
		{"off", off.URL + "/api/v2/admin/users"},
		{"on", on.URL + "/api/v2/admin/users"},
		{"on-sampled-10pct", sampled.URL + "/api/v2/admin/users"},
	}
	// Warm both alike (connections, token cache, attribute sets), so the first measured
	// variant does not pay for it.
	for _, target := range targets {
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 50 {
					if resp, err := client.Get(target.url); err == nil {
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}
			})
		}
		wg.Wait()
	}
	rates := map[string]float64{}
	for _, target := range targets {
		b.Run(target.name, func(b *testing.B) {
			rate := parallelGets(b, client, target.url)
			rates[target.name] = rate
			if target.name == "on" && rates["off"] > 0 {
				b.ReportMetric(rate/rates["off"], "on/off")
			}
		})
	}
	// The machine's load drifts between the two sub-benchmarks above; alternating short rounds
	// of the same parallel load puts the drift on both alike, for a fairer ratio.
	b.Run("interleaved", func(b *testing.B) {
		var spent [3]time.Duration
		const workers, perWorker = 16, 25
		round := func(url string) time.Duration {
			start := time.Now()
			var wg sync.WaitGroup
			for range workers {
				wg.Go(func() {
					for range perWorker {
						resp, err := client.Get(url)
						if err != nil {
							b.Error(err)
							return
						}
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				})
			}
			wg.Wait()
			return time.Since(start)
		}
		rounds := 0
		for b.Loop() {
			for i, target := range targets {
				spent[i] += round(target.url)
			}
			rounds++
		}
		n := float64(rounds * workers * perWorker)
		off, on, sampledRate := n/spent[0].Seconds(), n/spent[1].Seconds(), n/spent[2].Seconds()
		b.ReportMetric(off, "off-req/s")
		b.ReportMetric(on, "on-req/s")
		b.ReportMetric(on/off, "on/off")
		b.ReportMetric(sampledRate/off, "sampled10pct/off")
	})
	collector.mu.Lock()
	exports, n := collector.exports, collector.bytes
	collector.mu.Unlock()
	b.Logf("collector: %d exports, %s bytes", exports, strconv.FormatInt(n, 10))
}
