package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"sync"
	"time"
)

// This file owns request bodies at the edge: how they are framed (CloseChunked), how long a
// client may take to send one (BodyDeadline), and how a failure to read one is told apart from a
// failing back end (BodyError).

// BodyError is a failure to read a request body from the client: malformed chunked framing, a
// body cut short, a body too slow for its deadline. It says nothing about any back end, so it
// is answered 400 or 408 (never 502) and never counts against a replica.
type BodyError struct{ Err error }

func (e *BodyError) Error() string { return "read request body: " + e.Err.Error() }
func (e *BodyError) Unwrap() error { return e.Err }

// Slow reports whether the body missed its read deadline.
func (e *BodyError) Slow() bool { return errors.Is(e.Err, os.ErrDeadlineExceeded) }

// IsBodyError reports whether err comes from reading the client's request body (a BodyError, or
// a body over its BodyLimit).
func IsBodyError(err error) bool {
	var be *BodyError
	return errors.As(err, &be) || IsTooLarge(err)
}

// bodyError returns the failure reading the client's body behind err, or the one recorded for
// the request in ctx, or nil.
func bodyError(ctx context.Context, err error) *BodyError {
	var be *BodyError
	if errors.As(err, &be) {
		return be
	}
	if info := InfoFrom(ctx); info != nil {
		return info.BodyErr()
	}
	return nil
}

// CodeRequestTimeout answers a request whose body did not arrive in time.
const CodeRequestTimeout = "REQUEST_TIMEOUT"

// BodyReadError is the client error for a failure to read a request body, for handlers that
// read bodies themselves: 413 over the limit (limit, or the MaxBytesReader's when 0), 408 too
// slow, 400 otherwise. It returns nil when err is not about the body.
func BodyReadError(err error, limit int64) *Error {
	var be *BodyError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		if limit <= 0 {
			limit = mbe.Limit
		}
		return TooLarge(limit)
	case !errors.As(err, &be):
		return nil
	case be.Slow():
		return &Error{Status: http.StatusRequestTimeout, Code: CodeRequestTimeout,
			Message: "the request body did not arrive in time", Cause: err,
			Header: http.Header{"Connection": {"close"}}}
	}
	return &Error{Status: http.StatusBadRequest, Code: CodeValidation,
		Message: "the request body could not be read: it is malformed or cut short", Cause: err,
		Header: http.Header{"Connection": {"close"}}}
}

// markedBody turns every error but io.EOF from reading a client's body into a *BodyError and
// records the first in the request's Info.
type markedBody struct {
	io.ReadCloser
	info *Info // nil outside the edge middleware
}

func (b markedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	return n, markBodyError(err, b.info)
}

func markBodyError(err error, info *Info) error {
	if err == nil || err == io.EOF {
		return err
	}
	var be *BodyError
	if !errors.As(err, &be) {
		be = &BodyError{Err: err}
		if !IsTooLarge(err) {
			err = be // a MaxBytesError stays itself: handlers look for it
		}
	}
	if info != nil {
		info.bodyErr.CompareAndSwap(nil, be)
	}
	return err
}

// markBody wraps the body of the request with context ctx so that its read errors are
// BodyErrors; nil and NoBody stay.
func markBody(ctx context.Context, rc io.ReadCloser) io.ReadCloser {
	if rc == nil || rc == http.NoBody {
		return rc
	}
	if _, ok := rc.(markedBody); ok {
		return rc
	}
	if _, ok := rc.(*deadlineBody); ok {
		return rc
	}
	return markedBody{ReadCloser: rc, info: InfoFrom(ctx)}
}

// CloseChunked closes the connection after answering any HTTP/1.1 request whose body was framed
// by Transfer-Encoding. RFC 9112 §6.1 requires it when a request carries both Content-Length
// and Transfer-Encoding, and such a request cannot be told apart here: net/http removes the
// Content-Length before any handler runs. A front end that framed the request by its
// Content-Length, or did not recognise "TE:\tchunked" or "TE: CHUNKED", disagrees with the
// gateway about where the request ends; closing means the bytes after it are never read as
// another request. Clients rarely send chunked requests, so losing keep-alive costs little.
func CloseChunked() Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
				w.Header().Set("Connection", "close")
			}
			next.ServeHTTP(w, r)
		})
	}
}

