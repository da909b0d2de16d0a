package proxy_test

// Request bodies at the edge, over raw TCP connections so that framing and timing are exactly
// what a client (or an attacker) sends: smuggling with Content-Length and Transfer-Encoding,
// malformed chunked bodies, bodies trickled a byte at a time.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/proxy"
)

// rawConn is a client connection to srv that writes bytes as given.
type rawConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// A bound on the whole exchange, so a test that goes wrong fails instead of hanging.
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, c: c, br: bufio.NewReader(c)}
}

func (r *rawConn) send(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.c, s); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// response reads one response, body included.
func (r *rawConn) response() (*http.Response, string) {
	r.t.Helper()
	res, err := http.ReadResponse(r.br, nil)
	if err != nil {
		r.t.Fatalf("read response: %v", err)
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		r.t.Fatalf("read response body: %v", err)
	}
	return res, string(b)
}

// closed reports whether the server closed the connection (rather than sending more).
func (r *rawConn) closed() (bool, string) {
	b, err := r.br.ReadByte()
	if err == nil {
		rest, _ := r.br.Peek(r.br.Buffered())
		return false, string(b) + string(rest)
	}
	return errors.Is(err, io.EOF) || isReset(err), ""
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}

func addrOf(srvURL string) string { return strings.TrimPrefix(srvURL, "http://") }

// TestCloseChunked: a request framed by Transfer-Encoding (with or without a Content-Length, in
// the spellings net/http accepts) is answered and the connection closed, so bytes a front end
// may have taken for the rest of the body are never parsed as a second request. A request
// framed by Content-Length alone keeps its connection.
func TestCloseChunked(t *testing.T) {
	const smuggled = "GET /hidden HTTP/1.1\r\nHost: x\r\n\r\n"
	tests := []struct {
		name      string
		head      string
		body      string
		wantClose bool
	}{
		{"CL and TE", "Content-Length: 40\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n", true},
		{"TE with a tab", "Content-Length: 40\r\nTransfer-Encoding:\tchunked\r\n", "0\r\n\r\n", true},
		{"TE upper case", "Content-Length: 40\r\nTransfer-Encoding: CHUNKED\r\n", "0\r\n\r\n", true},
		{"TE before CL", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "1\r\nx\r\n0\r\n\r\n", true},
		{"TE alone", "Transfer-Encoding: chunked\r\n", "1\r\nx\r\n0\r\n\r\n", true},
		{"CL alone", "Content-Length: 1\r\n", "x", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hits, hidden atomic.Int64
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				if r.URL.Path == "/hidden" {
					hidden.Add(1)
				}
				_, _ = io.Copy(io.Discard, r.Body)
				_, _ = io.WriteString(w, "ok")
			}), proxy.CloseChunked())
			srv := startServer(t, h)
			c := dialRaw(t, addrOf(srv.URL))
			c.send("POST /public HTTP/1.1\r\nHost: x\r\n" + tt.head + "\r\n" + tt.body + smuggled)
			res, body := c.response()
			if res.StatusCode != 200 || body != "ok" {
				t.Fatalf("first response = %d %q", res.StatusCode, body)
			}
			if !tt.wantClose {
				if res.Close {
					t.Fatal("a request framed by Content-Length alone lost its connection")
				}
				if res2, _ := c.response(); res2.StatusCode != 200 || hidden.Load() != 1 {
					t.Fatalf("second request on the kept connection: %d, hidden hits %d", res2.StatusCode, hidden.Load())
				}
				return
			}
			if !res.Close {
				t.Error("response without Connection: close")
			}
			if closed, more := c.closed(); !closed {
				t.Errorf("the connection stayed open; the server sent %q after the first response", more)
			}
			if n := hidden.Load(); n != 0 {
				t.Errorf("the bytes after the chunked body were served as a request (%d times)", n)
			}
			if n := hits.Load(); n != 1 {
				t.Errorf("handler ran %d times, want 1", n)
			}
		})
	}
}

