package auth_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/auth"
	"voicegate/proxy"
)

// okHandler answers 200 "ok".
func okHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})
}

// bearer is a request carrying token in the Authorization header.
func bearer(token string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/api/v2/chat/stream", nil)
	r.Header.Set("Authorization", "Bearer "+token)
	return r
}

func serve(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	return rec
}

type errorDoc struct {
	Error     string `json:"error"`
	Code      string `json:"code"`
	RequestID string `json:"request_id"`
}

// wantError asserts the DESIGN.md error document, and WWW-Authenticate on every 401.
func wantError(t *testing.T, res *httptest.ResponseRecorder, status int, code string) errorDoc {
	t.Helper()
	var doc errorDoc
	if res.Code != status {
		t.Fatalf("status %d, want %d; body %s", res.Code, status, res.Body)
	}
	if ct := res.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want JSON", ct)
	}
	if err := json.Unmarshal(res.Body.Bytes(), &doc); err != nil {
		t.Fatalf("body is not the JSON error document: %v: %s", err, res.Body)
	}
	if doc.Code != code || doc.Error == "" {
		t.Errorf("code %q error %q, want code %q and a message", doc.Code, doc.Error, code)
	}
	wa := res.Header().Get("WWW-Authenticate")
	switch {
	case status == http.StatusUnauthorized && wa != `Bearer error="invalid_token"`:
		t.Errorf(`WWW-Authenticate = %q, want Bearer error="invalid_token"`, wa)
	case status != http.StatusUnauthorized && wa != "":
		t.Errorf("WWW-Authenticate %q on a %d", wa, status)
	}
	return doc
}

// newAuth returns an Authenticator on the fixture keys at the fixed clock, with an in-memory
// revocation store, after mod adjusts its options.
func newAuth(t testing.TB, mod func(*auth.Options)) (*auth.Authenticator, *auth.MemoryRevocations) {
	t.Helper()
	v, _, _ := newVerifier(t, nil)
	rev := auth.NewMemoryRevocations(24*time.Hour, nil)
	o := auth.Options{Verifier: v, Revocations: rev, Now: fixedClock(0)}
	if mod != nil {
		mod(&o)
	}
	return auth.New(o), rev
}

