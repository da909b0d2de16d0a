package auth_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"voicegate/auth"
)

// outcome is what a verification should end in.
type outcome int

const (
	accept outcome = iota
	refuse         // ErrTokenInvalid
	expire         // ErrTokenExpired
)

func (o outcome) String() string {
	return [...]string{"accept", "refuse (invalid)", "refuse (expired)"}[o]
}

// checkOutcome asserts err matches want, and that no error text carries the token.
func checkOutcome(t *testing.T, token string, id *auth.Identity, err error, want outcome) {
	t.Helper()
	switch want {
	case accept:
		if err != nil {
			t.Fatalf("refused: %v", err)
		}
		if id == nil {
			t.Fatal("accepted with a nil identity")
		}
		return
	case refuse:
		if !errors.Is(err, auth.ErrTokenInvalid) || errors.Is(err, auth.ErrTokenExpired) {
			t.Fatalf("err = %v, want ErrTokenInvalid", err)
		}
	case expire:
		if !errors.Is(err, auth.ErrTokenExpired) || errors.Is(err, auth.ErrTokenInvalid) {
			t.Fatalf("err = %v, want ErrTokenExpired", err)
		}
	}
	if id != nil {
		t.Errorf("refused with a non-nil identity %+v", id)
	}
	var te *auth.TokenError
	if !errors.As(err, &te) {
		t.Errorf("err %T is not a *auth.TokenError", err)
	}
	if sig := token[strings.LastIndexByte(token, '.')+1:]; len(sig) > 8 && strings.Contains(err.Error(), sig) {
		t.Errorf("error text carries the token's signature: %v", err)
	}
}

// derivedJTI in a test table stands for the ID of a token without jti: the first 16 bytes of
// its SHA-256, base64url, after "sha256:".
const derivedJTI = "(derived)"

