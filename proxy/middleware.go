package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Middleware wraps a handler. Chain composes them.
type Middleware func(http.Handler) http.Handler

// Chain wraps h so that the first middleware runs outermost.
func Chain(h http.Handler, mws ...Middleware) http.Handler {
	for i := len(mws) - 1; i >= 0; i-- {
		h = mws[i](h)
	}
	return h
}

// Info is what the edge middleware learns about a request. One *Info travels in the request
// context so that inner layers (the router, auth) can fill in what outer layers (the access log)
// report after the handler returns.
type Info struct {
	RequestID string
	ClientIP  netip.Addr
	// PeerTrusted: the connection came from one of TRUSTED_PROXIES, so its X-Forwarded-*
	// headers are believed (decided once, by ClientIP; Outbound passes the chain on).
	PeerTrusted bool
	Route       string // the ServeMux pattern, set by Route once a route matched
	UserID      string // set by authentication, for the access log
	ErrCode     string // set by WriteError
	ErrCause    error  // set by WriteError; logged, never sent
	Status      int    // the response status once written; 0 before
	Bytes       int64  // response body bytes written

	// bodyErr is the first failure reading the request body from the client. It is set by
	// whichever goroutine reads the body (a Transport's, for proxied requests), so atomically.
	bodyErr atomic.Pointer[BodyError]
}

// BodyErr returns the first failure reading the request's body from the client, or nil. A
// transport that fails because of it may report something else (the request's context, which
// net/http cancels when a read deadline cuts the connection), so this is what tells a client's
// fault from an upstream's.
func (i *Info) BodyErr() *BodyError { return i.bodyErr.Load() }

type infoKey struct{}

// InfoFrom returns the request's Info, or nil outside the edge middleware.
func InfoFrom(ctx context.Context) *Info {
	info, _ := ctx.Value(infoKey{}).(*Info)
	return info
}

// RequestIDFrom returns the request ID, or "" outside the edge middleware.
func RequestIDFrom(ctx context.Context) string {
	if info := InfoFrom(ctx); info != nil {
		return info.RequestID
	}
	return ""
}

// ensureInfo returns the request's Info, attaching a new one when there is none.
func ensureInfo(r *http.Request) (*Info, *http.Request) {
	if info := InfoFrom(r.Context()); info != nil {
		return info, r
	}
	info := &Info{}
	return info, r.WithContext(context.WithValue(r.Context(), infoKey{}, info))
}

// Route records the matched ServeMux pattern for logs and metrics; wrap each registered handler
// with it. The mux sets r.Pattern only on the request it hands to the handler, which outer
// middleware never sees.
func Route(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if info := InfoFrom(r.Context()); info != nil {
			info.Route = r.Pattern
		}
		h.ServeHTTP(w, r)
	})
}

// Recover turns a panic in a handler into a 500 and a log line. http.ErrAbortHandler is let
// through: it is how a handler (or ReverseProxy) deliberately aborts a response.
func Recover(log *slog.Logger) Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			info, r := ensureInfo(r)
			w = trackStatus(w, info) // so a late panic knows the response has started
			defer func() {
				v := recover()
				if v == nil {
					return
				}
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.ErrorContext(r.Context(), "panic in handler",
					"panic", fmt.Sprint(v), "request_id", info.RequestID)
				// If the response already started there is nothing sane left to send.
				if info.Status != 0 {
					panic(http.ErrAbortHandler)
				}
				WriteError(w, r, &Error{Status: http.StatusInternalServerError, Code: CodeInternal,
					Message: "internal error"})
			}()
			next.ServeHTTP(w, r)
		})
	}
}

// NewRequestID returns a fresh random request ID.
func NewRequestID() string { return rand.Text() }

// RequestID keeps a sane incoming X-Request-ID or makes one, stores it in the request's Info
// and echoes it in the response.
func RequestID() Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			info, r := ensureInfo(r)
			id := r.Header.Get("X-Request-ID")
			if !ValidRequestID(id) {
				id = NewRequestID()
				r.Header.Set("X-Request-ID", id)
			}
			info.RequestID = id
			w.Header().Set("X-Request-ID", id)
			next.ServeHTTP(w, r)
		})
	}
}

