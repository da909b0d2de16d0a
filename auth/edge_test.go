package auth_test

// The auth gaps an attack on the edge found: a revoked token working again within the leeway
// after its expiry, a JWKS rotation not reaching the token cache, identity-provider hosts in
// log lines, tokens meant to outlive the revocations that cover them.

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/auth"
	"voicegate/proxy"
)

// TestRevocationOutlivesLeeway: a token logged out before its expiry stays refused while the
// verifier would still accept it (exp plus the leeway), then is refused as expired — never
// accepted again in between. Time is synctest's, so the clocks of the verifier, the middleware
// and the store all move together.
func TestRevocationOutlivesLeeway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sec := secret(t)
		now := time.Now()
		tok := signHS256(t, sec, nil, map[string]any{"user_id": "u-1", "jti": "jti-leeway",
			"iat": now.Unix(), "exp": now.Add(time.Minute).Unix()})
		v, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: sec, Leeway: leeway})
		if err != nil {
			t.Fatal(err)
		}
		rev := auth.NewMemoryRevocations(24*time.Hour, nil)
		a := auth.New(auth.Options{Verifier: v, Revocations: rev})
		logout := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{Revocations: rev, Leeway: leeway}))
		req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		if res := serve(logout, req); res.Code != http.StatusOK {
			t.Fatalf("logout: %d %s", res.Code, res.Body)
		}
		check := a.Require(false)(okHandler())
		wantError(t, serve(check, bearer(tok)), http.StatusUnauthorized, proxy.CodeTokenRevoked)

		time.Sleep(time.Minute + leeway/2) // past exp, within the leeway
		wantError(t, serve(check, bearer(tok)), http.StatusUnauthorized, proxy.CodeTokenRevoked)

		time.Sleep(leeway) // past exp and the leeway
		wantError(t, serve(check, bearer(tok)), http.StatusUnauthorized, proxy.CodeTokenExpired)
	})
}

// recordingRevocations records the until of every RevokeToken.
type recordingRevocations struct {
	auth.Revocations
	until []time.Time
}

func (r *recordingRevocations) RevokeToken(ctx context.Context, tenant, jti string, until time.Time) error {
	r.until = append(r.until, until)
	return r.Revocations.RevokeToken(ctx, tenant, jti, until)
}

// TestRevokeKeepsLeeway: a logout keeps the jti until exp plus the leeway; an admin's revocation
// of another jti until the longest lifetime plus the leeway.
func TestRevokeKeepsLeeway(t *testing.T) {
	rec := &recordingRevocations{Revocations: auth.NewMemoryRevocations(24*time.Hour, nil)}
	a, _ := newAuth(t, func(o *auth.Options) { o.Revocations = rec })
	admin := signHS256(t, secret(t), nil, claims(map[string]any{"user_id": "admin-1", "jti": "jti-admin",
		"permissions": []string{auth.PermRevoke}}))
	h := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{Revocations: rec, Now: fixedClock(0),
		MaxLifetime: time.Hour, Leeway: leeway, Can: func(*http.Request, string) bool { return true }}))
	for _, c := range []struct{ token, body string }{{fixture(t, "hs256_valid"), ""}, {admin, `{"jti":"someone-else"}`}} {
		body := c.body
		req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+c.token)
		if res := serve(h, req); res.Code != http.StatusOK {
			t.Fatalf("revoke %q: %d %s", body, res.Code, res.Body)
		}
	}
	want := []time.Time{time.Unix(fixtureExp, 0).Add(leeway), time.Unix(fixtureNow, 0).Add(time.Hour + leeway)}
	if len(rec.until) != 2 || !rec.until[0].Equal(want[0]) || !rec.until[1].Equal(want[1]) {
		t.Errorf("revoked until %v, want %v", rec.until, want)
	}
}

