package proxy_test

// Pool tests: real loopback replicas behind a proxy.Pool used as a client's transport, checking
// where each request lands, what the client sees, and which outcomes the pool reports.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/proxy"
)

// replica is a loopback back end of a pool test: it answers with its name, counts what it
// received, and serves /slow by holding the request until released.
type replica struct {
	name    string
	srv     *httptest.Server
	hits    atomic.Int64
	status  atomic.Int64  // the status of ordinary answers; 0 means 200
	arrived chan string   // the replica's name, once per /slow request it holds
	release chan struct{} // closed: /slow requests end
	once    sync.Once
}

func newReplica(t *testing.T, name string) *replica {
	t.Helper()
	return newReplicaArriving(t, name, make(chan string, 100))
}

// newReplicaArriving is newReplica reporting its /slow requests on arrived, which replicas
// may share.
func newReplicaArriving(t *testing.T, name string, arrived chan string) *replica {
	t.Helper()
	r := &replica{name: name, arrived: arrived, release: make(chan struct{})}
	r.srv = startServer(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.hits.Add(1)
		_, _ = io.Copy(io.Discard, req.Body)
		switch req.URL.Path {
		case "/slow":
			w.WriteHeader(http.StatusOK)
			_ = http.NewResponseController(w).Flush()
			r.arrived <- name
			select {
			case <-r.release:
			case <-req.Context().Done():
			}
			_, _ = io.WriteString(w, name)
			return
		}
		if s := int(r.status.Load()); s != 0 {
			w.WriteHeader(s)
		}
		_, _ = io.WriteString(w, name)
	}))
	t.Cleanup(r.free)
	return r
}

// free releases the replica's held requests.
func (r *replica) free() { r.once.Do(func() { close(r.release) }) }

// outcomes records what a pool reports through OnResult.
type outcomes struct {
	mu   sync.Mutex
	list []string
}

func (o *outcomes) record(upstream, outcome string, _ time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.list = append(o.list, upstream+":"+outcome)
}

func (o *outcomes) all() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.list)
}

// count returns how many times outcome was reported.
func (o *outcomes) count(outcome string) int {
	n := 0
	for _, x := range o.all() {
		if strings.HasSuffix(x, ":"+outcome) {
			n++
		}
	}
	return n
}

// newPool builds a pool over targets (base URLs) with its own transport, and a client using it.
func newPool(t *testing.T, o proxy.PoolOptions, targets ...string) (*proxy.Pool, *http.Client, *outcomes) {
	t.Helper()
	rec := &outcomes{}
	if o.Name == "" {
		o.Name = "test"
	}
	o.OnResult = rec.record
	if o.Transport == nil {
		o.Transport = newTransport(t, proxy.TransportOptions{})
	}
	for _, s := range targets {
		o.Targets = append(o.Targets, mustURL(t, s))
	}
	p := proxy.NewPool(o)
	return p, &http.Client{Transport: p}, rec
}

// fetch sends a request to the pool's primary URL and returns the answer's body (the name of
// the replica that served it) and status.
func fetch(t *testing.T, c *http.Client, p *proxy.Pool, method, path, body string) (string, int, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, p.Primary().String()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return string(b), res.StatusCode, nil
}

// mustFetch is fetch that fails the test on a transport error.
func mustFetch(t *testing.T, c *http.Client, p *proxy.Pool, method, path string) string {
	t.Helper()
	got, _, err := fetch(t, c, p, method, path, "")
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return got
}

// heldRequest is a /slow request in flight.
type heldRequest struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// hold sends GET /slow and returns once a replica holds it (reported on arrived), with that
// replica's name.
func hold(t *testing.T, c *http.Client, p *proxy.Pool, arrived <-chan string) (string, *heldRequest) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h := &heldRequest{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.Primary().String()+"/slow", nil)
		res, err := c.Do(req)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}()
	t.Cleanup(func() { cancel(); <-h.done })
	select {
	case name := <-arrived:
		return name, h
	case <-time.After(5 * time.Second):
		t.Fatal("no replica received the /slow request within 5s")
		return "", nil
	}
}

