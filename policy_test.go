package main

// Authorization and fair use end to end: whole gateways started through run, several of them
// sharing a real redis-server where the limits live, talked to over loopback — with raw request
// lines where Go's client would clean a path before sending it.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"voicegate/policy"
)

// rawRequest writes one HTTP/1.1 request to g over a fresh TCP connection with target exactly
// as given in the request line — no client cleans, re-escapes or resolves it — and returns the
// response with its body read.
func rawRequest(t *testing.T, g *testGateway, method, target, token string) (*http.Response, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", g.Addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n",
		method, target, g.Addr, token)
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s %s: read response: %v", method, target, err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, target, err)
	}
	return res, string(body)
}

// uriBackend records the raw request-target of every request, and answers 200 with a body
// that says which area was served — admin content for anything a lenient back end would read as
// an admin path.
type uriBackend struct {
	*fakeBackend
	mu   sync.Mutex
	uris []string
}

func newURIBackend(t *testing.T) *uriBackend {
	t.Helper()
	b := &uriBackend{}
	b.fakeBackend = newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		b.mu.Lock()
		b.uris = append(b.uris, r.RequestURI)
		b.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if strings.HasPrefix(normalized(r.RequestURI), "/api/v2/admin") {
			io.WriteString(w, `{"area":"ADMIN-SECRET"}`)
			return
		}
		io.WriteString(w, `{"area":"documents"}`)
	})
	return b
}

func (b *uriBackend) received() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.uris)
}

