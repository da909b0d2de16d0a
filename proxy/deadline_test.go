package proxy_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"voicegate/proxy"
)

// bigBackend serves size bytes at /big, and counts its open connections.
func bigBackend(t *testing.T, size int) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var open atomic.Int64
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk[:min(len(chunk), size-sent)]); err != nil {
				return
			}
		}
	}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &open
}

// dialSmall connects to addr with a small receive buffer, set before connecting so that the
// window is small from the start.
func dialSmall(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
		})
		return errors.Join(err, serr)
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitFor polls cond every 10 ms for up to within, and reports how long it took.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// TestProxyWriteDeadline: clients that ask for a large body and never read are dropped within
// the write timeout (plus a generous margin for a busy machine), and the upstream connections
// serving them are closed with them.
func TestProxyWriteDeadline(t *testing.T) {
	const clients, size, timeout = 4, 64 << 20, 300 * time.Millisecond
	backend, open := bigBackend(t, size)
	tr := newTransport(t, proxy.TransportOptions{})
	front := startServer(t, proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr, WriteTimeout: timeout}))
	addr := strings.TrimPrefix(front.URL, "http://")
	var conns []net.Conn
	for range clients {
		c := dialSmall(t, addr)
		io.WriteString(c, "GET /big HTTP/1.1\r\nHost: front\r\n\r\n")
		conns = append(conns, c)
	}
	waitFor(t, 5*time.Second, "every request reaches the upstream", func() bool { return open.Load() == clients })
	took := waitFor(t, timeout+5*time.Second, "the upstream connections are closed", func() bool { return open.Load() == 0 })
	t.Logf("upstream connections closed %v after they opened (write timeout %v)", took, timeout)
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := io.Copy(io.Discard, c)
		var ne net.Error
		if (errors.As(err, &ne) && ne.Timeout()) || n >= size {
			t.Errorf("client %d: %d bytes, %v: want the connection closed mid-body", i, n, err)
		}
	}
}

// TestProxyWriteDeadlineMovesOn: a client that reads slowly but steadily gets the whole body
// although the download takes many times the write timeout: the deadline bounds each write,
// not the response.
func TestProxyWriteDeadlineMovesOn(t *testing.T) {
	const size, timeout = 32 << 20, time.Second
	backend, _ := bigBackend(t, size)
	tr := newTransport(t, proxy.TransportOptions{})
	front := startServer(t, proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr, WriteTimeout: timeout}))
	c := dialSmall(t, strings.TrimPrefix(front.URL, "http://"))
	io.WriteString(c, "GET /big HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
	// 1 MiB every 100 ms: about 3 s in all, with no pause near the timeout.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var n int64
	start := time.Now()
	for {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := io.CopyN(io.Discard, c, 1<<20)
		n += m
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes and %v: %v", n, time.Since(start), err)
		}
		<-tick.C
	}
	if n < size {
		t.Fatalf("the body was cut after %d bytes and %v", n, time.Since(start))
	}
	t.Logf("%d bytes in %v with a write timeout of %v", n, time.Since(start), timeout)
}

// TestProxyWriteDeadlineLifted: a keep-alive connection's next response, long after a proxied
// one, is not cut by the deadline the proxied response left behind.
func TestProxyWriteDeadlineLifted(t *testing.T) {
	const timeout = 50 * time.Millisecond
	backend, _ := bigBackend(t, 1<<10)
	tr := newTransport(t, proxy.TransportOptions{})
	big := bytes.Repeat([]byte("y"), 4<<20)
	mux := http.NewServeMux()
	mux.Handle("/big", proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr, WriteTimeout: timeout}))
	mux.HandleFunc("/plain", func(w http.ResponseWriter, r *http.Request) { w.Write(big) })
	front := startServer(t, mux)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	if body, status := get(t, client, front.URL+"/big"); status != http.StatusOK || len(body) != 1<<10 {
		t.Fatalf("proxied: %d, %d bytes", status, len(body))
	}
	// Past the deadline the proxied response's last write set; the connection is idle meanwhile.
	time.Sleep(4 * timeout)
	if body, status := get(t, client, front.URL+"/plain"); status != http.StatusOK || len(body) != len(big) {
		t.Fatalf("next response on the connection: %d, %d bytes", status, len(body))
	}
}