// TestPoolLeastOutstanding: requests go to the replica with the fewest requests in flight; when
// loads are equal they alternate.
func TestPoolLeastOutstanding(t *testing.T) {
	arrived := make(chan string, 10)
	a, b := newReplicaArriving(t, "a", arrived), newReplicaArriving(t, "b", arrived)
	p, c, _ := newPool(t, proxy.PoolOptions{}, a.srv.URL, b.srv.URL)

	// Held requests spread evenly: each goes to the replica holding fewer.
	held := map[string][]*heldRequest{}
	for i := range 4 {
		name, h := hold(t, c, p, arrived)
		held[name] = append(held[name], h)
		if d := len(held["a"]) - len(held["b"]); d > 1 || d < -1 {
			t.Fatalf("after %d held requests: %d on a, %d on b; want them spread by least outstanding",
				i+1, len(held["a"]), len(held["b"]))
		}
	}

	// b's requests end: a still holds two, so every new request goes to b.
	b.free()
	for _, h := range held["b"] {
		<-h.done
	}
	for i := range 10 {
		if got := mustFetch(t, c, p, "GET", "/"); got != "b" {
			t.Fatalf("request %d with 2 outstanding on a and none on b went to %q, want b", i+1, got)
		}
	}

	// Equal load again: replicas alternate.
	a.free()
	for _, h := range held["a"] {
		<-h.done
	}
	var got []string
	for range 10 {
		got = append(got, mustFetch(t, c, p, "GET", "/"))
	}
	for i := 1; i < len(got); i++ {
		if got[i] == got[i-1] {
			t.Fatalf("with equal load, requests went to %v; want them to alternate", got)
		}
	}
}