// AccessLog writes one line per request: method, route pattern, status, bytes, duration,
// request ID, client IP and, for failures, the error code and its cause. Health probes log at
// debug level so they do not drown the rest.
func AccessLog(log *slog.Logger) Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			info, r := ensureInfo(r)
			sw := trackStatus(w, info)
			defer func() {
				status := info.Status
				if v := recover(); v != nil {
					// Log the failed request, then let Recover (outside) answer it.
					if status == 0 {
						status = http.StatusInternalServerError
					}
					defer panic(v)
				}
				if status == 0 {
					status = http.StatusOK
				}
				level := slog.LevelInfo
				switch {
				case status >= 500:
					level = slog.LevelWarn
				case r.URL.Path == "/healthz" || r.URL.Path == "/readyz" || r.URL.Path == "/metrics":
					level = slog.LevelDebug
				}
				if !log.Enabled(r.Context(), level) {
					return
				}
				route := info.Route
				if route == "" {
					route = "unmatched"
				}
				attrs := make([]slog.Attr, 0, 12)
				attrs = append(attrs,
					slog.String("method", r.Method),
					slog.String("route", route),
					// The path too: a request refused before routing (a CORS preflight) has
					// no route. Never the query, which may carry secrets.
					slog.String("path", clipLog(r.URL.EscapedPath())),
					slog.Int("status", status),
					slog.Int64("bytes", info.Bytes),
					slog.Duration("duration", time.Since(start)),
					slog.String("request_id", info.RequestID),
				)
				if info.ClientIP.IsValid() {
					attrs = append(attrs, slog.String("client_ip", info.ClientIP.String()))
				}
				if origin := r.Header.Get("Origin"); origin != "" {
					// What a refused preflight or WebSocket origin check needs to be diagnosed.
					attrs = append(attrs, slog.String("origin", clipLog(origin)))
				}
				if info.UserID != "" {
					attrs = append(attrs, slog.String("user_id", info.UserID))
				}
				if info.ErrCode != "" {
					attrs = append(attrs, slog.String("code", info.ErrCode))
				}
				if info.ErrCause != nil {
					attrs = append(attrs, slog.String("cause", Describe(info.ErrCause)))
				}
				log.LogAttrs(r.Context(), level, "request", attrs...)
			}()
			next.ServeHTTP(sw, r)
		})
	}
}

// clipLog bounds client-sent text in a log line.
func clipLog(s string) string {
	if len(s) > 256 {
		return s[:256] + "…"
	}
	return s
}

// trackStatus returns w wrapped so that it records the response's status and size in info, or w
// itself if it already does (Recover and AccessLog share one wrapper).
func trackStatus(w http.ResponseWriter, info *Info) http.ResponseWriter {
	if sw, ok := w.(*statusWriter); ok && sw.info == info {
		return sw
	}
	return &statusWriter{ResponseWriter: w, info: info}
}

// statusWriter records status and size for the access log. It passes Flush and Unwrap through
// so that streaming and the WebSocket hijack keep working behind it.
type statusWriter struct {
	http.ResponseWriter
	info *Info
}