// TestRequire covers where a token may come from and the answer for each kind of trouble.
func TestRequire(t *testing.T) {
	a, _ := newAuth(t, nil)
	valid, other := fixture(t, "hs256_valid"), fixture(t, "user2")
	sig := segments(t, valid)[2]
	withHeaders := func(target string, h ...string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, target, nil)
		for i := 0; i < len(h); i += 2 {
			r.Header.Add(h[i], h[i+1])
		}
		return r
	}
	tests := []struct {
		name        string
		req         *http.Request
		subprotocol bool // Require(true): the voice route
		status      int
		code        string
	}{
		{"no token", withHeaders("/x"), false, 401, proxy.CodeTokenMissing},
		{"no token, voice route", withHeaders("/x"), true, 401, proxy.CodeTokenMissing},
		{"valid", bearer(valid), false, 200, ""},
		{"valid ES256", bearer(fixture(t, "es256_valid")), false, 200, ""},
		{"lower-case scheme", withHeaders("/x", "Authorization", "bearer "+valid), false, 200, ""},
		{"surrounding spaces", withHeaders("/x", "Authorization", "  Bearer   "+valid+"  "), false, 200, ""},
		{"Basic scheme", withHeaders("/x", "Authorization", "Basic dXNlcjpwYXNz"), false, 401, proxy.CodeTokenInvalid},
		{"scheme only", withHeaders("/x", "Authorization", "Bearer"), false, 401, proxy.CodeTokenInvalid},
		{"empty bearer", withHeaders("/x", "Authorization", "Bearer  "), false, 401, proxy.CodeTokenInvalid},
		{"raw token without scheme", withHeaders("/x", "Authorization", valid), false, 401, proxy.CodeTokenInvalid},
		{"garbage", bearer("garbage"), false, 401, proxy.CodeTokenInvalid},
		{"bad signature", bearer(valid[:len(valid)-len(sig)] + segments(t, other)[2]), false, 401, proxy.CodeTokenInvalid},
		{"alg none", bearer(fixture(t, "alg_none")), false, 401, proxy.CodeTokenInvalid},
		{"key confusion", bearer(fixture(t, "hs256_rsa_pubkey")), false, 401, proxy.CodeTokenInvalid},
		{"expired", bearer(fixture(t, "exp_past")), false, 401, proxy.CodeTokenExpired},
		{"64 KiB header", bearer(valid + strings.Repeat("A", 64<<10)), false, 401, proxy.CodeTokenInvalid},
		{"two Authorization headers", withHeaders("/x", "Authorization", "Bearer "+valid, "Authorization", "Bearer "+other), false, 401, proxy.CodeTokenInvalid},
		{"the same token twice", withHeaders("/x", "Authorization", "Bearer "+valid, "Authorization", "Bearer "+valid), false, 401, proxy.CodeTokenInvalid},
		{"header and subprotocol", withHeaders("/x", "Authorization", "Bearer "+valid, "Sec-WebSocket-Protocol", "voice-protocol-v2, bearer."+other), true, 401, proxy.CodeTokenInvalid},
		{"two subprotocol tokens", withHeaders("/x", "Sec-WebSocket-Protocol", "bearer."+valid+", bearer."+other), true, 401, proxy.CodeTokenInvalid},
		{"two subprotocol headers", withHeaders("/x", "Sec-WebSocket-Protocol", "bearer."+valid, "Sec-WebSocket-Protocol", "bearer."+valid), true, 401, proxy.CodeTokenInvalid},
		{"subprotocol, voice route", withHeaders("/x", "Sec-WebSocket-Protocol", "voice-protocol-v2, bearer."+valid), true, 200, ""},
		{"subprotocol, other route", withHeaders("/x", "Sec-WebSocket-Protocol", "voice-protocol-v2, bearer."+valid), false, 401, proxy.CodeTokenMissing},
		{"header and subprotocol, other route", withHeaders("/x", "Authorization", "Bearer "+valid, "Sec-WebSocket-Protocol", "bearer."+other), false, 200, ""},
		{"subprotocol expired", withHeaders("/x", "Sec-WebSocket-Protocol", "bearer."+fixture(t, "exp_past")), true, 401, proxy.CodeTokenExpired},
		{"query access_token", withHeaders("/x?access_token=" + valid), false, 401, proxy.CodeTokenInvalid},
		{"query access_token and header", withHeaders("/x?access_token="+valid, "Authorization", "Bearer "+valid), false, 401, proxy.CodeTokenInvalid},
		{"query token, voice route", withHeaders("/x?token=" + valid), true, 401, proxy.CodeTokenInvalid},
		{"query upper-case name", withHeaders("/x?Access_Token=" + valid), false, 401, proxy.CodeTokenInvalid},
		{"query jwt", withHeaders("/x?a=1&jwt=" + valid), false, 401, proxy.CodeTokenInvalid},
		{"unrelated query", withHeaders("/x?conversation_id=c1&language=en", "Authorization", "Bearer "+valid), false, 200, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := serve(a.Require(tt.subprotocol)(okHandler()), tt.req)
			if tt.status == http.StatusOK {
				if res.Code != http.StatusOK || res.Body.String() != "ok" {
					t.Fatalf("status %d body %q, want 200 ok", res.Code, res.Body)
				}
			} else {
				wantError(t, res, tt.status, tt.code)
			}
			for _, tok := range []string{valid, other, sig} {
				if strings.Contains(res.Body.String(), tok) {
					t.Error("the response carries token text")
				}
			}
		})
	}
}

