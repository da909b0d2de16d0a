package sse_test

// The tests of a stream's time bounds — a client that stops reading, a cancel or a drain while
// it does, pings, a trickled body — run in testing/synctest bubbles over net.Pipe connections,
// so that each bound is asserted exactly, on fake time, however busy the machine is.

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/sse"
)

// pipeNet is a network of net.Pipe connections: a dial to a listener's address hands the other
// end to its Accept.
type pipeNet struct {
	mu sync.Mutex
	ls map[string]*pipeListener
}

type pipeListener struct {
	addr  string
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

type pipeAddr string

func (a pipeAddr) Network() string { return "pipe" }
func (a pipeAddr) String() string  { return string(a) }

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *pipeListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *pipeListener) Addr() net.Addr { return pipeAddr(l.addr) }

// pipeConn is a pipe end whose Close also stops the deadline timers of both ends: net.Pipe's
// own does not, and a pending timer keeps the pipe alive.
type pipeConn struct {
	net.Conn
	peer *pipeConn
}

func (c *pipeConn) Close() error {
	c.Conn.SetDeadline(time.Time{})
	c.peer.Conn.SetDeadline(time.Time{})
	return c.Conn.Close()
}

func (n *pipeNet) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	n.mu.Lock()
	l := n.ls[addr]
	n.mu.Unlock()
	if l == nil {
		return nil, &net.OpError{Op: "dial", Net: "pipe", Err: syscall.ECONNREFUSED}
	}
	a, b := net.Pipe()
	ca, cb := &pipeConn{Conn: a}, &pipeConn{Conn: b}
	ca.peer, cb.peer = cb, ca
	select {
	case l.conns <- cb:
		return ca, nil
	case <-l.done:
		return nil, &net.OpError{Op: "dial", Net: "pipe", Err: syscall.ECONNREFUSED}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// serve runs h on a new listener until clean-up and returns its base URL.
func (n *pipeNet) serve(t *testing.T, name string, h http.Handler) *url.URL {
	l := &pipeListener{addr: name + ":80", conns: make(chan net.Conn), done: make(chan struct{})}
	n.mu.Lock()
	if n.ls == nil {
		n.ls = map[string]*pipeListener{}
	}
	n.ls[l.addr] = l
	n.mu.Unlock()
	srv := &http.Server{Handler: h}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	u, _ := url.Parse("http://" + l.addr)
	return u
}

// algo is a fake algorithm service: it answers each query with lines from next, one at a time,
// until next says stop, and records when it saw its request cancelled.
type algo struct {
	next      func(i int) (line string, gap time.Duration, more bool)
	requests  atomic.Int64
	cancelled chan time.Time
}

func (a *algo) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.requests.Add(1)
	io.Copy(io.Discard, r.Body)
	w.Header().Set("Content-Type", "application/x-ndjson")
	rc := http.NewResponseController(w)
	rc.Flush()
	for i := 0; ; i++ {
		line, gap, more := a.next(i)
		if !more {
			return
		}
		select {
		case <-time.After(gap):
		case <-r.Context().Done():
			a.cancelled <- time.Now()
			return
		}
		if _, err := io.WriteString(w, line+"\n"); err != nil || rc.Flush() != nil {
			a.cancelled <- time.Now()
			return
		}
	}
}

// streamEnv is the chat handler behind the edge's body deadline, in front of an algo, with a
// concurrency slot per stream, on a pipe network.
type streamEnv struct {
	net     *pipeNet
	reg     *sse.Registry
	algo    *algo
	leases  *policy.MemoryLeases
	admits  atomic.Int64
	ended   chan struct{} // a value per stream that ended (OnStreamEnd)
	gateway *url.URL
	client  *http.Client
}

const writeTimeout = 300 * time.Millisecond

func newStreamEnv(t *testing.T, a *algo, ping time.Duration) *streamEnv {
	e := &streamEnv{net: &pipeNet{}, reg: sse.NewRegistry(), algo: a, leases: policy.NewMemoryLeases(),
		ended: make(chan struct{}, 16)}
	a.cancelled = make(chan time.Time, 16)
	algoURL := e.net.serve(t, "algo", a)
	transport := &http.Transport{DialContext: e.net.dial}
	t.Cleanup(transport.CloseIdleConnections)
	h := sse.NewHandler(sse.HandlerOptions{
		AlgoURL:      algoURL,
		Transport:    transport,
		Registry:     e.reg,
		PingInterval: ping,
		WriteTimeout: writeTimeout,
		Admit: func(w http.ResponseWriter, r *http.Request, _ *policy.Claim) (func(), bool, error) {
			e.admits.Add(1)
			release, err := e.leases.Acquire(r.Context(), policy.LeaseRequest{Kind: "chat", User: "u", PerUser: 1})
			if err != nil {
				http.Error(w, err.Error(), http.StatusTooManyRequests)
				return nil, false, policy.ErrAnswered
			}
			return release, false, nil
		},
		OnStreamEnd: func() { e.ended <- struct{}{} },
	})
	e.gateway = e.net.serve(t, "gateway", proxy.Chain(h, proxy.RequestID(), proxy.BodyDeadline(proxy.BodyDeadlineOptions{
		Grace: time.Second, MinRate: 1024})))
	ct := &http.Transport{DialContext: e.net.dial}
	t.Cleanup(ct.CloseIdleConnections)
	e.client = &http.Client{Transport: ct}
	return e
}

