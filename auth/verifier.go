package auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"voicegate/proxy"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Verification errors callers branch on. A *TokenError wraps one of them with the reason.
var (
	ErrTokenInvalid    = errors.New("token invalid")
	ErrTokenExpired    = errors.New("token expired")
	ErrKeysUnavailable = errors.New("signing keys unavailable")
)

// TokenError says why a token was refused. Its text never contains the token.
type TokenError struct {
	Kind   error  // ErrTokenInvalid, ErrTokenExpired or ErrKeysUnavailable
	Reason string // for logs and the client message
}

func (e *TokenError) Error() string { return e.Kind.Error() + ": " + e.Reason }
func (e *TokenError) Unwrap() error { return e.Kind }

func invalid(format string, args ...any) error {
	return &TokenError{Kind: ErrTokenInvalid, Reason: fmt.Sprintf(format, args...)}
}

// VerifierOptions configures a Verifier. At least one of HMACSecret and JWKS is required.
type VerifierOptions struct {
	// HMACSecret verifies HS256/384/512 tokens; at least 32 bytes.
	HMACSecret []byte
	// JWKS verifies RS/PS/ES/EdDSA tokens by their kid.
	JWKS *JWKS
	// Issuer and Audience, when set, must match the token's iss and be among its aud.
	Issuer, Audience string
	// Leeway is the clock skew allowed for exp, nbf and iat.
	Leeway time.Duration
	// MaxLifetime, if set, refuses tokens meant to live longer: exp more than this after iat,
	// or after now. Revocations are kept for MaxLifetime (plus Leeway), so no token they cover
	// may outlive them. Zero means no bound.
	MaxLifetime time.Duration
	// Claims says where the identity is in a token; zero fields mean the defaults (user_id then
	// sub, username, tenant_id, roles, and scopes, scope and permissions).
	Claims Claims
	// MaxTokenBytes bounds a token before anything parses it; zero means 8 KiB.
	MaxTokenBytes int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Verifier checks JWTs. The algorithm always comes from the key: an HMAC secret accepts only
// HS256/384/512, an RSA key only RS*/PS*, an EC key only the ES algorithm of its curve, an
// Ed25519 key only EdDSA (and a key naming its "alg" only that one). Only the compact
// serialization is accepted; a "crit" header is refused; jku, x5u, jwk and x5c headers are ignored
// and never fetched.
type Verifier struct {
	o    VerifierOptions
	hmac jwk.Key
	now  func() time.Time
}

// MinHMACSecret is the shortest HMAC secret accepted.
const MinHMACSecret = 32

// minSecretSymbols is the fewest distinct bytes an HMAC secret may be made of. Any generated
// secret (random bytes, hex, base64) has far more; 40 spaces, "aaaa…" or a word typed over and
// over have fewer, and guessing them costs an attacker nothing whatever their length.
const minSecretSymbols = 8

// CheckHMACSecret refuses HMAC secrets given as configuration that are weak in an obvious way:
// blank or padded with white space (a stray newline from a file makes every token fail; a
// secret of spaces is no secret), or what NewVerifier refuses. It never repeats the secret.
func CheckHMACSecret(secret []byte) error {
	if t := bytes.TrimSpace(secret); len(t) != len(secret) {
		if len(t) == 0 {
			return errors.New("the secret is blank")
		}
		return errors.New("the secret starts or ends with white space")
	}
	return checkSecretBytes(secret)
}

// checkSecretBytes refuses secrets shorter than MinHMACSecret bytes or made of fewer than
// minSecretSymbols distinct bytes.
func checkSecretBytes(secret []byte) error {
	if len(secret) < MinHMACSecret {
		return fmt.Errorf("the secret is %d bytes; at least %d are required", len(secret), MinHMACSecret)
	}
	var seen [256]bool
	n := 0
	for _, b := range secret {
		if !seen[b] {
			seen[b] = true
			n++
		}
	}
	if n < minSecretSymbols {
		return fmt.Errorf("the secret is made of only %d distinct characters; use a random one, such as: openssl rand -base64 48", n)
	}
	return nil
}

// NewVerifier returns a Verifier.
func NewVerifier(o VerifierOptions) (*Verifier, error) {
	o.Claims = o.Claims.withDefaults()
	v := &Verifier{o: o, now: o.Now}
	if v.now == nil {
		v.now = time.Now
	}
	if v.o.MaxTokenBytes <= 0 {
		v.o.MaxTokenBytes = 8 << 10
	}
	if o.HMACSecret == nil && o.JWKS == nil {
		return nil, errors.New("auth: an HMAC secret or a JWKS is required")
	}
	if o.HMACSecret != nil {
		if err := checkSecretBytes(o.HMACSecret); err != nil {
			return nil, fmt.Errorf("auth: HMAC secret: %w", err)
		}
		k, err := jwk.FromRaw(o.HMACSecret)
		if err != nil {
			return nil, fmt.Errorf("auth: HMAC key: %w", err)
		}
		v.hmac = k
	}
	return v, nil
}

// header is the part of the JOSE header the gateway looks at. Everything else, jku and x5u
// included, is ignored.
type header struct {
	Alg  string          `json:"alg"`
	Kid  string          `json:"kid"`
	Crit json.RawMessage `json:"crit"`
	B64  json.RawMessage `json:"b64"`
}

// maxKidLen bounds a key ID taken from a token.
const maxKidLen = 128

// Verify checks token and returns the identity it proves.
func (v *Verifier) Verify(ctx context.Context, token string) (*Identity, error) {
	if len(token) > v.o.MaxTokenBytes {
		return nil, invalid("token longer than %d bytes", v.o.MaxTokenBytes)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, invalid("not a compact JWS")
	}
	for i, p := range parts {
		if p == "" {
			return nil, invalid("empty token segment %d", i+1) // also "alg":"none" tokens
		}
		if !isBase64URL(p) {
			return nil, invalid("token segment %d is not base64url", i+1)
		}
	}
	rawHeader, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return nil, invalid("header is not base64url")
	}
	var h header
	if err := json.Unmarshal(rawHeader, &h); err != nil {
		return nil, invalid("header is not a JSON object")
	}
	if h.Crit != nil {
		return nil, invalid("crit header not supported")
	}
	if h.B64 != nil {
		return nil, invalid("b64 header not supported")
	}
	var gen uint64
	if v.o.JWKS != nil && !isHMAC(h.Alg) {
		gen = v.o.JWKS.generation() // before the key look-up: see JWKS.generation
	}
	key, alg, err := v.key(ctx, h)
	if err != nil {
		return nil, err
	}
	payload, err := jws.Verify([]byte(token), jws.WithKey(alg, key), jws.WithCompact())
	if err != nil {
		return nil, invalid("signature does not verify")
	}
	id, err := v.claims(payload, token)
	if err != nil {
		return nil, err
	}
	id.keyGen = gen
	return id, nil
}

