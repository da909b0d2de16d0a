package voice_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// network is where a test's servers listen and its clients dial: real loopback sockets, or an
// in-memory network of net.Pipe connections, which a testing/synctest bubble can run on fake
// time (its goroutines block on channels, never on the kernel).
type network interface {
	listen(tb testing.TB) net.Listener
	dial(ctx context.Context, network, addr string) (net.Conn, error)
}

// loopback is the real thing.
type loopback struct{}

func (loopback) listen(tb testing.TB) net.Listener {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	return ln
}

func (loopback) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

// memNet is the in-memory network. A listener's address is a made-up host:port; a dial to it
// hands one end of a pipe to its Accept. net.Pipe has no buffer: a write waits until the peer
// reads it, so a peer that stops reading is felt at the next write, and deadlines work.
type memNet struct {
	mu        sync.Mutex
	listeners map[string]*memListener
	next      int
}

func newMemNet() *memNet { return &memNet{listeners: map[string]*memListener{}} }

func (n *memNet) listen(tb testing.TB) net.Listener {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.next++
	l := &memListener{n: n, addr: memAddr("host" + strconv.Itoa(n.next) + ".mem:80"),
		conns: make(chan net.Conn), done: make(chan struct{})}
	n.listeners[string(l.addr)] = l
	return l
}

func (n *memNet) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	n.mu.Lock()
	l := n.listeners[addr]
	n.mu.Unlock()
	if l == nil {
		return nil, &net.OpError{Op: "dial", Net: "mem", Err: syscall.ECONNREFUSED}
	}
	c, sc := net.Pipe()
	client, server := &memConn{Conn: c}, &memConn{Conn: sc}
	client.peer, server.peer = server, client
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		return nil, &net.OpError{Op: "dial", Net: "mem", Err: syscall.ECONNREFUSED}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// memConn is one end of a pipe. Its Close stops the deadline timers of both ends: net.Pipe's
// own Close does not, a pending timer keeps the pipe alive until it fires, and once one end is
// closed the other can no longer clear its own.
type memConn struct {
	net.Conn
	peer *memConn
}

func (c *memConn) Close() error {
	c.Conn.SetDeadline(time.Time{})
	c.peer.Conn.SetDeadline(time.Time{})
	return c.Conn.Close()
}

type memAddr string

func (a memAddr) Network() string { return "mem" }
func (a memAddr) String() string  { return string(a) }

type memListener struct {
	n     *memNet
	addr  memAddr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.n.mu.Lock()
		delete(l.n.listeners, string(l.addr))
		l.n.mu.Unlock()
	})
	return nil
}

func (l *memListener) Addr() net.Addr { return l.addr }

// server is an http.Server on a network, stopped at clean-up (hijacked connections are the
// handler's business).
type server struct {
	URL string
	srv *http.Server
}

func serve(tb testing.TB, n network, h http.Handler) *server {
	tb.Helper()
	ln := n.listen(tb)
	s := &server{URL: "http://" + ln.Addr().String(), srv: &http.Server{Handler: h}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			tb.Errorf("serve: %v", err)
		}
	}()
	tb.Cleanup(func() {
		s.srv.Close()
		<-done
	})
	return s
}

// hole accepts connections on n and never answers them, until clean-up.
func hole(tb testing.TB, n network) string {
	ln := n.listen(tb)
	var mu sync.Mutex
	var held []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String()
}

// clientTransport dials n, for a test's clients; idle connections close at clean-up.
func clientTransport(tb testing.TB, n network) *http.Transport {
	t := &http.Transport{DialContext: n.dial, IdleConnTimeout: time.Minute}
	tb.Cleanup(t.CloseIdleConnections)
	return t
}