// TestRequireIdentity: the identity reaches the handler's context, and the access-log Info when
// proxy.RequestID ran first.
func TestRequireIdentity(t *testing.T) {
	a, _ := newAuth(t, nil)
	tests := []struct {
		name      string
		requestID bool
		fixture   string
		userID    string
	}{
		{"with request ID", true, "hs256_valid", "u-123"},
		{"without request ID", false, "hs256_valid", "u-123"},
		{"sub as user ID", true, "rs256_valid", "rs-user"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got *auth.Identity
			var info *proxy.Info
			h := a.Require(false)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				got, info = auth.FromContext(r.Context()), proxy.InfoFrom(r.Context())
			}))
			if tt.requestID {
				h = proxy.Chain(h, proxy.RequestID())
			}
			if res := serve(h, bearer(fixture(t, tt.fixture))); res.Code != http.StatusOK {
				t.Fatalf("status %d: %s", res.Code, res.Body)
			}
			if got == nil || got.UserID != tt.userID {
				t.Fatalf("FromContext = %+v, want user %q", got, tt.userID)
			}
			switch {
			case tt.requestID && (info == nil || info.UserID != tt.userID):
				t.Errorf("proxy.InfoFrom = %+v, want UserID %q", info, tt.userID)
			case !tt.requestID && info != nil:
				t.Errorf("proxy.InfoFrom = %+v without the edge middleware", info)
			}
		})
	}
	if auth.FromContext(context.Background()) != nil {
		t.Error("FromContext of a bare context is not nil")
	}
}

// TestRequireRefreshHeaders: X-Token-Refresh-Required and X-Token-Expires-At appear only when
// the token has less than RefreshWindow left.
func TestRequireRefreshHeaders(t *testing.T) {
	tests := []struct {
		name    string
		window  time.Duration
		fixture string
		want    string // X-Token-Expires-At; empty: no headers
	}{
		{"58 min left, default 15 min window", 0, "hs256_valid", ""},
		{"58 min left, 1 h window", time.Hour, "hs256_valid", "1900003600"},
		{"58 min left, 58 min 20 s window", 3500 * time.Second, "hs256_valid", ""},
		{"5 min left, default window", 0, "refresh_soon", "1900000400"},
		{"5 min left, 1 min window", time.Minute, "refresh_soon", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, _ := newAuth(t, func(o *auth.Options) { o.RefreshWindow = tt.window })
			res := serve(a.Require(false)(okHandler()), bearer(fixture(t, tt.fixture)))
			if res.Code != http.StatusOK {
				t.Fatalf("status %d: %s", res.Code, res.Body)
			}
			req, at := res.Header().Get("X-Token-Refresh-Required"), res.Header().Get("X-Token-Expires-At")
			if tt.want == "" {
				if req != "" || at != "" {
					t.Errorf("refresh headers %q, %q on a token with time left", req, at)
				}
				return
			}
			if req != "true" || at != tt.want {
				t.Errorf("X-Token-Refresh-Required %q, X-Token-Expires-At %q; want true, %s", req, at, tt.want)
			}
		})
	}
}

// TestPublicPaths checks which paths PublicPaths covers. Public decides; whoever mounts Require
// skips it for them (and Require itself never does).
func TestPublicPaths(t *testing.T) {
	a, _ := newAuth(t, func(o *auth.Options) { o.PublicPaths = []string{"/healthz", "/public/"} })
	h := a.Require(false)(okHandler())
	tests := []struct {
		path   string
		public bool
	}{
		{"/healthz", true},
		{"/public/", true},
		{"/public/docs/a.html", true},
		{"/healthz/x", false},
		{"/healthzz", false},
		{"/public", false},
		{"/api/v2/chat/stream", false},
		{"/", false},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			if got := a.Public(tt.path); got != tt.public {
				t.Fatalf("Public(%q) = %v, want %v", tt.path, got, tt.public)
			}
			wantError(t, serve(h, httptest.NewRequest(http.MethodGet, tt.path, nil)), http.StatusUnauthorized, proxy.CodeTokenMissing)
		})
	}
}

