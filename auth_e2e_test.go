package main

// End-to-end tests of authentication: whole gateways started through run, several of them
// sharing a real redis-server (redis_test.go), talked to over loopback.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/auth"
)

// ---- helpers -------------------------------------------------------------------------------

// call sends one request to g with token as its bearer token (none when token is ""), and
// returns the response with its body already read, so that it can be closed at once and still
// be inspected (wantError reads it).
func call(t *testing.T, g *testGateway, method, path, token, body string) *http.Response {
	t.Helper()
	return callWith(t, g, method, path, token, body, nil)
}

// wantStatus fails the test unless res has the status.
func wantStatus(t *testing.T, res *http.Response, status int) {
	t.Helper()
	if res.StatusCode != status {
		body, _ := io.ReadAll(res.Body)
		t.Fatalf("%s %s = %d, want %d; body %s", res.Request.Method, res.Request.URL.Path, res.StatusCode, status, body)
	}
}

// errorCode returns the "code" of a JSON error body without consuming it.
func errorCode(res *http.Response) string {
	raw, _ := io.ReadAll(res.Body)
	res.Body = io.NopCloser(bytes.NewReader(raw))
	var doc struct {
		Code string `json:"code"`
	}
	_ = json.Unmarshal(raw, &doc)
	return doc.Code
}

// pollRefused sends method path with token to g every 5 ms, starting at once, until an answer
// other than 200 arrives or 2 s have passed since since. It returns the refusal and how long
// after since it arrived.
func pollRefused(t *testing.T, g *testGateway, method, path, token string, since time.Time) (*http.Response, time.Duration) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		res := call(t, g, method, path, token, "")
		took := time.Since(since)
		if res.StatusCode != http.StatusOK {
			return res, took
		}
		if took > 2*time.Second {
			t.Fatalf("%s %s still answers 200 %v after the revocation", method, path, took)
		}
		<-tick.C
	}
}

// tokenWatch mints tokens for a test and, at cleanup, stops the test's gateways and fails the
// test if any of those tokens (or the gateways' default client tokens) appears anywhere in their
// logs, whole or by its signature.
type tokenWatch struct {
	mu     sync.Mutex
	tokens []string
}

func watchTokens(t *testing.T, gws ...*testGateway) *tokenWatch {
	t.Helper()
	w := &tokenWatch{}
	for _, g := range gws {
		if wt, ok := g.Client.Transport.(withToken); ok {
			w.add(wt.token)
		}
	}
	// Registered after the gateways were started, so it runs before their own cleanup: stop
	// them first so that their logs are complete.
	t.Cleanup(func() {
		for _, g := range gws {
			g.stop()
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		for i, g := range gws {
			log := g.Stderr.String()
			for _, tok := range w.tokens {
				sig := tok[strings.LastIndexByte(tok, '.')+1:]
				if strings.Contains(log, tok) || strings.Contains(log, sig) {
					t.Errorf("gateway %d logged a token (%s…):\n%s", i, tok[:min(len(tok), 12)], clipText(log))
				}
			}
		}
	})
	return w
}

func (w *tokenWatch) add(tok string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.tokens = append(w.tokens, tok)
	return tok
}

// token is tokenFor, remembered for the log check.
func (w *tokenWatch) token(t *testing.T, user string, roles []string, extra map[string]any) string {
	t.Helper()
	return w.add(tokenFor(t, user, roles, extra))
}

// logRecords decodes the gateway's JSON log lines.
func logRecords(t *testing.T, g *testGateway) []map[string]any {
	t.Helper()
	var recs []map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.Stderr.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, sc.Text())
		}
		recs = append(recs, rec)
	}
	return recs
}

// okBackend answers every request 200 with a small JSON body.
func okBackend(t *testing.T) *fakeBackend {
	return newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
}

// doneAlgo is an algorithm service that ends every answer at once.
func doneAlgo(t *testing.T) *fakeAlgo {
	return newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_chunk","content":"hi"}`, `{"type":"generation_done"}`)
	})
}

