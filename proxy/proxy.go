// Package proxy owns voicegate's edge: reverse proxying on httputil.ReverseProxy (a tuned
// Transport, a shared buffer pool, one error mapping, the one list of headers a client may not
// pass to a back end), upstream replica pools, and the middleware every request passes through —
// recover, request ID, access log, client IP behind trusted proxies, CORS, body framing, body
// deadlines and limits — plus the JSON error document all packages answer with.
//
// Time bounds: a request body must arrive by BodyDeadline's rule (a grace, plus a second per
// MinRate bytes), enforced by a read deadline on the connection; upstreams answer headers within
// the Transport's ResponseHeaderTimeout; every write of a proxied response has a deadline
// (Options.WriteTimeout, moved before each write), so a client that stops reading is dropped
// within it, its upstream connection with it. A proxied response may run as long as the
// upstream keeps sending and the client keeps reading; other handlers (streams, sockets) bound
// their own writes the same way.
//
// Tunnels: only routes that declare an upgrade may switch protocols, no proxy relays a 101, and
// CONNECT and TRACE are refused at the edge (tunnel.go).
package proxy

import (
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// TransportOptions tunes the upstream Transport. Zero values pick defaults sized for thousands
// of concurrent long-lived streams to a handful of upstream hosts.
type TransportOptions struct {
	DialTimeout           time.Duration // zero: 5s
	TLSHandshakeTimeout   time.Duration // zero: 5s
	ResponseHeaderTimeout time.Duration // zero: 30s; how long an upstream may think before answering headers
	IdleConnTimeout       time.Duration // zero: 90s
	MaxIdleConnsPerHost   int           // zero: 1024 (the standard library's 2 churns connections under load)
}

// NewTransport returns an http.Transport for upstream calls. Its small read and write buffers
// keep the cost of thousands of idle streams down; they are not on a throughput-critical path
// because the payloads are small events.
func NewTransport(o TransportOptions) *http.Transport {
	def := func(d, v time.Duration) time.Duration {
		if d == 0 {
			return v
		}
		return d
	}
	perHost := o.MaxIdleConnsPerHost
	if perHost == 0 {
		perHost = 1024
	}
	dialer := &net.Dialer{Timeout: def(o.DialTimeout, 5*time.Second), KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 nil, // upstreams are internal; an environment proxy would be a surprise
		DialContext:           dialer.DialContext,
		TLSHandshakeTimeout:   def(o.TLSHandshakeTimeout, 5*time.Second),
		ResponseHeaderTimeout: def(o.ResponseHeaderTimeout, 30*time.Second),
		IdleConnTimeout:       def(o.IdleConnTimeout, 90*time.Second),
		ExpectContinueTimeout: time.Second,
		MaxIdleConns:          0, // no global cap; the per-host cap bounds it
		MaxIdleConnsPerHost:   perHost,
		ForceAttemptHTTP2:     true,
		// Pass the client's Accept-Encoding through instead of silently asking for gzip and
		// decoding it here, which would buffer streamed bodies.
		DisableCompression: true,
		WriteBufferSize:    1 << 10,
		ReadBufferSize:     2 << 10,
	}
}

// BufferPool is a sync.Pool of copy buffers for httputil.ReverseProxy, shared by all routes so
// that idle proxies hold no buffers.
type BufferPool struct {
	size int
	pool sync.Pool
}

// NewBufferPool returns a pool of size-byte buffers (32 KiB when size is 0).
func NewBufferPool(size int) *BufferPool {
	if size <= 0 {
		size = 32 << 10
	}
	bp := &BufferPool{size: size}
	bp.pool.New = func() any { b := make([]byte, size); return &b }
	return bp
}

// Get returns a buffer.
func (bp *BufferPool) Get() []byte { return *(bp.pool.Get().(*[]byte)) }

// Put returns a buffer to the pool.
func (bp *BufferPool) Put(b []byte) {
	if cap(b) != bp.size {
		return
	}
	b = b[:bp.size]
	bp.pool.Put(&b)
}

// Options configures a reverse proxy to one upstream.
type Options struct {
	// Target is the upstream base URL; the incoming path is appended to its path.
	Target *url.URL
	// Transport carries the requests; nil means a NewTransport with defaults.
	Transport http.RoundTripper
	// BufferPool holds copy buffers; nil means a private pool.
	BufferPool httputil.BufferPool
	// Code is the error code for an unreachable or failing upstream; empty means UPSTREAM_ERROR.
	Code string
	// Name names the upstream in client messages ("admin service"); empty means "upstream".
	Name string
	// Outbound shapes the request to the upstream (forwarded-for, request ID, identity).
	Outbound Outbound
	// Rewrite, if set, runs after the standard rewrite to adjust the outgoing request.
	Rewrite func(*httputil.ProxyRequest)
	// ModifyResponse is passed to httputil.ReverseProxy. Returning an *UpstreamStatusError maps
	// the upstream's status the same way as transport failures. It never sees a 101: that is a
	// 502 before it runs.
	ModifyResponse func(*http.Response) error
	// WriteTimeout bounds every write of the response to the client (zero: 10s): a client that
	// does not take a write within it is dropped, and the upstream connection closed.
	WriteTimeout time.Duration
}

// New returns a reverse proxy to o.Target: an httputil.ReverseProxy with Rewrite (SetURL and a
// deliberate SetXForwarded: an incoming X-Forwarded-For is kept only from trusted proxies), the
// shared buffer pool, and an ErrorHandler mapping failures to the JSON errors of DESIGN.md;
// every write to the client under a deadline, no upgrade passed to the upstream and no 101
// relayed from it.
func New(o Options) http.Handler {
	transport := o.Transport
	if transport == nil {
		transport = NewTransport(TransportOptions{})
	}
	pool := o.BufferPool
	if pool == nil {
		pool = NewBufferPool(0)
	}
	mapper := ErrorMapper{Code: o.Code, Name: o.Name}
	modify := refuseSwitch
	if o.ModifyResponse != nil {
		modify = func(res *http.Response) error {
			if err := refuseSwitch(res); err != nil {
				return err
			}
			return o.ModifyResponse(res)
		}
	}
	timeout := o.WriteTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			if o.Target != nil {
				pr.SetURL(o.Target)
			}
			// ReverseProxy passes an upgrade on; no upstream is asked to switch (StripUpgrade
			// has normally removed it already, this is the proxy's own guard).
			stripUpgrade(pr.Out.Header)
			o.Outbound.Shape(pr.In, pr.Out.Header)
			// A failure to read the client's body must not pass for a failing upstream.
			pr.Out.Body = markBody(pr.In.Context(), pr.Out.Body)
			if o.Rewrite != nil {
				o.Rewrite(pr)
			}
		},
		Transport:      transport,
		BufferPool:     pool,
		ModifyResponse: modify,
		ErrorHandler:   mapper.ServeError,
		// ReverseProxy's own log lines (copy errors after a client left) are noise at the edge.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rp.ServeHTTP(newDeadlineWriter(w, timeout), r)
	})
}