// TestRequireRevocation: a revoked jti is refused; a user revocation refuses that user's tokens
// issued before it and lets later ones (and other users) through; a revocation reaches its own
// tenant only. The store's clock is at NOW, where the revocations are made; the middleware's at
// NOW+200, so that the "issued_later" fixture (iat NOW+100) is in the past.
func TestRequireRevocation(t *testing.T) {
	ctx := context.Background()
	revokeUser := func(tenant string) func(r *auth.MemoryRevocations) error {
		return func(r *auth.MemoryRevocations) error {
			_, err := r.RevokeUser(ctx, tenant, "u-123")
			return err
		}
	}
	tests := []struct {
		name    string
		revoke  func(r *auth.MemoryRevocations) error
		fixture string // hs256_valid is of tenant t-1; the others of no tenant
		status  int
	}{
		{"jti revoked", func(r *auth.MemoryRevocations) error {
			return r.RevokeToken(ctx, "t-1", "jti-hs256", time.Unix(fixtureExp, 0))
		}, "hs256_valid", 401},
		{"another jti revoked", func(r *auth.MemoryRevocations) error {
			return r.RevokeToken(ctx, "", "jti-user2", time.Unix(fixtureExp, 0))
		}, "hs256_valid", 200},
		{"jti revoked in another tenant", func(r *auth.MemoryRevocations) error {
			return r.RevokeToken(ctx, "", "jti-hs256", time.Unix(fixtureExp, 0))
		}, "hs256_valid", 200},
		{"user revoked after iat", revokeUser("t-1"), "hs256_valid", 401},
		{"user revoked in another tenant", revokeUser("t-1"), "hs384_valid", 200},
		{"user revoked, token issued later", revokeUser(""), "issued_later", 200},
		{"user revoked, other user", revokeUser(""), "user2", 200},
		{"user revoked, token without iat", revokeUser(""), "no-iat", 401},
	}
	noIAT := signHS256(t, secret(t), nil, claims(map[string]any{"iat": nil, "jti": "jti-no-iat"}))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rev := auth.NewMemoryRevocations(24*time.Hour, fixedClock(0))
			v, _, _ := newVerifier(t, func(o *auth.VerifierOptions) { o.Now = fixedClock(200) })
			a := auth.New(auth.Options{Verifier: v, Revocations: rev, Now: fixedClock(200)})
			h := a.Require(false)(okHandler())
			token := noIAT
			if tt.fixture != "no-iat" {
				token = fixture(t, tt.fixture)
			}
			if res := serve(h, bearer(token)); res.Code != http.StatusOK {
				t.Fatalf("before revocation: status %d %s", res.Code, res.Body)
			}
			if err := tt.revoke(rev); err != nil {
				t.Fatal(err)
			}
			res := serve(h, bearer(token))
			if tt.status == http.StatusOK {
				if res.Code != http.StatusOK {
					t.Fatalf("status %d %s, want 200", res.Code, res.Body)
				}
				return
			}
			wantError(t, res, tt.status, proxy.CodeTokenRevoked)
		})
	}
}

// Revocation stores that misbehave.
type (
	// blockingStore answers only when its context ends: Redis that stopped answering.
	blockingStore struct{ auth.Revocations }
	// failingStore fails at once: Redis refusing connections.
	failingStore struct{ auth.Revocations }
	// countingStore counts lookups.
	countingStore struct {
		auth.Revocations
		n atomic.Int64
	}
)

func (blockingStore) Revoked(ctx context.Context, _ *auth.Identity) (bool, error) {
	<-ctx.Done()
	return false, ctx.Err()
}

func (failingStore) Revoked(context.Context, *auth.Identity) (bool, error) {
	return false, errors.New("dial tcp 10.9.8.7:6379: connect: connection refused")
}

func (c *countingStore) Revoked(ctx context.Context, id *auth.Identity) (bool, error) {
	c.n.Add(1)
	return c.Revocations.Revoked(ctx, id)
}

