package auth_test

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"voicegate/auth"
)

// TestMain fails the package's tests if any goroutine outlives them: every JWKS refresher and
// test server must be closed.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The fixtures in testdata/auth were made by PyJWT (testdata/auth/mktokens.py) with these times.
const (
	fixtureIAT = 1900000000 // 2030-03-17
	fixtureExp = fixtureIAT + 3600
	fixtureNow = fixtureIAT + 100 // the clock the tests run the verifier with
	leeway     = 30 * time.Second
	issuer     = "https://id.example"
	audience   = "voicegate"
)

var fixtureDir = filepath.Join("..", "testdata", "auth")

// fixedClock returns a clock stopped at fixtureNow+offset seconds.
func fixedClock(offset int64) func() time.Time {
	t := time.Unix(fixtureNow+offset, 0)
	return func() time.Time { return t }
}

var (
	loadOnce   sync.Once
	tokensJSON map[string]struct{ Token, Note string }
	loadErr    error
)

// fixtures returns the PyJWT-made tokens by name.
func fixtures(t testing.TB) map[string]struct{ Token, Note string } {
	t.Helper()
	loadOnce.Do(func() {
		var b []byte
		b, loadErr = os.ReadFile(filepath.Join(fixtureDir, "tokens.json"))
		if loadErr == nil {
			loadErr = json.Unmarshal(b, &tokensJSON)
		}
	})
	if loadErr != nil {
		t.Fatalf("load fixtures (regenerate with /usr/bin/python3 testdata/auth/mktokens.py): %v", loadErr)
	}
	return tokensJSON
}

// fixture returns one fixture token.
func fixture(t testing.TB, name string) string {
	t.Helper()
	f, ok := fixtures(t)[name]
	if !ok {
		t.Fatalf("no fixture %q in tokens.json", name)
	}
	return f.Token
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtureDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// secret is the HMAC secret the fixtures were signed with.
func secret(t testing.TB) []byte {
	return []byte(strings.TrimSpace(string(readFixture(t, "secret.txt"))))
}

// keyServer serves a JWKS document that a test can swap or take down, and counts requests.
type keyServer struct {
	*httptest.Server
	body atomic.Pointer[[]byte]
	down atomic.Bool
	hits atomic.Int64
}

func newKeyServer(t testing.TB, body []byte) *keyServer {
	t.Helper()
	ks := &keyServer{}
	ks.set(body)
	ks.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ks.hits.Add(1)
		if ks.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(*ks.body.Load())
	}))
	t.Cleanup(ks.Close)
	return ks
}

func (ks *keyServer) set(body []byte) { ks.body.Store(&body) }

// jwksWithout returns the fixture JWKS minus the keys with the given IDs.
func jwksWithout(t testing.TB, kids ...string) []byte {
	t.Helper()
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(readFixture(t, "jwks.json"), &set); err != nil {
		t.Fatal(err)
	}
	keep := set.Keys[:0]
	for _, k := range set.Keys {
		drop := false
		for _, kid := range kids {
			drop = drop || k["kid"] == kid
		}
		if !drop {
			keep = append(keep, k)
		}
	}
	set.Keys = keep
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newJWKS starts a key source on ks, closed when the test ends. The server's own client is used
// so that closing the server also closes its idle connections.
func newJWKS(t testing.TB, ks *keyServer, o auth.JWKSOptions) *auth.JWKS {
	t.Helper()
	o.URL = ks.URL + "/jwks"
	o.Client = ks.Client()
	s := auth.NewJWKS(context.Background(), o)
	t.Cleanup(s.Close)
	return s
}

// newVerifier returns a verifier with the fixture secret and a JWKS from the fixture key set at
// the fixed clock, after mod adjusts its options.
func newVerifier(t testing.TB, mod func(*auth.VerifierOptions)) (*auth.Verifier, *auth.JWKS, *keyServer) {
	t.Helper()
	ks := newKeyServer(t, readFixture(t, "jwks.json"))
	jwks := newJWKS(t, ks, auth.JWKSOptions{})
	o := auth.VerifierOptions{HMACSecret: secret(t), JWKS: jwks, Leeway: leeway, Now: fixedClock(0)}
	if mod != nil {
		mod(&o)
	}
	v, err := auth.NewVerifier(o)
	if err != nil {
		t.Fatal(err)
	}
	return v, jwks, ks
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// claims returns valid claims for the fixed clock, with over applied (a nil value deletes).
func claims(over map[string]any) map[string]any {
	c := map[string]any{"user_id": "u-123", "jti": "jti-go", "iat": fixtureIAT, "exp": fixtureExp}
	for k, v := range over {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

// signHS256 makes a compact HS256 JWS with crypto/hmac, for cases built at test time.
func signHS256(t testing.TB, key []byte, header, claims map[string]any) string {
	t.Helper()
	if header == nil {
		header = map[string]any{}
	}
	header["alg"] = "HS256"
	in := b64(mustJSON(t, header)) + "." + b64(mustJSON(t, claims))
	return in + "." + hs256Sig(key, in)
}

func hs256Sig(key []byte, signingInput string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(signingInput))
	return b64(m.Sum(nil))
}

// signRS256 makes a compact RS256 JWS with crypto/rsa.
func signRS256(t testing.TB, key *rsa.PrivateKey, header, claims map[string]any) string {
	t.Helper()
	header["alg"] = "RS256"
	in := b64(mustJSON(t, header)) + "." + b64(mustJSON(t, claims))
	sum := sha256.Sum256([]byte(in))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return in + "." + b64(sig)
}

// rsaJWKS renders key's public half as a one-key JWKS.
func rsaJWKS(t testing.TB, kid string, key *rsa.PublicKey) []byte {
	t.Helper()
	return mustJSON(t, map[string]any{"keys": []map[string]any{{
		"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
		"n": b64(key.N.Bytes()), "e": b64(big.NewInt(int64(key.E)).Bytes()),
	}}})
}

// segments splits a compact token.
func segments(t testing.TB, token string) []string {
	t.Helper()
	s := strings.Split(token, ".")
	if len(s) != 3 {
		t.Fatalf("fixture is not a compact JWS: %d segments", len(s))
	}
	return s
}