// redisEnv is the environment of a gateway on r with fake back ends.
func redisEnv(r *testRedis, algo *fakeAlgo, backend *fakeBackend, more map[string]string) map[string]string {
	env := map[string]string{
		"ALGO_URL":   algo.URL,
		"ADMIN_URL":  backend.URL,
		"DOCS_URL":   backend.URL,
		"REDIS_URL":  r.URL(),
		"JWT_SECRET": testSecret,
	}
	for k, v := range more {
		env[k] = v
	}
	return env
}

// ---- revocation across instances -----------------------------------------------------------

// TestAuthRevocationAcrossInstances: two instances share one Redis; a revocation through A is
// refused by B within 100 ms, although B had the token's "not revoked" answer cached.
func TestAuthRevocationAcrossInstances(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	env := redisEnv(r, doneAlgo(t), backend, nil)
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"

	t.Run("logout on A is refused by B", func(t *testing.T) {
		user := w.token(t, "u-logout", []string{"user"}, nil)
		for _, g := range []*testGateway{a, b, b} { // B twice: its client-side cache is warm
			wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)
		}
		res := call(t, a, "POST", "/api/v2/auth/revoke", user, "")
		revoked := time.Now()
		wantStatus(t, res, http.StatusOK)

		res, took := pollRefused(t, b, "GET", doc, user, revoked)
		wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
		if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
			t.Errorf("WWW-Authenticate = %q, want Bearer error=\"invalid_token\"", got)
		}
		if took > 100*time.Millisecond {
			t.Errorf("B refused the revoked token %v after A's 200, want within 100ms", took)
		}
		wantError(t, call(t, a, "GET", doc, user, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
	})

	t.Run("user revocation on A is refused by B; later tokens pass", func(t *testing.T) {
		admin := w.token(t, "u-root", []string{"admin"}, nil)
		other := w.token(t, "u-other", []string{"user"}, nil)
		x := w.token(t, "u-x", []string{"user"}, nil)
		x2 := w.token(t, "u-x", []string{"user"}, nil)
		for _, tok := range []string{x, x2, other} {
			wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK)
			wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK)
		}
		// A plain user may not revoke somebody else.
		wantError(t, call(t, a, "POST", "/api/v2/auth/revoke", other, `{"user_id":"u-x"}`), http.StatusForbidden, "PERMISSION_DENIED")

		res := call(t, a, "POST", "/api/v2/auth/revoke", admin, `{"user_id":"u-x"}`)
		revoked := time.Now()
		wantStatus(t, res, http.StatusOK)

		res, took := pollRefused(t, b, "GET", doc, x, revoked)
		wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
		if took > 100*time.Millisecond {
			t.Errorf("B refused the user's token %v after A's 200, want within 100ms", took)
		}
		wantError(t, call(t, b, "GET", doc, x2, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
		wantStatus(t, call(t, b, "GET", doc, other, ""), http.StatusOK)

		// iat has second granularity: a token from the next second is surely issued after.
		fresh := w.token(t, "u-x", []string{"user"}, map[string]any{"iat": time.Now().Add(time.Second).Unix()})
		wantStatus(t, call(t, a, "GET", doc, fresh, ""), http.StatusOK)
		wantStatus(t, call(t, b, "GET", doc, fresh, ""), http.StatusOK)
	})
}

