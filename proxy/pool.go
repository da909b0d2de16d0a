package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// PoolOptions configures a Pool.
type PoolOptions struct {
	// Name labels the upstream in metrics ("algo", "admin", "docs").
	Name string
	// Targets are the replicas; they differ only in scheme and host.
	Targets []*url.URL
	// Transport carries the requests; nil means NewTransport defaults.
	Transport http.RoundTripper
	// EjectAfter consecutive failures take a replica out; zero means 3. A refused connection
	// takes it out at once: nothing answers there.
	EjectAfter int
	// EjectFor is how long the first ejection lasts; it doubles while the replica keeps failing
	// when tried again, up to MaxEject. Zero means 5 s and 1 minute.
	EjectFor, MaxEject time.Duration
	// OnResult, if set, is called with every attempt's outcome (see Outcome) and how long it
	// took: from sending the request to the answer's headers (an upgrade's 101), or to the
	// failure. It is called as soon as that is known, not when a streamed body ends.
	OnResult func(upstream, outcome string, took time.Duration)
	// Trace, if set, starts a client span per attempt: it returns the attempt's context, a
	// function that writes the trace context into the outgoing headers, and one that ends the
	// span. Hooking in here costs no request copy of its own.
	Trace func(ctx context.Context, method string) (context.Context, func(http.Header), func(status int, err error))
	// Now is the clock ejections are timed by; nil means time.Now.
	Now func() time.Time
}

// Replica is one member of a Pool.
type Replica struct {
	URL         *url.URL
	outstanding atomic.Int64
	mu          sync.Mutex
	failures    int
	ejections   int
	until       time.Time // ejected until
	now         func() time.Time
}

// Pool balances requests over an upstream's replicas by least outstanding requests, takes out a
// replica that keeps failing for a while and tries it again later (passive health checking), and
// retries a request on another replica when the first could not even connect (whatever its
// method, as long as its body can be sent again), so probing a replica that is still down costs
// no client its request. It is an http.RoundTripper: requests name the pool's first replica and
// are redirected per attempt.
type Pool struct {
	o        PoolOptions
	replicas []*Replica
	next     atomic.Uint32 // breaks ties between equally loaded replicas
}

// NewPool returns a pool over o.Targets (at least one).
func NewPool(o PoolOptions) *Pool {
	if o.Transport == nil {
		o.Transport = NewTransport(TransportOptions{})
	}
	if o.EjectAfter <= 0 {
		o.EjectAfter = 3
	}
	if o.EjectFor <= 0 {
		o.EjectFor = 5 * time.Second
	}
	if o.MaxEject <= 0 {
		o.MaxEject = time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	p := &Pool{o: o}
	for _, u := range o.Targets {
		p.replicas = append(p.replicas, &Replica{URL: u, now: o.Now})
	}
	return p
}

// Primary is the URL requests are addressed to before the pool picks a replica.
func (p *Pool) Primary() *url.URL { return p.replicas[0].URL }

// Replicas returns the pool's replicas.
func (p *Pool) Replicas() []*Replica { return p.replicas }

// Ejected reports whether the replica is out of rotation now.
func (r *Replica) Ejected() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.now().Before(r.until)
}

// Pick chooses a replica: the least loaded of those in rotation, skipping exclude. When every
// candidate is ejected it returns the one whose ejection ends first, so a pool never refuses
// outright. The caller must call done with the attempt's outcome.
func (p *Pool) Pick(exclude []*Replica) (r *Replica, done func(outcome string)) {
	now := p.o.Now()
	start := int(p.next.Add(1))
	var best, soonest *Replica
	var bestLoad int64
	var soonestUntil time.Time
	for i := range p.replicas {
		c := p.replicas[(start+i)%len(p.replicas)]
		if contains(exclude, c) {
			continue
		}
		c.mu.Lock()
		until := c.until
		c.mu.Unlock()
		if now.Before(until) {
			if soonest == nil || until.Before(soonestUntil) {
				soonest, soonestUntil = c, until
			}
			continue
		}
		if load := c.outstanding.Load(); best == nil || load < bestLoad {
			best, bestLoad = c, load
		}
	}
	if best == nil {
		best = soonest
	}
	if best == nil {
		return nil, nil
	}
	best.outstanding.Add(1)
	var once sync.Once
	return best, func(outcome string) {
		once.Do(func() {
			best.outstanding.Add(-1)
			p.record(best, outcome)
		})
	}
}

func contains(l []*Replica, r *Replica) bool {
	for _, x := range l {
		if x == r {
			return true
		}
	}
	return false
}

