package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
)

type openAIStyleKey struct{}

// OpenAIErrors makes WriteError answer the requests it wraps in OpenAI's error document,
// {"error":{"message","type","param","code"}}, which OpenAI's SDKs read: the routes under /v1/.
// Status codes, headers (Retry-After, WWW-Authenticate) and what is logged stay the same:
// whatever refuses a request (authentication, the policy, a body limit, the handler) is told
// nothing of the dialect.
func OpenAIErrors() Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), openAIStyleKey{}, true)))
		})
	}
}

func openAIStyle(ctx context.Context) bool {
	v, _ := ctx.Value(openAIStyleKey{}).(bool)
	return v
}

// OpenAIError is the "error" member of OpenAI's error document.
type OpenAIError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    string  `json:"code"`
	// RequestID is voicegate's, for support: SDKs ignore members they do not know.
	RequestID string `json:"request_id,omitempty"`
}

// openAIErrorBody is the error document OpenAI's SDKs read: the type is chosen by status
// as OpenAI's API chooses it, the code is voicegate's in lower case (or the one a handler
// chose in OpenAI's words, such as unsupported_parameter), and param names the first invalid
// field.
func openAIErrorBody(status int, code, msg, requestID string, details any) map[string]OpenAIError {
	e := OpenAIError{Message: msg, Type: OpenAIErrorType(status), Code: strings.ToLower(code), RequestID: requestID}
	if details != nil {
		var fields []struct {
			Field string `json:"field"`
		}
		if b, err := json.Marshal(details); err == nil && json.Unmarshal(b, &fields) == nil && len(fields) > 0 && fields[0].Field != "" {
			e.Param = &fields[0].Field
		}
	}
	return map[string]OpenAIError{"error": e}
}

// OpenAIErrorType is the "type" OpenAI's API gives an error of status.
func OpenAIErrorType(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return "authentication_error"
	case status == http.StatusForbidden:
		return "permission_error"
	case status == http.StatusNotFound:
		return "not_found_error"
	case status == http.StatusTooManyRequests:
		return "rate_limit_error"
	case status >= 500:
		return "server_error"
	}
	return "invalid_request_error"
}