// TestVerifyFixtures runs every PyJWT fixture through the verifier, with and without a required
// issuer and audience, at the fixed clock with a 30 s leeway.
func TestVerifyFixtures(t *testing.T) {
	plain, _, _ := newVerifier(t, nil)
	strict, _, _ := newVerifier(t, func(o *auth.VerifierOptions) { o.Issuer, o.Audience = issuer, audience })

	tests := []struct {
		name           string // fixture name
		plain, strict  outcome
		userID, jti    string // for accepted tokens
		checkFullClaim bool
	}{
		{name: "hs256_valid", plain: accept, strict: refuse, userID: "u-123", jti: "jti-hs256", checkFullClaim: true},
		{name: "hs384_valid", plain: accept, strict: refuse, userID: "u-123", jti: "jti-hs384_valid"},
		{name: "hs512_valid", plain: accept, strict: refuse, userID: "u-123", jti: "jti-hs512_valid"},
		{name: "rs256_valid", plain: accept, strict: refuse, userID: "rs-user", jti: "jti-rs256"},
		{name: "ps256_rsa1", plain: refuse, strict: refuse},
		{name: "ps256_rsa2", plain: accept, strict: refuse, userID: "u-123", jti: "jti-ps256-rsa2"},
		{name: "es256_valid", plain: accept, strict: refuse, userID: "u-123", jti: "jti-es256"},
		{name: "eddsa_valid", plain: accept, strict: refuse, userID: "u-123", jti: "jti-eddsa"},
		{name: "alg_none", plain: refuse, strict: refuse},
		{name: "hs256_rsa_pubkey", plain: refuse, strict: refuse},
		{name: "es384_p256_key", plain: refuse, strict: refuse},
		{name: "rs256_ec_kid", plain: refuse, strict: refuse},
		{name: "rs256_unknown_kid", plain: refuse, strict: refuse},
		{name: "rs256_missing_kid", plain: refuse, strict: refuse},
		{name: "rs256_path_kid", plain: refuse, strict: refuse},
		{name: "jku_attacker", plain: refuse, strict: refuse},
		{name: "jwk_embedded", plain: refuse, strict: refuse},
		{name: "x5u_header", plain: refuse, strict: refuse},
		{name: "exp_missing", plain: refuse, strict: refuse},
		{name: "exp_zero", plain: refuse, strict: refuse},
		{name: "exp_past", plain: expire, strict: expire},
		{name: "exp_inside_leeway", plain: accept, strict: refuse, userID: "u-123", jti: "jti-exp_inside_leeway"},
		{name: "nbf_future_beyond", plain: refuse, strict: refuse},
		{name: "nbf_future_inside", plain: accept, strict: refuse, userID: "u-123", jti: "jti-nbf_future_inside"},
		{name: "iat_future_beyond", plain: refuse, strict: refuse},
		{name: "iat_future_inside", plain: accept, strict: refuse, userID: "u-123", jti: "jti-iat_future_inside"},
		{name: "nbf_far_future", plain: refuse, strict: refuse},
		{name: "iat_far_future", plain: refuse, strict: refuse},
		{name: "iss_wrong", plain: accept, strict: refuse, userID: "u-123", jti: "jti-iss_wrong"},
		{name: "aud_wrong", plain: accept, strict: refuse, userID: "u-123", jti: "jti-aud_wrong"},
		{name: "iss_aud_valid", plain: accept, strict: accept, userID: "u-123", jti: "jti-iss_aud_valid"},
		{name: "aud_string_valid", plain: accept, strict: accept, userID: "u-123", jti: "jti-aud_string_valid"},
		{name: "crit_header", plain: refuse, strict: refuse},
		{name: "jti_missing", plain: accept, strict: refuse, userID: "u-123", jti: derivedJTI},
		{name: "sub_user_id_missing", plain: refuse, strict: refuse},
		{name: "username_control_char", plain: refuse, strict: refuse},
		{name: "user2", plain: accept, strict: refuse, userID: "u-456", jti: "jti-user2"},
		{name: "user2_second", plain: accept, strict: refuse, userID: "u-456", jti: "jti-user2_second"},
		{name: "issued_later", plain: refuse, strict: refuse}, // iat NOW+100: valid only on a later clock
		{name: "refresh_soon", plain: accept, strict: refuse, userID: "u-123", jti: "jti-refresh_soon"},
	}

	// Every fixture has a row, so a fixture added to mktokens.py is not silently untested.
	seen := map[string]bool{}
	for _, tt := range tests {
		seen[tt.name] = true
	}
	for name := range fixtures(t) {
		if !seen[name] {
			t.Errorf("fixture %q has no test case", name)
		}
	}

	for _, tt := range tests {
		for _, cfg := range []struct {
			name string
			v    *auth.Verifier
			want outcome
		}{{"plain", plain, tt.plain}, {"strict", strict, tt.strict}} {
			t.Run(tt.name+"/"+cfg.name, func(t *testing.T) {
				token := fixture(t, tt.name)
				id, err := cfg.v.Verify(context.Background(), token)
				checkOutcome(t, token, id, err, cfg.want)
				if cfg.want != accept {
					return
				}
				wantJTI := tt.jti
				if wantJTI == derivedJTI {
					sum := sha256.Sum256([]byte(token))
					wantJTI = "sha256:" + base64.RawURLEncoding.EncodeToString(sum[:16])
				}
				if id.UserID != tt.userID || id.TokenID != wantJTI {
					t.Errorf("UserID, TokenID = %q, %q; want %q, %q", id.UserID, id.TokenID, tt.userID, wantJTI)
				}
				if !tt.checkFullClaim {
					return
				}
				want := auth.Identity{
					UserID: "u-123", Username: "alice", TenantID: "t-1", SessionID: "s-1",
					TokenID: "jti-hs256", Roles: []string{"user", "editor"},
					Permissions: []string{"chat:write", "voice:write", "document:read", "document:write", "admin:read"},
					IssuedAt:    time.Unix(fixtureIAT, 0), ExpiresAt: time.Unix(fixtureExp, 0),
				}
				got := auth.Identity{
					UserID: id.UserID, Username: id.Username, TenantID: id.TenantID, SessionID: id.SessionID,
					TokenID: id.TokenID, Roles: id.Roles, Permissions: id.Permissions,
					IssuedAt: id.IssuedAt, ExpiresAt: id.ExpiresAt,
				}
				if !got.IssuedAt.Equal(want.IssuedAt) || !got.ExpiresAt.Equal(want.ExpiresAt) {
					t.Errorf("IssuedAt, ExpiresAt = %v, %v; want %v, %v", got.IssuedAt, got.ExpiresAt, want.IssuedAt, want.ExpiresAt)
				}
				got.IssuedAt, got.ExpiresAt, want.IssuedAt, want.ExpiresAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("identity\n got %+v\nwant %+v", got, want)
				}
			})
		}
	}
}

