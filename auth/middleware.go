package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"voicegate/proxy"
)

// Options configures an Authenticator.
type Options struct {
	Verifier    *Verifier
	Revocations Revocations // required
	// Users, if set, is asked whether the user is active.
	Users *UserStatus
	// Budget bounds each revocation or user-status lookup; zero means 75 ms.
	Budget time.Duration
	// FailOpen lets requests through when the revocation store cannot answer in time. Off by
	// default: an unreachable store then means 503 AUTH_SERVICE_ERROR. Every fail-open is
	// logged and counted.
	FailOpen bool
	// RefreshWindow: a token with less than this left gets X-Token-Refresh-Required; zero means
	// 15 minutes.
	RefreshWindow time.Duration
	// PublicPaths are path prefixes served without a token (Public): whoever mounts Require
	// decides, once, to skip it for them — and the policy too.
	PublicPaths []string
	// CacheSize bounds the verified-token cache; zero means 10000.
	CacheSize int
	// OnFailure, if set, is called with the error code of every refused request (metrics).
	OnFailure func(code string)
	// OnStoreError, if set, is called when the revocation store fails (metrics).
	OnStoreError func()
	// Log receives fail-open and store failures (never tokens).
	Log *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Authenticator is the authentication middleware.
type Authenticator struct {
	o     Options
	cache *tokenCache
	now   func() time.Time
}

// New returns an Authenticator.
func New(o Options) *Authenticator {
	if o.Budget <= 0 {
		o.Budget = 75 * time.Millisecond
	}
	if o.RefreshWindow <= 0 {
		o.RefreshWindow = 15 * time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	return &Authenticator{o: o, cache: newTokenCache(o.CacheSize), now: now}
}

// SubprotocolPrefix marks a token carried as a WebSocket subprotocol, for browsers, which cannot
// set headers on a WebSocket.
const SubprotocolPrefix = "bearer."

// OpenAISubprotocolPrefix marks a token carried as OpenAI's browser clients carry their key: a
// subprotocol "openai-insecure-api-key.<token>" beside "realtime" (GET /v1/realtime).
const OpenAISubprotocolPrefix = "openai-insecure-api-key."

// Require returns middleware that lets a request through only with a valid, unrevoked token, and
// puts the identity in its context. allowSubprotocol also accepts the token as a
// "bearer.<token>" WebSocket subprotocol (the voice route).
func (a *Authenticator) Require(allowSubprotocol bool) proxy.Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id, aerr := a.Authenticate(r, allowSubprotocol)
			if aerr != nil {
				if a.o.OnFailure != nil {
					a.o.OnFailure(aerr.Code)
				}
				proxy.WriteError(w, r, aerr)
				return
			}
			if left := id.ExpiresAt.Sub(a.now()); left < a.o.RefreshWindow {
				h := w.Header()
				h.Set("X-Token-Refresh-Required", "true")
				h.Set("X-Token-Expires-At", strconv.FormatInt(id.ExpiresAt.Unix(), 10))
			}
			if info := proxy.InfoFrom(r.Context()); info != nil {
				info.UserID = id.UserID // for the access log
			}
			next.ServeHTTP(w, r.WithContext(WithIdentity(r.Context(), id)))
		})
	}
}

// Public reports whether path is served without a token (Options.PublicPaths).
func (a *Authenticator) Public(path string) bool {
	for _, p := range a.o.PublicPaths {
		if path == p || (strings.HasSuffix(p, "/") && strings.HasPrefix(path, p)) {
			return true
		}
	}
	return false
}

// Authenticate finds, verifies and checks the request's token.
func (a *Authenticator) Authenticate(r *http.Request, allowSubprotocol bool) (*Identity, *proxy.Error) {
	token, aerr := tokenOf(r, allowSubprotocol)
	if aerr != nil {
		return nil, aerr
	}
	now := a.now()
	// Hash from a stack buffer: converting the token to []byte would allocate on every request.
	var buf [1024]byte
	key := sha256.Sum256(append(buf[:0], token...))
	id := a.cache.get(key, now)
	if id != nil && !a.o.Verifier.current(id) {
		id = nil // its key set has changed since: verify the signature again
	}
	if id == nil {
		var err error
		id, err = a.o.Verifier.Verify(r.Context(), token)
		if err != nil {
			return nil, verifyError(err)
		}
		a.cache.put(key, id, now)
	}
	if aerr := a.Check(r.Context(), id); aerr != nil {
		return nil, aerr
	}
	return id, nil
}

// Expiry is when the token of r's verified identity stops being accepted (its exp plus the
// leeway): from then on Check refuses it as expired. It is zero when r has no identity.
// Long-lived sessions close at that time without asking Check.
func (a *Authenticator) Expiry(r *http.Request) time.Time {
	if id := FromContext(r.Context()); id != nil {
		return a.expiry(id)
	}
	return time.Time{}
}