// UpstreamStatusError reports an upstream answer that must not be passed through as is (a
// streaming upstream that answered something other than 200).
type UpstreamStatusError struct {
	Status     int
	RetryAfter int // seconds, from the upstream's Retry-After; 0 when absent
}

func (e *UpstreamStatusError) Error() string {
	return "upstream answered " + strconv.Itoa(e.Status)
}

// ErrorMapper turns upstream failures into client errors, in one place: a gone client is 499
// (logged, not sent), an over-limit body 413, a body too slow 408, a malformed one 400, a timeout
// 504, everything else 502 — without upstream host names in what the client sees.
type ErrorMapper struct {
	Code string // the code for unreachable/failing upstreams; empty means UPSTREAM_ERROR
	Name string // the upstream in messages; empty means "upstream"
}

// Map classifies err for the request r.
func (m ErrorMapper) Map(r *http.Request, err error) *Error {
	code := m.Code
	if code == "" {
		code = CodeUpstream
	}
	name := m.Name
	if name == "" {
		name = "upstream"
	}
	var use *UpstreamStatusError
	var netErr net.Error
	be := bodyError(r.Context(), err)
	switch {
	case be != nil && be.Slow():
		// Before the check for a gone client: net/http cancels the request's context when
		// the body's read deadline cuts the connection, but the client is still there to read
		// why.
		return BodyReadError(be, 0)
	case r.Context().Err() != nil && errors.Is(context.Cause(r.Context()), context.Canceled):
		return &Error{Status: StatusClientClosed, Code: "CLIENT_CLOSED", Message: "client closed the request", Cause: err}
	case IsTooLarge(err):
		var mbe *http.MaxBytesError
		errors.As(err, &mbe)
		return TooLarge(mbe.Limit)
	case be != nil:
		return BodyReadError(be, 0) // the client's fault, whatever the transport made of it
	case errors.As(err, &use):
		switch use.Status {
		case http.StatusTooManyRequests:
			return &Error{Status: http.StatusTooManyRequests, Code: CodeRateLimited,
				Message: name + " is rate limiting; retry later", RetryAfter: max(use.RetryAfter, 1), Cause: err}
		case http.StatusServiceUnavailable:
			return &Error{Status: http.StatusServiceUnavailable, Code: code,
				Message: name + " is unavailable", RetryAfter: use.RetryAfter, Cause: err}
		case http.StatusGatewayTimeout:
			return &Error{Status: http.StatusGatewayTimeout, Code: CodeUpstreamTimeout,
				Message: name + " timed out", Cause: err}
		}
		return &Error{Status: http.StatusBadGateway, Code: code, Message: name + " failed", Cause: err}
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return &Error{Status: http.StatusGatewayTimeout, Code: CodeUpstreamTimeout,
			Message: name + " did not answer in time", Cause: err}
	case errors.Is(err, syscall.ECONNREFUSED):
		return &Error{Status: http.StatusBadGateway, Code: code, Message: name + " is unreachable", Cause: err}
	}
	return &Error{Status: http.StatusBadGateway, Code: code, Message: name + " failed", Cause: err}
}

// ServeError is an httputil.ReverseProxy ErrorHandler.
func (m ErrorMapper) ServeError(w http.ResponseWriter, r *http.Request, err error) {
	WriteError(w, r, m.Map(r, err))
}

// ParseRetryAfter reads a Retry-After header given in seconds; dates and junk give 0.
func ParseRetryAfter(v string) int {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return min(n, 3600)
}
