package main

// Telemetry end to end: Prometheus metrics after mixed traffic (and at start, of the process, of
// Redis errors and of the dependencies) as the README's Metrics table lists them, and OTLP
// tracing to a fake collector.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"

	"voicegate/policy"
)

// readmeMetrics are the metrics of docs/operations.md's "Metrics" table with their label names.
func readmeMetrics(t *testing.T) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile("docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(raw), "\n## Metrics\n")
	if !ok {
		t.Fatal(`docs/operations.md has no "## Metrics" section`)
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

// wantMetrics are docs/operations.md's metrics and their label names.
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
	"voice_resumes_total":               {"outcome"},
	"voice_resume_gap_seconds":          {},
}

// TestOpsMetrics: after a mix of traffic — chat streams, 404s, 401s, a 429, admin GETs of 1,000
// distinct users, a voice session — /metrics parses as Prometheus text, has every metric of the
// README with exactly its labels, labels routes by pattern, and stays small.
func TestOpsMetrics(t *testing.T) {
	t.Parallel()
	if got := readmeMetrics(t); !maps.EqualFunc(got, wantMetrics, slices.Equal) {
		t.Errorf("docs/operations.md's metrics table = %v, want %v", got, wantMetrics)
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
		if name == "voice_resumes_total" || name == "voice_resume_gap_seconds" {
			continue // they need a resume: TestVoiceResumeNetworkCut checks them
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

// TestOpsMetricsProcess: /metrics describes the box it runs on, under the names leak and
// saturation alerts are written against: the process's CPU, memory and file descriptors, and
// the Go runtime's goroutines, threads, heap and GC. The figures are this process's own: its
// open descriptors grow by the connections a test holds open, and its goroutines too.
func TestOpsMetricsProcess(t *testing.T) {
	raw, err := os.ReadFile("docs/operations.md")
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
			t.Errorf("docs/operations.md does not name %s", name)
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