// BodyDeadlineOptions configures BodyDeadline.
type BodyDeadlineOptions struct {
	// Grace is how long any body may take, whatever its size; zero means 5 s.
	Grace time.Duration
	// MinRate is the average rate, in bytes per second, a body must keep up beyond Grace; zero
	// means 16 KiB/s.
	MinRate int64
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// BodyDeadline bounds the time a client may take to send a request body, on every route. The
// rule: the body must be complete by Grace after the request's headers, plus one second for
// every MinRate bytes it has delivered so far. A client that falls behind is cut off by a read
// deadline on its connection: the reader gets a *BodyError (Slow), the client 408, and the
// connection is closed. So a body of n bytes holds a goroutine, a lease or an upstream connection
// for at most Grace + n/MinRate, and a client trickling a byte a second for about Grace.
//
// The deadline is lifted once the body has been read to its end, so it never cuts a response
// that streams for minutes afterwards, and it is never touched once the handler has returned.
// Upgrade requests (WebSocket) are left alone: they carry no body, and their connection is
// hijacked. A server that cannot set read deadlines (not HTTP/1 or HTTP/2) gets no bound.
func BodyDeadline(o BodyDeadlineOptions) Middleware {
	if o.Grace <= 0 {
		o.Grace = 5 * time.Second
	}
	if o.MinRate <= 0 {
		o.MinRate = 16 << 10
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Body == nil || r.Body == http.NoBody || r.Header.Get("Upgrade") != "" {
				next.ServeHTTP(w, r)
				return
			}
			info, r := ensureInfo(r)
			b := &deadlineBody{rc: r.Body, ctl: http.NewResponseController(w), o: &o, start: o.Now(), info: info}
			if b.arm() != nil {
				r.Body = markBody(r.Context(), r.Body) // no deadlines on this connection; nothing to bound with
				next.ServeHTTP(w, r)
				return
			}
			r.Body = b
			defer b.finish()
			next.ServeHTTP(w, r)
		})
	}
}

// deadlineBody re-arms the connection's read deadline before each read of the body. Reads may
// come from another goroutine than the handler's (a Transport sending the body upstream), even
// after the handler returned; mu and done keep those from touching a connection that may be
// serving the next request by then.
type deadlineBody struct {
	rc    io.ReadCloser
	ctl   *http.ResponseController
	o     *BodyDeadlineOptions
	start time.Time
	info  *Info

	mu   sync.Mutex // held only around deadline changes, never around a read
	n    int64      // bytes read so far
	done bool       // the handler returned, or the body ended: deadlines are not ours any more
}

// deadline is when the body must be complete, given n bytes so far.
func (b *deadlineBody) deadline(n int64) time.Time {
	rate := b.o.MinRate
	allow := time.Duration(n/rate)*time.Second + time.Duration(n%rate)*time.Second/time.Duration(rate)
	return b.start.Add(b.o.Grace + allow)
}

func (b *deadlineBody) arm() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return nil
	}
	return b.ctl.SetReadDeadline(b.deadline(b.n))
}

// lift ends the deadline for good: the body is complete, and the connection's reads from now
// on (net/http watching for the client to go away during a long response) must not time out.
func (b *deadlineBody) lift(clear bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return
	}
	b.done = true
	if clear {
		_ = b.ctl.SetReadDeadline(time.Time{})
	}
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	_ = b.arm()
	n, err := b.rc.Read(p)
	b.mu.Lock()
	b.n += int64(n)
	b.mu.Unlock()
	if err == io.EOF {
		b.lift(true)
	}
	return n, markBodyError(err, b.info)
}

func (b *deadlineBody) Close() error { return b.rc.Close() }

// finish runs when the handler returns. An unfinished body keeps its deadline: net/http then
// discards what is left of it, and that too must not take longer than the rule allows.
func (b *deadlineBody) finish() { b.lift(false) }