// TestVerifyKeySources: an HMAC-only verifier refuses JWKS algorithms and a JWKS-only one refuses
// HS*, so neither kind of key can stand in for the other; and the confusion fixture really is
// keyed with rsa-1's public PEM (a verifier naively using that PEM as its secret accepts it).
func TestVerifyKeySources(t *testing.T) {
	hmacOnly, _, _ := newVerifier(t, func(o *auth.VerifierOptions) { o.JWKS = nil })
	jwksOnly, _, _ := newVerifier(t, func(o *auth.VerifierOptions) { o.HMACSecret = nil })
	pemSecret, _, _ := newVerifier(t, func(o *auth.VerifierOptions) {
		o.JWKS, o.HMACSecret = nil, readFixture(t, "rsa-1.pub.pem")
	})
	tests := []struct {
		name    string
		v       *auth.Verifier
		fixture string
		want    outcome
	}{
		{"hmac-only/hs256", hmacOnly, "hs256_valid", accept},
		{"hmac-only/rs256", hmacOnly, "rs256_valid", refuse},
		{"hmac-only/es256", hmacOnly, "es256_valid", refuse},
		{"hmac-only/eddsa", hmacOnly, "eddsa_valid", refuse},
		{"jwks-only/rs256", jwksOnly, "rs256_valid", accept},
		{"jwks-only/hs256", jwksOnly, "hs256_valid", refuse},
		{"jwks-only/confusion", jwksOnly, "hs256_rsa_pubkey", refuse},
		{"pem-as-secret/confusion-token-is-genuine", pemSecret, "hs256_rsa_pubkey", accept},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			token := fixture(t, tt.fixture)
			id, err := tt.v.Verify(context.Background(), token)
			checkOutcome(t, token, id, err, tt.want)
		})
	}
}

func TestNewVerifierOptions(t *testing.T) {
	ks := newKeyServer(t, readFixture(t, "jwks.json"))
	jwks := newJWKS(t, ks, auth.JWKSOptions{})
	tests := []struct {
		name    string
		o       auth.VerifierOptions
		wantErr bool
	}{
		{"nothing", auth.VerifierOptions{}, true},
		{"short secret", auth.VerifierOptions{HMACSecret: make([]byte, auth.MinHMACSecret-1)}, true},
		{"empty secret", auth.VerifierOptions{HMACSecret: []byte{}}, true},
		{"32 zero bytes", auth.VerifierOptions{HMACSecret: make([]byte, auth.MinHMACSecret)}, true},
		{"32-byte random secret", auth.VerifierOptions{HMACSecret: []byte(rand.Text() + "abcdef")[:auth.MinHMACSecret]}, false},
		{"40 spaces", auth.VerifierOptions{HMACSecret: []byte(strings.Repeat(" ", 40))}, true},
		{"a word over and over", auth.VerifierOptions{HMACSecret: []byte(strings.Repeat("secret", 8))}, true},
		{"jwks only", auth.VerifierOptions{JWKS: jwks}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := auth.NewVerifier(tt.o)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err == nil && v == nil {
				t.Fatal("nil verifier without an error")
			}
		})
	}
}