// TestAuthLogoutEverywhereThenLogin: "log out everywhere" on A refuses, on both instances,
// every token of the user issued before it — one a second earlier, and one issued in the same
// second just before it, whose iat is that second — and the token of the login right after its
// answer, issued in the second the answer came, passes on both. Tokens are minted by the
// tests' own HS256 signer, with iat in whole seconds as identity providers make them.
func TestAuthLogoutEverywhereThenLogin(t *testing.T) {
	r := startRedis(t)
	env := redisEnv(r, doneAlgo(t), okBackend(t), nil)
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"

	earlier := w.token(t, "u-relogin", []string{"user"}, map[string]any{"iat": time.Now().Add(-time.Second).Unix()})
	current := w.token(t, "u-relogin", []string{"user"}, nil)
	for _, tok := range []string{earlier, current} {
		wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK) // B's cache is warm
	}
	sent := time.Now()
	res := call(t, a, "POST", "/api/v2/auth/revoke", current, `{"user_id":"u-relogin"}`)
	wantStatus(t, res, http.StatusOK)
	answered := time.Now()
	next := w.token(t, "u-relogin", []string{"user"}, nil) // the next login, right after the answer
	t.Logf("log out everywhere sent at +%dms into its second, answered %v later",
		sent.Nanosecond()/1e6, answered.Sub(sent).Round(time.Millisecond))
	var got struct{ Before int64 }
	// The second after the revocation's (Redis's clock is this machine's), begun by the answer.
	if err := json.NewDecoder(res.Body).Decode(&got); err != nil || got.Before < sent.Unix()+1 || got.Before > answered.Unix() {
		t.Errorf("before = %d (%v), want in [%d, %d]", got.Before, err, sent.Unix()+1, answered.Unix())
	}
	for _, g := range []*testGateway{a, b} {
		wantError(t, call(t, g, "GET", doc, earlier, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
		wantError(t, call(t, g, "GET", doc, current, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
		wantStatus(t, call(t, g, "GET", doc, next, ""), http.StatusOK)
	}
}

// ---- Redis outages -------------------------------------------------------------------------

// TestAuthRedisKilled: with Redis gone, a valid (and cached) token gets 503 AUTH_SERVICE_ERROR
// within the budget, /readyz fails, and both recover once Redis is back, without a restart.
func TestAuthRedisKilled(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, map[string]string{"AUTH_BUDGET": "75ms"}))
	w := watchTokens(t, g)
	tok := w.token(t, "u-1", []string{"user"}, nil)
	const doc = "/api/v2/documents/x"
	wantStatus(t, call(t, g, "GET", doc, tok, ""), http.StatusOK)
	wantStatus(t, call(t, g, "GET", doc, tok, ""), http.StatusOK)

	r.Kill()
	// Until the gateway has seen its Redis connection break, a cached answer from a moment ago
	// may still serve; readiness shows when it has.
	wantStatus(t, call(t, g, "GET", "/readyz", "", ""), http.StatusServiceUnavailable)
	start := time.Now()
	res := call(t, g, "GET", doc, tok, "")
	took := time.Since(start)
	wantError(t, res, http.StatusServiceUnavailable, "AUTH_SERVICE_ERROR")
	if res.Header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	if took > 500*time.Millisecond {
		t.Errorf("the 503 took %v with AUTH_BUDGET=75ms, want < 500ms", took)
	}
	n := len(backend.requests())
	if n != 2 {
		t.Errorf("back end received %d requests, want only the 2 from before the outage", n)
	}

	r.Restart()
	deadline := time.Now().Add(5 * time.Second)
	for {
		api := call(t, g, "GET", doc, tok, "")
		ready := call(t, g, "GET", "/readyz", "", "")
		if api.StatusCode == http.StatusOK && ready.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5s after Redis came back: GET %s = %d (%s), /readyz = %d; want 200 for both",
				doc, api.StatusCode, errorCode(api), ready.StatusCode)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Revocation works again on the new connections: their invalidations are subscribed again.
	// The first write after the restart sometimes fails with EOF (rueidis retries reads, not
	// writes); the gateway then says so (503, try again) and the logout is retried, as a client
	// would.
	var revoked time.Time
	for attempt := 1; ; attempt++ {
		res = call(t, g, "POST", "/api/v2/auth/revoke", tok, "")
		revoked = time.Now()
		if res.StatusCode == http.StatusOK {
			if attempt > 1 {
				t.Logf("logout after Redis came back took %d attempts", attempt)
			}
			break
		}
		wantError(t, res, http.StatusServiceUnavailable, "AUTH_SERVICE_ERROR")
		if attempt == 5 {
			t.Fatalf("logout still fails %d attempts after Redis came back", attempt)
		}
	}
	res, took = pollRefused(t, g, "GET", doc, tok, revoked)
	wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
	if took > 100*time.Millisecond {
		t.Errorf("the token revoked after Redis came back was refused %v later, want within 100ms", took)
	}
}

// TestAuthFailOpen: with AUTH_FAIL_OPEN=true, an unreachable Redis lets valid tokens through,
// and says so in the log.
func TestAuthFailOpen(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, map[string]string{"AUTH_BUDGET": "75ms", "AUTH_FAIL_OPEN": "true"}))
	w := watchTokens(t, g)
	tok := w.token(t, "u-1", []string{"user"}, nil)
	const doc = "/api/v2/documents/x"
	wantStatus(t, call(t, g, "GET", doc, tok, ""), http.StatusOK)

	r.Kill()
	// A token the gateway has not checked before: the first one's revocation answers may still
	// be served from the client-side cache until the client notices the dead connection.
	fresh := w.token(t, "u-1", []string{"user"}, nil)
	start := time.Now()
	wantStatus(t, call(t, g, "GET", doc, fresh, ""), http.StatusOK)
	if took := time.Since(start); took > time.Second {
		t.Errorf("the fail-open request took %v, want well under 1s", took)
	}
	if n := len(backend.requests()); n != 2 {
		t.Errorf("back end received %d requests, want 2", n)
	}
	var failOpen []map[string]any
	for _, rec := range logRecords(t, g) {
		if msg, _ := rec["msg"].(string); strings.Contains(msg, "fail-open") {
			failOpen = append(failOpen, rec)
		}
	}
	if len(failOpen) == 0 {
		t.Fatalf("no log line mentions fail-open:\n%s", g.Stderr)
	}
	if lvl := failOpen[0]["level"]; lvl != "WARN" && lvl != "ERROR" {
		t.Errorf("the fail-open line is at level %v, want WARN or ERROR", lvl)
	}
	if failOpen[0]["user_id"] != "u-1" {
		t.Errorf("the fail-open line names user %v, want u-1: %v", failOpen[0]["user_id"], failOpen[0])
	}
}

