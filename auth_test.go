package main

// Authentication end to end: tokens required and where they may be, public paths,
// permissions, revocation and "log out everywhere" across instances sharing a real
// redis-server, the user-status service, tokens of real identity providers, the demo token and
// voicegate token.

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/auth"
)

// TestAuthRevocationAcrossInstances: two instances share one Redis; a revocation through A is
// refused by B within 100 ms, although B had the token's "not revoked" answer cached: in every
// one of revocationTrials but the slowest, so that one trial the machine stalled does not
// decide it alone (each revocation's answer waits for the next second: they cannot be many).
func TestAuthRevocationAcrossInstances(t *testing.T) {
	r := startRedis(t)
	backend := okBackend(t)
	env := redisEnv(r, doneAlgo(t), backend, nil)
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"
	const revocationTrials = 5

	t.Run("logout on A is refused by B", func(t *testing.T) {
		var took []time.Duration
		for i := range revocationTrials {
			user := w.token(t, "u-logout-"+strconv.Itoa(i), []string{"user"}, nil)
			for _, g := range []*testGateway{a, b, b} { // B twice: its client-side cache is warm
				wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)
			}
			res := call(t, a, "POST", "/api/v2/auth/revoke", user, "")
			revoked := time.Now()
			wantStatus(t, res, http.StatusOK)

			res, d := pollRefused(t, b, "GET", doc, user, revoked)
			wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
			if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
				t.Errorf("WWW-Authenticate = %q, want Bearer error=\"invalid_token\"", got)
			}
			wantError(t, call(t, a, "GET", doc, user, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
			took = append(took, d)
		}
		wantWithin(t, "from A's 200 for a logout to B refusing the token", took, 100*time.Millisecond)
	})

	t.Run("user revocation on A is refused by B; later tokens pass", func(t *testing.T) {
		admin := w.token(t, "u-root", []string{"admin"}, nil)
		other := w.token(t, "u-other", []string{"user"}, nil)
		var took []time.Duration
		var user string
		for i := range revocationTrials {
			user = "u-x-" + strconv.Itoa(i)
			x := w.token(t, user, []string{"user"}, nil)
			x2 := w.token(t, user, []string{"user"}, nil)
			for _, tok := range []string{x, x2, other} {
				wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK)
				wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK)
			}
			// A plain user may not revoke somebody else.
			wantError(t, call(t, a, "POST", "/api/v2/auth/revoke", other, `{"user_id":"`+user+`"}`), http.StatusForbidden, "PERMISSION_DENIED")

			res := call(t, a, "POST", "/api/v2/auth/revoke", admin, `{"user_id":"`+user+`"}`)
			revoked := time.Now()
			wantStatus(t, res, http.StatusOK)

			res, d := pollRefused(t, b, "GET", doc, x, revoked)
			wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
			wantError(t, call(t, b, "GET", doc, x2, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
			wantStatus(t, call(t, b, "GET", doc, other, ""), http.StatusOK)
			took = append(took, d)
		}
		wantWithin(t, "from A's 200 for a user's revocation to B refusing the user's token", took, 100*time.Millisecond)

		// iat has second granularity: a token from the next second is surely issued after.
		fresh := w.token(t, user, []string{"user"}, map[string]any{"iat": time.Now().Add(time.Second).Unix()})
		wantStatus(t, call(t, a, "GET", doc, fresh, ""), http.StatusOK)
		wantStatus(t, call(t, b, "GET", doc, fresh, ""), http.StatusOK)
	})
}

// wantWithin fails the test unless every one of took but the slowest is within bound, and logs
// the spread.
func wantWithin(t *testing.T, what string, took []time.Duration, bound time.Duration) {
	t.Helper()
	took = slices.Clone(took)
	slices.Sort(took)
	t.Logf("%s, over %d: %v", what, len(took), took)
	if len(took) < 2 || took[len(took)-2] > bound {
		t.Errorf("%s: %v, want all but the slowest within %v", what, took, bound)
	}
}

