package policy_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/policy"
	"voicegate/proxy"
)

// harness is an Enforcer on a real ServeMux with the gateway's routes and the default roles and
// bindings, under the limits a test chooses.
type harness struct {
	mux                *http.ServeMux
	enforcer           *policy.Enforcer
	limited, storeErrs atomic.Int32
	log                *syncBuffer
	calls              atomic.Int32 // handler calls
}

type harnessOptions struct {
	limits  policy.Limits
	limiter policy.Limiter
	leases  policy.Leases
	handler http.Handler // nil: 200 "ok"
	budget  time.Duration
}

func newHarness(t *testing.T, o harnessOptions) *harness {
	t.Helper()
	f := policy.Default(gatewayBindings)
	f.Limits = o.limits
	// The chat and voice routes hold leases, which need a (here uncapped) concurrency limit.
	if f.Limits.Concurrency == nil {
		f.Limits.Concurrency = map[string]policy.Concurrency{}
	}
	for _, kind := range []string{"chat", "voice"} {
		if _, ok := f.Limits.Concurrency[kind]; !ok {
			f.Limits.Concurrency[kind] = policy.Concurrency{}
		}
	}
	p, err := policy.Compile(f, gatewayRoutes, handlerPerms)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{mux: http.NewServeMux(), log: &syncBuffer{}}
	h.enforcer = policy.NewEnforcer(policy.EnforcerOptions{
		Policy:       func() *policy.Policy { return p },
		Subject:      subjectOf,
		Admitter:     policy.Compose(o.limiter, o.leases),
		Budget:       o.budget,
		OnLimited:    func() { h.limited.Add(1) },
		OnStoreError: func() { h.storeErrs.Add(1) },
		Log:          slog.New(slog.NewJSONHandler(h.log, nil)),
	})
	next := o.handler
	if next == nil {
		next = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) })
	}
	counted := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.calls.Add(1)
		next.ServeHTTP(w, r)
	})
	for _, route := range gatewayRoutes {
		h.mux.Handle(route, h.enforcer.Wrap(counted))
	}
	return h
}

func (h *harness) do(method, target string, s *policy.Subject) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.mux.ServeHTTP(rec, withSubject(httptest.NewRequest(method, target, nil), s))
	return rec
}

func user(id, tenant string) *policy.Subject {
	return &policy.Subject{UserID: id, TenantID: tenant, Roles: []string{"admin"}}
}

func perHour(n int) *policy.Rate {
	return &policy.Rate{Requests: n, Per: policy.Duration(time.Hour), Burst: n}
}

// step is one request of a sequence and what must come of it.
type step struct {
	who       *policy.Subject
	method    string
	target    string
	status    int
	remaining string // RateLimit-Remaining; "" means not checked
}

func runSteps(t *testing.T, h *harness, steps []step) {
	t.Helper()
	for i, s := range steps {
		rec := h.do(s.method, s.target, s.who)
		if rec.Code != s.status {
			t.Fatalf("step %d (%s %s %s): status %d, want %d; body %s", i+1, s.who.UserID, s.method, s.target, rec.Code, s.status, rec.Body)
		}
		if s.remaining != "" {
			if got := rec.Header().Get("RateLimit-Remaining"); got != s.remaining {
				t.Fatalf("step %d (%s %s %s): RateLimit-Remaining %q, want %q", i+1, s.who.UserID, s.method, s.target, got, s.remaining)
			}
		}
		if rec.Code == http.StatusTooManyRequests {
			doc := decodeError(t, rec)
			if doc.Code != proxy.CodeRateLimited {
				t.Fatalf("step %d: code %q, want %s", i+1, doc.Code, proxy.CodeRateLimited)
			}
			if ra, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || ra < 1 {
				t.Fatalf("step %d: Retry-After %q, want ≥ 1", i+1, rec.Header().Get("Retry-After"))
			}
		}
	}
}

const (
	chat = "/api/v2/chat/stream"
	docs = "/api/v2/documents/x"
)