// TestRequireStoreFailure: a revocation store that cannot answer means 503 AUTH_SERVICE_ERROR
// within the budget, or, with FailOpen, a request let through, counted and logged.
func TestRequireStoreFailure(t *testing.T) {
	const budget = 100 * time.Millisecond
	tests := []struct {
		name     string
		store    auth.Revocations
		failOpen bool
	}{
		{"blocking, fail closed", blockingStore{}, false},
		{"failing, fail closed", failingStore{}, false},
		{"blocking, fail open", blockingStore{}, true},
		{"failing, fail open", failingStore{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var storeErrors atomic.Int64
			var logBuf syncBuffer
			a, _ := newAuth(t, func(o *auth.Options) {
				o.Revocations, o.FailOpen, o.Budget = tt.store, tt.failOpen, budget
				o.OnStoreError = func() { storeErrors.Add(1) }
				o.Log = slog.New(slog.NewJSONHandler(&logBuf, nil))
			})
			start := time.Now()
			res := serve(a.Require(false)(okHandler()), bearer(fixture(t, "hs256_valid")))
			elapsed := time.Since(start)
			if elapsed > budget+50*time.Millisecond {
				t.Errorf("answered after %v, budget %v", elapsed, budget)
			}
			if storeErrors.Load() != 1 {
				t.Errorf("OnStoreError called %d times, want 1", storeErrors.Load())
			}
			if tt.failOpen {
				if res.Code != http.StatusOK {
					t.Fatalf("fail-open: status %d %s, want 200", res.Code, res.Body)
				}
				if !strings.Contains(logBuf.String(), "fail-open") {
					t.Errorf("fail-open not logged: %q", logBuf.String())
				}
				return
			}
			wantError(t, res, http.StatusServiceUnavailable, proxy.CodeAuthService)
			if res.Header().Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
			if strings.Contains(res.Body.String(), "10.9.8.7") {
				t.Errorf("the store's address reached the client: %s", res.Body)
			}
		})
	}
}

// TestRequireUserStatus asks a user service on loopback.
func TestRequireUserStatus(t *testing.T) {
	var mu sync.Mutex
	var paths []string
	users := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.URL.EscapedPath())
		mu.Unlock()
		switch r.URL.EscapedPath() {
		case "/users/u-123":
			_, _ = w.Write([]byte(`{"status":"active"}`))
		case "/users/u-456":
			_, _ = w.Write([]byte(`{"status":"disabled"}`))
		case "/users/u-500":
			http.Error(w, "boom", http.StatusInternalServerError)
		case "/users/u-garbled":
			_, _ = w.Write([]byte(`{"state":"active"}`))
		case "/users/u-slow":
			<-r.Context().Done()
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(users.Close)
	down := httptest.NewServer(http.NotFoundHandler())
	downURL, _ := url.Parse(down.URL)
	down.Close()
	usersURL, _ := url.Parse(users.URL)

	// The budget is wide enough that a busy test machine alone never runs it out; a call past it
	// is still told apart from one that waits for the slow service, which never answers.
	const budget = 500 * time.Millisecond
	sec := secret(t)
	tests := []struct {
		name    string
		url     *url.URL
		userID  string
		status  int
		code    string
		outcome string // what OnResult is told
	}{
		{"active", usersURL, "u-123", 200, "", "ok"},
		{"disabled", usersURL, "u-456", 401, proxy.CodeUserDisabled, "ok"},
		{"unknown user", usersURL, "u-404", 401, proxy.CodeUserDisabled, "ok"},
		{"service error", usersURL, "u-500", 503, proxy.CodeAuthService, "error_status"},
		{"malformed answer", usersURL, "u-garbled", 503, proxy.CodeAuthService, "ok"},
		{"service too slow", usersURL, "u-slow", 503, proxy.CodeAuthService, "timeout"},
		{"service down", downURL, "u-123", 503, proxy.CodeAuthService, "refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var outcomes []string
			var took time.Duration
			a, _ := newAuth(t, func(o *auth.Options) {
				o.Users = auth.NewUserStatus(auth.UserStatusOptions{URL: tt.url, Client: users.Client(),
					OnResult: func(outcome string, d time.Duration) {
						mu.Lock()
						defer mu.Unlock()
						outcomes, took = append(outcomes, outcome), d
					}})
				o.Budget = budget
			})
			defer func() {
				mu.Lock()
				defer mu.Unlock()
				if len(outcomes) != 1 || outcomes[0] != tt.outcome {
					t.Errorf("OnResult told %v, want [%s]", outcomes, tt.outcome)
				}
				if tt.outcome == "timeout" && took < budget*9/10 {
					t.Errorf("a call that ran out the %v budget took %v by OnResult", budget, took)
				}
			}()
			token := signHS256(t, sec, nil, claims(map[string]any{"user_id": tt.userID}))
			start := time.Now()
			res := serve(a.Require(false)(okHandler()), bearer(token))
			if elapsed := time.Since(start); elapsed > 2*budget {
				t.Errorf("answered after %v, budget %v", elapsed, budget)
			}
			if tt.status == http.StatusOK {
				if res.Code != http.StatusOK {
					t.Fatalf("status %d %s, want 200", res.Code, res.Body)
				}
				return
			}
			doc := wantError(t, res, tt.status, tt.code)
			if strings.Contains(doc.Error, "127.0.0.1") {
				t.Errorf("the user service address reached the client: %q", doc.Error)
			}
		})
	}

	// A user ID is one path segment, whatever it contains.
	t.Run("user ID escaped", func(t *testing.T) {
		mu.Lock()
		paths = nil
		mu.Unlock()
		a, _ := newAuth(t, func(o *auth.Options) {
			o.Users = auth.NewUserStatus(auth.UserStatusOptions{URL: usersURL, Client: users.Client()})
		})
		token := signHS256(t, sec, nil, claims(map[string]any{"user_id": "../u-123"}))
		res := serve(a.Require(false)(okHandler()), bearer(token))
		mu.Lock()
		defer mu.Unlock()
		if len(paths) != 1 || paths[0] != "/users/..%2Fu-123" {
			t.Errorf("user service asked for %q, want [/users/..%%2Fu-123]", paths)
		}
		if res.Code == http.StatusOK {
			t.Errorf("user %q passed as active", "../u-123")
		}
	})
}

