package auth

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"time"

	"voicegate/policy"
	"voicegate/proxy"
)

// PermRevoke lets a caller revoke other callers' tokens.
const PermRevoke = "token:revoke"

// RevokeOptions configures the revoke endpoint.
type RevokeOptions struct {
	Revocations Revocations
	// Can reports whether the request's caller holds a permission; nil means nobody holds any.
	Can func(r *http.Request, perm string) bool
	// MaxLifetime is the longest a token lives: a jti revoked by someone other than its holder
	// (whose expiry is unknown here) stays revoked that long (plus Leeway). Zero means 24h.
	MaxLifetime time.Duration
	// Leeway is the verifier's clock skew: a token is accepted until exp plus Leeway, so its
	// revocation must be kept that long too, or a logged-out token works again after exp.
	Leeway time.Duration
	// Budget bounds the store call; zero means 500 ms.
	Budget time.Duration
	// Now is the clock of a jti's revocation when its expiry is unknown; nil means time.Now. A
	// user revocation takes the store's clock.
	Now func() time.Time
	// OnRevoked, if set, is told of every revocation stored. It ends what runs on the revoked
	// tokens (streams, voice sessions) at once, on every instance; the periodic recheck of
	// long-lived sessions is only the fallback.
	OnRevoked func(ctx context.Context, v policy.Revocation)
}

type revokeRequest struct {
	JTI      string `json:"jti"`
	UserID   string `json:"user_id"`
	TenantID string `json:"tenant_id"`
}

// NewRevokeHandler returns POST /api/v2/auth/revoke. With an empty body (or {}) the caller's
// own token is revoked (logout). {"user_id": own id} revokes all of the caller's tokens. Revoking
// another "jti" or another user's tokens needs token:revoke. A revocation belongs to a tenant:
// the caller's, or, for a super admin only, the one named by "tenant_id" — revocationTenant
// decides.
//
// A user revocation reaches the user's tokens issued in the second it is made and before
// (policy.RevocationCutoff); the answer comes once that second is over, so that a token issued
// after it (the next login) is accepted.
func NewRevokeHandler(o RevokeOptions) http.Handler {
	if o.MaxLifetime <= 0 {
		o.MaxLifetime = 24 * time.Hour
	}
	if o.Budget <= 0 {
		o.Budget = 500 * time.Millisecond
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := FromContext(r.Context())
		if id == nil {
			proxy.Errorf(w, r, http.StatusUnauthorized, proxy.CodeAuthRequired, "authentication required")
			return
		}
		var req revokeRequest
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 4<<10))
		if err != nil {
			if proxy.IsTooLarge(err) {
				proxy.WriteError(w, r, proxy.TooLarge(4<<10))
				return
			}
			proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeInvalidJSON, "could not read the request body")
			return
		}
		if len(body) > 0 {
			if err := json.Unmarshal(body, &req); err != nil {
				proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeInvalidJSON, "the body must be a JSON object with jti or user_id")
				return
			}
		}
		if req.JTI != "" && req.UserID != "" {
			proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeValidation, "give jti or user_id, not both")
			return
		}
		// What a token's identity may hold (the verifier's rule), so nothing else can be named.
		if !proxy.ValidLabel(req.JTI, maxClaimLen) {
			proxy.WriteError(w, r, proxy.InvalidFields(proxy.FieldError{Field: "jti", Reason: proxy.LabelReason(maxClaimLen)}))
			return
		}
		if !proxy.ValidLabel(req.UserID, maxClaimLen) {
			proxy.WriteError(w, r, proxy.InvalidFields(proxy.FieldError{Field: "user_id", Reason: proxy.LabelReason(maxClaimLen)}))
			return
		}
		tenant, perr := revocationTenant(id, &req)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		own := tenant == id.TenantID
		can := func(perm string) bool { return o.Can != nil && o.Can(r, perm) }
		ctx, cancel := context.WithTimeout(r.Context(), o.Budget)
		defer cancel()
		var result map[string]any
		v := policy.Revocation{TenantID: tenant}
		var left time.Duration // until the cutoff of a user revocation has begun
		switch {
		case req.UserID != "":
			if !(own && req.UserID == id.UserID) && !can(PermRevoke) {
				proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "revoking another user's tokens needs "+PermRevoke)
				return
			}
			var c Cutoff
			c, err = o.Revocations.RevokeUser(ctx, tenant, req.UserID)
			v.UserID, v.Before, left = req.UserID, c.Before.Unix(), c.Left
			result = map[string]any{"revoked": "user", "user_id": req.UserID, "tenant_id": tenant, "before": v.Before}
		case req.JTI != "" && !(own && req.JTI == id.TokenID):
			if !can(PermRevoke) {
				proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "revoking another token needs "+PermRevoke)
				return
			}
			err = o.Revocations.RevokeToken(ctx, tenant, req.JTI, o.Now().Add(o.MaxLifetime+o.Leeway))
			v.TokenID = req.JTI
			result = map[string]any{"revoked": "token", "jti": req.JTI, "tenant_id": tenant}
		default:
			err = o.Revocations.RevokeToken(ctx, tenant, id.TokenID, id.ExpiresAt.Add(o.Leeway))
			v.TokenID = id.TokenID
			result = map[string]any{"revoked": "token", "jti": id.TokenID, "tenant_id": tenant}
		}
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeAuthService,
				Message: "the revocation could not be stored; try again", RetryAfter: 1, Cause: err})
			return
		}
		if o.OnRevoked != nil {
			o.OnRevoked(ctx, v)
		}
		if left > 0 {
			// At most a second: the revocation holds already, and what runs on it has been
			// told; only the answer waits, so the caller's next token is issued after the cutoff.
			t := time.NewTimer(left)
			defer t.Stop()
			select {
			case <-t.C:
			case <-r.Context().Done():
				return // the client is gone; the revocation stands
			}
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_ = json.NewEncoder(w).Encode(result)
	})
}

// revocationTenant is the tenant a revocation request reaches: the caller's own, unless the
// body names another with "tenant_id", which only a super admin may do (policy.IsSuper, the
// role that passes every check). A tenant_id names the tenant of a jti or a user_id; alone it
// means nothing and is refused.
func revocationTenant(id *Identity, req *revokeRequest) (string, *proxy.Error) {
	if req.TenantID == "" {
		return id.TenantID, nil
	}
	if req.JTI == "" && req.UserID == "" {
		return "", &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
			Message: "tenant_id names the tenant of a jti or user_id; give one of them"}
	}
	if !proxy.ValidLabel(req.TenantID, maxClaimLen) {
		return "", proxy.InvalidFields(proxy.FieldError{Field: "tenant_id", Reason: proxy.LabelReason(maxClaimLen)})
	}
	if req.TenantID != id.TenantID && !policy.IsSuper(id.Roles) {
		return "", &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodePermission,
			Message: "revoking in another tenant needs " + policy.SuperAdmin}
	}
	return req.TenantID, nil
}
