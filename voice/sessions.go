package voice

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"voicegate/proxy"
)

// NewSessionsHandler returns GET /api/v2/voice/sessions: the live sessions of every instance
// (of this one without Redis), oldest first: the caller's tenant's, or every tenant's for a
// super admin.
func NewSessionsHandler(reg *Registry, caller Caller) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		list, err := reg.List(ctx)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the session registry is unavailable", Cause: err})
			return
		}
		tenant, super := caller(r)
		mine := []Info{}
		for _, i := range list {
			if super || i.TenantID == tenant {
				mine = append(mine, i)
			}
		}
		list = mine
		proxy.WriteJSON(w, http.StatusOK, map[string]any{"sessions": list, "count": len(list)})
	})
}

// Caller says who calls an admin route: the caller's tenant, and whether the caller may act on
// every tenant (super_admin).
type Caller func(r *http.Request) (tenant string, super bool)

// NewSessionHandler returns GET /api/v2/voice/sessions/{session_id}: that session's live
// counters, wherever it runs. A session of another tenant is not found, unless the caller is a
// super admin.
func NewSessionHandler(reg *Registry, caller Caller) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		id, ok := sessionID(w, r)
		if !ok {
			return
		}
		l, ok, err := reg.Get(ctx, id)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the session registry is unavailable", Cause: err})
			return
		}
		tenant, super := caller(r)
		if !ok || !super && l.TenantID != tenant {
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "no such live voice session")
			return
		}
		proxy.WriteJSON(w, http.StatusOK, l)
	})
}

// sessionID returns the {session_id} of r's path, or refuses r (400) and reports false when it
// cannot be a session ID: one the gateway made (proxy.ValidRequestID's shape).
func sessionID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id := r.PathValue("session_id")
	if !proxy.ValidRequestID(id) {
		proxy.WriteError(w, r, proxy.InvalidFields(proxy.FieldError{Field: "session_id", Reason: proxy.RequestIDReason}))
		return "", false
	}
	return id, true
}

// NewCloseHandler returns DELETE /api/v2/voice/sessions/{session_id}: that session is closed
// wherever it runs, its client told why (an error SESSION_CLOSED, then close 1008). A session of
// another tenant is not found, unless the caller is a super admin.
func NewCloseHandler(reg *Registry, caller Caller) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		id, ok := sessionID(w, r)
		if !ok {
			return
		}
		l, ok, err := reg.Get(ctx, id)
		tenant, super := caller(r)
		if err == nil && ok && (super || l.TenantID == tenant) {
			ok, err = reg.CloseSession(ctx, id)
		} else if err == nil {
			ok = false
		}
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the session registry is unavailable", Cause: err})
			return
		}
		if !ok {
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "no such live voice session")
			return
		}
		proxy.WriteJSON(w, http.StatusOK, map[string]string{"session_id": id, "status": "closed"})
	})
}

// maxBroadcastBody bounds a broadcast's request body.
const maxBroadcastBody = 64 << 10

// NewBroadcastHandler returns POST /api/v2/voice/broadcast: body {"message": any JSON value,
// "tenant_id"?, "user_id"?}; a notice to every matching live session on every instance,
// answered with {"delivered": n}. A caller who is not a super admin reaches only the sessions
// of their own tenant, and naming another is refused (403).
func NewBroadcastHandler(reg *Registry, caller Caller) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Message  json.RawMessage `json:"message"`
			TenantID *string         `json:"tenant_id"`
			UserID   string          `json:"user_id"`
		}
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBroadcastBody))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeInvalidJSON, "the body must be a JSON object: message, tenant_id, user_id")
			return
		}
		if len(req.Message) == 0 || string(req.Message) == "null" {
			proxy.WriteError(w, r, proxy.InvalidFields(proxy.FieldError{Field: "message", Reason: "required"}))
			return
		}
		var bad []proxy.FieldError
		if req.TenantID != nil && !proxy.ValidLabel(*req.TenantID, 0) {
			bad = append(bad, proxy.FieldError{Field: "tenant_id", Reason: proxy.LabelReason(0)})
		}
		if !proxy.ValidLabel(req.UserID, 0) {
			bad = append(bad, proxy.FieldError{Field: "user_id", Reason: proxy.LabelReason(0)})
		}
		if len(bad) > 0 {
			proxy.WriteError(w, r, proxy.InvalidFields(bad...))
			return
		}
		b := Broadcast{Message: req.Message, UserID: req.UserID}
		tenant, super := caller(r)
		switch {
		case req.TenantID != nil && (super || *req.TenantID == tenant):
			b.TenantID = *req.TenantID
		case req.TenantID != nil:
			proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "this tenant is not yours")
			return
		case super:
			b.AllTenants = true
		default:
			b.TenantID = tenant
		}
		n, err := reg.Broadcast(r.Context(), b)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the broadcast did not reach every instance", Cause: err,
				Details: []map[string]any{{"delivered": n, "reason": "not every instance answered in time"}}})
			return
		}
		proxy.WriteJSON(w, http.StatusOK, map[string]int{"delivered": n})
	})
}