// TestVerifyMalformed takes valid tokens apart: other serializations, bad base64 in each segment,
// wrong segment counts, alg none variants.
func TestVerifyMalformed(t *testing.T) {
	v, _, _ := newVerifier(t, nil)
	valid := fixture(t, "hs256_valid")
	seg := segments(t, valid)
	es := segments(t, fixture(t, "es256_valid"))
	join := func(s ...string) string { return strings.Join(s, ".") }
	replaced := func(i int, s string) string {
		c := append([]string(nil), seg...)
		c[i] = s
		return join(c...)
	}
	sec := secret(t)

	tests := []struct {
		name  string
		token string
	}{
		{"json flattened", fmt.Sprintf(`{"protected":%q,"payload":%q,"signature":%q}`, seg[0], seg[1], seg[2])},
		{"json general", fmt.Sprintf(`{"payload":%q,"signatures":[{"protected":%q,"signature":%q}]}`, seg[1], seg[0], seg[2])},
		{"json flattened es256", fmt.Sprintf(`{"protected":%q,"payload":%q,"signature":%q}`, es[0], es[1], es[2])},
		{"empty", ""},
		{"one segment", seg[0]},
		{"two segments", join(seg[0], seg[1])},
		{"four segments", join(seg[0], seg[1], seg[2], seg[2])},
		{"JWE-like five segments", join(seg[0], "", seg[1], seg[1], seg[2])},
		{"whitespace", " " + valid},
		{"empty header", join("", seg[1], seg[2])},
		{"empty payload (detached)", join(seg[0], "", seg[2])},
		{"empty signature", join(seg[0], seg[1], "")},
		{"header not JSON", replaced(0, b64([]byte("not json")))},
		{"header JSON array", replaced(0, b64([]byte(`["HS256"]`)))},
		{"payload not JSON", signHS256Raw(t, sec, `{"alg":"HS256"}`, "not json")},
		{"payload wrong types", signHS256(t, sec, nil, claims(map[string]any{"roles": 42}))},
		{"roles of the wrong type", signHS256(t, sec, nil, claims(map[string]any{"roles": []any{"user", 7}}))},
		{"user_id an object", signHS256(t, sec, nil, claims(map[string]any{"user_id": map[string]any{"id": "u"}}))},
		{"tenant_id a list", signHS256(t, sec, nil, claims(map[string]any{"tenant_id": []string{"t-1"}}))},
		{"exp as string", signHS256(t, sec, nil, claims(map[string]any{"exp": "1900003600"}))},
		{"b64 false", signHS256(t, sec, map[string]any{"b64": false}, claims(nil))},
		{"alg none with signature", signHS256Raw(t, sec, `{"alg":"none"}`, string(mustJSON(t, claims(nil))))},
		{"alg None", replaced(0, b64([]byte(`{"alg":"None"}`)))},
		{"alg missing", signHS256Raw(t, sec, `{"typ":"JWT"}`, string(mustJSON(t, claims(nil))))},
		{"alg HS256 lowercase", signHS256Raw(t, sec, `{"alg":"hs256"}`, string(mustJSON(t, claims(nil))))},
		{"role with comma", signHS256(t, sec, nil, claims(map[string]any{"roles": []string{"user,admin"}}))},
		{"role with space", signHS256(t, sec, nil, claims(map[string]any{"roles": []string{"user admin"}}))},
		{"NUL in user_id", signHS256(t, sec, nil, claims(map[string]any{"user_id": "u\x00-123"}))},
		{"DEL in tenant_id", signHS256(t, sec, nil, claims(map[string]any{"tenant_id": "t\x7f"}))},
		{"LF in session_id", signHS256(t, sec, nil, claims(map[string]any{"session_id": "s\nX-User-Id: x"}))},
		{"invalid UTF-8 in username", signHS256Raw(t, sec, `{"alg":"HS256"}`,
			`{"user_id":"u-123","jti":"j","iat":1900000000,"exp":1900003600,"username":"a\xff"}`)},
		{"over-long username", signHS256(t, sec, nil, claims(map[string]any{"username": strings.Repeat("a", 10000)}))},
		{"signature of another token", replaced(2, segments(t, fixture(t, "hs384_valid"))[2])},
		{"payload of another token", replaced(1, segments(t, fixture(t, "user2"))[1])},
	}
	for i := range 3 {
		for _, bad := range []struct{ name, s string }{
			{"plus", "+" + seg[i][1:]},
			{"slash", "/" + seg[i][1:]},
			{"padding", seg[i] + "="},
			{"space", seg[i][:4] + " " + seg[i][4:]},
			{"bang", seg[i][:len(seg[i])-1] + "!"},
			{"percent-encoded", seg[i][:4] + "%41" + seg[i][4:]},
			{"non-ASCII", seg[i][:4] + "é" + seg[i][4:]},
			{"std alphabet", strings.NewReplacer("-", "+", "_", "/").Replace(seg[i]) + "+"},
		} {
			tests = append(tests, struct {
				name  string
				token string
			}{fmt.Sprintf("segment %d base64 %s", i+1, bad.name), replaced(i, bad.s)})
		}
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := v.Verify(context.Background(), tt.token)
			if err == nil || !errors.Is(err, auth.ErrTokenInvalid) {
				t.Fatalf("Verify = %+v, %v; want ErrTokenInvalid", id, err)
			}
		})
	}
}

// signHS256Raw signs exactly the given header and payload JSON texts.
func signHS256Raw(t testing.TB, key []byte, header, payload string) string {
	t.Helper()
	in := b64([]byte(header)) + "." + b64([]byte(payload))
	return in + "." + hs256Sig(key, in)
}