// slotFree reports whether the one chat slot is free.
func (e *streamEnv) slotFree() bool {
	release, err := e.leases.Acquire(context.Background(), policy.LeaseRequest{Kind: "chat", User: "u", PerUser: 1})
	if err != nil {
		return false
	}
	release()
	return true
}

// open posts a chat request and returns the response, its body read line by line.
func (e *streamEnv) open(t *testing.T, requestID string) (*http.Response, *bufio.Reader) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.gateway.String()+"/api/v2/chat/stream",
		strings.NewReader(`{"message":"hi","request_id":"`+requestID+`"}`))
	req.Header.Set("Content-Type", "application/json")
	res, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d", res.StatusCode)
	}
	return res, bufio.NewReader(res.Body)
}

// readBlock reads one event (or ping comment) block.
func readBlock(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	var b strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the stream: %v (so far %q)", err, b.String())
		}
		if line == "\n" {
			return b.String()
		}
		b.WriteString(line)
	}
}

// flood is an answer that never ends: big lines as fast as they are taken.
func flood(i int) (string, time.Duration, bool) {
	return `{"type":"generation_chunk","content":"` + strings.Repeat("x", 4000) + `"}`, 0, true
}

// after waits for a value on ch for at most d of fake time.
func after[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("%s: not within %v", what, d)
	}
	var zero T
	return zero
}

// over checks what must hold once a stream is over: nothing registered, the slot free.
func (e *streamEnv) over(t *testing.T) {
	t.Helper()
	synctest.Wait()
	if n := e.reg.Len(); n != 0 {
		t.Errorf("the registry holds %d streams", n)
	}
	if !e.slotFree() {
		t.Error("the stream's concurrency slot is still held")
	}
}

func TestClientThatStopsReading(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newStreamEnv(t, &algo{next: flood}, -1)
		_, br := e.open(t, "r-1")
		readBlock(t, br) // stream_start; then the client reads nothing more
		start := time.Now()
		cancelled := after(t, e.algo.cancelled, writeTimeout+time.Second, "the upstream request cancelled")
		after(t, e.ended, time.Second, "the stream ended")
		took := cancelled.Sub(start)
		t.Logf("upstream cancelled %v after the client stopped reading (write timeout %v)", took, writeTimeout)
		if took < writeTimeout*7/8 {
			t.Errorf("cancelled after %v, before the write timeout", took)
		}
		e.over(t)
	})
}

func TestEndWhileTheClientStopsReading(t *testing.T) {
	for _, tt := range []struct {
		name string
		end  func(e *streamEnv) error
	}{
		{"cancel", func(e *streamEnv) error { return e.reg.Cancel(sse.StreamKey{RequestID: "r-1"}) }},
		{"drain", func(e *streamEnv) error { e.reg.EndAll(); return nil }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newStreamEnv(t, &algo{next: flood}, -1)
				_, br := e.open(t, "r-1")
				readBlock(t, br)
				time.Sleep(writeTimeout / 2) // the gateway's write is stuck by now
				start := time.Now()
				if err := tt.end(e); err != nil {
					t.Fatal(err)
				}
				if got := after(t, e.algo.cancelled, time.Second, "the upstream request cancelled"); got != start {
					t.Errorf("the upstream request was cancelled %v after the %s, want at once", got.Sub(start), tt.name)
				}
				after(t, e.ended, writeTimeout+time.Second, "the stream ended")
				if took := time.Since(start); took > writeTimeout {
					t.Errorf("the stream ended %v after the %s, want within the write timeout", took, tt.name)
				}
				e.over(t)
			})
		})
	}
}