// TestPoolRefusedReplica: a replica that refuses connections is ejected at once. A request whose
// body can be sent again (none, or GetBody) is retried on the other replica whatever its method,
// so the client never sees the refusal; one whose body cannot is not, so the client sees the
// error once, then later requests go to the live replica.
func TestPoolRefusedReplica(t *testing.T) {
	for _, order := range []string{"dead first", "live first"} {
		t.Run(order, func(t *testing.T) {
			t.Run("GET retried", func(t *testing.T) {
				live := newReplica(t, "live")
				targets := []string{"http://" + closedAddr(t), live.srv.URL}
				if order == "live first" {
					slices.Reverse(targets)
				}
				p, c, rec := newPool(t, proxy.PoolOptions{}, targets...)
				for i := range 10 {
					got, status, err := fetch(t, c, p, "GET", "/", "")
					if err != nil || status != 200 || got != "live" {
						t.Fatalf("GET %d = %q %d %v, want 200 from live with no error", i+1, got, status, err)
					}
					if i == 1 && rec.count("refused") != 1 {
						t.Fatalf("after 2 GETs outcomes are %v, want the dead replica tried once", rec.all())
					}
				}
				if n := rec.count("refused"); n != 1 {
					t.Errorf("refused reported %d times in 10 GETs (outcomes %v), want 1: ejected at once", n, rec.all())
				}
				if n := live.hits.Load(); n != 10 {
					t.Errorf("live replica received %d requests, want 10", n)
				}
				dead := replicaByURL(p, targets[0])
				if order == "live first" {
					dead = replicaByURL(p, targets[1])
				}
				if !dead.Ejected() {
					t.Error("the refusing replica is not ejected")
				}
			})

			t.Run("PUT with a body retried", func(t *testing.T) {
				var bodies []string
				var mu sync.Mutex
				live := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					b, _ := io.ReadAll(r.Body)
					mu.Lock()
					bodies = append(bodies, string(b))
					mu.Unlock()
				}))
				targets := []string{"http://" + closedAddr(t), live.URL}
				if order == "live first" {
					slices.Reverse(targets)
				}
				p, c, rec := newPool(t, proxy.PoolOptions{}, targets...)
				for i := range 2 {
					if _, status, err := fetch(t, c, p, "PUT", "/", fmt.Sprintf("body-%d", i)); err != nil || status != 200 {
						t.Fatalf("PUT %d = %d %v, want 200", i+1, status, err)
					}
				}
				if rec.count("refused") != 1 || !slices.Equal(bodies, []string{"body-0", "body-1"}) {
					t.Errorf("outcomes %v, live received %q; want one refusal and both bodies whole", rec.all(), bodies)
				}
			})

			// A dial that fails sent nothing, so a POST is as safe to retry as a GET: probing a
			// replica that is still down must not cost a client its chat.
			t.Run("POST retried when its body can be sent again", func(t *testing.T) {
				var bodies []string
				var mu sync.Mutex
				live := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					b, _ := io.ReadAll(r.Body)
					mu.Lock()
					bodies = append(bodies, string(b))
					mu.Unlock()
				}))
				targets := []string{"http://" + closedAddr(t), live.URL}
				if order == "live first" {
					slices.Reverse(targets)
				}
				p, c, rec := newPool(t, proxy.PoolOptions{}, targets...)
				var want []string
				for i := range 4 {
					body := fmt.Sprintf(`{"n":%d}`, i)
					want = append(want, body)
					if _, status, err := fetch(t, c, p, "POST", "/", body); err != nil || status != 200 {
						t.Fatalf("POST %d = %d %v, want 200", i+1, status, err)
					}
				}
				if rec.count("refused") != 1 || !slices.Equal(bodies, want) {
					t.Errorf("outcomes %v, live received %q; want one refusal and every body whole", rec.all(), bodies)
				}
			})

			t.Run("POST not retried when its body cannot be sent again", func(t *testing.T) {
				live := newReplica(t, "live")
				targets := []string{"http://" + closedAddr(t), live.srv.URL}
				if order == "live first" {
					slices.Reverse(targets)
				}
				p, c, rec := newPool(t, proxy.PoolOptions{}, targets...)
				var failed []int
				for i := range 10 {
					req, err := http.NewRequestWithContext(t.Context(), "POST", p.Primary().String()+"/", strings.NewReader(`{"n":1}`))
					if err != nil {
						t.Fatal(err)
					}
					req.GetBody = nil // a body read once, as a server's request body is
					res, err := c.Do(req)
					if err != nil {
						failed = append(failed, i+1)
						if !errors.Is(err, syscall.ECONNREFUSED) {
							t.Errorf("POST %d failed with %v, want the refused connection", i+1, err)
						}
						continue
					}
					got, _ := io.ReadAll(res.Body)
					res.Body.Close()
					if res.StatusCode != 200 || string(got) != "live" {
						t.Errorf("POST %d = %q %d, want 200 from live", i+1, got, res.StatusCode)
					}
				}
				if len(failed) != 1 || failed[0] > 2 {
					t.Errorf("POSTs %v failed, want exactly one of the first two (the dead replica, tried once, not retried)", failed)
				}
				if n := live.hits.Load(); n != 9 {
					t.Errorf("live replica received %d POSTs, want 9 (the failed one is not retried there)", n)
				}
				if n := rec.count("refused"); n != 1 {
					t.Errorf("outcomes %v, want one refusal", rec.all())
				}
			})
		})
	}
}

func replicaByURL(p *proxy.Pool, u string) *proxy.Replica {
	for _, r := range p.Replicas() {
		if r.URL.String() == u {
			return r
		}
	}
	return nil
}

// TestPoolEjectAfterErrorStatus: three consecutive 502/503/504 answers eject a replica; an "ok"
// in between starts the count again; other statuses (such as 500) say nothing about health.
func TestPoolEjectAfterErrorStatus(t *testing.T) {
	flaky := newReplica(t, "flaky")
	p, c, rec := newPool(t, proxy.PoolOptions{EjectFor: time.Minute}, flaky.srv.URL)
	r := p.Replicas()[0]
	send := func(status int) {
		t.Helper()
		flaky.status.Store(int64(status))
		got, code, err := fetch(t, c, p, "GET", "/", "")
		if err != nil || code != status || got != "flaky" {
			t.Fatalf("GET = %q %d %v, want the replica's %d passed through", got, code, err, status)
		}
	}
	for _, s := range []int{503, 502, 200, 504, 503, 500, 500, 500, 200, 503, 503} {
		send(s)
		if r.Ejected() {
			t.Fatalf("ejected after %v; want no three consecutive failures counted yet (outcomes %v)", s, rec.all())
		}
	}
	send(503)
	if !r.Ejected() {
		t.Fatalf("not ejected after three 503s in a row (outcomes %v)", rec.all())
	}
	want := []string{"error_status", "error_status", "ok", "error_status", "error_status", "ok", "ok", "ok", "ok",
		"error_status", "error_status", "error_status"}
	var got []string
	for _, o := range rec.all() {
		got = append(got, strings.TrimPrefix(o, "test:"))
	}
	if !slices.Equal(got, want) {
		t.Errorf("outcomes = %v, want %v", got, want)
	}
}