// TestAuthRedisAddressNotLogged: DESIGN.md says no upstream host name reaches a log line; the
// gateway's own config errors and access-log causes strip addresses (proxy.Describe). Redis
// failures logged while Redis is down must do the same.
func TestAuthRedisAddressNotLogged(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, map[string]string{"AUTH_FAIL_OPEN": "true"}))
	w := watchTokens(t, g)
	tok := w.token(t, "u-1", []string{"user"}, nil)
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/x", tok, ""), http.StatusOK)
	r.Kill()
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/x", tok, ""), http.StatusOK)
	g.stop()
	var named []string
	for _, line := range strings.Split(g.Stderr.String(), "\n") {
		if strings.Contains(line, r.Addr()) {
			named = append(named, line)
		}
	}
	if len(named) > 0 {
		t.Errorf("log lines name the Redis address %s:\n%s",
			r.Addr(), strings.Join(named, "\n"))
	}
}

// TestAuthRedisUnreachableAtStart: run refuses to start, naming REDIS_URL (and not its
// password or address), after REDIS_CONNECT_TIMEOUT, and never listens.
func TestAuthRedisUnreachableAtStart(t *testing.T) {
	const addr = "127.0.0.1:1" // nothing listens on tcpmux
	vars := map[string]string{
		"LISTEN_ADDR":           "127.0.0.1:0",
		"LOG_FORMAT":            "json",
		"LOG_LEVEL":             "debug",
		"ALGO_URL":              "http://127.0.0.1:1",
		"JWT_SECRET":            testSecret,
		"REDIS_URL":             "redis://:hunter2-pw@" + addr + "/0",
		"REDIS_CONNECT_TIMEOUT": "300ms",
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	stdout, stderr := &logBuffer{}, newLogBuffer()
	start := time.Now()
	err := run(ctx, []string{"voicegate"}, func(k string) string { return vars[k] }, stdout, stderr)
	took := time.Since(start)
	if err == nil {
		t.Fatal("run returned nil with Redis unreachable")
	}
	if msg := err.Error(); !strings.Contains(msg, "REDIS_URL") || strings.Contains(msg, "hunter2-pw") || strings.Contains(msg, addr) {
		t.Errorf("error = %q, want one naming REDIS_URL without its password or address", msg)
	}
	if took < 300*time.Millisecond || took > 3*time.Second {
		t.Errorf("run gave up after %v, want about REDIS_CONNECT_TIMEOUT=300ms", took)
	}
	if log := stderr.String(); strings.Contains(log, `"listening"`) || strings.Contains(log, "hunter2-pw") {
		t.Errorf("log shows listening or the password:\n%s", log)
	}
}

// ---- user status ---------------------------------------------------------------------------

// TestAuthUserStatus: USER_SERVICE_URL decides whether a user is active; the answer is cached in
// memory and in Redis, where a second instance finds it without asking the service.
func TestAuthUserStatus(t *testing.T) {
	r := startRedis(t)
	var mu sync.Mutex
	asked := map[string]int{}
	users := newFakeBackend(t, func(w http.ResponseWriter, req *http.Request) {
		mu.Lock()
		asked[req.URL.Path]++
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch req.URL.Path {
		case "/users/u-1":
			io.WriteString(w, `{"status":"active"}`)
		case "/users/u-2":
			io.WriteString(w, `{"status":"disabled"}`)
		default:
			http.NotFound(w, req)
		}
	})
	askedFor := func(path string) int {
		mu.Lock()
		defer mu.Unlock()
		return asked[path]
	}
	backend := okBackend(t)
	env := redisEnv(r, doneAlgo(t), backend, map[string]string{"USER_SERVICE_URL": users.URL})
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	u1 := w.token(t, "u-1", []string{"user"}, nil)
	u2 := w.token(t, "u-2", []string{"user"}, nil)
	const doc = "/api/v2/documents/x"

	wantStatus(t, call(t, a, "GET", doc, u1, ""), http.StatusOK)
	res := call(t, a, "GET", doc, u2, "")
	wantError(t, res, http.StatusUnauthorized, "USER_DISABLED")
	if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
		t.Errorf("WWW-Authenticate = %q, want Bearer error=\"invalid_token\"", got)
	}

	for user, want := range map[string]string{"u-1": "active", "u-2": "disabled"} {
		key := "voicegate:user:status:" + user
		if got := r.Do(t, "GET", key); got != want {
			t.Errorf("Redis %s = %#v, want %q", key, got, want)
		}
		if ttl, _ := r.Do(t, "PTTL", key).(int64); ttl <= 0 || ttl > int64(time.Minute/time.Millisecond) {
			t.Errorf("Redis %s PTTL = %d ms, want a short expiry", key, ttl)
		}
	}

	// Memory cache on A, Redis cache on B: the service is not asked again.
	wantStatus(t, call(t, a, "GET", doc, u1, ""), http.StatusOK)
	wantStatus(t, call(t, b, "GET", doc, u1, ""), http.StatusOK)
	wantError(t, call(t, b, "GET", doc, u2, ""), http.StatusUnauthorized, "USER_DISABLED")
	if n1, n2 := askedFor("/users/u-1"), askedFor("/users/u-2"); n1 != 1 || n2 != 1 {
		t.Errorf("user service asked %d times for u-1 and %d for u-2, want once each", n1, n2)
	}
	for _, req := range backend.requests() {
		if req.Header.Get("X-User-Id") != "u-1" {
			t.Errorf("back end received a request for %q, want only u-1's", req.Header.Get("X-User-Id"))
		}
	}
}