// TestNewMalformedChunkedBody: a chunked body that net/http cannot read (a chunk-size line
// ending in a bare LF, garbage for a size) is the client's error, 400, not the upstream's 502.
func TestNewMalformedChunkedBody(t *testing.T) {
	for _, body := range []string{"5\nhello\r\n0\r\n\r\n", "zz\r\nhello\r\n0\r\n\r\n"} {
		t.Run(fmt.Sprintf("%q", body), func(t *testing.T) {
			backend, _ := recordingBackend(t)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
			front := startServer(t, edge(p, logger))
			c := dialRaw(t, addrOf(front.URL))
			c.send("POST /docs/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
			res, got := c.response()
			if res.StatusCode != http.StatusBadRequest {
				t.Fatalf("status = %d %s, want 400", res.StatusCode, got)
			}
			if doc := decodeError(t, []byte(got)); doc.Code != proxy.CodeValidation {
				t.Errorf("code = %s, want %s", doc.Code, proxy.CodeValidation)
			}
		})
	}
}

// TestPoolClientErrorsKeepReplicas: requests whose bodies are malformed or over the limit are
// the client's fault and eject no replica: afterwards requests still spread over both.
func TestPoolClientErrorsKeepReplicas(t *testing.T) {
	a, b := newReplica(t, "a"), newReplica(t, "b")
	pool, _, rec := newPool(t, proxy.PoolOptions{}, a.srv.URL, b.srv.URL)
	logger, _ := newLog(slog.LevelDebug)
	p := proxy.New(proxy.Options{Target: pool.Primary(), Transport: pool})
	front := startServer(t, proxy.Chain(p, proxy.Recover(logger), proxy.RequestID(), proxy.BodyLimit(64)))

	bad := []struct {
		body   string
		status int
	}{
		{"5\nhello\r\n0\r\n\r\n", http.StatusBadRequest},
		{"100\r\n" + strings.Repeat("x", 256) + "\r\n0\r\n\r\n", http.StatusRequestEntityTooLarge},
	}
	for i := range 6 {
		tc := bad[i%2]
		c := dialRaw(t, addrOf(front.URL))
		c.send("GET /docs/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + tc.body)
		if res, got := c.response(); res.StatusCode != tc.status {
			t.Fatalf("bad request %d: status %d %s, want %d", i+1, res.StatusCode, got, tc.status)
		}
	}
	for _, r := range pool.Replicas() {
		if r.Ejected() {
			t.Errorf("replica %s ejected by client errors (outcomes %v)", r.URL, rec.all())
		}
	}
	a.hits.Store(0)
	b.hits.Store(0)
	c := &http.Client{Transport: newTransport(t, proxy.TransportOptions{})}
	for range 20 {
		if _, status := get(t, c, front.URL+"/docs/1"); status != 200 {
			t.Fatalf("GET after the bad requests: %d", status)
		}
	}
	if a.hits.Load() == 0 || b.hits.Load() == 0 {
		t.Errorf("20 GETs went a:%d b:%d, want both replicas used", a.hits.Load(), b.hits.Load())
	}
	if n := rec.count("client_error"); n == 0 {
		t.Errorf("outcomes %v, want the bad bodies reported as client_error", rec.all())
	}
}

// slowBodyHandler reads the whole body and answers what happened: "read N" or the error the
// edge maps it to.
func slowBodyHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			if e := proxy.BodyReadError(err, 1<<20); e != nil {
				proxy.WriteError(w, r, e)
				return
			}
			t := fmt.Sprintf("unexpected %v", err)
			http.Error(w, t, 500)
			return
		}
		fmt.Fprintf(w, "read %d", len(b))
	})
}