// TestPoolEjectionEnds: an ejection lasts EjectFor; a replica that still fails when tried again
// is ejected twice as long, up to MaxEject; one that answers is re-admitted and its next
// ejection is short again. Ejections are timed on the pool's clock, stepped by hand here.
func TestPoolEjectionEnds(t *testing.T) {
	const ejectFor, maxEject = 50 * time.Millisecond, 120 * time.Millisecond
	var mu sync.Mutex
	now := time.Date(2026, 1, 2, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}
	advance := func(d time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		now = now.Add(d)
	}
	flaky, good := newReplica(t, "flaky"), newReplica(t, "good")
	flaky.status.Store(503)
	p, c, rec := newPool(t, proxy.PoolOptions{EjectAfter: 1, EjectFor: ejectFor, MaxEject: maxEject, Now: clock},
		flaky.srv.URL, good.srv.URL)
	r := replicaByURL(p, flaky.srv.URL)

	// tryFlaky sends requests until one reaches the flaky replica (the first after an
	// ejection ends, or the other replica's turn first).
	tryFlaky := func() {
		t.Helper()
		for range 4 {
			n := flaky.hits.Load()
			got, _, err := fetch(t, c, p, "GET", "/", "")
			if err != nil {
				t.Fatal(err)
			}
			if flaky.hits.Load() > n {
				if got != "flaky" {
					t.Fatalf("flaky replica was hit but the answer came from %q", got)
				}
				return
			}
		}
		t.Fatalf("the flaky replica received none of 4 requests while in rotation (outcomes %v)", rec.all())
	}

	steps := []struct {
		healthy bool
		want    time.Duration
	}{
		{false, ejectFor},
		{false, 2 * ejectFor},
		{false, maxEject}, // 4×50ms capped
		{false, maxEject},
		{true, 0},
		{false, ejectFor}, // re-admitted: the count started again
	}
	for i, st := range steps {
		if st.healthy {
			flaky.status.Store(200)
		} else {
			flaky.status.Store(503)
		}
		tryFlaky()
		if st.healthy {
			if r.Ejected() {
				t.Fatalf("step %d: replica answering 200 is ejected", i+1)
			}
			continue
		}
		// Ejected for exactly want from the failed request (the clock stood still meanwhile).
		if !r.Ejected() {
			t.Fatalf("step %d: the failing replica is not ejected", i+1)
		}
		advance(st.want - time.Millisecond)
		if !r.Ejected() {
			t.Errorf("step %d: ejection ended before %v", i+1, st.want)
		}
		advance(time.Millisecond)
		if r.Ejected() {
			t.Errorf("step %d: still ejected %v after the request", i+1, st.want)
		}
	}
}

// TestPoolAllEjected: with every replica ejected, requests still go to the one whose ejection
// ends first, never refused outright.
func TestPoolAllEjected(t *testing.T) {
	a, b := newReplica(t, "a"), newReplica(t, "b")
	a.status.Store(503)
	b.status.Store(503)
	p, c, _ := newPool(t, proxy.PoolOptions{EjectAfter: 1, EjectFor: 10 * time.Second}, a.srv.URL, b.srv.URL)
	first := mustFetch(t, c, p, "GET", "/")
	second := mustFetch(t, c, p, "GET", "/")
	if first == second {
		t.Fatalf("first two requests both went to %q, want the second to avoid the ejected one", first)
	}
	for _, r := range p.Replicas() {
		if !r.Ejected() {
			t.Fatalf("%s is not ejected after a 503 with EjectAfter 1", r.URL)
		}
	}
	// Both are out: the first ejected comes back first. It fails again and is ejected for
	// twice as long, so now the other's ejection ends first.
	if got := mustFetch(t, c, p, "GET", "/"); got != first {
		t.Errorf("with both ejected, request went to %q, want %q (its ejection ends first)", got, first)
	}
	if got := mustFetch(t, c, p, "GET", "/"); got != second {
		t.Errorf("next request went to %q, want %q (now its ejection ends first)", got, second)
	}
}