func isHMAC(alg string) bool {
	switch jwa.SignatureAlgorithm(alg) {
	case jwa.HS256, jwa.HS384, jwa.HS512:
		return true
	}
	return false
}

// current reports whether id, verified earlier, was verified under the key set in force: a
// JWKS refresh that changed the set makes every JWKS token verify again before it is trusted,
// so a key dropped from the set (compromised, rotated out) stops working for cached tokens too.
func (v *Verifier) current(id *Identity) bool {
	return id.keyGen == 0 || v.o.JWKS == nil || id.keyGen == v.o.JWKS.generation()
}

// key picks the verification key for the header and checks that the key allows its alg.
func (v *Verifier) key(ctx context.Context, h header) (jwk.Key, jwa.SignatureAlgorithm, error) {
	alg := jwa.SignatureAlgorithm(h.Alg)
	switch alg {
	case jwa.HS256, jwa.HS384, jwa.HS512:
		if v.hmac == nil {
			return nil, "", invalid("%s tokens are not accepted", alg)
		}
		return v.hmac, alg, nil
	case jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512,
		jwa.ES256, jwa.ES384, jwa.ES512, jwa.EdDSA:
	default:
		return nil, "", invalid("algorithm %q not accepted", clip(h.Alg))
	}
	if v.o.JWKS == nil {
		return nil, "", invalid("%s tokens are not accepted", alg)
	}
	if h.Kid == "" {
		return nil, "", invalid("kid missing")
	}
	if len(h.Kid) > maxKidLen || !printableASCII(h.Kid) {
		return nil, "", invalid("kid malformed")
	}
	key, err := v.o.JWKS.Key(ctx, h.Kid)
	if err != nil {
		return nil, "", err
	}
	if !keyAllows(key, alg) {
		return nil, "", invalid("the key does not allow %s", alg)
	}
	return key, alg, nil
}

// keyAllows reports whether key may verify alg.
func keyAllows(key jwk.Key, alg jwa.SignatureAlgorithm) bool {
	if ka := key.Algorithm(); ka != nil && ka.String() != "" {
		return ka.String() == alg.String()
	}
	switch k := key.(type) {
	case jwk.RSAPublicKey:
		switch alg {
		case jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512:
			return true
		}
	case jwk.ECDSAPublicKey:
		switch k.Crv() {
		case jwa.P256:
			return alg == jwa.ES256
		case jwa.P384:
			return alg == jwa.ES384
		case jwa.P521:
			return alg == jwa.ES512
		}
	case jwk.OKPPublicKey:
		return k.Crv() == jwa.Ed25519 && alg == jwa.EdDSA
	}
	return false
}

