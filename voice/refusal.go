package voice

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"

	"voicegate/proxy"
)

// RefusalCode is the close code that tells a browser its upgrade was refused with an HTTP
// status: 4000 + the status (4400, 4401, 4403, 4429, 4502, ...). A refusal after the upgrade
// shares the scheme: 4401 is also a token that expired or was revoked during the session.
func RefusalCode(status int) websocket.StatusCode {
	return websocket.StatusCode(4000 + status)
}

// refusalTimeout bounds each read and write of an in-band refusal, close handshake included.
const refusalTimeout = 2 * time.Second

// maxRefusalBody bounds what is kept of a refused request's JSON error.
const maxRefusalBody = 16 << 10

// RefuseInBand wraps the voice route — authentication, the policy and the handler — so that a
// browser whose upgrade is refused can learn why. Browser JavaScript never sees the status or
// the body of a refused WebSocket handshake, only close 1006. So when a browser-style upgrade
// (one with an Origin and without an Authorization header, which browsers cannot send on a
// WebSocket, offering voice-protocol-v2) is refused with an HTTP error, the
// upgrade is accepted instead, the client gets one error message carrying the refusal
// ({"type":"error","code","message","status","request_id","retry_after","details"}) and the
// socket is closed with RefusalCode(status). Nothing else happens on that socket: no session,
// no dial, nothing read from the client but its close frame; so accepting it even from an
// origin that is not allowed grants that origin nothing but the reason. And that reason is only
// ever the origin's: an upgrade from an origin allow refuses is answered 403 before anything
// else runs, so a page elsewhere cannot use the in-band answer to learn whether a token is
// valid, or anything else the chain would have said.
//
// Every other request (non-browser clients send no Origin, or send their token in
// Authorization) keeps the HTTP status and JSON error. The access log and the metrics count
// the refusal's status either way, not the 101 that carried it.
func RefuseInBand(allow func(origin string) bool, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !browserUpgrade(r) {
			next.ServeHTTP(w, r)
			return
		}
		rw := &refusalWriter{ResponseWriter: w}
		if originRefused(r, allow) {
			proxy.Errorf(rw, r, http.StatusForbidden, proxy.CodePermission, msgOriginRefused)
		} else {
			next.ServeHTTP(rw, r)
		}
		if rw.status != 0 {
			refuse(w, r, rw.status, rw.body.Bytes())
		}
	})
}

// browserUpgrade reports whether r is a WebSocket upgrade as a browser's voice client makes
// it: with an Origin, without Authorization, offering the voice subprotocol.
func browserUpgrade(r *http.Request) bool {
	if !isUpgrade(r) || r.Header.Get("Origin") == "" || r.Header.Get("Authorization") != "" {
		return false
	}
	for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			if strings.TrimSpace(p) == Subprotocol {
				return true
			}
		}
	}
	return false
}

// refusalWriter holds back an error response (status 400 and above) instead of writing it;
// anything else, the 101 included, passes through.
type refusalWriter struct {
	http.ResponseWriter
	status int // the held-back error's status; 0 while none
	passed bool
	body   bytes.Buffer
}

func (w *refusalWriter) WriteHeader(code int) {
	if w.status != 0 || w.passed {
		return
	}
	if code >= http.StatusBadRequest {
		w.status = code
		return
	}
	if code >= http.StatusOK || code == http.StatusSwitchingProtocols {
		w.passed = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *refusalWriter) Write(b []byte) (int, error) {
	if w.status != 0 {
		if room := maxRefusalBody - w.body.Len(); room > 0 {
			w.body.Write(b[:min(len(b), room)])
		}
		return len(b), nil
	}
	w.passed = true
	return w.ResponseWriter.Write(b)
}

// Flush passes through only what is not held back.
func (w *refusalWriter) Flush() {
	if w.status == 0 {
		_ = http.NewResponseController(w.ResponseWriter).Flush()
	}
}

// Unwrap lets the handler hijack the connection for a session it accepts.
func (w *refusalWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// refusal is the error message of an in-band refusal.
type refusal struct {
	Type        string          `json:"type"`
	Error       string          `json:"error"` // the origin's field; message says the same
	Code        string          `json:"code"`
	Message     string          `json:"message"`
	Status      int             `json:"status"`
	RequestID   string          `json:"request_id,omitempty"`
	RetryAfter  int             `json:"retry_after,omitempty"`
	Details     json.RawMessage `json:"details,omitempty"`
	Timestamp   int64           `json:"timestamp"` // Unix seconds
	TimestampMS int64           `json:"timestamp_ms"`
}

// refuse accepts the upgrade only to send the refusal held back from the handler chain, then
// closes with RefusalCode(status).
func refuse(w http.ResponseWriter, r *http.Request, status int, body []byte) {
	var doc struct {
		Error     string          `json:"error"`
		Code      string          `json:"code"`
		RequestID string          `json:"request_id"`
		Details   json.RawMessage `json:"details"`
	}
	_ = json.Unmarshal(body, &doc) // every refusal on this route is proxy.WriteError's JSON
	if doc.Code == "" {
		doc.Code = "HTTP_" + strconv.Itoa(status)
	}
	if doc.Error == "" {
		doc.Error = http.StatusText(status)
	}
	h := w.Header()
	retry, _ := strconv.Atoi(h.Get("Retry-After"))
	for _, k := range []string{"Content-Type", "Content-Length", "X-Content-Type-Options", "Retry-After", "WWW-Authenticate"} {
		h.Del(k) // the error's headers; the 101 is not that response
	}
	hj := &hijacker{ResponseWriter: w, read: refusalTimeout, write: refusalTimeout}
	c, err := websocket.Accept(hj, r, &websocket.AcceptOptions{
		Subprotocols: []string{Subprotocol},
		// The origin may be one the gateway refuses: that is what it is being told (see
		// RefuseInBand), and all it is told.
		InsecureSkipVerify: true,
		CompressionMode:    websocket.CompressionDisabled,
	})
	if err != nil {
		return // Accept answered the request
	}
	defer c.CloseNow()
	now := time.Now()
	msg, _ := json.Marshal(refusal{Type: TypeError, Error: doc.Error, Code: doc.Code, Message: doc.Error, Status: status,
		RequestID: doc.RequestID, RetryAfter: retry, Details: doc.Details, Timestamp: now.Unix(), TimestampMS: now.UnixMilli()})
	if info := proxy.InfoFrom(r.Context()); info != nil {
		info.Status = status // for the access log and the metrics: a refusal, not a session
	}
	ctx, cancel := context.WithTimeout(r.Context(), refusalTimeout)
	defer cancel()
	if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
		return
	}
	_ = c.Close(RefusalCode(status), clip(doc.Code))
}