// TestPoolStreamHoldsReplica: a replica stays loaded until the response body is closed, so a
// long stream counts against it for its whole life; its outcome is reported once, as soon as
// the answer's headers arrive (it is known then, and so is the set-up time that goes with it).
func TestPoolStreamHoldsReplica(t *testing.T) {
	arrived := make(chan string, 10)
	a, b := newReplicaArriving(t, "a", arrived), newReplicaArriving(t, "b", arrived)
	p, c, rec := newPool(t, proxy.PoolOptions{}, a.srv.URL, b.srv.URL)

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.Primary().String()+"/slow", nil)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var streaming string
	select {
	case streaming = <-arrived:
	case <-ctx.Done():
		t.Fatal("the stream reached no replica")
	}
	other := map[string]string{"a": "b", "b": "a"}[streaming]
	if got := rec.all(); !slices.Equal(got, []string{"test:ok"}) {
		t.Errorf("outcomes %v reported while the stream's body is open, want the stream's ok", got)
	}
	for i := range 5 {
		if got := mustFetch(t, c, p, "GET", "/"); got != other {
			t.Fatalf("request %d during the stream on %s went to %q, want %s", i+1, streaming, got, other)
		}
	}
	res.Body.Close() // the client leaves before the stream ends
	seen := map[string]bool{}
	for range 4 {
		seen[mustFetch(t, c, p, "GET", "/")] = true
	}
	if !seen["a"] || !seen["b"] {
		t.Errorf("after the stream's body was closed requests went to %v, want both replicas again", seen)
	}
	if got := rec.all(); len(got) != 10 || rec.count("ok") != 10 {
		t.Errorf("outcomes %v, want 10 ok: 9 requests and the stream, reported once", got)
	}
}

// TestPoolReportsSetUpTime: OnResult's duration is the attempt's set-up, from sending the
// request to the answer's headers, measured on the pool's clock: not the time before the
// request was sent, nor the stream that follows the headers.
func TestPoolReportsSetUpTime(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 1, 2, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}
	advance := func(d time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		now = now.Add(d)
	}
	const setUp, stream = 3 * time.Second, 40 * time.Second
	reported := make(chan struct{}, 1)
	srv := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		advance(setUp) // the upstream thinks, then answers
		w.WriteHeader(http.StatusOK)
		_ = http.NewResponseController(w).Flush()
		select { // the client has the headers
		case <-reported:
		case <-r.Context().Done():
			return
		}
		advance(stream) // then it streams for a long time
		_, _ = io.WriteString(w, "done")
	}))
	var took []time.Duration
	p := proxy.NewPool(proxy.PoolOptions{Name: "algo", Targets: []*url.URL{mustURL(t, srv.URL)}, Now: clock,
		Transport: newTransport(t, proxy.TransportOptions{}),
		OnResult: func(upstream, outcome string, d time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			if upstream == "algo" && outcome == "ok" {
				took = append(took, d)
			}
			reported <- struct{}{}
		}})
	advance(time.Hour) // before the request: not its time
	if body, status, err := fetch(t, &http.Client{Transport: p}, p, "GET", "/", ""); err != nil || status != 200 || body != "done" {
		t.Fatalf("fetch = %q %d %v", body, status, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(took) != 1 || took[0] != setUp {
		t.Errorf("OnResult durations = %v, want one of %v", took, setUp)
	}
}

// TestPoolOutcomes: OnResult reports what happened to each attempt.
func TestPoolOutcomes(t *testing.T) {
	slow := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	gotRequest := make(chan struct{}, 1)
	waiting := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body) // so the server notices the client leaving
		gotRequest <- struct{}{}
		<-r.Context().Done()
	}))
	hangup := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	ok := newReplica(t, "ok")
	failing := newReplica(t, "failing")
	failing.status.Store(http.StatusServiceUnavailable)

	tests := []struct {
		name   string
		target string
		opts   proxy.TransportOptions
		ctx    func(t *testing.T) context.Context
		want   string
	}{
		{name: "ok", target: ok.srv.URL, want: "ok"},
		{name: "error_status", target: failing.srv.URL, want: "error_status"},
		{name: "refused", target: "http://" + closedAddr(t), want: "refused"},
		{name: "timeout", target: slow.URL, opts: proxy.TransportOptions{ResponseHeaderTimeout: 50 * time.Millisecond}, want: "timeout"},
		{name: "error", target: hangup.URL, want: "error"},
		{name: "canceled", target: waiting.URL, want: "canceled", ctx: func(t *testing.T) context.Context {
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				select {
				case <-gotRequest:
				case <-time.After(5 * time.Second):
				}
				cancel()
			}()
			return ctx
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, c, rec := newPool(t, proxy.PoolOptions{Name: "algo", Transport: newTransport(t, tt.opts)}, tt.target)
			ctx := t.Context()
			if tt.ctx != nil {
				ctx = tt.ctx(t)
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, p.Primary().String()+"/", strings.NewReader("x"))
			res, err := c.Do(req)
			if err == nil {
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
			if got := rec.all(); !slices.Equal(got, []string{"algo:" + tt.want}) {
				t.Errorf("outcomes = %v (err %v), want [algo:%s]", got, err, tt.want)
			}
		})
	}

	t.Run("canceled does not count against the replica", func(t *testing.T) {
		p, c, rec := newPool(t, proxy.PoolOptions{}, waiting.URL)
		for range 4 {
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				<-gotRequest
				cancel()
			}()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.Primary().String()+"/", nil)
			if res, err := c.Do(req); err == nil {
				res.Body.Close()
			}
			cancel()
		}
		if p.Replicas()[0].Ejected() || rec.count("canceled") != 4 {
			t.Errorf("after 4 cancelled requests: ejected %v, outcomes %v; want 4 canceled and still in rotation",
				p.Replicas()[0].Ejected(), rec.all())
		}
	})
}