func TestEnforcerRateLimits(t *testing.T) {
	a, b, e := user("alice", "acme"), user("bob", "acme"), user("eve", "globex")
	tests := []struct {
		name    string
		limits  policy.Limits
		steps   []step
		limited int32
	}{
		{"per user", policy.Limits{PerUser: perHour(2)}, []step{
			{a, "POST", chat, 200, "1"},
			{a, "GET", docs, 200, "0"}, // one bucket for all of a user's routes
			{a, "GET", docs, 429, "0"},
			{b, "GET", docs, 200, "1"},
			{e, "GET", docs, 200, "1"},
			{a, "POST", chat, 429, ""},
		}, 2},
		{"per tenant shared by its users", policy.Limits{PerTenant: perHour(3)}, []step{
			{a, "GET", docs, 200, "2"},
			{a, "GET", docs, 200, "1"},
			{b, "GET", docs, 200, "0"},
			{b, "GET", docs, 429, "0"},
			{a, "POST", chat, 429, ""},
			{e, "GET", docs, 200, "2"},
		}, 2},
		{"per class and user", policy.Limits{Classes: map[string]policy.Rate{"documents": *perHour(1)}}, []step{
			{a, "GET", docs, 200, "0"},
			{a, "GET", docs, 429, ""},
			{a, "POST", chat, 200, ""}, // another class
			{b, "GET", docs, 200, "0"},
		}, 1},
		{"tightest bucket in the headers", policy.Limits{PerUser: perHour(10), PerTenant: perHour(3)}, []step{
			{a, "GET", docs, 200, "2"},
			{b, "GET", docs, 200, "1"},
		}, 0},
		{"refused for permission costs nothing", policy.Limits{PerUser: perHour(1)}, []step{
			{&policy.Subject{UserID: "alice", TenantID: "acme", Roles: []string{"user"}}, "POST", "/api/v2/admin/x", 403, ""},
			{a, "GET", docs, 200, "0"},
		}, 0},
		{"refusal by one bucket costs the others nothing", policy.Limits{
			PerUser:              perHour(3),
			Classes:              map[string]policy.Rate{"chat": *perHour(1)},
			DailyRequestsPerUser: 3,
		}, []step{
			{a, "POST", chat, 200, "0"},
			{a, "POST", chat, 429, ""}, // the class refuses: neither the user bucket nor the quota is charged
			{a, "POST", chat, 429, ""},
			{a, "GET", docs, 200, "1"},
			{a, "GET", docs, 200, "0"},
			{a, "GET", docs, 429, ""},
		}, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{limits: tc.limits, limiter: policy.NewMemoryLimiter(nil)})
			runSteps(t, h, tc.steps)
			if got := h.limited.Load(); got != tc.limited {
				t.Errorf("OnLimited called %d times, want %d", got, tc.limited)
			}
			if got := h.storeErrs.Load(); got != 0 {
				t.Errorf("OnStoreError called %d times", got)
			}
		})
	}
}

