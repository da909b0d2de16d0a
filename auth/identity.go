// Package auth owns who a caller is: JWT verification on lestrrat-go/jwx (HMAC secrets and JWKS
// key sets, the algorithm always decided by the key; the identity read from claim paths that fit
// real identity providers, see ClaimPath), token revocation shared through Redis, an
// optional user-status check, the verified identity in the request context and in the headers
// upstreams trust, and the token endpoints.
package auth

import (
	"context"
	"net/http"
	"strings"
	"time"

	"voicegate/proxy"
)

// Identity is a verified caller. Values are shared between requests through the token cache;
// treat them as read-only.
type Identity struct {
	UserID      string
	Username    string
	TenantID    string
	SessionID   string
	TokenID     string   // the token's jti; for a token without one, "sha256:" and its hash
	Roles       []string // from the roles claim paths (VerifierOptions.Claims)
	Permissions []string // direct grants from the scopes claim paths
	IssuedAt    time.Time
	ExpiresAt   time.Time

	rolesHeader string // Roles joined for X-User-Roles, computed once
	keyGen      uint64 // the JWKS generation the token was verified under; 0: an HMAC token
}

type identityKey struct{}

// WithIdentity returns ctx carrying id.
func WithIdentity(ctx context.Context, id *Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// FromContext returns the request's verified identity, or nil.
func FromContext(ctx context.Context) *Identity {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	return id
}

// Owner names the request's verified user and tenant ("" without an identity): who owns what
// the request starts, a chat stream or a voice session.
func Owner(r *http.Request) (userID, tenantID string) {
	if id := FromContext(r.Context()); id != nil {
		return id.UserID, id.TenantID
	}
	return "", ""
}

// Token names the token of the request's verified identity: its ID and when it was issued.
func Token(r *http.Request) (tokenID string, issuedAt time.Time) {
	if id := FromContext(r.Context()); id != nil {
		return id.TokenID, id.IssuedAt
	}
	return "", time.Time{}
}

// SetHeaders replaces every identity header in h (whatever the client sent, in any spelling)
// with the values of id; with a nil id it only removes them. The headers and how they are set
// are proxy's (proxy.SetIdentity): this only says what id's values are.
func SetHeaders(h http.Header, id *Identity) {
	if id == nil {
		proxy.SetIdentity(h, nil)
		return
	}
	roles := id.rolesHeader
	if roles == "" {
		roles = strings.Join(id.Roles, ",") // an Identity not made by Verify
	}
	proxy.SetIdentity(h, &proxy.Caller{UserID: id.UserID, Username: id.Username, TenantID: id.TenantID,
		Roles: roles, SessionID: id.SessionID})
}

// UpstreamHeaders is a hook for proxies: it sets the identity headers of the request's caller.
func UpstreamHeaders(in *http.Request, out http.Header) {
	SetHeaders(out, FromContext(in.Context()))
}

func (id *Identity) finish() {
	id.rolesHeader = strings.Join(id.Roles, ",")
}