func (a *Authenticator) expiry(id *Identity) time.Time {
	return id.ExpiresAt.Add(a.o.Verifier.o.Leeway)
}

// Check runs the checks that must be repeated for a token already verified: expiry, revocation
// and, when configured, the user's status. Long-lived sessions call it again now and then.
func (a *Authenticator) Check(ctx context.Context, id *Identity) *proxy.Error {
	if a.now().After(a.expiry(id)) {
		return unauthorized(proxy.CodeTokenExpired, "the token has expired", nil)
	}
	if nb, ok := a.o.Revocations.(interface{ NeverBlocks() bool }); !ok || !nb.NeverBlocks() || a.o.Users != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, a.o.Budget)
		defer cancel()
	}
	revoked, err := a.o.Revocations.Revoked(ctx, id)
	if err != nil {
		if a.o.OnStoreError != nil {
			a.o.OnStoreError()
		}
		if !a.o.FailOpen {
			return &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeAuthService,
				Message: "authentication is temporarily unavailable", RetryAfter: 1, Cause: err}
		}
		a.o.Log.Warn("revocation store unavailable; letting the request through (fail-open)",
			"user_id", id.UserID, "err", proxy.Describe(err))
	}
	if revoked {
		return unauthorized(proxy.CodeTokenRevoked, "the token has been revoked", nil)
	}
	if a.o.Users != nil {
		switch err := a.o.Users.Check(ctx, id.UserID); {
		case errors.Is(err, ErrUserDisabled):
			return unauthorized(proxy.CodeUserDisabled, "the user is not active", nil)
		case err != nil:
			return &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeAuthService,
				Message: "authentication is temporarily unavailable", RetryAfter: 1, Cause: err}
		}
	}
	return nil
}

// tokenOf finds the one token of a request.
func tokenOf(r *http.Request, allowSubprotocol bool) (string, *proxy.Error) {
	// A misplaced token is refused like any unusable token: 401 TOKEN_INVALID, as every TOKEN_*
	// code is, so clients branch on one status.
	if q := r.URL.RawQuery; q != "" && queryHasToken(r) {
		return "", misplaced("tokens are not accepted in the query string (it ends up in logs); use the Authorization header")
	}
	var tokens []string
	for _, v := range r.Header.Values("Authorization") {
		scheme, tok, ok := strings.Cut(strings.TrimSpace(v), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
			return "", unauthorized(proxy.CodeTokenInvalid, "the Authorization header must be \"Bearer <token>\"", nil)
		}
		tokens = append(tokens, strings.TrimSpace(tok))
	}
	if allowSubprotocol {
		for _, p := range SubprotocolTokens(r) {
			tokens = append(tokens, p)
		}
	}
	switch len(tokens) {
	case 0:
		return "", unauthorized(proxy.CodeTokenMissing, "a bearer token is required", nil)
	case 1:
		return tokens[0], nil
	}
	return "", misplaced("the request carries more than one token")
}

func misplaced(msg string) *proxy.Error { return unauthorized(proxy.CodeTokenInvalid, msg, nil) }

// SubprotocolTokens returns the tokens offered as WebSocket subprotocols: "bearer.<token>"
// (the voice protocol's browsers) or "openai-insecure-api-key.<token>" (OpenAI's). The
// WebSocket routes never select either, so a token is never echoed in the 101.
func SubprotocolTokens(r *http.Request) []string {
	var out []string
	for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			p = strings.TrimSpace(p)
			for _, prefix := range [...]string{SubprotocolPrefix, OpenAISubprotocolPrefix} {
				if t, ok := strings.CutPrefix(p, prefix); ok {
					out = append(out, t)
				}
			}
		}
	}
	return out
}

func queryHasToken(r *http.Request) bool {
	for k := range r.URL.Query() {
		switch strings.ToLower(k) {
		case "token", "access_token", "jwt", "id_token", "auth", "authorization", "bearer":
			return true
		}
	}
	return false
}

func unauthorized(code, msg string, cause error) *proxy.Error {
	return &proxy.Error{Status: http.StatusUnauthorized, Code: code, Message: msg, Cause: cause,
		Header: http.Header{"Www-Authenticate": {`Bearer error="invalid_token"`}}}
}

func verifyError(err error) *proxy.Error {
	var te *TokenError
	errors.As(err, &te)
	switch {
	case errors.Is(err, ErrTokenExpired):
		return unauthorized(proxy.CodeTokenExpired, "the token has expired", err)
	case errors.Is(err, ErrKeysUnavailable):
		return &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeAuthService,
			Message: "authentication is temporarily unavailable", RetryAfter: 5, Cause: err}
	case te != nil:
		return unauthorized(proxy.CodeTokenInvalid, "the token is invalid: "+te.Reason, err)
	}
	return unauthorized(proxy.CodeTokenInvalid, "the token is invalid", err)
}

// Revocations is the store the authenticator checks tokens against (the revoke endpoint writes
// to it).
func (a *Authenticator) Revocations() Revocations { return a.o.Revocations }