// TestEnforcerClassRate: 5 per minute with a burst of 5 admits 5 at once, counting down, and
// refuses the 6th with Retry-After and RateLimit-* headers. Refilling one slot takes 12 s, longer
// than the test.
func TestEnforcerClassRate(t *testing.T) {
	h := newHarness(t, harnessOptions{
		limits:  policy.Limits{Classes: map[string]policy.Rate{"chat": {Requests: 5, Per: policy.Duration(time.Minute), Burst: 5}}},
		limiter: policy.NewMemoryLimiter(nil),
	})
	a := user("alice", "acme")
	for i, want := range []string{"4", "3", "2", "1", "0"} {
		rec := h.do("POST", chat, a)
		if rec.Code != http.StatusOK {
			t.Fatalf("request %d: status %d", i+1, rec.Code)
		}
		hd := rec.Header()
		if hd.Get("RateLimit-Limit") != "5" || hd.Get("RateLimit-Remaining") != want {
			t.Fatalf("request %d: RateLimit-Limit %q Remaining %q, want 5 and %s", i+1,
				hd.Get("RateLimit-Limit"), hd.Get("RateLimit-Remaining"), want)
		}
		if reset, err := strconv.Atoi(hd.Get("RateLimit-Reset")); err != nil || reset < 1 || reset > 60 {
			t.Fatalf("request %d: RateLimit-Reset %q, want 1..60 s", i+1, hd.Get("RateLimit-Reset"))
		}
	}
	rec := h.do("POST", chat, a)
	if rec.Code != http.StatusTooManyRequests {
		t.Fatalf("6th request: status %d, want 429", rec.Code)
	}
	doc := decodeError(t, rec)
	if doc.Code != proxy.CodeRateLimited || !strings.Contains(doc.Error, "rate limit exceeded") {
		t.Fatalf("6th request: %+v", doc)
	}
	hd := rec.Header()
	if ra, err := strconv.Atoi(hd.Get("Retry-After")); err != nil || ra < 1 || ra > 12 {
		t.Fatalf("Retry-After %q, want 1..12 s", hd.Get("Retry-After"))
	}
	if hd.Get("RateLimit-Limit") != "5" || hd.Get("RateLimit-Remaining") != "0" || hd.Get("RateLimit-Reset") == "" {
		t.Fatalf("RateLimit headers on the refusal: %v", hd)
	}
	if h.calls.Load() != 5 {
		t.Fatalf("handler called %d times, want 5", h.calls.Load())
	}
	if h.limited.Load() != 1 {
		t.Fatalf("OnLimited called %d times, want 1", h.limited.Load())
	}
}

// TestEnforcerRefill: 10 per second with a burst of 1 refuses a second request at once and
// admits one again once the slot has refilled (100 ms on the limiter's clock).
func TestEnforcerRefill(t *testing.T) {
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
	h := newHarness(t, harnessOptions{
		limits:  policy.Limits{PerUser: &policy.Rate{Requests: 10, Per: policy.Duration(time.Second), Burst: 1}},
		limiter: policy.NewMemoryLimiter(clock),
	})
	a := user("alice", "acme")
	if rec := h.do("GET", docs, a); rec.Code != http.StatusOK {
		t.Fatalf("first: %d", rec.Code)
	}
	if rec := h.do("GET", docs, a); rec.Code != http.StatusTooManyRequests {
		t.Fatalf("second at once: %d, want 429", rec.Code)
	}
	advance(99 * time.Millisecond)
	if rec := h.do("GET", docs, a); rec.Code != http.StatusTooManyRequests {
		t.Fatalf("1 ms before the refill: %d, want 429", rec.Code)
	}
	advance(time.Millisecond)
	if rec := h.do("GET", docs, a); rec.Code != http.StatusOK {
		t.Fatalf("at the refill: %d, want 200", rec.Code)
	}
}

func TestEnforcerDailyQuota(t *testing.T) {
	h := newHarness(t, harnessOptions{limits: policy.Limits{DailyRequestsPerUser: 3}, limiter: policy.NewMemoryLimiter(nil)})
	a, b := user("alice", "acme"), user("bob", "acme")
	runSteps(t, h, []step{
		{a, "GET", docs, 200, ""},
		{a, "POST", chat, 200, ""},
		{a, "GET", docs, 200, ""},
		{a, "GET", docs, 429, ""},
		{b, "GET", docs, 200, ""},
		{a, "POST", chat, 429, ""},
	})
	rec := h.do("GET", docs, a)
	doc := decodeError(t, rec)
	if rec.Code != http.StatusTooManyRequests || doc.Error != "daily request quota exceeded" {
		t.Fatalf("status %d, message %q, want 429 daily request quota exceeded", rec.Code, doc.Error)
	}
	if ra, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || ra < 1 || ra > 86400 {
		t.Fatalf("Retry-After %q, want until the next UTC day", rec.Header().Get("Retry-After"))
	}
	if h.limited.Load() != 3 {
		t.Fatalf("OnLimited called %d times, want 3", h.limited.Load())
	}
}

// blocker is a handler that holds chat requests until told to finish.
type blocker struct {
	entered chan string   // receives the caller's user ID once inside
	release chan struct{} // one value lets one handler return
}