// trickle writes body one byte per gap until stop is closed or the body is sent.
func trickle(c net.Conn, body string, gap time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(gap)
	defer tick.Stop()
	for i := 0; i < len(body); i++ {
		if _, err := c.Write([]byte{body[i]}); err != nil {
			return
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// TestBodyDeadline: a body trickled far below the minimum rate is cut at about Grace with 408
// and a closed connection; a body at a good rate is read whole; the deadline is lifted once the
// body is complete, so a response that takes longer than Grace afterwards is not cut.
func TestBodyDeadline(t *testing.T) {
	const grace = 200 * time.Millisecond
	mw := proxy.BodyDeadline(proxy.BodyDeadlineOptions{Grace: grace, MinRate: 1 << 10})

	t.Run("trickle cut", func(t *testing.T) {
		srv := startServer(t, proxy.Chain(slowBodyHandler(), proxy.RequestID(), mw))
		c := dialRaw(t, addrOf(srv.URL))
		start := time.Now()
		c.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
		stop := make(chan struct{})
		defer close(stop)
		go trickle(c.c, strings.Repeat("x", 100), 20*time.Millisecond, stop)
		res, got := c.response()
		took := time.Since(start)
		if res.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("status = %d %s, want 408", res.StatusCode, got)
		}
		if doc := decodeError(t, []byte(got)); doc.Code != proxy.CodeRequestTimeout {
			t.Errorf("code = %s, want %s", doc.Code, proxy.CodeRequestTimeout)
		}
		if took < grace || took > grace+time.Second {
			t.Errorf("408 after %v, want soon after the %v grace", took, grace)
		}
		if closed, more := c.closed(); !closed {
			t.Errorf("connection kept open after a cut body; got %q", more)
		}
	})

	t.Run("chunked trickle cut", func(t *testing.T) {
		srv := startServer(t, proxy.Chain(slowBodyHandler(), proxy.RequestID(), mw))
		c := dialRaw(t, addrOf(srv.URL))
		start := time.Now()
		c.send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
		stop := make(chan struct{})
		defer close(stop)
		go trickle(c.c, strings.Repeat("1\r\nx\r\n", 50), 20*time.Millisecond, stop)
		if res, got := c.response(); res.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("status = %d %s, want 408", res.StatusCode, got)
		}
		if took := time.Since(start); took > grace+time.Second {
			t.Errorf("408 after %v, want soon after the %v grace", took, grace)
		}
	})

	t.Run("fast body read whole", func(t *testing.T) {
		srv := startServer(t, proxy.Chain(slowBodyHandler(), proxy.RequestID(), mw))
		c := dialRaw(t, addrOf(srv.URL))
		body := strings.Repeat("y", 64<<10)
		c.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n" + body)
		if res, got := c.response(); res.StatusCode != 200 || got != "read 65536" {
			t.Fatalf("response = %d %q, want 200 read 65536", res.StatusCode, got)
		}
		// The connection is kept, and the next request gets a deadline of its own.
		c.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nzz")
		if res, got := c.response(); res.StatusCode != 200 || got != "read 2" {
			t.Fatalf("second response = %d %q", res.StatusCode, got)
		}
	})

	t.Run("lifted once the body is complete", func(t *testing.T) {
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.ReadAll(r.Body)
			w.WriteHeader(200)
			_ = http.NewResponseController(w).Flush()
			// A response that goes on well past the body's deadline, as a stream does: the
			// server's watch for a vanished client must not time out and cancel it.
			select {
			case <-r.Context().Done():
				_, _ = io.WriteString(w, "canceled")
			case <-time.After(3 * grace):
				_, _ = io.WriteString(w, "finished")
			}
		})
		srv := startServer(t, proxy.Chain(h, mw))
		c := dialRaw(t, addrOf(srv.URL))
		c.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
		if res, got := c.response(); res.StatusCode != 200 || got != "finished" {
			t.Fatalf("response = %d %q, want 200 finished", res.StatusCode, got)
		}
	})
}

// TestNewSlowBodyFreesUpstream: a body trickled through the proxy is cut at its deadline: the
// client gets 408, and the back end's connection ends then too instead of being held.
func TestNewSlowBodyFreesUpstream(t *testing.T) {
	const grace = 200 * time.Millisecond
	backendErr := make(chan error, 1)
	backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.ReadAll(r.Body)
		backendErr <- err
	}))
	tr := newTransport(t, proxy.TransportOptions{})
	logger, _ := newLog(slog.LevelDebug)
	p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
	front := startServer(t, proxy.Chain(p, proxy.Recover(logger), proxy.RequestID(),
		proxy.BodyDeadline(proxy.BodyDeadlineOptions{Grace: grace, MinRate: 1 << 10})))
	c := dialRaw(t, addrOf(front.URL))
	start := time.Now()
	c.send("POST /docs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
	stop := make(chan struct{})
	defer close(stop)
	go trickle(c.c, strings.Repeat("x", 100), 20*time.Millisecond, stop)
	res, got := c.response()
	if res.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("status = %d %s, want 408", res.StatusCode, got)
	}
	select {
	case err := <-backendErr:
		if err == nil {
			t.Error("the back end read a whole body; want it cut")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the back end still reads the body 2s after the client got 408")
	}
	if took := time.Since(start); took > grace+time.Second {
		t.Errorf("upstream connection held %v, want about the %v grace", took, grace)
	}
}