// TestAuthLogoutEverywhereThenLogin: "log out everywhere" on A refuses, on both instances,
// every token of the user issued before it — one a second earlier, and one issued in the same
// second just before it, whose iat is that second — and the token of the login right after its
// answer, issued in the second the answer came, passes on both. Tokens are minted by the
// tests' own HS256 signer, with iat in whole seconds as identity providers make them.
func TestAuthLogoutEverywhereThenLogin(t *testing.T) {
	t.Parallel()
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

// TestAuthDemoToken: -demo prints a token made with its own fresh secret, and it streams chat.
func TestAuthDemoToken(t *testing.T) {
	g := startRun(t, []string{"-demo"}, map[string]string{"JWT_SECRET": ""})
	w := watchTokens(t, g)

	var token string
	deadline := time.Now().Add(2 * time.Second)
	for token == "" {
		for _, line := range strings.Split(g.Stdout.String(), "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "export TOKEN="); ok && strings.Count(v, ".") == 2 {
				token = v
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no export TOKEN=... line on stdout:\n%s", g.Stdout)
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

// TestAuthMisplacedTokensAre401: a token in the query string, or two tokens, are 401
// TOKEN_INVALID like any unusable token.
func TestAuthMisplacedTokensAre401(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL})
	tok := tokenFor(t, "u-edge3", []string{"admin"}, nil)
	for _, tt := range []struct {
		name    string
		path    string
		headers int // Authorization headers
	}{
		{"in the query", "/api/v2/voice/sessions?access_token=" + tok, 0},
		{"twice", "/api/v2/voice/sessions", 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, g.URL+tt.path, nil)
			req.Header.Set("X-Test-No-Token", "1") // exactly the Authorization headers below
			for range tt.headers {
				req.Header.Add("Authorization", "Bearer "+tok)
			}
			res, err := g.Client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			wantError(t, res, http.StatusUnauthorized, "TOKEN_INVALID")
			if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
				t.Errorf("WWW-Authenticate = %q", got)
			}
		})
	}
}

// providerToken is one token of testdata/auth/providers.json, made by PyJWT
// (testdata/auth/mktokens.py) in the shape of a real provider's access token.
type providerToken struct {
	Token    string `json:"token"`
	Issuer   string `json:"issuer"`
	Audience string `json:"audience"`
}