func (w *statusWriter) WriteHeader(code int) {
	// 1xx answers are interim (except 101, which ends HTTP on the connection).
	if w.info.Status == 0 || (w.info.Status < 200 && w.info.Status != http.StatusSwitchingProtocols) {
		w.info.Status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.info.Status == 0 {
		w.info.Status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.info.Bytes += int64(n)
	return n, err
}

func (w *statusWriter) Flush() {
	if w.info.Status == 0 {
		w.info.Status = http.StatusOK
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack is implemented directly (not only through Unwrap) because some callers still assert
// http.Hijacker.
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// Prefixes is a set of CIDRs.
type Prefixes []netip.Prefix

// Contains reports whether addr is inside one of the prefixes.
func (ps Prefixes) Contains(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, p := range ps {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// ParsePrefixes parses a comma-separated list of CIDRs or bare addresses.
func ParsePrefixes(s string) (Prefixes, error) {
	var ps Prefixes
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("%q is not a CIDR or address", f)
			}
			ps = append(ps, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR or address", f)
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, fmt.Errorf("%q is not a CIDR or address usable here: an IPv4-mapped range needs at least /96", f)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		ps = append(ps, p.Masked())
	}
	return ps, nil
}

func remoteAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// ClientIP works out the client address. X-Forwarded-For is believed only when the connection
// comes from a trusted proxy, and then only up to the first hop that is not itself trusted
// (reading right to left), so a client cannot claim an address by sending the header.
func ClientIP(trusted Prefixes) Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			info, r := ensureInfo(r)
			info.ClientIP = clientIP(r, trusted)
			info.PeerTrusted = trusted.Contains(remoteAddr(r))
			next.ServeHTTP(w, r)
		})
	}
}

func clientIP(r *http.Request, trusted Prefixes) netip.Addr {
	peer := remoteAddr(r)
	if !peer.IsValid() || !trusted.Contains(peer) {
		return peer
	}
	ip := peer
	hops := r.Header.Values("X-Forwarded-For")
	for i := len(hops) - 1; i >= 0; i-- {
		parts := strings.Split(hops[i], ",")
		for j := len(parts) - 1; j >= 0; j-- {
			a, err := netip.ParseAddr(strings.TrimSpace(parts[j]))
			if err != nil {
				return ip // a malformed hop ends what can be believed
			}
			ip = a.Unmap()
			if !trusted.Contains(ip) {
				return ip
			}
		}
	}
	return ip
}

// CORSOptions configures CORS.
type CORSOptions struct {
	// Origins are the allowed origins, such as "https://app.example.com". Empty allows none;
	// "*" allows any origin (credentials are then never allowed).
	Origins []string
	// MaxAge is how long a browser may cache a preflight answer; zero means 10 minutes.
	MaxAge time.Duration
}

// AllowOrigin reports whether origin may call us; it is also the WebSocket Origin check.
func (o CORSOptions) AllowOrigin(origin string) bool {
	for _, a := range o.Origins {
		if a == "*" || strings.EqualFold(a, origin) {
			return true
		}
	}
	return false
}

// CORS answers preflight requests and adds CORS headers for allowed origins. A disallowed
// origin simply gets no CORS headers (the browser then blocks it); a disallowed preflight gets
// 403 so the failure is visible.
func CORS(o CORSOptions) Middleware {
	maxAge := o.MaxAge
	if maxAge == 0 {
		maxAge = 10 * time.Minute
	}
	maxAgeStr := strconv.Itoa(int(maxAge / time.Second))
	wildcard := false
	for _, a := range o.Origins {
		wildcard = wildcard || a == "*"
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			origin := r.Header.Get("Origin")
			if origin == "" {
				next.ServeHTTP(w, r)
				return
			}
			h := w.Header()
			h.Add("Vary", "Origin")
			preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
			if !o.AllowOrigin(origin) {
				if preflight {
					WriteError(w, r, &Error{Status: http.StatusForbidden, Code: CodePermission,
						Message: "origin not allowed", Cause: errors.New("origin not in CORS_ORIGINS")})
					return
				}
				next.ServeHTTP(w, r)
				return
			}
			if wildcard {
				h.Set("Access-Control-Allow-Origin", "*")
			} else {
				h.Set("Access-Control-Allow-Origin", origin)
				h.Set("Access-Control-Allow-Credentials", "true")
			}
			if !preflight {
				h.Set("Access-Control-Expose-Headers", "X-Request-ID, Retry-After, X-Token-Refresh-Required, X-Token-Expires-At, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset")
				next.ServeHTTP(w, r)
				return
			}
			h.Add("Vary", "Access-Control-Request-Method")
			h.Add("Vary", "Access-Control-Request-Headers")
			h.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
			if reqHeaders := r.Header.Get("Access-Control-Request-Headers"); reqHeaders != "" {
				h.Set("Access-Control-Allow-Headers", reqHeaders)
			}
			h.Set("Access-Control-Max-Age", maxAgeStr)
			w.WriteHeader(http.StatusNoContent)
		})
	}
}

// BodyLimit refuses bodies over limit bytes with 413: at once when Content-Length says so,
// otherwise when the reader crosses the limit (the handler or proxy then maps
// *http.MaxBytesError to 413).
func BodyLimit(limit int64) Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ContentLength > limit {
				WriteError(w, r, TooLarge(limit))
				return
			}
			if r.Body != nil && r.Body != http.NoBody {
				r.Body = http.MaxBytesReader(w, r.Body, limit)
			}
			next.ServeHTTP(w, r)
		})
	}
}

// TooLarge is the 413 error for a body over limit bytes.
func TooLarge(limit int64) *Error {
	return &Error{Status: http.StatusRequestEntityTooLarge, Code: CodePayloadTooLarge,
		Message: fmt.Sprintf("request body is larger than %d bytes", limit)}
}

// IsTooLarge reports whether err comes from reading past a BodyLimit.
func IsTooLarge(err error) bool {
	var mbe *http.MaxBytesError
	return errors.As(err, &mbe)
}

// CanonicalPath refuses request paths that could mean one thing to the router and another to an
// upstream: encoded slashes, backslashes, dots or NULs, ';' parameters, and paths that are not
// clean (//, /./, /../). Such paths have no legitimate use against this API, and refusing them
// here means a protected route can never be reached under a disguise.
func CanonicalPath() Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !canonical(r) {
				Errorf(w, r, http.StatusBadRequest, CodeValidation, "the request path is not in canonical form")
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

func canonical(r *http.Request) bool {
	p := r.URL.Path
	if p == "*" && r.Method == http.MethodOptions {
		return true
	}
	if p == "" || p[0] != '/' || strings.ContainsAny(p, ";\\\x00") {
		return false
	}
	if raw := r.URL.RawPath; raw != "" {
		lower := strings.ToLower(raw)
		for _, bad := range []string{"%2f", "%5c", "%2e", "%00", "%3b"} {
			if strings.Contains(lower, bad) {
				return false
			}
		}
	}
	clean := path.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return clean == p
}
