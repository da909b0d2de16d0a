package voice

import (
	"context"
	"net/http"
	"time"

	"voicegate/proxy"
)

// NewSessionsHandler returns GET /api/v2/voice/sessions: the live sessions of every instance
// (of this one without Redis), oldest first.
func NewSessionsHandler(reg *Registry) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		list, err := reg.List(ctx)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the session registry is unavailable", Cause: err})
			return
		}
		if list == nil {
			list = []Info{}
		}
		proxy.WriteJSON(w, http.StatusOK, map[string]any{"sessions": list, "count": len(list)})
	})
}
