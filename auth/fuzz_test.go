package auth_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"voicegate/auth"
)

// FuzzTokenPreParse feeds arbitrary Authorization header values through the middleware and
// their tokens through Verify, before any signature check and after: nothing panics; every
// refusal is a *TokenError with a 400, 401 or 503 and never repeats the token; whatever is
// accepted is a compact JWS of base64url segments within the size bound whose identity is
// printable, and the middleware and Verify agree.
func FuzzTokenPreParse(f *testing.F) {
	for _, tok := range fixtures(f) {
		f.Add("Bearer " + tok.Token)
		f.Add(tok.Token)
	}
	f.Add("Bearer ")
	f.Add("bearer a.b.c")
	f.Add("Bearer " + b64([]byte(`{"alg":"none"}`)) + ".e30.")
	f.Add("Bearer " + b64([]byte(`{"alg":"HS256","crit":["x"]}`)) + ".e30.AAAA")
	f.Add("Bearer " + b64([]byte(`{"alg":"RS256","kid":"`+strings.Repeat("k", 200)+`"}`)) + ".e30.AAAA")

	v, _, _ := newVerifier(f, nil)
	a := auth.New(auth.Options{Verifier: v, Revocations: auth.NewMemoryRevocations(time.Hour, nil), Now: fixedClock(0)})
	h := a.Require(false)(okHandler())
	f.Fuzz(func(t *testing.T, header string) {
		req, err := http.NewRequest(http.MethodGet, "http://gw/x", nil)
		if err != nil {
			t.Skip()
		}
		req.Header["Authorization"] = []string{header}
		res := serve(h, req)
		switch res.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusUnauthorized, http.StatusServiceUnavailable:
		default:
			t.Fatalf("status %d for %q", res.Code, header)
		}
		_, token, _ := strings.Cut(strings.TrimSpace(header), " ")
		token = strings.TrimSpace(token)
		if len(token) >= 16 && strings.Contains(res.Body.String(), token) {
			t.Fatalf("the answer repeats the token: %s", res.Body)
		}

		id, err := v.Verify(context.Background(), token)
		if err != nil {
			var te *auth.TokenError
			if !errors.As(err, &te) {
				t.Fatalf("Verify error %v (%T) is not a *TokenError", err, err)
			}
			if len(token) >= 16 && strings.Contains(err.Error(), token) {
				t.Fatalf("the error repeats the token: %v", err)
			}
			if res.Code == http.StatusOK {
				t.Fatalf("the middleware accepted %q, which Verify refuses: %v", header, err)
			}
			return
		}
		parts := strings.Split(token, ".")
		if len(token) > 8<<10 || len(parts) != 3 {
			t.Fatalf("accepted a token of %d bytes and %d segments", len(token), len(parts))
		}
		for _, p := range parts {
			if p == "" || strings.Trim(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
				t.Fatalf("accepted a segment that is not base64url: %q", p)
			}
		}
		for _, s := range []string{id.UserID, id.Username, id.TenantID, id.SessionID, id.TokenID} {
			if strings.ContainsAny(s, "\r\n\x00") {
				t.Fatalf("accepted an identity with control characters: %+v", id)
			}
		}
		if id.UserID == "" || id.TokenID == "" {
			t.Fatalf("accepted an identity without user or jti: %+v", id)
		}
	})
}