// normalized is what a lenient back end might make of a request-target: percent-decoded (once,
// as HTTP says), backslashes as slashes, ';' parameters dropped, case folded, dot segments
// resolved.
func normalized(uri string) string {
	p, _, _ := strings.Cut(uri, "?")
	if d, err := url.PathUnescape(p); err == nil {
		p = d
	}
	p = strings.ReplaceAll(p, `\`, "/")
	var segs []string
	for _, s := range strings.Split(p, "/") {
		s, _, _ = strings.Cut(s, ";")
		segs = append(segs, s)
	}
	return strings.ToLower(path.Clean("/" + strings.Join(segs, "/")))
}

// redisLog is what g logged about Redis and the fair-use store, one record a line.
func redisLog(t *testing.T, g *testGateway) string {
	t.Helper()
	var b strings.Builder
	for _, rec := range logRecords(t, g) {
		if m, _ := rec["msg"].(string); strings.Contains(m, "Redis") || strings.Contains(m, "fair-use") {
			fmt.Fprintln(&b, rec)
		}
	}
	return b.String()
}

// TestPolicyPathTricks: a user with document:read only, against a gateway whose admin and
// documents routes go to the same back end (so a path that reaches the documents proxy but
// means admin to the back end would be served admin content), sends disguised admin paths as
// raw request lines. None may reach the back end; each is refused with 400, 403, 404 or 405.
func TestPolicyPathTricks(t *testing.T) {
	backend := newURIBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL})
	w := watchTokens(t, g)
	user := w.token(t, "u-user", []string{"user"}, nil)
	admin := w.token(t, "u-admin", []string{"admin"}, nil)

	// Controls: the back end serves both areas, the user reads documents, the admin reads admin.
	for _, c := range []struct {
		token, target, want string
	}{
		{user, "/api/v2/documents/x", "documents"},
		{admin, "/api/v2/admin/x", "ADMIN-SECRET"},
	} {
		res, body := rawRequest(t, g, "GET", c.target, c.token)
		if res.StatusCode != http.StatusOK || !strings.Contains(body, c.want) {
			t.Fatalf("control GET %s = %d %s, want 200 with %q", c.target, res.StatusCode, body, c.want)
		}
	}
	if res, body := rawRequest(t, g, "GET", "/api/v2/admin/x", user); res.StatusCode != http.StatusForbidden {
		t.Fatalf("control: user GET /api/v2/admin/x = %d %s, want 403", res.StatusCode, body)
	}
	controls := len(backend.received())

	for _, tt := range []struct{ method, target string }{
		{"GET", "//api/v2/admin/x"},
		{"GET", "/api/v2//admin/x"},
		{"GET", "/api/v2/documents/../admin/x"},
		{"GET", "/api/v2/documents/..%2fadmin/x"},
		{"GET", "/api/v2/documents/..%2Fadmin/x"},
		{"GET", "/api/v2/documents/%2e%2e/admin/x"},
		{"GET", "/api/v2/documents/%2E%2E/admin/x"},
		{"GET", "/api/v2/documents/.%2e/admin/x"},
		{"GET", "/api/v2/documents/%2e%2e%2fadmin/x"},
		{"GET", "/api/v2/documents/x%2F..%2F..%2Fadmin"},
		{"GET", "/api/v2/documents/x/..%2f..%2fadmin/x"},
		{"GET", "/API/v2/admin/x"},
		{"GET", "/api/v2/Admin/x"},
		{"GET", "/api/v2/ADMIN/x"},
		{"GET", "/api/v2/admin;/x"},
		{"GET", "/api/v2/admin;x=1/x"},
		{"GET", "/api/v2/documents/..;/admin/x"},
		{"GET", "/api/v2/documents/x;/../../admin/x"},
		{"GET", "/api/v2/documents/x%3b/../../admin/x"},
		{"GET", "/api/v2/documents/./../admin/x"},
		{"GET", "/api/v2/documents/x/../../admin/x"},
		{"GET", "/api/v2/admin%2Fx"},
		{"GET", "/api/v2/admin%2fx"},
		{"GET", "/api/v2%2fadmin/x"},
		{"GET", `/api/v2/documents/..\admin/x`},
		{"GET", `/api/v2/documents\..\admin\x`},
		{"GET", `/api\v2\admin\x`},
		{"GET", "/api/v2/documents/..%5cadmin/x"},
		{"GET", "/api/v2/documents/..%5Cadmin/x"},
		{"GET", "/api/v2/documents/%00/../admin/x"},
		{"GET", "/api/v2/documents/x%00"},
		{"GET", "/api/v2/%61dmin/x"}, // %61 is "a": the route is admin, and the user lacks admin:read
		{"GET", "http://example.com/api/v2/admin/x"},
		{"GET", "http://example.com//api/v2/admin/x"},
		{"get", "/api/v2/admin/x"},
		{"PUT", "/api/v2/documents/..%2fadmin/x"},
		{"DELETE", "/api/v2/documents/%2e%2e/admin/x"},
		{"POST", "/api/v2/documents/x;/../../admin/x"},
	} {
		t.Run(tt.method+" "+tt.target, func(t *testing.T) {
			before := len(backend.received())
			res, body := rawRequest(t, g, tt.method, tt.target, user)
			switch res.StatusCode {
			case http.StatusBadRequest, http.StatusForbidden, http.StatusNotFound, http.StatusMethodNotAllowed:
			default:
				t.Errorf("status = %d, want 400, 403, 404 or 405; body %s", res.StatusCode, body)
			}
			if strings.Contains(body, "ADMIN-SECRET") {
				t.Errorf("admin content reached the client: %s", body)
			}
			if got := backend.received()[before:]; len(got) > 0 {
				t.Errorf("back end received %q, want nothing", got)
			}
		})
	}

	// The subtree root without its slash is redirected (by the router, before authentication)
	// to the canonical path, which is then refused: a redirect, never content.
	before := len(backend.received())
	res, body := rawRequest(t, g, "GET", "/api/v2/admin", user)
	if loc := res.Header.Get("Location"); res.StatusCode/100 == 3 && loc != "/api/v2/admin/" {
		t.Errorf("GET /api/v2/admin = %d to %q, want a redirect to /api/v2/admin/ if any", res.StatusCode, loc)
	} else if res.StatusCode/100 == 2 || strings.Contains(body, "ADMIN-SECRET") {
		t.Errorf("GET /api/v2/admin = %d %s, want no content", res.StatusCode, body)
	}
	if res, body := rawRequest(t, g, "GET", "/api/v2/admin/", user); res.StatusCode != http.StatusForbidden {
		t.Errorf("GET /api/v2/admin/ = %d %s, want 403", res.StatusCode, body)
	}
	if got := backend.received()[before:]; len(got) > 0 {
		t.Errorf("back end received %q, want nothing", got)
	}

	// A double-encoded dot segment is a document whose name contains "%2e%2e": it may go to the
	// documents back end, but verbatim — decoding it once on the way would hand a back end
	// "%2e%2e", which it would decode to "..".
	const double = "/api/v2/documents/%252e%252e/admin/x"
	before = len(backend.received())
	res, body = rawRequest(t, g, "GET", double, user)
	if got := backend.received()[before:]; res.StatusCode == http.StatusOK {
		if len(got) != 1 || got[0] != double {
			t.Errorf("GET %s reached the back end as %q, want it verbatim", double, got)
		}
	} else if len(got) > 0 {
		t.Errorf("GET %s = %d but the back end received %q", double, res.StatusCode, got)
	}
	if strings.Contains(body, "ADMIN-SECRET") {
		t.Errorf("GET %s: admin content reached the client: %s", double, body)
	}

	// Whatever reached the back end, under any lenient reading, is not an admin path unless the
	// admin control sent it.
	for _, uri := range backend.received()[controls:] {
		if strings.HasPrefix(normalized(uri), "/api/v2/admin") {
			t.Errorf("back end received %q, an admin path for a user without admin:read", uri)
		}
	}
}

// TestPolicyTenantIsolation: X-Tenant-ID naming another tenant is refused on every kind of
// route, before any upstream sees it; naming one's own tenant is allowed; a super_admin may name
// any tenant.
func TestPolicyTenantIsolation(t *testing.T) {
	algo := doneAlgo(t)
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL})
	w := watchTokens(t, g)
	// An admin of tenant-a holds every permission the routes need: only the tenant decides.
	admin := w.token(t, "u-a", []string{"admin"}, nil)
	super := w.token(t, "u-root", []string{"super_admin"}, nil)

	routes := []struct{ method, path, body string }{
		{"POST", "/api/v2/chat/stream", `{"message":"hi"}`},
		{"GET", "/api/v2/admin/x", ""},
		{"POST", "/api/v2/admin/x", `{}`},
		{"GET", "/api/v2/documents/x", ""},
		{"DELETE", "/api/v2/documents/x", ""},
	}
	upstream := func() int { return len(algo.requests()) + len(backend.requests()) }
	for _, rt := range routes {
		t.Run(rt.method+" "+rt.path, func(t *testing.T) {
			for _, other := range []string{"tenant-b", "TENANT-A", "tenant-a,tenant-b", "tenant-aa", "*"} {
				n := upstream()
				res := callWith(t, g, rt.method, rt.path, admin, rt.body, map[string]string{"X-Tenant-ID": other})
				doc := wantError(t, res, http.StatusForbidden, "PERMISSION_DENIED")
				if !strings.Contains(doc.Error, "tenant") {
					t.Errorf("X-Tenant-ID %q: 403 = %s, want it to say the tenant is the reason", other, doc.raw)
				}
				if m := upstream() - n; m != 0 {
					t.Errorf("X-Tenant-ID %q: upstreams received %d requests, want none", other, m)
				}
			}

			n := upstream()
			wantStatus(t, callWith(t, g, rt.method, rt.path, admin, rt.body, map[string]string{"X-Tenant-ID": "tenant-a"}), http.StatusOK)
			wantStatus(t, callWith(t, g, rt.method, rt.path, super, rt.body, map[string]string{"X-Tenant-ID": "tenant-b"}), http.StatusOK)
			if m := upstream() - n; m != 2 {
				t.Errorf("upstreams received %d requests, want 2", m)
			}
		})
	}

	// A plain user of tenant-a likewise, on the routes the role may use.
	user := w.token(t, "u-user", []string{"user"}, nil)
	for _, rt := range []struct{ method, path, body string }{routes[0], routes[3]} {
		doc := wantError(t, callWith(t, g, rt.method, rt.path, user, rt.body, map[string]string{"X-Tenant-ID": "tenant-b"}),
			http.StatusForbidden, "PERMISSION_DENIED")
		if !strings.Contains(doc.Error, "tenant") {
			t.Errorf("user %s %s: 403 = %s, want it to say the tenant is the reason", rt.method, rt.path, doc.raw)
		}
		wantStatus(t, callWith(t, g, rt.method, rt.path, user, rt.body, map[string]string{"X-Tenant-ID": "tenant-a"}), http.StatusOK)
	}

	// Only X-Tenant-ID names a tenant; the back end is told the token's tenant, never a header's.
	n := len(backend.requests())
	wantStatus(t, callWith(t, g, "GET", "/api/v2/documents/x", user, "", map[string]string{"X_Tenant_ID": "tenant-b"}), http.StatusOK)
	got := backend.requests()[n]
	if v := got.Header.Values("X-Tenant-Id"); !slices.Equal(v, []string{"tenant-a"}) {
		t.Errorf("back end got X-Tenant-Id %q, want only the token's tenant-a", v)
	}
	if v := got.Header.Values("X_tenant_id"); len(v) > 0 {
		t.Errorf("back end got the client's X_Tenant_ID %q", v)
	}
}

// TestPolicyRateLimitAcrossInstances: two gateways on one Redis, a per-user rate of 20 a
// minute with a burst of 20 (GCRA: one more every 3 s). 40 concurrent requests from one user,
// spread over both, are admitted 20 times in total (21 if the test straddles a refill); the
// rest get 429 RATE_LIMITED with Retry-After and RateLimit-* headers. Another user is unaffected.
func TestPolicyRateLimitAcrossInstances(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	env := redisEnv(r, doneAlgo(t), backend, with(roomyBudgets, map[string]string{"POLICY_FILE": "testdata/policy/e2e-rate.json"}))
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	burst := w.token(t, "u-burst", []string{"user"}, nil)
	other := w.token(t, "u-other", []string{"user"}, nil)

	const total = 40
	type answer struct {
		res *http.Response
		err error
		via int
	}
	answers := make([]answer, total)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range total {
		wg.Go(func() {
			g := []*testGateway{a, b}[i%2]
			res, err := try(t.Context(), g, "GET", "/api/v2/documents/x", burst, "", nil)
			answers[i] = answer{res, err, i % 2}
		})
	}
	wg.Wait()
	took := time.Since(start)

	admitted, perInstance := 0, [2]int{}
	for i, an := range answers {
		if an.err != nil {
			t.Fatalf("request %d: %v", i, an.err)
		}
		res := an.res
		if got := res.Header.Get("RateLimit-Limit"); got != "20" {
			t.Errorf("request %d: RateLimit-Limit = %q, want 20", i, got)
		}
		remaining, err := strconv.Atoi(res.Header.Get("RateLimit-Remaining"))
		if err != nil || remaining < 0 || remaining > 19 {
			t.Errorf("request %d: RateLimit-Remaining = %q, want 0..19", i, res.Header.Get("RateLimit-Remaining"))
		}
		if reset, err := strconv.Atoi(res.Header.Get("RateLimit-Reset")); err != nil || reset < 1 || reset > 60 {
			t.Errorf("request %d: RateLimit-Reset = %q, want 1..60 seconds", i, res.Header.Get("RateLimit-Reset"))
		}
		switch res.StatusCode {
		case http.StatusOK:
			admitted++
			perInstance[an.via]++
		case http.StatusTooManyRequests:
			wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
			if ra, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || ra < 1 || ra > 3 {
				t.Errorf("request %d: Retry-After = %q, want 1..3 seconds (one request per 3 s)", i, res.Header.Get("Retry-After"))
			}
			if remaining != 0 {
				t.Errorf("request %d: refused with RateLimit-Remaining %d, want 0", i, remaining)
			}
		default:
			t.Errorf("request %d: status %d, want 200 or 429; body %s", i, res.StatusCode, errorCode(res))
		}
	}
	t.Logf("admitted %d of %d (A %d, B %d) in %v", admitted, total, perInstance[0], perInstance[1], took)
	if admitted < 20 || admitted > 21 {
		t.Errorf("admitted %d of %d, want 20 (21 if a refill fell inside the %v the burst took)", admitted, total, took)
	}
	if took < 3*time.Second && admitted != 20 {
		t.Errorf("admitted %d in %v, want exactly 20: no refill was due", admitted, took)
	}
	// Which instance wins the race for the budget is up to the scheduler; the total is the point.
	if n := len(backend.requests()); n != admitted {
		t.Errorf("back end received %d requests, want the %d admitted", n, admitted)
	}

	for _, g := range []*testGateway{a, b} {
		res := call(t, g, "GET", "/api/v2/documents/x", other, "")
		wantStatus(t, res, http.StatusOK)
		if got := res.Header.Get("RateLimit-Remaining"); got != "19" && got != "18" {
			t.Errorf("another user: RateLimit-Remaining = %q, want a budget of its own", got)
		}
		wantError(t, call(t, g, "GET", "/api/v2/documents/x", burst, ""), http.StatusTooManyRequests, "RATE_LIMITED")
	}

	key := "voicegate:rl:{tenant-a}:u:u-burst"
	if ttl, _ := r.Do(t, "PTTL", key).(int64); ttl <= 0 || ttl > 60_000 {
		t.Errorf("PTTL %s = %d ms, want a key that expires within the minute (keys: %v)", key, ttl, r.Do(t, "KEYS", "*"))
	}
}

// TestPolicyDailyQuotaAcrossInstances: a quota of 5 requests a day, shared by two gateways: the
// sixth request of the day is refused by either, with a Retry-After up to the next UTC midnight.
func TestPolicyDailyQuotaAcrossInstances(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	env := redisEnv(r, doneAlgo(t), backend, with(roomyBudgets, map[string]string{"POLICY_FILE": "testdata/policy/e2e-quota.json"}))
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	user := w.token(t, "u-quota", []string{"user"}, nil)
	other := w.token(t, "u-other", []string{"user"}, nil)
	day := time.Now().UTC().Format("20060102")

	for i, g := range []*testGateway{a, b, a, b, a} {
		res := call(t, g, "GET", "/api/v2/documents/x", user, "")
		if res.StatusCode != http.StatusOK {
			t.Fatalf("request %d of the day = %d %s, want 200", i+1, res.StatusCode, errorCode(res))
		}
	}
	for _, g := range []*testGateway{b, a} {
		res := call(t, g, "GET", "/api/v2/documents/x", user, "")
		doc := wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
		if !strings.Contains(doc.Error, "quota") {
			t.Errorf("429 = %s, want it to name the daily quota", doc.raw)
		}
		untilMidnight := time.Until(time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour))
		ra, err := strconv.Atoi(res.Header.Get("Retry-After"))
		if err != nil || ra < 1 || time.Duration(ra)*time.Second > untilMidnight+2*time.Second ||
			time.Duration(ra)*time.Second < untilMidnight-5*time.Second {
			t.Errorf("Retry-After = %q, want the %v to the next UTC midnight", res.Header.Get("Retry-After"), untilMidnight.Round(time.Second))
		}
	}
	if time.Now().UTC().Format("20060102") != day {
		t.Skip("the UTC day changed during the test")
	}
	wantStatus(t, call(t, b, "GET", "/api/v2/documents/x", other, ""), http.StatusOK)
	if n := len(backend.requests()); n != 6 {
		t.Errorf("back end received %d requests, want 5 + 1", n)
	}
	key := "voicegate:quota:{tenant-a}:u-quota:" + day
	if got := r.Do(t, "GET", key); got != "5" {
		t.Errorf("GET %s = %#v, want 5: refusals are not counted (keys: %v)", key, got, r.Do(t, "KEYS", "*"))
	}
	if ttl, _ := r.Do(t, "PTTL", key).(int64); time.Duration(ttl)*time.Millisecond < 24*time.Hour {
		t.Errorf("PTTL %s = %d ms, want about 25h", key, ttl)
	}
}

// TestPolicyRateBucketsOfOneUserOnly: every user has buckets of their own, whatever their ID.
// A user whose ID is another's followed by ":c:chat" must not spend that other user's chat
// budget (per_user 100 a minute, chat class 2 a minute).
func TestPolicyRateBucketsOfOneUserOnly(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-classes.json"})))
	w := watchTokens(t, g)
	alice := w.token(t, "alice", []string{"user"}, nil)
	mallory := w.token(t, "alice:c:chat", []string{"user"}, nil)

	// 60 documents requests: well within mallory's own per-user budget of 100.
	for i := range 60 {
		if res := call(t, g, "GET", "/api/v2/documents/x", mallory, ""); res.StatusCode != http.StatusOK {
			t.Fatalf("mallory's request %d = %d %s, want 200", i, res.StatusCode, errorCode(res))
		}
	}
	res := call(t, g, "POST", "/api/v2/chat/stream", alice, `{"message":"hi"}`)
	wantStatus(t, res, http.StatusOK)
	wantStatus(t, call(t, g, "POST", "/api/v2/chat/stream", alice, `{"message":"hi"}`), http.StatusOK)
	wantError(t, call(t, g, "POST", "/api/v2/chat/stream", alice, `{"message":"hi"}`), http.StatusTooManyRequests, "RATE_LIMITED")
}

// TestPolicyLeaseAcrossInstances: one open chat stream per user (LEASE_TTL=1s), across two
// gateways on one Redis. A stream held on A refuses a second one on B, also after longer than
// the TTL (A renews), and B admits the moment A's stream ends. Then a third gateway C, in a
// child process, holds a stream and is SIGKILLed: its lease is not released, and B admits again
// once it has expired, within LEASE_TTL (plus slack) of the kill.
func TestPolicyLeaseAcrossInstances(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	release := make(chan struct{})
	algo := holdAlgo(t, release)
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-lease.json", "LEASE_TTL": "1s"}))
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	holder := w.token(t, "u-holder", []string{"user"}, nil)
	other := w.token(t, "u-other", []string{"user"}, nil)
	const leaseTTL = time.Second

	t.Run("held on A, refused on B, admitted after A ends", func(t *testing.T) {
		resA, s := openStream(t, a, holder, "hold")
		defer resA.Body.Close()

		res := call(t, b, "POST", "/api/v2/chat/stream", holder, `{"message":"second"}`)
		doc := wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
		if !strings.Contains(doc.Error, "concurrency") {
			t.Errorf("429 = %s, want it to name the concurrency cap", doc.raw)
		}
		if ra, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || ra < 1 {
			t.Errorf("Retry-After = %q, want ≥ 1", res.Header.Get("Retry-After"))
		}
		wantStatus(t, call(t, b, "POST", "/api/v2/chat/stream", other, `{"message":"hi"}`), http.StatusOK)

		time.Sleep(leaseTTL + leaseTTL/2) // longer than the TTL: only renewal keeps the lease
		wantError(t, call(t, b, "POST", "/api/v2/chat/stream", holder, `{"message":"second"}`),
			http.StatusTooManyRequests, "RATE_LIMITED")

		close(release) // the upstream ends the answer normally
		evs := readEvents(t, s)
		if names := eventNames(evs); len(names) == 0 || names[len(names)-1] != "stream_end" {
			t.Fatalf("A's stream events = %v, want it to end with stream_end", names)
		}
		// The lease is released before the response ends, so B admits at once, well within
		// the TTL that expiry would take.
		wantStatus(t, call(t, b, "POST", "/api/v2/chat/stream", holder, `{"message":"again"}`), http.StatusOK)
		if n := r.Do(t, "ZCARD", "voicegate:lease:{tenant-a}:chat:u:u-holder"); n != int64(0) {
			t.Errorf("ZCARD of the user's lease set = %#v after every stream ended, want 0", n)
		}
	})

	// A gateway that dies cannot release its leases: cancelling run's context would shut down
	// gracefully and release them, so C runs in a child process (this test binary, re-executed
	// as a gateway) and is killed with SIGKILL while its stream is open.
	t.Run("C killed while holding a lease", func(t *testing.T) {
		c := startChildGateway(t, env)
		dead := w.token(t, "u-dead", []string{"user"}, nil)
		res := doRequest(t, c.client, "POST", c.url+"/api/v2/chat/stream", strings.NewReader(`{"message":"hold-forever"}`),
			map[string]string{"Authorization": "Bearer " + dead})
		s := wantStream(t, res)
		if ev := nextEvent(t, s); ev.Event != "stream_start" {
			t.Fatalf("first event on C = %q, want stream_start", ev.Event)
		}
		key := "voicegate:lease:{tenant-a}:chat:u:u-dead"
		if n := r.Do(t, "ZCARD", key); n != int64(1) {
			t.Fatalf("ZCARD %s = %#v while C holds the stream, want 1", key, n)
		}
		wantError(t, call(t, b, "POST", "/api/v2/chat/stream", dead, `{"message":"second"}`), http.StatusTooManyRequests, "RATE_LIMITED")

		c.kill()
		killed := time.Now()
		res.Body.Close()
		wantError(t, call(t, b, "POST", "/api/v2/chat/stream", dead, `{"message":"second"}`), http.StatusTooManyRequests, "RATE_LIMITED")
		eventually(t, leaseTTL+time.Second, "B admits the dead instance's user within LEASE_TTL+1s", func() bool {
			res := call(t, b, "POST", "/api/v2/chat/stream", dead, `{"message":"hi"}`)
			if res.StatusCode == http.StatusTooManyRequests {
				return false
			}
			wantStatus(t, res, http.StatusOK)
			return true
		})
		t.Logf("B admitted %v after C was killed (LEASE_TTL %v)", time.Since(killed), leaseTTL)
	})
}

// TestPolicyRedisDown: with Redis killed, a gateway failing closed answers 503
// AUTH_SERVICE_ERROR to valid tokens; one with AUTH_FAIL_OPEN=true lets them through without
// rate limiting (limits fail open), warning about the limiter once, not per request. Once Redis
// is back, limits apply again.
func TestPolicyRedisDown(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	// With Redis down a call fails when its budget runs out: budgets short enough for a quick
	// test, long enough for a loaded machine while Redis is up.
	more := map[string]string{"POLICY_FILE": "testdata/policy/e2e-failopen.json", "AUTH_BUDGET": "250ms", "LIMIT_BUDGET": "250ms"}
	closed := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, more))
	more["AUTH_FAIL_OPEN"] = "true"
	open := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, more))
	w := watchTokens(t, closed, open)
	user := w.token(t, "u-1", []string{"user"}, nil)
	const doc = "/api/v2/documents/x"

	// Limits apply: 3 a minute.
	for range 3 {
		wantStatus(t, call(t, open, "GET", doc, user, ""), http.StatusOK)
	}
	wantError(t, call(t, open, "GET", doc, user, ""), http.StatusTooManyRequests, "RATE_LIMITED")
	wantError(t, call(t, closed, "GET", doc, user, ""), http.StatusTooManyRequests, "RATE_LIMITED")

	r.Kill()
	n := len(backend.requests())
	res := call(t, closed, "GET", doc, w.token(t, "u-2", []string{"user"}, nil), "")
	wantError(t, res, http.StatusServiceUnavailable, "AUTH_SERVICE_ERROR")
	if res.Header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}

	const extra = 10
	start := time.Now()
	for i := range extra {
		res := call(t, open, "GET", doc, user, "")
		if res.StatusCode != http.StatusOK {
			t.Fatalf("request %d with Redis down and AUTH_FAIL_OPEN = %d %s, want 200 (limits fail open)", i, res.StatusCode, errorCode(res))
		}
		if v := res.Header.Get("RateLimit-Remaining"); v != "" {
			t.Errorf("request %d: RateLimit-Remaining %q with no limiter to ask", i, v)
		}
	}
	took := time.Since(start)
	if took > 8*time.Second {
		t.Errorf("%d fail-open requests took %v, want each well within AUTH_BUDGET + LIMIT_BUDGET", extra, took)
	}
	if m := len(backend.requests()) - n; m != extra {
		t.Errorf("back end received %d requests with Redis down, want %d (none from the fail-closed gateway)", m, extra)
	}
	count, rec := logCount(t, open, "fair-use store unavailable")
	if count != 1 {
		t.Errorf("%d log lines about the fair-use store for %d requests, want exactly 1 (at most one per 10s):\n%s",
			count, extra, clipText(open.Stderr.String()))
	} else if rec["level"] != "WARN" {
		t.Errorf("the limiter line is at level %v, want WARN: %v", rec["level"], rec)
	}
	if count, _ := logCount(t, closed, "fair-use store unavailable"); count != 0 {
		t.Errorf("the fail-closed gateway logged %d limiter lines; auth refused first, the limiter was never asked", count)
	}

	r.Restart()
	for i, g := range []*testGateway{open, closed} {
		probe := w.token(t, fmt.Sprintf("u-probe-%d", i), []string{"user"}, nil)
		eventually(t, 5*time.Second, "the limiter answers again after Redis came back", func() bool {
			res := call(t, g, "GET", doc, probe, "")
			return res.StatusCode == http.StatusOK && res.Header.Get("RateLimit-Limit") == "3"
		})
	}
	// The restarted Redis kept nothing: a fresh budget of 3, then refusals again. A connection
	// of the client library that the restart broke fails its next call (EOF) before it is
	// dialled again; fair use fails open for that one call, which never reached the new Redis.
	// So a few answers may come without a limiter, but those that have one count down from 2.
	var remaining []string
	for i := 0; len(remaining) < 3 && i < 6; i++ {
		res := call(t, open, "GET", doc, user, "")
		if res.StatusCode != http.StatusOK {
			t.Fatalf("request %d after Redis came back = %d %s, want 200", i, res.StatusCode, errorCode(res))
		}
		if v := res.Header.Get("RateLimit-Remaining"); v != "" {
			remaining = append(remaining, v)
		}
	}
	if got := strings.Join(remaining, ","); got != "2,1,0" {
		t.Fatalf("RateLimit-Remaining after Redis came back = %q, want 2,1,0 (a fresh budget of 3); the gateway's Redis log:\n%s",
			got, redisLog(t, open))
	}
	wantError(t, call(t, open, "GET", doc, user, ""), http.StatusTooManyRequests, "RATE_LIMITED")
	eventually(t, 5*time.Second, "the fail-closed gateway refuses the exhausted user too", func() bool {
		res := call(t, closed, "GET", doc, user, "")
		return res.StatusCode == http.StatusTooManyRequests && errorCode(res) == "RATE_LIMITED"
	})
}

// TestPolicyAdmissionFailsClosed: the chat stream and voice routes charge rates and caps in
// their handlers (policy.Admit) once they have validated the request. Left public by
// AUTH_PUBLIC_PATHS, no guard authorizes them and there is nobody to charge: they answer 500
// INTERNAL_ERROR, logged with its cause, and the algorithm service is never asked — instead of
// serving an anonymous caller ungoverned.
func TestPolicyAdmissionFailsClosed(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL,
		"AUTH_PUBLIC_PATHS": "/api/v2/chat/stream,/api/v2/voice/stream"})
	res := call(t, g, "POST", "/api/v2/chat/stream", "", `{"message":"hi"}`)
	wantError(t, res, http.StatusInternalServerError, "INTERNAL_ERROR")
	res = voiceRefused(t, g, "?conversation_id=c-public", nil)
	wantError(t, res, http.StatusInternalServerError, "INTERNAL_ERROR")
	if n := len(algo.requests()); n != 0 {
		t.Errorf("the algorithm service got %d requests from callers nobody authorized", n)
	}
	logged := 0
	for _, rec := range logRecords(t, g) {
		if rec["msg"] == "request" && rec["code"] == "INTERNAL_ERROR" && strings.Contains(fmt.Sprint(rec["cause"]), "no guard") {
			logged++
		}
	}
	if logged != 2 {
		t.Errorf("%d access log lines name the missing guard, want 2\n%s", logged, clipText(g.Stderr.String()))
	}
}

// TestDefaultPolicyFromRouteTable: the built-in policy's bindings are the route table's — every
// route that needs a token bound once, as the table binds it, and no open route — with every
// optional route on; and testdata/policy/good/default.json, from which the policy package's tests
// take the gateway's routes, is that policy exactly.
func TestDefaultPolicyFromRouteTable(t *testing.T) {
	rs := routes(&config{ConsoleEnabled: true, MetricsEnabled: true}, handlers{})
	bs := bindings(rs)
	bound := map[string]int{}
	for _, b := range bs {
		bound[b.Route]++
	}
	for _, r := range rs {
		switch {
		case r.access == open && bound[r.pattern] != 0:
			t.Errorf("open route %s is bound", r.pattern)
		case r.access == open && !reflect.DeepEqual(r.bind, bind{}):
			t.Errorf("open route %s carries a binding: %+v", r.pattern, r.bind)
		case r.access != open && bound[r.pattern] != 1:
			t.Errorf("route %s is bound %d times, want once", r.pattern, bound[r.pattern])
		}
	}
	if _, err := policy.Compile(policy.Default(bs), protectedRoutes(rs), handlerPerms); err != nil {
		t.Fatalf("the built-in policy does not compile against the route table: %v", err)
	}
	data, err := os.ReadFile("testdata/policy/good/default.json")
	if err != nil {
		t.Fatal(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.MarshalIndent(f, "", "  ")
	want, _ := json.MarshalIndent(policy.Default(bs), "", "  ")
	if !bytes.Equal(got, want) {
		t.Errorf("testdata/policy/good/default.json is not the built-in policy of the route table:\nfile:\n%s\nroute table:\n%s", got, want)
	}
}

// protectedRoutes are the patterns of the routes that need a token.
func protectedRoutes(rs []route) []string {
	var ps []string
	for _, b := range bindings(rs) {
		ps = append(ps, b.Route)
	}
	return ps
}
