package main

// Operations end to end: draining on SIGTERM, what a shutdown says and waits for, a dead
// algorithm replica, health, request IDs, logs, the container health check and the version.
// Every test drives the whole gateway through run.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
)

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

// TestOpsReplicaDown: with one of two replicas of the algorithm service (and of the admin back
// end) refusing connections, every chat request succeeds after at most one failure and every
// admin GET succeeds (retried); the refusals are counted; once the dead replicas come back and
// their ejection (5 s) is over, they receive requests again.
func TestOpsReplicaDown(t *testing.T) {
	t.Parallel()
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

// redisClasses is the fixed set of redis_command_duration_seconds's command_class.
var redisClasses = []string{"auth", "control", "leases", "limits", "other", "registry", "replay"}

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

// TestOpsShutdownSaysWhatItWaitsFor: Ctrl-C stops the demo at once, and every shutdown says what
// it waits for and that a second signal ends it.
func TestOpsShutdownSaysWhatItWaitsFor(t *testing.T) {
	demo := startRun(t, []string{"-demo"}, map[string]string{"DRAIN_DELAY": ""})
	eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(demo.Stdout.String(), "Ctrl-C") })
	if !strings.Contains(demo.Stdout.String(), "Ctrl-C again stops at once") {
		t.Errorf("the banner does not say a second Ctrl-C stops at once:\n%s", demo.Stdout)
	}
	start := time.Now()
	demo.cancel()
	select {
	case <-demo.finished:
	case <-time.After(time.Second):
		t.Fatal("the demo did not stop within 1s of Ctrl-C")
	}
	t.Logf("the demo stopped %v after Ctrl-C", time.Since(start))

	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DRAIN_DELAY": "200ms"})
	g.stop()
	found := false
	for _, rec := range logRecords(t, g) {
		if msg, _ := rec["msg"].(string); strings.HasPrefix(msg, "shutting down") {
			found = true
			if !strings.Contains(msg, "second signal stops at once") || !strings.Contains(msg, "DRAIN_DELAY") || rec["drain_delay"] != "200ms" {
				t.Errorf("shutdown line = %v, want what it waits for (DRAIN_DELAY 200ms) and the second-signal hint", rec)
			}
		}
	}
	if !found {
		t.Errorf("no shutting down line:\n%s", g.Stderr)
	}
}

// TestOpsRefusedOriginsLogged: a refused preflight and a refused WebSocket origin are logged with
// the path and the origin (and, for the preflight, why).
func TestOpsRefusedOriginsLogged(t *testing.T) {
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, `{"type":"done"}`) }})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example"})
	res := callWith(t, g, "OPTIONS", "/api/v2/chat/stream", "", "", map[string]string{
		"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
	wantError(t, res, http.StatusForbidden, "PERMISSION_DENIED")

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, wres, err := websocket.Dial(ctx, "ws://"+g.Addr+"/api/v2/voice/stream", &websocket.DialOptions{
		HTTPClient:   g.Client,
		HTTPHeader:   http.Header{"Origin": {"https://evil.example"}},
		Subprotocols: []string{"voice-protocol-v2"},
	})
	if err == nil || wres == nil || wres.StatusCode != http.StatusForbidden {
		t.Fatalf("voice from a refused origin: %v, want 403", err)
	}

	var preflight, ws map[string]any
	eventually(t, 2*time.Second, "both refusals logged", func() bool {
		for _, rec := range logRecords(t, g) {
			if rec["msg"] != "request" || rec["status"] != float64(403) {
				continue
			}
			switch rec["method"] {
			case "OPTIONS":
				preflight = rec
			case "GET":
				ws = rec
			}
		}
		return preflight != nil && ws != nil
	})
	if preflight["path"] != "/api/v2/chat/stream" || preflight["origin"] != "https://evil.example" ||
		!strings.Contains(str(preflight["cause"]), "CORS_ORIGINS") {
		t.Errorf("preflight refusal logged as %v, want path, origin and the CORS_ORIGINS cause", preflight)
	}
	if ws["path"] != "/api/v2/voice/stream" || ws["origin"] != "https://evil.example" || ws["route"] != "GET /api/v2/voice/stream" {
		t.Errorf("WebSocket origin refusal logged as %v, want path, route and origin", ws)
	}
}

// TestOpsLogDurationsAsText: JSON logs give durations as text, the way they are configured.
func TestOpsLogDurationsAsText(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "SHUTDOWN_GRACE": "2s"})
	wantStatus(t, call(t, g, "GET", "/healthz", "", ""), http.StatusOK)
	g.stop()
	seen := map[string]bool{}
	for _, rec := range logRecords(t, g) {
		for _, key := range []string{"grace", "duration", "drain_delay"} {
			v, ok := rec[key]
			if !ok {
				continue
			}
			seen[key] = true
			s, isString := v.(string)
			if _, err := time.ParseDuration(s); !isString || err != nil {
				t.Errorf("%q = %#v in %v, want a duration such as 25s", key, v, rec)
			}
		}
	}
	for _, key := range []string{"grace", "duration", "drain_delay"} {
		if !seen[key] {
			t.Errorf("no log line with %q", key)
		}
	}
	for _, rec := range logRecords(t, g) {
		if rec["msg"] == "shutting down" || strings.HasPrefix(str(rec["msg"]), "shutting down") {
			if rec["grace"] != "2s" {
				t.Errorf("grace = %v, want \"2s\"", rec["grace"])
			}
		}
	}
}

// TestVersion: -version prints the version and the Go version, even with settings that would
// stop the gateway; voicegate_build_info carries the same, and voicegate_ready follows /readyz,
// dropping to 0 while the gateway drains.
func TestVersion(t *testing.T) {
	t.Parallel()
	stdout, _, err := runCommand(t, map[string]string{"LOG_LEVEL": "loud"}, "-version")
	if err != nil {
		t.Fatalf("-version: %v", err)
	}
	want := "voicegate " + buildVersion() + " (" + runtime.Version() + ", "
	if !strings.HasPrefix(stdout, want) || strings.Count(stdout, "\n") != 1 {
		t.Errorf("-version printed %q, want one line starting %q", stdout, want)
	}
	if !regexp.MustCompile(`^(v\d+\.\d+\.\d+\S*|devel(-[0-9a-f]+(-dirty)?)?)$`).MatchString(buildVersion()) {
		t.Errorf("buildVersion() = %q, want a module version or devel", buildVersion())
	}

	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + deadAddr(t), "SHUTDOWN_GRACE": "2s", "DRAIN_DELAY": "1s"})
	fams := scrape(t, g.URL+"/metrics")
	if v, ok := sample(fams, "voicegate_build_info", map[string]string{"version": buildVersion(), "go_version": runtime.Version()}); !ok || v != 1 {
		t.Errorf("voicegate_build_info{version=%q,go_version=%q} = %v (present %v), want 1", buildVersion(), runtime.Version(), v, ok)
	}
	checkFamily(t, fams, "voicegate_build_info", []string{"go_version", "version"})
	if v, ok := sample(fams, "voicegate_ready", nil); !ok || v != 1 {
		t.Errorf("voicegate_ready = %v (present %v) on a ready gateway, want 1", v, ok)
	}
	g.cancel()
	eventually(t, 900*time.Millisecond, "voicegate_ready 0 while draining", func() bool {
		v, ok := sample(scrape(t, g.URL+"/metrics"), "voicegate_ready", nil)
		return ok && v == 0
	})
}