// TestAuthUserStatusBound: a user disabled in the user service is refused by every instance
// within 60 s (RedisTTL) of the service's last "active" answer, however the two cache levels
// line up. Worst case: instance B reads the shared copy just before it expires in Redis (here a
// copy with 1 s left, as one written 59 s earlier has); B's memory then keeps it for that second,
// not a whole memory TTL (30 s) beyond. The caches' clock is injected; Redis's expiry is
// Redis's, so the copy's last second is set with PEXPIRE and its end with DEL.
func TestAuthUserStatusBound(t *testing.T) {
	r := startRedis(t)
	client := testClient(t, r)
	var status atomic.Value
	status.Store("active")
	users := newFakeBackend(t, func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"status":%q}`, status.Load())
	})
	u, err := url.Parse(users.URL)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	now := time.Unix(1_900_000_000, 0)
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
	newStatus := func() *auth.UserStatus {
		return auth.NewUserStatus(auth.UserStatusOptions{URL: u, Redis: client, Prefix: "voicegate:", Now: clock})
	}
	a, b := newStatus(), newStatus()
	ctx := t.Context()
	const key = "voicegate:user:status:u-1"

	if err := a.Check(ctx, "u-1"); err != nil { // the service says active; cached for 60 s
		t.Fatal(err)
	}
	if ttl, _ := r.Do(t, "PTTL", key).(int64); ttl <= 59_000 || ttl > 60_000 {
		t.Fatalf("PTTL %s = %d ms, want about 60 s", key, ttl)
	}
	advance(59 * time.Second)
	if n, _ := r.Do(t, "PEXPIRE", key, "1000").(int64); n != 1 {
		t.Fatal("PEXPIRE found no key")
	}
	status.Store("disabled")
	if err := b.Check(ctx, "u-1"); err != nil { // B reads the copy's last second
		t.Fatalf("B, 59 s after the service's answer: %v, want the cached active", err)
	}
	advance(1500 * time.Millisecond) // 60.5 s after the service's answer
	r.Do(t, "DEL", key)              // its expiry in Redis
	for name, s := range map[string]*auth.UserStatus{"A": a, "B": b} {
		if err := s.Check(ctx, "u-1"); !errors.Is(err, auth.ErrUserDisabled) {
			t.Errorf("%s, 60.5 s after the service's last active: %v, want ErrUserDisabled", name, err)
		}
	}
}

// ---- Redis keys ----------------------------------------------------------------------------

// TestAuthRedisKeys: the keys documented in auth/redis.go are the ones written: under the
// tenant's hash tag, a user's cutoff in unix seconds on Redis's clock.
func TestAuthRedisKeys(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	g := startRun(t, nil, redisEnv(r, doneAlgo(t), backend, nil))
	w := watchTokens(t, g)

	exp := time.Now().Add(10 * time.Minute).Unix()
	tok := w.token(t, "u-keys", []string{"user"}, map[string]any{"jti": "jti-keys-1", "exp": exp})
	wantStatus(t, call(t, g, "POST", "/api/v2/auth/revoke", tok, ""), http.StatusOK)
	key := "voicegate:revoked:{tenant-a}:jti:jti-keys-1"
	if got := r.Do(t, "EXISTS", key); got != int64(1) {
		t.Fatalf("EXISTS %s = %#v after logout, want 1 (keys: %v)", key, got, r.Do(t, "KEYS", "*"))
	}
	// The verifier accepts the token until exp plus JWT_LEEWAY (30s): the revocation must last
	// as long, or the logged-out token works again for the leeway after its expiry.
	const leeway = 30 * time.Second
	left := time.Until(time.Unix(exp, 0)) + leeway
	ttl, _ := r.Do(t, "PTTL", key).(int64)
	if d := time.Duration(ttl) * time.Millisecond; d <= 0 || d > left+50*time.Millisecond || d < left-5*time.Second {
		t.Errorf("PTTL %s = %v, want the token's remaining life plus the leeway (%v) or a little less", key, d, left)
	}

	admin := w.token(t, "u-root", []string{"admin"}, nil)
	before := time.Now()
	wantStatus(t, call(t, g, "POST", "/api/v2/auth/revoke", admin, `{"user_id":"u-gone"}`), http.StatusOK)
	after := time.Now()
	key = "voicegate:revoked:{tenant-a}:user:u-gone"
	v, _ := r.Do(t, "GET", key).(string)
	// The second after the revocation's, on Redis's clock (this machine's).
	cutoff, err := strconv.ParseInt(v, 10, 64)
	if err != nil || cutoff < before.Unix()+1 || cutoff > after.Unix()+1 {
		t.Errorf("GET %s = %q, want the cutoff in unix seconds in [%d, %d] (keys: %v)",
			key, v, before.Unix()+1, after.Unix()+1, r.Do(t, "KEYS", "*"))
	}
	if after.Before(time.Unix(cutoff, 0)) {
		t.Errorf("the revocation was answered at %v, before its cutoff %v began", after, time.Unix(cutoff, 0))
	}
	if ttl, _ := r.Do(t, "PTTL", key).(int64); time.Duration(ttl)*time.Millisecond < 24*time.Hour+leeway-5*time.Second {
		t.Errorf("PTTL %s = %d ms, want JWT_MAX_LIFETIME (24h) plus the leeway", key, ttl)
	}
}

// ---- no token ------------------------------------------------------------------------------

// TestAuthTokenRequired: every route but the health checks refuses a request without a token,
// before any back end sees it; AUTH_PUBLIC_PATHS opens exactly the listed subtree.
func TestAuthTokenRequired(t *testing.T) {
	algo := doneAlgo(t)
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL})
	watchTokens(t, g)

	for _, rq := range []struct{ method, path, body string }{
		{"POST", "/api/v2/chat/stream", `{"message":"hi"}`},
		{"POST", "/api/v2/chat/cancel", `{"request_id":"r-1"}`},
		{"POST", "/api/v2/auth/revoke", ""},
		{"GET", "/api/v2/admin/x", ""},
		{"GET", "/api/v2/documents/x", ""},
		{"GET", "/api/v2/voice/stream", ""},
		{"GET", "/api/v2/voice/sessions", ""},
	} {
		t.Run(rq.method+" "+rq.path, func(t *testing.T) {
			res := call(t, g, rq.method, rq.path, "", rq.body)
			wantError(t, res, http.StatusUnauthorized, "TOKEN_MISSING")
			if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
				t.Errorf("WWW-Authenticate = %q, want Bearer error=\"invalid_token\"", got)
			}
		})
	}
	if n, m := len(algo.requests()), len(backend.requests()); n+m != 0 {
		t.Errorf("back ends received %d and %d requests without a token, want none", n, m)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		wantStatus(t, call(t, g, "GET", path, "", ""), http.StatusOK)
	}
}

// TestAuthPublicPaths: AUTH_PUBLIC_PATHS=/api/v2/documents/public/ lets that subtree reach the
// documents back end without a token, and only that subtree.
func TestAuthPublicPaths(t *testing.T) {
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "DOCS_URL": backend.URL,
		"AUTH_PUBLIC_PATHS": "/api/v2/documents/public/"})
	watchTokens(t, g)

	wantError(t, call(t, g, "GET", "/api/v2/documents/publicx", "", ""), http.StatusUnauthorized, "TOKEN_MISSING")
	wantError(t, call(t, g, "GET", "/api/v2/documents/x", "", ""), http.StatusUnauthorized, "TOKEN_MISSING")
	if res := call(t, g, "GET", "/api/v2/documents/public/../x", "", ""); res.StatusCode < 400 {
		t.Errorf("GET /api/v2/documents/public/../x = %d, want it refused", res.StatusCode)
	}
	if n := len(backend.requests()); n != 0 {
		t.Fatalf("back end received %d requests for non-public paths without a token", n)
	}

	// Without a token, and with a forged identity that must not reach the back end either.
	res := doRequest(t, g.Client, "GET", g.URL+"/api/v2/documents/public/a", nil,
		map[string]string{"X-Test-No-Token": "1", "X-User-ID": "root", "X-User-Roles": "super_admin"})
	wantStatus(t, res, http.StatusOK)
	got := backend.only(t)
	if got.Path != "/api/v2/documents/public/a" || got.Header.Get("X-User-Id") != "" || got.Header.Get("X-User-Roles") != "" {
		t.Errorf("back end got %s with X-User-Id %q and X-User-Roles %q, want /api/v2/documents/public/a and no identity",
			got.Path, got.Header.Get("X-User-Id"), got.Header.Get("X-User-Roles"))
	}
}

// ---- permissions ---------------------------------------------------------------------------

// TestAuthPermissions: the default policy decides, from roles and scopes, after authentication.
func TestAuthPermissions(t *testing.T) {
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL})
	w := watchTokens(t, g)
	user := w.token(t, "u-user", []string{"user"}, nil)
	admin := w.token(t, "u-admin", []string{"admin"}, nil)
	reader := w.token(t, "u-reader", nil, map[string]any{"roles": nil, "scopes": []string{"admin:read"}})

	for _, tt := range []struct {
		name, token, method, path string
		denied                    string // the permission named in the 403, or "" for 200
	}{
		{"user reads admin", user, "GET", "/api/v2/admin/x", "admin:read"},
		{"admin reads admin", admin, "GET", "/api/v2/admin/x", ""},
		{"admin writes admin", admin, "POST", "/api/v2/admin/x", ""},
		{"user reads a document", user, "GET", "/api/v2/documents/x", ""},
		{"user deletes a document", user, "DELETE", "/api/v2/documents/x", "document:delete"},
		{"user writes a document", user, "PUT", "/api/v2/documents/x", "document:write"},
		{"admin deletes a document", admin, "DELETE", "/api/v2/documents/x", ""},
		{"admin:read scope reads admin", reader, "GET", "/api/v2/admin/x", ""},
		{"admin:read scope writes admin", reader, "POST", "/api/v2/admin/x", "admin:write"},
		{"admin:read scope reads a document", reader, "GET", "/api/v2/documents/x", "document:read"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := len(backend.requests())
			body := ""
			if tt.method == "POST" || tt.method == "PUT" {
				body = `{}`
			}
			res := call(t, g, tt.method, tt.path, tt.token, body)
			reached := len(backend.requests()) - n
			if tt.denied == "" {
				wantStatus(t, res, http.StatusOK)
				if reached != 1 {
					t.Errorf("back end received %d requests, want 1", reached)
				}
				return
			}
			doc := wantError(t, res, http.StatusForbidden, "PERMISSION_DENIED")
			if !strings.Contains(doc.Error+string(doc.Details), tt.denied) {
				t.Errorf("403 = %s, want it to name %s", doc.raw, tt.denied)
			}
			if reached != 0 {
				t.Errorf("back end received %d requests for a refused one", reached)
			}
		})
	}
}

// ---- demo ----------------------------------------------------------------------------------

// TestAuthDemoToken: -demo prints a token made with its own fresh secret, and it streams chat.
func TestAuthDemoToken(t *testing.T) {
	g := startRun(t, []string{"-demo"}, map[string]string{"JWT_SECRET": ""})
	w := watchTokens(t, g)

	var token string
	deadline := time.Now().Add(2 * time.Second)
	for token == "" {
		for _, line := range strings.Split(g.Stdout.String(), "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "TOKEN="); ok && strings.Count(v, ".") == 2 {
				token = v
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no TOKEN=... line on stdout:\n%s", g.Stdout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.add(token) // printed for the user on stdout, never logged

	// The test's own secret is not the demo's: only the printed token gets in.
	wantError(t, call(t, g, "POST", "/api/v2/chat/stream", w.token(t, "u-1", []string{"user"}, nil), `{"message":"hi"}`),
		http.StatusUnauthorized, "TOKEN_INVALID")

	res := doRequest(t, g.Client, "POST", g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hello demo"}`),
		map[string]string{"Authorization": "Bearer " + token})
	s := wantStream(t, res)
	var names []string
	for {
		ev := nextEvent(t, s)
		names = append(names, ev.Event)
		if ev.Event == "generation_chunk" {
			break
		}
		if len(names) > 10 {
			t.Fatalf("events = %v, want a generation_chunk early", names)
		}
	}
	if names[0] != "stream_start" {
		t.Errorf("events = %v, want stream_start first", names)
	}
	res.Body.Close() // the rest of the answer is not needed; this cancels it
}
