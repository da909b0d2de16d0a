package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// Machine-readable error codes, as listed in DESIGN.md. Clients branch on these, so they never
// change meaning.
const (
	CodeInvalidJSON      = "INVALID_JSON"
	CodeValidation       = "VALIDATION_ERROR"
	CodeTokenMissing     = "TOKEN_MISSING"
	CodeTokenInvalid     = "TOKEN_INVALID"
	CodeTokenExpired     = "TOKEN_EXPIRED"
	CodeTokenRevoked     = "TOKEN_REVOKED"
	CodeUserDisabled     = "USER_DISABLED"
	CodeAuthService      = "AUTH_SERVICE_ERROR"
	CodeAuthRequired     = "AUTH_REQUIRED"
	CodePermission       = "PERMISSION_DENIED"
	CodeRateLimited      = "RATE_LIMITED"
	CodeAlgoService      = "ALGO_SERVICE_ERROR"
	CodeUpstream         = "UPSTREAM_ERROR"
	CodeUpstreamTimeout  = "UPSTREAM_TIMEOUT"
	CodePayloadTooLarge  = "PAYLOAD_TOO_LARGE"
	CodeUnsupportedMedia = "UNSUPPORTED_MEDIA_TYPE"
	CodeNotFound         = "NOT_FOUND"
	CodeSessionNotFound  = "SESSION_NOT_FOUND" // a voice resume token that names no resumable session of the caller
	CodeMethodNotAllowed = "METHOD_NOT_ALLOWED"
	CodeConflict         = "CONFLICT"
	CodeUnavailable      = "SERVICE_UNAVAILABLE"
	CodeInternal         = "INTERNAL_ERROR"
)

// StatusClientClosed is logged (never really sent) when the client went away before the answer,
// following nginx's convention.
const StatusClientClosed = 499

// Error is an HTTP error with a message safe for clients and a cause kept for the log. The zero
// Status means 500.
type Error struct {
	Status  int    // HTTP status; 0 means 500
	Code    string // one of the Code constants; empty means INTERNAL_ERROR
	Message string // a human sentence for the client; empty means the status text
	// Details, optional, is for the client: always a JSON array of objects, each with a "reason"
	// and what it is about ("field" for a request field, "permission" for a missing one), so
	// that clients parse one shape.
	Details any
	// RetryAfter, when positive, is sent as the Retry-After header in seconds.
	RetryAfter int
	// Header holds extra response headers, such as WWW-Authenticate.
	Header http.Header
	// Cause is for the log only and never reaches the client.
	Cause error
}

func (e *Error) Error() string {
	msg := e.Code + ": " + e.Message
	if e.Cause != nil {
		msg += ": " + e.Cause.Error()
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Cause }

type errorBody struct {
	Error     string `json:"error"`
	Code      string `json:"code"`
	RequestID string `json:"request_id,omitempty"`
	Details   any    `json:"details,omitempty"`
}

// WriteError writes e as the JSON error document of DESIGN.md and records the cause for the
// access log line, so a failure is logged once, at the edge.
func WriteError(w http.ResponseWriter, r *http.Request, e *Error) {
	status := e.Status
	if status == 0 {
		status = http.StatusInternalServerError
	}
	code := e.Code
	if code == "" {
		code = CodeInternal
	}
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(status)
	}
	info := InfoFrom(r.Context())
	if info != nil {
		info.ErrCode = code
		info.ErrCause = e.Cause
	}
	if status == StatusClientClosed {
		// Nobody is listening; the status is only for the access log.
		w.WriteHeader(status)
		return
	}
	h := w.Header()
	for k, v := range e.Header {
		h[k] = v
	}
	if e.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Del("Content-Length")
	w.WriteHeader(status)
	var requestID string
	if info != nil {
		requestID = info.RequestID
	}
	if openAIStyle(r.Context()) {
		_ = json.NewEncoder(w).Encode(openAIErrorBody(status, code, msg, requestID, e.Details))
		return
	}
	_ = json.NewEncoder(w).Encode(errorBody{Error: msg, Code: code, Details: e.Details, RequestID: requestID})
}

// FieldError names one invalid request field (or header) in a VALIDATION_ERROR's details.
type FieldError struct {
	Field  string `json:"field"`
	Reason string `json:"reason"`
}

// InvalidFields is the 400 VALIDATION_ERROR for the fields of bad (at least one): its message
// names the first, its details all of them.
func InvalidFields(bad ...FieldError) *Error {
	return &Error{Status: http.StatusBadRequest, Code: CodeValidation,
		Message: "invalid request: " + bad[0].Field + " " + bad[0].Reason, Details: bad}
}

// Errorf is shorthand for writing a client error without a separate cause.
func Errorf(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	WriteError(w, r, &Error{Status: status, Code: code, Message: msg})
}

// Describe renders err for a log line without the addresses that net and url errors carry:
// upstream host names stay out of logs as well as responses.
func Describe(err error) string {
	var ue *url.Error
	var oe *net.OpError
	var de *net.DNSError
	var se *os.SyscallError
	var he x509.HostnameError
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var cv *tls.CertificateVerificationError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &he), errors.As(err, &ua), errors.As(err, &ci), errors.As(err, &cv):
		return "tls: certificate verification failed" // the details name hosts
	case errors.As(err, &ue):
		return strings.ToLower(ue.Op) + ": " + Describe(ue.Err)
	case errors.As(err, &de):
		return "lookup failed: " + de.Err
	case errors.As(err, &oe):
		return oe.Op + ": " + Describe(oe.Err)
	case errors.As(err, &se):
		return se.Err.Error()
	}
	return err.Error()
}
