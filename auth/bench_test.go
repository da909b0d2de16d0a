package auth_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"voicegate/auth"
)

// BenchmarkMiddleware compares, in one run, a bare handler with no authentication (the baseline)
// with the same handler behind Require: warm (the token seen before: a token-cache hit plus the
// in-memory revocation check) for HS256 and ES256, and cold (Verifier.Verify on every op, no
// cache: parse, key lookup, signature check, claims) for HS256 and ES256.
//
// Every op gets a fresh httptest.ResponseRecorder (in the baseline too, so its cost cancels out).
// The request is built once and reused without cloning: the middleware only reads it and hands the
// handler a shallow copy (r.WithContext), so nothing carries over between ops.
func BenchmarkMiddleware(b *testing.B) {
	v, _, _ := newVerifier(b, nil)
	a := auth.New(auth.Options{Verifier: v, Revocations: auth.NewMemoryRevocations(24*time.Hour, nil), Now: fixedClock(0)})
	final := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	authed := a.Require(false)(final)
	hs, es := fixture(b, "hs256_valid"), fixture(b, "es256_valid")

	serveLoop := func(h http.Handler, req *http.Request) func(b *testing.B) {
		return func(b *testing.B) {
			if rec := serve(h, req); rec.Code != http.StatusNoContent { // warms the cache
				b.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != http.StatusNoContent {
					b.Fatalf("status %d", rec.Code)
				}
			}
		}
	}
	verifyLoop := func(token string) func(b *testing.B) {
		return func(b *testing.B) {
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.Verify(ctx, token); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.Run("none", serveLoop(final, bearer(hs)))
	b.Run("HS256-warm", serveLoop(authed, bearer(hs)))
	b.Run("ES256-warm", serveLoop(authed, bearer(es)))
	b.Run("HS256-cold", verifyLoop(hs))
	b.Run("ES256-cold", verifyLoop(es))
}
