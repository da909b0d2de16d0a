package auth_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/auth"
	"voicegate/proxy"
)

// rawToken builds a structurally valid token with the given header whose signature is junk: for
// tests where the key lookup decides.
func rawToken(t testing.TB, header map[string]any) string {
	t.Helper()
	return b64(mustJSON(t, header)) + "." + b64(mustJSON(t, claims(nil))) + "." + b64([]byte("not a signature"))
}

// TestJWKSUnknownKidSpray: a spray of random kids costs at most one key-set fetch per MinRefetch,
// however many arrive and however concurrently.
func TestJWKSUnknownKidSpray(t *testing.T) {
	const minRefetch = 300 * time.Millisecond
	ks := newKeyServer(t, readFixture(t, "jwks.json"))
	jwks := newJWKS(t, ks, auth.JWKSOptions{MinRefetch: minRefetch, Refresh: time.Hour})
	v, err := auth.NewVerifier(auth.VerifierOptions{JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
	if err != nil {
		t.Fatal(err)
	}
	base := jwks.Fetches.Load()
	if base != 1 || ks.hits.Load() != 1 {
		t.Fatalf("after NewJWKS: %d fetches, %d server hits; want 1, 1", base, ks.hits.Load())
	}
	start := time.Now()

	spray := func(t *testing.T, concurrent bool) {
		var wg sync.WaitGroup
		for i := range 50 {
			kid := rand.Text()
			switch i % 5 {
			case 1:
				kid = "../" + kid
			case 2:
				kid = "rsa-" + kid[:4]
			}
			token := rawToken(t, map[string]any{"alg": "RS256", "kid": kid})
			verify := func() {
				if _, err := v.Verify(context.Background(), token); !errors.Is(err, auth.ErrTokenInvalid) {
					t.Errorf("kid %q: err = %v, want ErrTokenInvalid", kid, err)
				}
			}
			if concurrent {
				wg.Go(verify)
			} else {
				verify()
			}
		}
		wg.Wait()
	}
	check := func(t *testing.T, minExtra int64) {
		t.Helper()
		extra := jwks.Fetches.Load() - base
		allowed := 1 + int64(time.Since(start)/minRefetch)
		if extra < minExtra || extra > allowed {
			t.Errorf("%d extra fetches after %v; want between %d and %d (one per MinRefetch)",
				extra, time.Since(start).Round(time.Millisecond), minExtra, allowed)
		}
		if got := ks.hits.Load(); got != jwks.Fetches.Load() {
			t.Errorf("server saw %d requests, JWKS counted %d fetches", got, jwks.Fetches.Load())
		}
	}

	var firstDone time.Time
	t.Run("concurrent", func(t *testing.T) {
		spray(t, true)
		firstDone = time.Now()
		check(t, 1) // the first unknown kid may refetch: the provider may have rotated
	})
	t.Run("sequential in the same interval", func(t *testing.T) {
		spray(t, false)
		check(t, 1)
	})
	t.Run("next interval", func(t *testing.T) {
		time.Sleep(time.Until(firstDone.Add(minRefetch + 10*time.Millisecond)))
		spray(t, false)
		check(t, 2)
	})
	t.Run("known kids still verify", func(t *testing.T) {
		if _, err := v.Verify(context.Background(), fixture(t, "es256_valid")); err != nil {
			t.Fatal(err)
		}
	})
}

// TestJWKSScheduledRefresh: a rotation at the identity provider reaches the gateway on the
// refresh schedule, even when the unknown-kid refetch is spent: the new key verifies and the
// retired one no longer does.
func TestJWKSScheduledRefresh(t *testing.T) {
	ks := newKeyServer(t, jwksWithout(t, "ec-1"))
	jwks := newJWKS(t, ks, auth.JWKSOptions{Refresh: 50 * time.Millisecond, MinRefetch: time.Hour})
	v, err := auth.NewVerifier(auth.VerifierOptions{JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	es, rs := fixture(t, "es256_valid"), fixture(t, "rs256_valid")
	if _, err := v.Verify(ctx, es); !errors.Is(err, auth.ErrTokenInvalid) {
		t.Fatalf("before rotation, ES256 (ec-1 not published): err = %v, want ErrTokenInvalid", err)
	}
	if _, err := v.Verify(ctx, rs); err != nil {
		t.Fatalf("before rotation, RS256: %v", err)
	}

	ks.set(jwksWithout(t, "rsa-1")) // publish ec-1, retire rsa-1
	rotated := time.Now()
	var esErr, rsErr error
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		_, esErr = v.Verify(ctx, es)
		_, rsErr = v.Verify(ctx, rs)
		if esErr == nil && rsErr != nil {
			break
		}
	}
	if esErr != nil {
		t.Errorf("ES256 after rotation: %v", esErr)
	}
	if !errors.Is(rsErr, auth.ErrTokenInvalid) {
		t.Errorf("RS256 with the retired key after rotation: err = %v, want ErrTokenInvalid", rsErr)
	}
	t.Logf("rotation seen after %v, %d fetches", time.Since(rotated).Round(time.Millisecond), jwks.Fetches.Load())
}

// TestJWKSUnavailable: when no key set could be fetched yet, JWKS tokens get ErrKeysUnavailable
// (503 AUTH_SERVICE_ERROR through the middleware), HMAC tokens are unaffected, and everything works
// once the key server answers, without a restart.
func TestJWKSUnavailable(t *testing.T) {
	good := readFixture(t, "jwks.json")
	tests := []struct {
		name    string
		breakIt func(ks *keyServer)
		fix     func(ks *keyServer)
	}{
		{"503", func(ks *keyServer) { ks.down.Store(true) }, func(ks *keyServer) { ks.down.Store(false) }},
		{"not JSON", func(ks *keyServer) { ks.set([]byte("<html>oops</html>")) }, func(ks *keyServer) { ks.set(good) }},
		{"over 1 MiB", func(ks *keyServer) {
			ks.set([]byte(`{"keys":[],"pad":"` + strings.Repeat("x", 1<<20) + `"}`))
		}, func(ks *keyServer) { ks.set(good) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks := newKeyServer(t, good)
			tt.breakIt(ks)
			jwks := newJWKS(t, ks, auth.JWKSOptions{Refresh: 50 * time.Millisecond, MinRefetch: time.Hour})
			v, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: secret(t), JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
			if err != nil {
				t.Fatal(err)
			}
			a := auth.New(auth.Options{Verifier: v, Revocations: auth.NewMemoryRevocations(time.Hour, nil), Now: fixedClock(0)})
			h := a.Require(false)(okHandler())
			es := fixture(t, "es256_valid")

			if _, err := v.Verify(context.Background(), es); !errors.Is(err, auth.ErrKeysUnavailable) {
				t.Fatalf("Verify with no key set: err = %v, want ErrKeysUnavailable", err)
			}
			res := serve(h, bearer(es))
			wantError(t, res, http.StatusServiceUnavailable, proxy.CodeAuthService)
			if res.Header().Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
			if res := serve(h, bearer(fixture(t, "hs256_valid"))); res.Code != http.StatusOK {
				t.Errorf("HS256 while the key server is down: status %d, want 200", res.Code)
			}

			tt.fix(ks)
			var last *httptest.ResponseRecorder
			for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				if last = serve(h, bearer(es)); last.Code == http.StatusOK {
					break
				}
			}
			if last.Code != http.StatusOK {
				t.Fatalf("after the key server recovered: status %d %s", last.Code, last.Body)
			}
		})
	}
}

// TestJWKSKeyFilter: keys without a kid, or published for encryption, never verify.
func TestJWKSKeyFilter(t *testing.T) {
	edit := func(kid string, f func(k map[string]any)) []byte {
		var c struct {
			Keys []map[string]any `json:"keys"`
		}
		_ = json.Unmarshal(readFixture(t, "jwks.json"), &c)
		for _, k := range c.Keys {
			if k["kid"] == kid {
				f(k)
			}
		}
		return mustJSON(t, c)
	}
	tests := []struct {
		name    string
		set     []byte
		fixture string
		accept  bool
	}{
		{"as published", readFixture(t, "jwks.json"), "es256_valid", true},
		{"use enc", edit("ec-1", func(k map[string]any) { k["use"] = "enc" }), "es256_valid", false},
		{"no use", edit("ec-1", func(k map[string]any) { delete(k, "use") }), "es256_valid", true},
		{"alg names another algorithm", edit("ec-1", func(k map[string]any) { k["alg"] = "ES384" }), "es256_valid", false},
		{"alg names RS256 on rsa-2", edit("rsa-2", func(k map[string]any) { k["alg"] = "RS256" }), "ps256_rsa2", false},
		{"alg names PS256 on rsa-1", edit("rsa-1", func(k map[string]any) { k["alg"] = "PS256" }), "ps256_rsa1", true},
		{"kid renamed", edit("ed-1", func(k map[string]any) { k["kid"] = "ed-2" }), "eddsa_valid", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks := newKeyServer(t, tt.set)
			jwks := newJWKS(t, ks, auth.JWKSOptions{Refresh: time.Hour})
			v, err := auth.NewVerifier(auth.VerifierOptions{JWKS: jwks, Leeway: leeway, Now: fixedClock(0)})
			if err != nil {
				t.Fatal(err)
			}
			token := fixture(t, tt.fixture)
			id, err := v.Verify(context.Background(), token)
			want := refuse
			if tt.accept {
				want = accept
			}
			checkOutcome(t, token, id, err, want)
		})
	}
}

// TestTokenKeyURLsNeverFetched: jku, x5u and jwk headers are ignored. A loopback server that
// would hand out the attacker's key receives no request, whatever the token says.
func TestTokenKeyURLsNeverFetched(t *testing.T) {
	attacker := attackerKey(t)
	var jkuHits atomic.Int64
	jku := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		jkuHits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(rsaJWKS(t, "attacker-go", &attacker.PublicKey))
	}))
	t.Cleanup(jku.Close)

	v, jwks, ks := newVerifier(t, nil)
	sec := secret(t)
	pubJWK := map[string]any{}
	if err := json.Unmarshal(rsaJWKS(t, "attacker-go", &attacker.PublicKey), &struct {
		Keys []*map[string]any `json:"keys"`
	}{Keys: []*map[string]any{&pubJWK}}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name  string
		token string
		want  outcome
	}{
		{"fixture jku to a closed port", fixture(t, "jku_attacker"), refuse},
		{"fixture x5u", fixture(t, "x5u_header"), refuse},
		{"fixture embedded jwk", fixture(t, "jwk_embedded"), refuse},
		{"HS256 with jku to the live server", signHS256(t, sec,
			map[string]any{"jku": jku.URL + "/jwks", "kid": "attacker-go"}, claims(nil)), accept},
		{"RS256 attacker kid, jku live", signRS256(t, attacker,
			map[string]any{"jku": jku.URL + "/jwks", "kid": "attacker-go"}, claims(nil)), refuse},
		{"RS256 rsa-1 kid, jku and x5u live", signRS256(t, attacker,
			map[string]any{"jku": jku.URL + "/jwks", "x5u": jku.URL + "/cert.pem", "kid": "rsa-1"}, claims(nil)), refuse},
		{"RS256 embedded jwk, no kid", signRS256(t, attacker,
			map[string]any{"jwk": pubJWK}, claims(nil)), refuse},
		{"RS256 embedded jwk and kid, jku live", signRS256(t, attacker,
			map[string]any{"jwk": pubJWK, "kid": "attacker-go", "jku": jku.URL}, claims(nil)), refuse},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := v.Verify(context.Background(), tt.token)
			checkOutcome(t, tt.token, id, err, tt.want)
		})
	}
	if n := jkuHits.Load(); n != 0 {
		t.Errorf("the server named by jku/x5u received %d requests, want 0", n)
	}
	if jwks.Fetches.Load() != ks.hits.Load() {
		t.Errorf("JWKS fetched %d times but its own server saw %d requests", jwks.Fetches.Load(), ks.hits.Load())
	}
}

// attackerKey is the fixture key that is in no JWKS.
func attackerKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	block, _ := pem.Decode(readFixture(t, "attacker-rsa.pem"))
	if block == nil {
		t.Fatal("attacker-rsa.pem: no PEM block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		t.Fatalf("attacker-rsa.pem holds a %T", k)
	}
	return rk
}