func newBlocker() *blocker {
	return &blocker{entered: make(chan string, 16), release: make(chan struct{})}
}

func (b *blocker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != chat {
		return // only streams are held open
	}
	s, _ := subjectOf(r)
	b.entered <- s.UserID
	<-b.release
}

// start sends a request in the background and waits until its handler runs.
func (h *harness) start(t *testing.T, b *blocker, s *policy.Subject, done *sync.WaitGroup, codes chan<- int) {
	t.Helper()
	done.Add(1)
	go func() {
		defer done.Done()
		codes <- h.do("POST", chat, s).Code
	}()
	select {
	case id := <-b.entered:
		if id != s.UserID {
			t.Fatalf("entered: %s, want %s", id, s.UserID)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s's request was not admitted", s.UserID)
	}
}

// refuse sends a chat request expected to be refused without reaching the handler. Should it be
// admitted instead, the blocker would hold it, so it runs in the background and the test fails
// after a while rather than hanging; the test's final release lets it end.
func (h *harness) refuse(t *testing.T, s *policy.Subject, done *sync.WaitGroup) *httptest.ResponseRecorder {
	t.Helper()
	recs := make(chan *httptest.ResponseRecorder, 1)
	done.Add(1)
	go func() {
		defer done.Done()
		recs <- h.do("POST", chat, s)
	}()
	select {
	case rec := <-recs:
		return rec
	case <-time.After(5 * time.Second):
		t.Fatalf("%s's request over the cap was admitted", s.UserID)
		return nil
	}
}

func TestEnforcerConcurrency(t *testing.T) {
	a, b, c, e := user("alice", "acme"), user("bob", "acme"), user("carol", "acme"), user("eve", "globex")
	tests := []struct {
		name    string
		held    []*policy.Subject // admitted and held open, in order
		refused *policy.Subject
		level   string // what the refusal names
		other   *policy.Subject
	}{
		{"per user", []*policy.Subject{a, a}, a, "user", b},
		{"per tenant", []*policy.Subject{a, a, b}, c, "tenant", e},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bl := newBlocker()
			h := newHarness(t, harnessOptions{
				limits:  policy.Limits{Concurrency: map[string]policy.Concurrency{"chat": {PerUser: 2, PerTenant: 3}}},
				leases:  policy.NewMemoryLeases(),
				handler: bl,
			})
			var done sync.WaitGroup
			codes := make(chan int, 16)
			defer func() {
				close(bl.release) // let every held handler return
				done.Wait()
			}()
			for _, s := range tc.held {
				h.start(t, bl, s, &done, codes)
			}
			rec := h.refuse(t, tc.refused, &done)
			if rec.Code != http.StatusTooManyRequests {
				t.Fatalf("over the cap: status %d, want 429", rec.Code)
			}
			doc := decodeError(t, rec)
			if want := "open chat sessions per " + tc.level; doc.Code != proxy.CodeRateLimited || !strings.Contains(doc.Error, want) {
				t.Fatalf("over the cap: %+v", doc)
			}
			if rec.Header().Get("Retry-After") != "1" {
				t.Fatalf("Retry-After %q, want 1", rec.Header().Get("Retry-After"))
			}
			if h.limited.Load() != 1 {
				t.Fatalf("OnLimited called %d times, want 1", h.limited.Load())
			}
			// A cap on chat does not touch other routes.
			if rec := h.do("GET", docs, tc.refused); rec.Code != http.StatusOK {
				t.Fatalf("documents while chat is full: %d", rec.Code)
			}
			// Another user (or tenant) still gets in.
			h.start(t, bl, tc.other, &done, codes)
			// One stream ends: a slot is free again.
			bl.release <- struct{}{}
			if code := <-codes; code != http.StatusOK {
				t.Fatalf("a finished stream answered %d", code)
			}
			h.start(t, bl, tc.refused, &done, codes)
			// And full again.
			if rec := h.refuse(t, tc.refused, &done); rec.Code != http.StatusTooManyRequests {
				t.Fatalf("full again: status %d, want 429", rec.Code)
			}
		})
	}
}