// TestJWKSRotationReachesTokenCache: a token verified (and cached) with a key that a JWKS
// refresh then drops is refused at once, not accepted from the cache until it expires; a token
// whose key stays in the set keeps working.
func TestJWKSRotationReachesTokenCache(t *testing.T) {
	ks := newKeyServer(t, readFixture(t, "jwks.json"))
	// Unknown kids trigger a refetch at once: that is how the test makes the refresh happen.
	jwks := newJWKS(t, ks, auth.JWKSOptions{Refresh: time.Hour, MinRefetch: time.Nanosecond})
	v, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: secret(t), JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
	if err != nil {
		t.Fatal(err)
	}
	a := auth.New(auth.Options{Verifier: v, Revocations: auth.NewMemoryRevocations(time.Hour, nil), Now: fixedClock(0)})
	h := a.Require(false)(okHandler())
	rs, es := fixture(t, "rs256_valid"), fixture(t, "es256_valid")
	for _, tok := range []string{rs, es, rs, es} {
		if res := serve(h, bearer(tok)); res.Code != http.StatusOK {
			t.Fatalf("before the rotation: %d %s", res.Code, res.Body)
		}
	}

	ks.set(jwksWithout(t, "rsa-1"))
	fetches := jwks.Fetches.Load()
	wantError(t, serve(h, bearer(fixture(t, "rs256_unknown_kid"))), http.StatusUnauthorized, proxy.CodeTokenInvalid)
	if jwks.Fetches.Load() == fetches {
		t.Fatal("the unknown kid did not refetch the key set")
	}

	wantError(t, serve(h, bearer(rs)), http.StatusUnauthorized, proxy.CodeTokenInvalid)
	if res := serve(h, bearer(es)); res.Code != http.StatusOK {
		t.Errorf("ES256 token whose key stayed: %d %s", res.Code, res.Body)
	}
	if res := serve(h, bearer(fixture(t, "hs256_valid"))); res.Code != http.StatusOK {
		t.Errorf("HS256 token: %d %s", res.Code, res.Body)
	}
}

// TestJWKSErrorsNameNoHost: a JWKS that cannot be fetched is logged without the identity
// provider's address.
func TestJWKSErrorsNameNoHost(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.2:0") // nothing else binds 127.0.0.2: the port stays refused
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var buf syncBuffer
	jwks := auth.NewJWKS(context.Background(), auth.JWKSOptions{URL: "http://" + addr + "/jwks",
		Log: slog.New(slog.NewJSONHandler(&buf, nil)), MinRefetch: time.Nanosecond})
	defer jwks.Close()
	if _, err := jwks.Key(context.Background(), "some-kid"); err == nil {
		t.Fatal("a key from a JWKS that cannot be fetched")
	}
	out := buf.String()
	if !strings.Contains(out, "JWKS") {
		t.Fatalf("no JWKS failure logged: %s", out)
	}
	host, port, _ := net.SplitHostPort(addr)
	if strings.Contains(out, addr) || strings.Contains(out, host) || strings.Contains(out, ":"+port) {
		t.Errorf("the log names the identity provider's address %s:\n%s", addr, out)
	}
}

// TestVerifyMaxLifetime: with a maximum lifetime, a token meant to live longer (by exp - iat,
// or by exp from now when it has no iat) is refused, so no revocation kept that long can run out
// while a token it covers is still accepted.
func TestVerifyMaxLifetime(t *testing.T) {
	v, _, _ := newVerifier(t, func(o *auth.VerifierOptions) { o.MaxLifetime = 2 * time.Hour })
	sec := secret(t)
	tests := []struct {
		name string
		over map[string]any
		ok   bool
	}{
		{"an hour", nil, true},
		{"two hours and the leeway", map[string]any{"exp": fixtureIAT + 7200 + 30}, true},
		{"three hours after iat", map[string]any{"exp": fixtureIAT + 3*3600}, false},
		{"no iat, exp an hour ahead", map[string]any{"iat": nil}, true},
		{"no iat, exp a day ahead", map[string]any{"iat": nil, "exp": fixtureNow + 86400}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := v.Verify(context.Background(), signHS256(t, sec, nil, claims(tt.over)))
			if (err == nil) != tt.ok {
				t.Fatalf("Verify = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}