// TestRequireTokenCache: a token seen before is not verified again (the verifier's clock, read
// once per verification, is not read), but the revocation store is asked every time, refused
// tokens are never cached, and a cached token still expires.
func TestRequireTokenCache(t *testing.T) {
	var verifications atomic.Int64
	v, _, _ := newVerifier(t, func(o *auth.VerifierOptions) {
		o.Now = func() time.Time {
			verifications.Add(1)
			return time.Unix(fixtureNow, 0)
		}
	})
	var now atomic.Int64
	now.Store(fixtureNow)
	store := &countingStore{Revocations: auth.NewMemoryRevocations(time.Hour, nil)}
	a := auth.New(auth.Options{Verifier: v, Revocations: store,
		Now: func() time.Time { return time.Unix(now.Load(), 0) }})
	h := a.Require(false)(okHandler())

	type step struct {
		name          string
		do            func()
		fixture       string
		status        int
		verifications int64 // total so far
		lookups       int64 // total so far
	}
	steps := []step{
		{name: "first HS256", fixture: "hs256_valid", status: 200, verifications: 1, lookups: 1},
		{name: "repeat HS256", fixture: "hs256_valid", status: 200, verifications: 1, lookups: 2},
		{name: "repeat HS256 again", fixture: "hs256_valid", status: 200, verifications: 1, lookups: 3},
		{name: "first ES256", fixture: "es256_valid", status: 200, verifications: 2, lookups: 4},
		{name: "repeat ES256", fixture: "es256_valid", status: 200, verifications: 2, lookups: 5},
		{name: "expired, first", fixture: "exp_past", status: 401, verifications: 3, lookups: 5},
		{name: "expired, again: not cached", fixture: "exp_past", status: 401, verifications: 4, lookups: 5},
		{name: "cached HS256 after its jti is revoked", do: func() {
			_ = store.RevokeToken(context.Background(), "t-1", "jti-hs256", time.Unix(fixtureExp, 0))
		}, fixture: "hs256_valid", status: 401, verifications: 4, lookups: 6},
		{name: "cached ES256 after its expiry", do: func() { now.Store(fixtureExp + 31) },
			fixture: "es256_valid", status: 401, verifications: 5, lookups: 6},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			if s.do != nil {
				s.do()
			}
			res := serve(h, bearer(fixture(t, s.fixture)))
			if res.Code != s.status {
				t.Errorf("status %d, want %d: %s", res.Code, s.status, res.Body)
			}
			if got := verifications.Load(); got != s.verifications {
				t.Errorf("%d verifications so far, want %d", got, s.verifications)
			}
			if got := store.n.Load(); got != s.lookups {
				t.Errorf("%d revocation lookups so far, want %d", got, s.lookups)
			}
		})
	}
}