func providerTokens(t *testing.T) map[string]providerToken {
	t.Helper()
	raw, err := os.ReadFile("testdata/auth/providers.json")
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]providerToken
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAuthProviderTokens: tokens shaped like Keycloak's, Auth0's and Azure AD's, verified against
// the fixture JWKS, authorize what their roles and permissions allow with the claim settings the
// README gives for each provider, and the back ends receive the identity those claims hold.
func TestAuthProviderTokens(t *testing.T) {
	jwks, err := os.ReadFile("testdata/auth/jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	keys := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(jwks)
	}))
	defer keys.Close()
	tokens := providerTokens(t)
	backend := okBackend(t)
	algo := doneAlgo(t)

	type check struct {
		method, path string
		header       map[string]string
		status       int
	}
	tests := []struct {
		provider string
		env      map[string]string // the README's settings for the provider
		checks   []check
		identity map[string]string // identity headers the admin or documents back end receives
	}{
		{
			provider: "keycloak",
			env: map[string]string{
				"JWT_ROLES_CLAIM":    "realm_access.roles,resource_access.voicegate.web.roles",
				"JWT_TENANT_CLAIM":   "tenant",
				"JWT_USERNAME_CLAIM": "preferred_username",
			},
			checks: []check{
				{"GET", "/api/v2/voice/sessions", nil, 200}, // voice:admin, from the client role admin
				{"GET", "/api/v2/admin/users", nil, 200},
				{"GET", "/api/v2/admin/users", map[string]string{"X-Tenant-ID": "globex"}, 403},
			},
			identity: map[string]string{"X-User-Id": "f3b2c1d0-1111-4a2b-8c3d-5e6f7a8b9c0d", "X-Username": "alice",
				"X-Tenant-Id": "acme", "X-User-Roles": "default-roles-voice,offline_access,uma_authorization,user,admin"},
		},
		{
			provider: "keycloak",
			env:      map[string]string{}, // without the claim settings: no roles at all
			checks: []check{
				{"GET", "/api/v2/voice/sessions", nil, 403},
				{"GET", "/api/v2/documents/d-1", nil, 403},
			},
		},
		{
			provider: "auth0",
			env: map[string]string{
				"JWT_ROLES_CLAIM":  "https://voicegate.example/roles",
				"JWT_TENANT_CLAIM": "org_id",
			},
			checks: []check{
				{"PUT", "/api/v2/documents/d-1", nil, 200},    // document:write, from the role editor
				{"DELETE", "/api/v2/documents/d-1", nil, 200}, // document:delete, from the permissions claim
				{"GET", "/api/v2/admin/users", nil, 403},
				{"POST", "/api/v2/chat/stream", nil, 200},
			},
			identity: map[string]string{"X-User-Id": "auth0|64f0c2a1b2c3d4e5f6a7b8c9", "X-Tenant-Id": "org_9ZyX8wV7uT6sR5qP",
				"X-User-Roles": "editor"},
		},
		{
			provider: "azure",
			env: map[string]string{
				"JWT_USER_CLAIM":     "oid",
				"JWT_TENANT_CLAIM":   "tid",
				"JWT_USERNAME_CLAIM": "preferred_username",
				"JWT_SCOPES_CLAIM":   "scp",
			},
			checks: []check{
				{"GET", "/api/v2/documents/d-1", nil, 200},
				{"PUT", "/api/v2/documents/d-1", nil, 403},
				{"POST", "/api/v2/chat/stream", nil, 200},
			},
			identity: map[string]string{"X-User-Id": "00000000-0000-0000-66f3-3332eca7ea81", "X-Username": "carol@contoso.example",
				"X-Tenant-Id": "72f988bf-86f1-41af-91ab-2d7cd011db47", "X-User-Roles": "user"},
		},
	}
	for _, tt := range tests {
		name := tt.provider
		if len(tt.env) == 0 {
			name += " without claim settings"
		}
		t.Run(name, func(t *testing.T) {
			tok, ok := tokens[tt.provider]
			if !ok {
				t.Fatalf("no %s token in providers.json", tt.provider)
			}
			env := with(map[string]string{
				"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL,
				"JWT_JWKS_URL": keys.URL, "JWT_ISSUER": tok.Issuer, "JWT_AUDIENCE": tok.Audience,
				// The fixtures are made to outlive the test suite, far beyond any real token.
				"JWT_MAX_LIFETIME": "876000h",
			}, tt.env)
			g := startRun(t, nil, env)
			for _, c := range tt.checks {
				body := ""
				if c.method != "GET" && c.method != "DELETE" {
					body = `{"message":"hi"}`
				}
				res := callWith(t, g, c.method, c.path, tok.Token, body, c.header)
				if res.StatusCode != c.status {
					t.Errorf("%s %s %v = %d %s, want %d", c.method, c.path, c.header, res.StatusCode, errorCode(res), c.status)
				}
			}
			if tt.identity == nil {
				return
			}
			reqs := backend.requests()
			if len(reqs) == 0 {
				t.Fatal("the back end received nothing")
			}
			got := reqs[len(reqs)-1].Header
			for h, v := range tt.identity {
				if got.Get(h) != v {
					t.Errorf("back end got %s = %q, want %q", h, got.Get(h), v)
				}
			}
		})
	}
}