// TestEnforcerLeaseCapMessage: the 429 says which cap is full, and a Leases that returns the
// sentinel itself (errors.Is holds) is refused the same way, without a panic.
func TestEnforcerLeaseCapMessage(t *testing.T) {
	tests := []struct {
		name   string
		leases policy.Leases
		hold   bool // take the one slot first
		want   string
	}{
		{"memory leases", policy.NewMemoryLeases(), true, "at most 1 open chat sessions per user"},
		{"bare sentinel", fakeLeases{err: policy.ErrCapReached}, false, "concurrency cap reached"},
		{"wrapped sentinel", fakeLeases{err: fmt.Errorf("%w: tenant full", policy.ErrCapReached)}, false, "tenant full"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bl := newBlocker()
			h := newHarness(t, harnessOptions{
				limits:  policy.Limits{Concurrency: map[string]policy.Concurrency{"chat": {PerUser: 1}}},
				leases:  tc.leases,
				handler: bl,
			})
			var done sync.WaitGroup
			codes := make(chan int, 4)
			defer func() {
				close(bl.release)
				done.Wait()
			}()
			if tc.hold {
				h.start(t, bl, user("alice", "acme"), &done, codes)
			}
			var rec *httptest.ResponseRecorder
			func() {
				defer func() {
					if p := recover(); p != nil {
						t.Fatalf("Wrap panicked: %v", p)
					}
				}()
				rec = h.refuse(t, user("alice", "acme"), &done)
			}()
			doc := decodeError(t, rec)
			if rec.Code != http.StatusTooManyRequests || doc.Code != proxy.CodeRateLimited || !strings.Contains(doc.Error, tc.want) {
				t.Fatalf("status %d, %+v, want 429 RATE_LIMITED containing %q", rec.Code, doc, tc.want)
			}
			if h.storeErrs.Load() != 0 || h.limited.Load() != 1 {
				t.Fatalf("OnStoreError %d, OnLimited %d: a full cap is a refusal, not a store failure",
					h.storeErrs.Load(), h.limited.Load())
			}
		})
	}
}

type fakeLimiter struct {
	err   error
	block bool // wait for the context to end
}

func (f fakeLimiter) Allow(ctx context.Context, _ *policy.Charge) (policy.Verdict, error) {
	if f.block {
		<-ctx.Done()
		return policy.Verdict{}, ctx.Err()
	}
	return policy.Verdict{}, f.err
}

type fakeLeases struct {
	err   error
	block bool
}

func (f fakeLeases) Acquire(ctx context.Context, _ policy.LeaseRequest) (func(), error) {
	if f.block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return nil, f.err
}