// syncBuffer is a bytes.Buffer safe for a logger shared with background goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestNoTokenInLogs runs requests through the edge middleware with a JSON access log and every
// auth logger on one buffer, and asserts that no token, nor any of its segments, is logged.
func TestNoTokenInLogs(t *testing.T) {
	var buf syncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))

	ks := newKeyServer(t, readFixture(t, "jwks.json"))
	jwks := newJWKS(t, ks, auth.JWKSOptions{Log: log, MinRefetch: time.Millisecond})
	v, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: secret(t), JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
	if err != nil {
		t.Fatal(err)
	}
	rev := auth.NewMemoryRevocations(time.Hour, nil)
	if err := rev.RevokeToken(context.Background(), "", "jti-user2", time.Unix(fixtureExp, 0)); err != nil {
		t.Fatal(err)
	}
	strict := auth.New(auth.Options{Verifier: v, Revocations: rev, Log: log, Now: fixedClock(0)})
	open := auth.New(auth.Options{Verifier: v, Revocations: failingStore{}, FailOpen: true, Log: log, Now: fixedClock(0)})
	edge := func(a *auth.Authenticator) http.Handler {
		return proxy.Chain(okHandler(), proxy.Recover(log), proxy.RequestID(), proxy.AccessLog(log), a.Require(true))
	}

	valid := fixture(t, "hs256_valid")
	tampered := valid[:len(valid)-4] + "AAAA"
	expired := fixture(t, "exp_past")
	reqs := []struct {
		name  string
		h     http.Handler
		req   *http.Request
		token string
	}{
		{"valid", edge(strict), bearer(valid), valid},
		{"invalid", edge(strict), bearer(tampered), tampered},
		{"expired", edge(strict), bearer(expired), expired},
		{"alg none", edge(strict), bearer(fixture(t, "alg_none")), fixture(t, "alg_none")},
		{"unknown kid, JWKS refetch", edge(strict), bearer(fixture(t, "rs256_unknown_kid")), fixture(t, "rs256_unknown_kid")},
		{"wrong key type", edge(strict), bearer(fixture(t, "ps256_rsa1")), fixture(t, "ps256_rsa1")},
		{"revoked", edge(strict), bearer(fixture(t, "user2")), fixture(t, "user2")},
		{"control character", edge(strict), bearer(fixture(t, "username_control_char")), fixture(t, "username_control_char")},
		{"query string", edge(strict), httptest.NewRequest(http.MethodGet, "/x?access_token="+valid, nil), valid},
		{"subprotocol", edge(strict), func() *http.Request {
			r := httptest.NewRequest(http.MethodGet, "/x", nil)
			r.Header.Set("Sec-WebSocket-Protocol", "voice-protocol-v2, bearer."+expired)
			return r
		}(), expired},
		{"duplicate", edge(strict), func() *http.Request {
			r := bearer(valid)
			r.Header.Add("Authorization", "Bearer "+tampered)
			return r
		}(), tampered},
		{"fail-open", edge(open), bearer(valid), valid},
	}
	for _, r := range reqs {
		t.Run(r.name, func(t *testing.T) {
			before := strings.Count(buf.String(), "\n")
			res := serve(r.h, r.req)
			if strings.Count(buf.String(), "\n") == before {
				t.Fatal("nothing logged")
			}
			if strings.Contains(res.Body.String(), r.token) {
				t.Errorf("response body carries the token")
			}
		})
	}

	logged := buf.String()
	for _, r := range reqs {
		for i, part := range append([]string{r.token}, strings.Split(r.token, ".")...) {
			if len(part) >= 16 && strings.Contains(logged, part) {
				t.Errorf("%s: the log carries the token (part %d)", r.name, i)
			}
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(logged), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("not a JSON log line: %q", line)
		}
		if m["msg"] == "request" && m["request_id"] == "" {
			t.Errorf("access log line without a request ID: %s", line)
		}
	}
	t.Logf("%d log lines checked", strings.Count(logged, "\n"))
}