// TestPoolWebSocketVia: a WebSocket dial through Pool.Via balances like any request (a refused
// replica is skipped, the dial being a GET) and the 101 answer keeps its body the raw,
// writable connection the WebSocket library needs.
func TestPoolWebSocketVia(t *testing.T) {
	echo := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer conn.CloseNow()
		for {
			typ, msg, err := conn.Read(r.Context())
			if err != nil {
				return
			}
			if err := conn.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	}))
	tr := newTransport(t, proxy.TransportOptions{})
	tr.ForceAttemptHTTP2 = false
	rec := &outcomes{}
	p := proxy.NewPool(proxy.PoolOptions{
		Name:      "algo",
		Targets:   []*url.URL{mustURL(t, "http://"+closedAddr(t)), mustURL(t, echo.URL)},
		Transport: newTransport(t, proxy.TransportOptions{}),
		OnResult:  rec.record,
	})
	client := &http.Client{Transport: p.Via(tr)}
	wsURL := "ws://" + p.Primary().Host + "/ws"

	t.Run("raw 101 body", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.Primary().Host+"/ws", nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		res, err := client.Transport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status = %d, want 101", res.StatusCode)
		}
		if _, ok := res.Body.(io.ReadWriteCloser); !ok {
			t.Fatalf("101 body is a %T, want an io.ReadWriteCloser", res.Body)
		}
	})

	for i := range 3 {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		conn, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPClient: client})
		if err != nil {
			cancel()
			t.Fatalf("dial %d through the pool: %v (outcomes %v)", i+1, err, rec.all())
		}
		if err := conn.Write(ctx, websocket.MessageText, []byte("hello")); err != nil {
			t.Fatal(err)
		}
		typ, msg, err := conn.Read(ctx)
		if err != nil || typ != websocket.MessageText || string(msg) != "hello" {
			t.Errorf("echo = %v %q %v, want text hello", typ, msg, err)
		}
		conn.Close(websocket.StatusNormalClosure, "")
		cancel()
	}
	// The refused replica was tried once and ejected; every upgrade is reported when the 101
	// arrives (the connection then lives outside the pool).
	if rec.count("refused") != 1 || rec.count("ok") != 4 {
		t.Errorf("outcomes = %v, want one refused and 4 ok", rec.all())
	}
}
