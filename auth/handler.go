package auth

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"time"

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
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// OnRevoked, if set, is told of every revocation stored: a token (tokenID) or the tokens of
	// a user issued before before. It ends what runs on them (streams, voice sessions) at once,
	// on every instance; the periodic recheck of long-lived sessions is only the fallback.
	OnRevoked func(ctx context.Context, tokenID, userID string, before time.Time)
}

type revokeRequest struct {
	JTI    string `json:"jti"`
	UserID string `json:"user_id"`
}

// NewRevokeHandler returns POST /api/v2/auth/revoke. With an empty body (or {}) the caller's
// own token is revoked (logout). {"user_id": own id} revokes all of the caller's tokens. Revoking
// another "jti" or another user's tokens needs token:revoke.
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
		can := func(perm string) bool { return o.Can != nil && o.Can(r, perm) }
		ctx, cancel := context.WithTimeout(r.Context(), o.Budget)
		defer cancel()
		now := o.Now()
		var result map[string]any
		var tokenID, userID string
		switch {
		case req.UserID != "":
			if req.UserID != id.UserID && !can(PermRevoke) {
				proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "revoking another user's tokens needs "+PermRevoke)
				return
			}
			err = o.Revocations.RevokeUser(ctx, req.UserID, now)
			result = map[string]any{"revoked": "user", "user_id": req.UserID, "before": now.Unix()}
			tokenID, userID = "", req.UserID
		case req.JTI != "" && req.JTI != id.TokenID:
			if !can(PermRevoke) {
				proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "revoking another token needs "+PermRevoke)
				return
			}
			err = o.Revocations.RevokeToken(ctx, req.JTI, now.Add(o.MaxLifetime+o.Leeway))
			result = map[string]any{"revoked": "token", "jti": req.JTI}
			tokenID = req.JTI
		default:
			err = o.Revocations.RevokeToken(ctx, id.TokenID, id.ExpiresAt.Add(o.Leeway))
			result = map[string]any{"revoked": "token", "jti": id.TokenID}
			tokenID = id.TokenID
		}
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeAuthService,
				Message: "the revocation could not be stored; try again", RetryAfter: 1, Cause: err})
			return
		}
		if o.OnRevoked != nil {
			o.OnRevoked(ctx, tokenID, userID, now)
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_ = json.NewEncoder(w).Encode(result)
	})
}
