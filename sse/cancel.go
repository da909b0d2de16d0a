package sse

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"voicegate/proxy"
)

// CancelOptions configures the cancel handler.
type CancelOptions struct {
	Registry *Registry
	// Owner names the caller of r: its user and tenant. Nil: the anonymous streams.
	Owner func(r *http.Request) (userID, tenantID string)
	// Tenant, if set, names the tenant whose streams the caller of r addresses (a super admin
	// may name another than its own); nil means the caller's.
	Tenant func(r *http.Request) string
	// Admin, if set, reports whether the caller of r may cancel other users' streams of the
	// tenant it addresses (chat:admin): only then is a user_id naming another user honoured.
	Admin func(r *http.Request) bool
	// Remote, if set, is asked to cancel a stream this instance does not run; it reports
	// ErrStreamNotFound when no instance runs it.
	Remote func(ctx context.Context, k StreamKey) error
}

// NewCancelHandler returns POST /api/v2/chat/cancel: {"request_id": "..."} ends the caller's
// stream of that request ID with stream_cancelled, on whichever instance runs it.
//
// A request ID belongs to its user, so a cancel names the caller's own stream; another user's
// stream of the same ID is not found (404, as for an ID nobody uses: a cancel tells nobody
// whether someone else uses an ID). A caller holding chat:admin in the tenant it addresses
// names another user's stream with "user_id"; anyone else naming another user is refused (403)
// whether or not that user has such a stream.
func NewCancelHandler(o CancelOptions) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RequestID string `json:"request_id"`
			UserID    string `json:"user_id"`
		}
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
		if err := dec.Decode(&req); err != nil {
			if proxy.IsTooLarge(err) {
				proxy.WriteError(w, r, proxy.TooLarge(4<<10))
				return
			}
			proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeInvalidJSON, "the request body must be a JSON object with request_id")
			return
		}
		if !proxy.ValidRequestID(req.RequestID) {
			reason := proxy.RequestIDReason
			if req.RequestID == "" {
				reason = "required"
			}
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "invalid request: request_id " + reason, Details: []FieldError{{"request_id", reason}}})
			return
		}
		if req.UserID != "" && !proxy.ValidLabel(req.UserID, proxy.MaxLabelLen) {
			reason := proxy.LabelReason(proxy.MaxLabelLen)
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "invalid request: user_id " + reason, Details: []FieldError{{"user_id", reason}}})
			return
		}
		var k StreamKey
		if o.Owner != nil {
			k.User, k.Tenant = o.Owner(r)
		}
		if o.Tenant != nil {
			k.Tenant = o.Tenant(r)
		}
		if req.UserID != "" && req.UserID != k.User {
			if o.Admin == nil || !o.Admin(r) {
				proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "user_id names another user: chat:admin is required")
				return
			}
			k.User = req.UserID
		}
		k.RequestID = req.RequestID
		err := o.Registry.Cancel(k)
		if errors.Is(err, ErrStreamNotFound) && o.Remote != nil {
			err = o.Remote(r.Context(), k)
		}
		switch {
		case errors.Is(err, ErrStreamNotFound):
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "no running stream has this request_id")
		case err != nil:
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "could not reach the other gateway instances", Cause: err})
		default:
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			_ = json.NewEncoder(w).Encode(map[string]string{"request_id": req.RequestID, "status": "cancelled"})
		}
	})
}