// TestVerifySizeLimit: a token over MaxTokenBytes is refused before anything parses it — its kid
// is unknown, yet the JWKS is not asked — and the limit is exact.
func TestVerifySizeLimit(t *testing.T) {
	sec := secret(t)
	exact := signHS256(t, sec, nil, claims(map[string]any{"pad": strings.Repeat("x", 1000)}))
	unknownKid := b64([]byte(`{"alg":"RS256","kid":"never-seen-kid"}`)) + "." +
		b64(mustJSON(t, claims(map[string]any{"pad": strings.Repeat("x", 10<<10)}))) + "." + b64([]byte("sig"))

	tests := []struct {
		name   string
		max    int
		token  string
		accept bool
	}{
		{"default limit, 64 KiB token", 0, unknownKid + strings.Repeat("A", 64<<10), false},
		{"default limit, 10 KiB unknown kid", 0, unknownKid, false},
		{"at the limit", len(exact), exact, true},
		{"one byte over", len(exact) - 1, exact, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, jwks, ks := newVerifier(t, func(o *auth.VerifierOptions) { o.MaxTokenBytes = tt.max })
			fetches, hits := jwks.Fetches.Load(), ks.hits.Load()
			_, err := v.Verify(context.Background(), tt.token)
			if tt.accept {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, auth.ErrTokenInvalid) {
				t.Fatalf("err = %v, want ErrTokenInvalid", err)
			}
			if jwks.Fetches.Load() != fetches || ks.hits.Load() != hits {
				t.Errorf("an over-long token made the JWKS fetch (%d→%d fetches, %d→%d hits)",
					fetches, jwks.Fetches.Load(), hits, ks.hits.Load())
			}
		})
	}
}

// TestVerifyTimeBoundaries checks exp, nbf and iat at both edges of the leeway.
func TestVerifyTimeBoundaries(t *testing.T) {
	v, _, _ := newVerifier(t, nil)
	sec := secret(t)
	now := int64(fixtureNow)
	lw := int64(leeway / time.Second)
	tests := []struct {
		name string
		over map[string]any
		want outcome
	}{
		{"exp one second inside leeway", map[string]any{"exp": now - lw + 1}, accept},
		{"exp at now minus leeway", map[string]any{"exp": now - lw}, expire},
		{"exp negative", map[string]any{"exp": -5}, refuse},
		{"exp fractional", map[string]any{"exp": float64(fixtureExp) + 0.5}, accept},
		{"nbf at now plus leeway", map[string]any{"nbf": now + lw}, accept},
		{"nbf one second beyond", map[string]any{"nbf": now + lw + 1}, refuse},
		{"iat at now plus leeway", map[string]any{"iat": now + lw}, accept},
		{"iat one second beyond", map[string]any{"iat": now + lw + 1}, refuse},
		{"iat missing", map[string]any{"iat": nil}, accept},
		{"aud present but not required", map[string]any{"aud": "someone-else"}, accept},
		{"nbf in 2286", map[string]any{"nbf": 1e10}, refuse},
		{"iat in 2286", map[string]any{"iat": 1e10}, refuse},
		{"exp in 2286", map[string]any{"exp": 1e10}, accept},
		{"exp 1e300", map[string]any{"exp": 1e300}, accept},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			token := signHS256(t, sec, nil, claims(tt.over))
			id, err := v.Verify(context.Background(), token)
			checkOutcome(t, token, id, err, tt.want)
		})
	}
}

// TestCheckHMACSecret: the configuration check refuses blank, padded, short and obviously
// low-entropy secrets, and never repeats the secret in its message.
func TestCheckHMACSecret(t *testing.T) {
	tests := []struct {
		name   string
		secret string
		ok     bool
	}{
		{"random base64", "k3J9vQ2mZx8LwP4tR7yB1nC6hD0fG5sA+uE/iO==", true},
		{"hex", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", true},
		{"the test secret", "voicegate-test-secret-0123456789abcdef", true},
		{"40 spaces", strings.Repeat(" ", 40), false},
		{"tabs and newlines", strings.Repeat("\t\n", 20), false},
		{"trailing newline", "k3J9vQ2mZx8LwP4tR7yB1nC6hD0fG5sA+uE/iO==\n", false},
		{"leading space", " k3J9vQ2mZx8LwP4tR7yB1nC6hD0fG5sA+uE/iO==", false},
		{"one letter", strings.Repeat("a", 64), false},
		{"a short word repeated", strings.Repeat("abc123", 8), false},
		{"short", "k3J9vQ2mZx8LwP4t", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := auth.CheckHMACSecret([]byte(tt.secret))
			if (err == nil) != tt.ok {
				t.Fatalf("CheckHMACSecret = %v, want ok=%v", err, tt.ok)
			}
			if err != nil && strings.TrimSpace(tt.secret) != "" && strings.Contains(err.Error(), strings.TrimSpace(tt.secret)) {
				t.Errorf("the error repeats the secret: %v", err)
			}
		})
	}
}