// numericDate is a JWT NumericDate: seconds since the epoch, integer or not.
type numericDate float64

// maxNumericDate (year 9999) bounds dates: beyond it a float64 of seconds stops converting
// cleanly, and no token needs it.
const maxNumericDate = 253402300799

func (d numericDate) time() time.Time {
	f := min(float64(d), maxNumericDate)
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9))
}

// audience is a JWT "aud": one string or an array of them.
type audience []string

func (a *audience) UnmarshalJSON(b []byte) error {
	if bytes.HasPrefix(bytes.TrimSpace(b), []byte(`"`)) {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*a = audience{s}
		return nil
	}
	var l []string
	if err := json.Unmarshal(b, &l); err != nil {
		return err
	}
	*a = l
	return nil
}

// tokenClaims are the registered claims, whose names no identity provider changes. The
// identity claims are found through Claims paths instead.
type tokenClaims struct {
	JTI       string       `json:"jti"`
	SessionID string       `json:"session_id"`
	Exp       *numericDate `json:"exp"`
	Nbf       *numericDate `json:"nbf"`
	Iat       *numericDate `json:"iat"`
	Iss       string       `json:"iss"`
	Aud       audience     `json:"aud"`
}

// maxClaimLen bounds identity claims, which travel on as header values.
const maxClaimLen = 256

func (v *Verifier) claims(payload []byte, token string) (*Identity, error) {
	var c tokenClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, invalid("claims are not a JSON object of the expected types")
	}
	var all map[string]any
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber() // a numeric user ID keeps its digits
	if err := dec.Decode(&all); err != nil {
		return nil, invalid("claims are not a JSON object")
	}
	now := v.now()
	leeway := v.o.Leeway
	at := func(d numericDate) time.Time { return d.time() }
	switch {
	case c.Exp == nil:
		return nil, invalid("exp missing")
	case *c.Exp <= 0:
		return nil, invalid("exp not positive")
	case !now.Before(at(*c.Exp).Add(leeway)):
		return nil, &TokenError{Kind: ErrTokenExpired, Reason: "token expired"}
	case c.Nbf != nil && now.Add(leeway).Before(at(*c.Nbf)):
		return nil, invalid("token not valid yet (nbf)")
	case c.Iat != nil && now.Add(leeway).Before(at(*c.Iat)):
		return nil, invalid("token issued in the future (iat)")
	case v.o.MaxLifetime > 0 && at(*c.Exp).After(now.Add(v.o.MaxLifetime+leeway)):
		return nil, invalid("token lives longer than the gateway allows (exp too far ahead)")
	case v.o.MaxLifetime > 0 && c.Iat != nil && at(*c.Exp).Sub(at(*c.Iat)) > v.o.MaxLifetime+leeway:
		return nil, invalid("token lives longer than the gateway allows (exp - iat)")
	case v.o.Issuer != "" && c.Iss != v.o.Issuer:
		return nil, invalid("wrong issuer")
	case v.o.Audience != "" && !contains(c.Aud, v.o.Audience):
		return nil, invalid("wrong audience")
	}
	id := &Identity{SessionID: c.SessionID, TokenID: c.JTI, ExpiresAt: at(*c.Exp)}
	if id.TokenID == "" {
		// Auth0 and Azure AD access tokens carry no jti. The token's own hash names it instead,
		// so it can still be revoked on its own (logout).
		sum := sha256.Sum256([]byte(token))
		id.TokenID = "sha256:" + base64.RawURLEncoding.EncodeToString(sum[:16])
	}
	m := v.o.Claims
	var err error
	if id.UserID, err = first(all, m.UserID); err != nil {
		return nil, err
	}
	if id.UserID == "" {
		return nil, invalid("no user ID claim (%s)", joinPaths(m.UserID))
	}
	if id.Username, err = first(all, m.Username); err != nil {
		return nil, err
	}
	if id.TenantID, err = first(all, m.TenantID); err != nil {
		return nil, err
	}
	if id.Roles, err = list(all, m.Roles); err != nil {
		return nil, err
	}
	if id.Permissions, err = list(all, m.Scopes); err != nil {
		return nil, err
	}
	if c.Iat != nil {
		id.IssuedAt = at(*c.Iat)
	}
	for _, s := range []string{id.UserID, id.Username, id.TenantID, id.SessionID, id.TokenID} {
		if !proxy.ValidLabel(s, maxClaimLen) {
			return nil, invalid("identity claim too long or not printable")
		}
	}
	for _, r := range id.Roles {
		if r == "" || len(r) > maxClaimLen || !printableASCII(r) || strings.ContainsRune(r, ',') {
			return nil, invalid("malformed role")
		}
	}
	id.finish()
	return id, nil
}

func joinPaths(ps []ClaimPath) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

// clip shortens header values echoed in messages.
func clip(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func isBase64URL(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