// TestEnforcerFailsOpen: when the limiter or the leases cannot answer, requests go through,
// OnStoreError counts each failure and the log gets one line, not one per request.
func TestEnforcerFailsOpen(t *testing.T) {
	// A Redis error names the server's address, which must not reach the log.
	down := fmt.Errorf("policy: rate limit: %w", &net.OpError{Op: "dial", Net: "tcp",
		Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 7), Port: 6379}, Err: errors.New("connection refused")})
	limits := policy.Limits{PerUser: perHour(1), DailyRequestsPerUser: 1,
		Concurrency: map[string]policy.Concurrency{"chat": {PerUser: 1, PerTenant: 1}}}
	tests := []struct {
		name           string
		limiter        policy.Limiter
		leases         policy.Leases
		method, target string
		logMsg         string
	}{
		{"limiter error", fakeLimiter{err: down}, nil, "GET", docs, "fair-use store unavailable"},
		{"limiter too slow", fakeLimiter{block: true}, nil, "GET", docs, "fair-use store unavailable"},
		{"leases error", nil, fakeLeases{err: down}, "POST", chat, "fair-use store unavailable"},
		{"leases too slow", nil, fakeLeases{block: true}, "POST", chat, "fair-use store unavailable"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOptions{limits: limits, limiter: tc.limiter, leases: tc.leases,
				budget: 20 * time.Millisecond})
			a := user("alice", "acme")
			for i := range 3 {
				start := time.Now()
				rec := h.do(tc.method, tc.target, a)
				if rec.Code != http.StatusOK {
					t.Fatalf("request %d: status %d, want 200 (fail open)", i+1, rec.Code)
				}
				if d := time.Since(start); d > 2*time.Second {
					t.Fatalf("request %d took %v: the budget does not bound the store call", i+1, d)
				}
				if rec.Header().Get("RateLimit-Limit") != "" {
					t.Fatalf("RateLimit headers without a verdict: %v", rec.Header())
				}
			}
			if got := h.storeErrs.Load(); got != 3 {
				t.Fatalf("OnStoreError called %d times, want one per request (3)", got)
			}
			if h.limited.Load() != 0 {
				t.Fatalf("OnLimited called %d times", h.limited.Load())
			}
			lines := h.log.lines(t)
			if len(lines) != 1 || lines[0]["level"] != "WARN" || !strings.Contains(fmt.Sprint(lines[0]["msg"]), tc.logMsg) {
				t.Fatalf("log %v, want one WARN line %q", lines, tc.logMsg)
			}
			if l := fmt.Sprint(lines[0]); strings.Contains(l, "10.0.0.7") {
				t.Fatalf("log line names the store's address: %s", l)
			}
		})
	}
}

// TestAdmitWithoutGuard: a handler that charges its own admission (Admit) behind Guard is
// admitted and charged; the same handler reached without Guard (a public path over it, a wiring
// mistake) is refused 500 INTERNAL_ERROR with a cause for the log, and its work never runs,
// whoever the request claims to be.
func TestAdmitWithoutGuard(t *testing.T) {
	var worked atomic.Int32
	admitted := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		release, ok := policy.Admit(w, r, nil)
		if !ok {
			return
		}
		defer release()
		worked.Add(1)
		w.WriteHeader(http.StatusNoContent)
	})
	h := newHarness(t, harnessOptions{limits: policy.Limits{PerUser: perHour(1)}, limiter: policy.NewMemoryLimiter(nil)})
	guarded := h.enforcer.Guard(admitted)
	serve := func(handler http.Handler, s *policy.Subject) (*httptest.ResponseRecorder, *proxy.Info) {
		rec := httptest.NewRecorder()
		var info *proxy.Info
		mux := http.NewServeMux()
		mux.Handle("POST "+chat, handler)
		proxy.RequestID()(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			info = proxy.InfoFrom(r.Context())
			mux.ServeHTTP(w, r)
		})).ServeHTTP(rec, withSubject(httptest.NewRequest("POST", chat, nil), s))
		return rec, info
	}
	alice := user("alice", "acme")
	if rec, _ := serve(guarded, alice); rec.Code != http.StatusNoContent || worked.Load() != 1 {
		t.Fatalf("guarded: %d %s, worked %d; want 204 once", rec.Code, rec.Body, worked.Load())
	}
	if rec, _ := serve(guarded, alice); rec.Code != http.StatusTooManyRequests {
		t.Fatalf("guarded again: %d, want 429: Admit charges the caller's rate", rec.Code)
	}
	for _, s := range []*policy.Subject{nil, alice, {UserID: "root", TenantID: "acme", Roles: []string{policy.SuperAdmin}}} {
		rec, info := serve(admitted, s)
		if rec.Code != http.StatusInternalServerError || decodeError(t, rec).Code != proxy.CodeInternal {
			t.Errorf("without Guard (subject %v): %d %s, want 500 INTERNAL_ERROR", s, rec.Code, rec.Body)
		}
		if info.ErrCause == nil || !strings.Contains(info.ErrCause.Error(), "no guard") {
			t.Errorf("without Guard: logged cause %v, want one naming the missing guard", info.ErrCause)
		}
	}
	if worked.Load() != 1 {
		t.Errorf("the handler's work ran %d times, want only the guarded once", worked.Load())
	}
}
