package main

import (
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"testing"
	"time"
)

// testSecret is the HMAC secret of the gateways the tests start.
const testSecret = "voicegate-test-secret-0123456789abcdef"

// signHS256 makes an HS256 JWT with crypto/hmac directly: a second implementation, independent
// of the library the gateway verifies with.
func signHS256(t testing.TB, secret string, claims map[string]any) string {
	t.Helper()
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signingInput := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signingInput))
	return signingInput + "." + enc.EncodeToString(mac.Sum(nil))
}

// tokenFor returns a valid one-hour token for user with roles; extra claims override.
func tokenFor(t testing.TB, user string, roles []string, extra map[string]any) string {
	now := time.Now()
	claims := map[string]any{
		"sub": user, "jti": crand.Text(), "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(),
		"username": user + "-name", "tenant_id": "tenant-a", "roles": roles,
	}
	for k, v := range extra {
		if v == nil {
			delete(claims, k)
			continue
		}
		claims[k] = v
	}
	return signHS256(t, testSecret, claims)
}

// withToken is a RoundTripper that adds a bearer token to requests that carry none.
type withToken struct {
	base  http.RoundTripper
	token string
}

func (w withToken) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("Authorization") != "" || r.Header.Get("X-Test-No-Token") != "" {
		r.Header.Del("X-Test-No-Token")
		return w.base.RoundTrip(r)
	}
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+w.token)
	return w.base.RoundTrip(r)
}