// record updates a replica's health with an attempt's outcome.
func (p *Pool) record(r *Replica, outcome string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch outcome {
	case "ok":
		r.failures, r.ejections = 0, 0
		return
	case "canceled", "client_error":
		return // the client left or sent a bad body; says nothing about the replica
	}
	r.failures++
	if outcome == "refused" || r.failures >= p.o.EjectAfter {
		d := p.o.EjectFor << min(r.ejections, 10)
		r.until = p.o.Now().Add(min(d, p.o.MaxEject))
		r.ejections++
		r.failures = 0
	}
}

// report tells OnResult about an attempt that started at start.
func (p *Pool) report(outcome string, start time.Time) {
	if p.o.OnResult != nil {
		p.o.OnResult(p.o.Name, outcome, p.o.Now().Sub(start))
	}
}

// Outcome classifies the result of a call to an upstream, for metrics and health, made with
// ctx (the client's request context): "ok" (any answer but the three below), "error_status"
// (502, 503 or 504: the upstream or a proxy before it is failing), "refused" (nothing was
// sent: the connection was refused or could not be made), "timeout", "error", "canceled" (the
// client left) or "client_error" (the client's body could not be read: malformed, too large,
// too slow).
func Outcome(ctx context.Context, res *http.Response, err error) string {
	var ne net.Error
	switch {
	case err == nil && (res.StatusCode == http.StatusBadGateway || res.StatusCode == http.StatusServiceUnavailable ||
		res.StatusCode == http.StatusGatewayTimeout):
		return "error_status"
	case err == nil:
		return "ok"
	case IsBodyError(err) || bodyError(ctx, err) != nil:
		return "client_error"
	case ctx.Err() != nil && errors.Is(context.Cause(ctx), context.Canceled):
		return "canceled"
	case notSent(err):
		return "refused"
	case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	return "error"
}

// notSent reports whether err means the request never left: the connection was refused or
// could not be made, so trying elsewhere cannot do anything twice.
func notSent(err error) bool {
	var oe *net.OpError
	return errors.Is(err, syscall.ECONNREFUSED) || (errors.As(err, &oe) && oe.Op == "dial")
}

// replayable reports whether a request's body can be sent again to a second replica: it has
// none, or GetBody makes a fresh copy. Retries happen only when the first attempt was never
// sent, so the method does not matter: nothing can happen twice.
func replayable(r *http.Request) bool {
	return r.Body == nil || r.Body == http.NoBody || r.GetBody != nil
}

// RoundTrip implements http.RoundTripper with the pool's transport.
func (p *Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	return p.roundTrip(p.o.Transport, req)
}

// Via returns a RoundTripper that balances over the pool's replicas, sharing their health,
// through another transport (the WebSocket dial needs one that speaks HTTP/1.1 only).
func (p *Pool) Via(t http.RoundTripper) http.RoundTripper {
	return roundTripperFunc(func(req *http.Request) (*http.Response, error) { return p.roundTrip(t, req) })
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (p *Pool) roundTrip(transport http.RoundTripper, req *http.Request) (*http.Response, error) {
	var tried []*Replica
	for {
		r, done := p.Pick(tried)
		if r == nil {
			return nil, errors.New("proxy: no replica left to try")
		}
		tried = append(tried, r)
		start := p.o.Now()
		ctx, inject, endSpan := req.Context(), func(http.Header) {}, func(int, error) {}
		if p.o.Trace != nil {
			ctx, inject, endSpan = p.o.Trace(ctx, req.Method)
		}
		out := req.Clone(ctx)
		inject(out.Header)
		out.URL.Scheme, out.URL.Host = r.URL.Scheme, r.URL.Host
		if len(tried) > 1 && req.GetBody != nil {
			body, err := req.GetBody()
			if err != nil {
				p.report("error", start)
				done("error")
				endSpan(0, err)
				return nil, err
			}
			out.Body = body
		}
		res, err := transport.RoundTrip(out)
		result := Outcome(req.Context(), res, err)
		p.report(result, start)
		if err != nil {
			endSpan(0, err)
			done(result)
			if result == "refused" && replayable(req) && len(tried) < len(p.replicas) {
				continue
			}
			return nil, err
		}
		endSpan(res.StatusCode, nil) // the span covers the wait for the answer's headers
		if res.StatusCode == http.StatusSwitchingProtocols {
			done(result) // an upgraded connection's body must stay the raw connection
			return res, nil
		}
		// The replica stays loaded until the body is read: streams can last minutes.
		res.Body = &doneBody{ReadCloser: res.Body, done: func() { done(result) }}
		return res, nil
	}
}

// doneBody reports the end of a response body once.
type doneBody struct {
	io.ReadCloser
	done func()
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.done()
	return err
}