func TestPingWhileSilent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ping = 2 * time.Second
		e := newStreamEnv(t, &algo{next: func(i int) (string, time.Duration, bool) {
			if i == 0 {
				return `{"type":"generation_chunk","content":"a"}`, 0, true
			}
			return `{"type":"generation_done"}`, 3*ping + ping/2, i == 1
		}}, ping)
		_, br := e.open(t, "r-1")
		readBlock(t, br)
		if ev := readBlock(t, br); !strings.Contains(ev, "generation_chunk") {
			t.Fatalf("got %q, want the first chunk", ev)
		}
		last := time.Now()
		for range 3 {
			if ev := readBlock(t, br); ev != ": ping\n" {
				t.Fatalf("got %q while the upstream was silent, want a ping", ev)
			}
			if gap := time.Since(last); gap != ping {
				t.Errorf("a ping %v after the last write, want %v", gap, ping)
			}
			last = time.Now()
		}
		if ev := readBlock(t, br); !strings.Contains(ev, "generation_done") {
			t.Fatalf("got %q, want generation_done", ev)
		}
		if ev := readBlock(t, br); !strings.Contains(ev, "stream_end") {
			t.Fatalf("got %q, want stream_end", ev)
		}
		after(t, e.ended, time.Second, "the stream ended")
		e.over(t)
	})
}

// slowBody sends a chat body a byte every gap, until done.
type slowBody struct {
	body string
	gap  time.Duration
	done chan struct{}
	sent atomic.Int64
}

func (b *slowBody) Read(p []byte) (int, error) {
	n := b.sent.Load()
	if int(n) == len(b.body) {
		return 0, io.EOF
	}
	select {
	case <-time.After(b.gap):
	case <-b.done:
		return 0, io.ErrClosedPipe
	}
	p[0] = b.body[n]
	b.sent.Add(1)
	return 1, nil
}

func TestTrickledBodyHoldsNoSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newStreamEnv(t, &algo{next: func(i int) (string, time.Duration, bool) {
			return `{"type":"generation_done"}`, 0, i == 0
		}}, -1)
		body := &slowBody{body: `{"message":"hi"}`, gap: 200 * time.Millisecond, done: make(chan struct{})}
		defer synctest.Wait()
		defer close(body.done)
		req, _ := http.NewRequest(http.MethodPost, e.gateway.String()+"/api/v2/chat/stream", body)
		req.ContentLength = int64(len(body.body))
		req.Header.Set("Content-Type", "application/json")
		type result struct {
			res *http.Response
			err error
		}
		done := make(chan result, 1)
		start := time.Now()
		go func() {
			res, err := e.client.Do(req)
			done <- result{res, err}
		}()
		time.Sleep(500 * time.Millisecond)
		synctest.Wait()
		if n := e.admits.Load(); n != 0 || !e.slotFree() {
			t.Errorf("%d admissions, slot free %v while the body trickles; want none taken", n, e.slotFree())
		}
		r := after(t, done, 5*time.Second, "the trickled request answered")
		took := time.Since(start)
		if r.err == nil {
			defer r.res.Body.Close()
			if r.res.StatusCode != http.StatusRequestTimeout {
				t.Errorf("status %d, want 408", r.res.StatusCode)
			}
		}
		sent := body.sent.Load()
		t.Logf("trickled body cut after %v (%v): %d of %d bytes sent", took, r.err, sent, len(body.body))
		// The edge's rule: a second, plus a second per 1024 bytes delivered.
		if bound := time.Second + time.Duration(sent)*time.Second/1024; took > bound+time.Millisecond {
			t.Errorf("the slow body was cut after %v, want at its deadline %v", took, bound)
		}
		if n := e.admits.Load(); n != 0 {
			t.Errorf("%d admissions for a body that never arrived", n)
		}
		if n := e.algo.requests.Load(); n != 0 {
			t.Errorf("the algorithm service got %d requests", n)
		}
		e.over(t)
	})
}

func TestCancelBeforeTheUpstreamAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newStreamEnv(t, &algo{next: flood}, -1)
		// An algorithm service that thinks before it answers.
		slow := e.net.serve(t, "slow", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body) // then net/http watches for the gateway hanging up
			select {
			case <-time.After(time.Hour):
			case <-r.Context().Done():
				e.algo.cancelled <- time.Now()
			}
		}))
		tr := &http.Transport{DialContext: e.net.dial}
		defer tr.CloseIdleConnections()
		h := sse.NewHandler(sse.HandlerOptions{AlgoURL: slow, Transport: tr, Registry: e.reg})
		gw := e.net.serve(t, "gw2", h)
		errs := make(chan error, 1)
		go func() {
			time.Sleep(time.Second)
			errs <- e.reg.Cancel(sse.StreamKey{RequestID: "r-early"})
		}()
		req, _ := http.NewRequest(http.MethodPost, gw.String(), strings.NewReader(`{"message":"hi","request_id":"r-early"}`))
		res, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		if !strings.Contains(string(b), "event: stream_start") || !strings.Contains(string(b), "event: stream_cancelled") {
			t.Errorf("got %q, want a stream opened and cancelled", b)
		}
		after(t, e.algo.cancelled, time.Second, "the upstream request cancelled")
		e.over(t)
	})
}