// tokenPayload decodes a token's claims without verifying it.
func tokenPayload(t *testing.T, tok string) map[string]any {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q is not a compact JWS", tok)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestTokenSubcommand: voicegate token refuses without JWT_SECRET, always warns on stderr that
// it is for development only, and prints a token that a gateway with the same settings accepts
// for the given subject, roles and tenant — with its claims where JWT_*_CLAIM look.
func TestTokenSubcommand(t *testing.T) {
	t.Run("refuses without a secret", func(t *testing.T) {
		stdout, stderr, err := runCommand(t, nil, "token", "-sub", "alice")
		if err == nil || !strings.Contains(err.Error(), "JWT_SECRET") || strings.ContainsAny(err.Error(), "\n") {
			t.Errorf("error = %v, want one line naming JWT_SECRET", err)
		}
		if stdout != "" {
			t.Errorf("stdout = %q, want no token", stdout)
		}
		if !strings.Contains(stderr, "development and tests only") {
			t.Errorf("stderr = %q, want the warning", stderr)
		}
	})
	t.Run("refuses a lifetime beyond JWT_MAX_LIFETIME", func(t *testing.T) {
		_, _, err := runCommand(t, map[string]string{"JWT_SECRET": testSecret, "JWT_MAX_LIFETIME": "1h"}, "token", "-lifetime", "2h")
		if err == nil || !strings.Contains(err.Error(), "JWT_MAX_LIFETIME") {
			t.Errorf("error = %v, want one naming JWT_MAX_LIFETIME", err)
		}
	})

	backend := okBackend(t)
	for _, tt := range []struct {
		name   string
		env    map[string]string
		claims func(map[string]any) bool
	}{
		{"default claims", map[string]string{"JWT_ISSUER": "https://id.example", "JWT_AUDIENCE": "voicegate"},
			func(c map[string]any) bool {
				return c["sub"] == "alice" && c["tenant_id"] == "t-9" && c["iss"] == "https://id.example" &&
					slices.Equal(strList(c["roles"]), []string{"admin", "editor"})
			}},
		{"Keycloak and Auth0 style paths", map[string]string{"JWT_ROLES_CLAIM": "realm_access.roles",
			"JWT_TENANT_CLAIM": "https://example.com/tenant", "JWT_USER_CLAIM": "oid"},
			func(c map[string]any) bool {
				return c["oid"] == "alice" && c["https://example.com/tenant"] == "t-9" &&
					slices.Equal(strList(dig(c, "realm_access", "roles")), []string{"admin", "editor"})
			}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := with(map[string]string{"JWT_SECRET": testSecret}, tt.env)
			stdout, stderr, err := runCommand(t, env, "token", "-sub", "alice", "-roles", "admin,editor",
				"-tenant", "t-9", "-username", "Alice", "-lifetime", "10m")
			if err != nil {
				t.Fatalf("voicegate token: %v\n%s", err, stderr)
			}
			if !strings.Contains(stderr, "not for production identity") {
				t.Errorf("stderr = %q, want a warning that it is not for production", stderr)
			}
			tok := strings.TrimSpace(stdout)
			c := tokenPayload(t, tok)
			if !tt.claims(c) {
				t.Errorf("claims = %v", c)
			}
			if exp, iat := c["exp"].(float64), c["iat"].(float64); exp-iat != 600 {
				t.Errorf("exp - iat = %v, want the 10m lifetime", exp-iat)
			}
			g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL}))
			wantStatus(t, call(t, g, "GET", "/api/v2/voice/sessions", tok, ""), http.StatusOK)
			wantStatus(t, call(t, g, "GET", "/api/v2/admin/users", tok, ""), http.StatusOK)
			reqs := backend.requests()
			h := reqs[len(reqs)-1].Header
			if h.Get("X-User-Id") != "alice" || h.Get("X-Tenant-Id") != "t-9" || h.Get("X-User-Roles") != "admin,editor" || h.Get("X-Username") != "Alice" {
				t.Errorf("back end got identity %v", h)
			}
		})
	}
}
