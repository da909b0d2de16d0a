package main

// End-to-end tests of the edge at the protocol level, over raw TCP connections to a gateway
// started through run: request smuggling with Content-Length and Transfer-Encoding, malformed
// chunked bodies, and bodies trickled a byte at a time.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// edgeConn is a raw client connection to a gateway.
type edgeConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialEdge(t *testing.T, g *testGateway) *edgeConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", g.Addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second)) // a test gone wrong fails, never hangs
	return &edgeConn{t: t, c: c, br: bufio.NewReader(c)}
}

func (e *edgeConn) send(s string) {
	e.t.Helper()
	if _, err := io.WriteString(e.c, s); err != nil {
		e.t.Fatalf("write: %v", err)
	}
}

// response reads one response and its body.
func (e *edgeConn) response() (*http.Response, string) {
	e.t.Helper()
	res, err := http.ReadResponse(e.br, nil)
	if err != nil {
		e.t.Fatalf("read response: %v", err)
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		e.t.Fatalf("read body: %v", err)
	}
	return res, string(b)
}

// closed reports whether the gateway closed the connection rather than sending anything more.
func (e *edgeConn) closed() (bool, string) {
	b, err := e.br.ReadByte()
	if err == nil {
		more, _ := e.br.Peek(e.br.Buffered())
		return false, string(b) + string(more)
	}
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout()), ""
}

// TestEdgeSmuggling: a request with both Content-Length and Transfer-Encoding (in the
// spellings net/http accepts) is framed by its chunked body and answered, and the connection is
// closed: what a Content-Length-framing front end took for the rest of the body never reaches a
// back end as a request of its own — neither a protected one nor a public one.
func TestEdgeSmuggling(t *testing.T) {
	admin, docs := okBackend(t), okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "ADMIN_URL": admin.URL, "DOCS_URL": docs.URL})
	w := watchTokens(t, g)
	tok := w.token(t, "u-admin", []string{"admin"}, nil)

	hiddenAdmin := "GET /api/v2/admin/hidden HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + tok + "\r\n\r\n"
	hiddenPublic := "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
	tests := []struct {
		name, te, path, hidden string
		auth                   bool
	}{
		{"to a back end", "Transfer-Encoding: chunked", "/api/v2/documents/x", hiddenAdmin, true},
		{"TE with a tab", "Transfer-Encoding:\tchunked", "/api/v2/documents/x", hiddenAdmin, true},
		{"TE upper case", "Transfer-Encoding: CHUNKED", "/api/v2/documents/x", hiddenAdmin, true},
		{"public path, no token", "Transfer-Encoding: chunked", "/readyz", hiddenPublic, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(admin.requests())
			c := dialEdge(t, g)
			body := "0\r\n\r\n" + tt.hidden
			head := "POST " + tt.path + " HTTP/1.1\r\nHost: gw\r\n"
			if tt.auth {
				head += "Authorization: Bearer " + tok + "\r\n"
			}
			head += fmt.Sprintf("Content-Length: %d\r\n%s\r\n\r\n", len(body), tt.te)
			c.send(head + body)
			res, got := c.response()
			if res.StatusCode >= 500 {
				t.Fatalf("first response = %d %s", res.StatusCode, got)
			}
			if !res.Close {
				t.Error("the answer to a CL+TE request does not close the connection")
			}
			if closed, more := c.closed(); !closed {
				t.Errorf("the connection stayed open; the gateway answered the hidden request: %.200q", more)
			}
			if n := len(admin.requests()) - before; n != 0 {
				t.Errorf("the hidden request reached the admin back end %d times", n)
			}
		})
	}
}

// TestEdgeBadBodiesKeepReplicas: malformed or oversized chunked bodies from a plain user are
// answered 400 and 413 (not 502), and eject neither of two healthy documents replicas: the
// next 20 requests still go to both.
func TestEdgeBadBodiesKeepReplicas(t *testing.T) {
	var hitsA, hitsB atomic.Int64
	a := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) { hitsA.Add(1) })
	b := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) { hitsB.Add(1) })
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": a.URL + "," + b.URL,
		"MAX_BODY_BYTES": "64"})
	w := watchTokens(t, g)
	user := w.token(t, "u-user", []string{"user"}, nil)

	bad := []struct {
		body   string
		status int
		code   string
	}{
		{"5\nhello\r\n0\r\n\r\n", http.StatusBadRequest, "VALIDATION_ERROR"},
		{"100\r\n" + strings.Repeat("x", 256) + "\r\n0\r\n\r\n", http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE"},
	}
	for i := range 6 {
		tc := bad[i%2]
		c := dialEdge(t, g)
		c.send("GET /api/v2/documents/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + user +
			"\r\nTransfer-Encoding: chunked\r\n\r\n" + tc.body)
		res, got := c.response()
		if res.StatusCode != tc.status || !strings.Contains(got, tc.code) {
			t.Fatalf("bad body %d: %d %s, want %d %s", i+1, res.StatusCode, got, tc.status, tc.code)
		}
	}
	hitsA.Store(0)
	hitsB.Store(0)
	for range 20 {
		wantStatus(t, call(t, g, "GET", "/api/v2/documents/x", user, ""), http.StatusOK)
	}
	if hitsA.Load() == 0 || hitsB.Load() == 0 {
		t.Errorf("after the bad bodies, 20 requests went a:%d b:%d; want both replicas still in use", hitsA.Load(), hitsB.Load())
	}
}

// TestEdgeSlowBodies: 10 chat and 10 documents requests sending their bodies a byte every 50 ms
// are all cut within BODY_READ_TIMEOUT and a little more, their connections closed; the
// documents back end's connections end with them, and the chat lease each held (one per user)
// is free again at once.
func TestEdgeSlowBodies(t *testing.T) {
	const grace = 300 * time.Millisecond
	var backendCut atomic.Int64
	docs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			backendCut.Add(1)
		}
	}))
	t.Cleanup(docs.Close)
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": docs.URL,
		"POLICY_FILE": "testdata/policy/e2e-lease.json", "BODY_READ_TIMEOUT": grace.String(), "BODY_MIN_RATE": "1024"})
	w := watchTokens(t, g)

	const n = 10
	var users []string
	for i := range n {
		users = append(users, w.token(t, fmt.Sprintf("u-slow-%d", i), []string{"editor"}, nil))
	}
	type result struct {
		path   string
		status int
		closed bool
		took   time.Duration
	}
	results := make(chan result, 2*n)
	stop := make(chan struct{})
	defer close(stop)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range 2 * n {
		path := "/api/v2/chat/stream"
		if i >= n {
			path = "/api/v2/documents/x"
		}
		c := dialEdge(t, g)
		wg.Go(func() {
			const body = `{"message":"` + "a slow body that keeps on coming, a byte at a time, forever" + `"}`
			c.send(fmt.Sprintf("POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
				path, users[i%n], len(body)))
			go func() {
				tick := time.NewTicker(50 * time.Millisecond)
				defer tick.Stop()
				for j := 0; j < len(body); j++ {
					if _, err := c.c.Write([]byte{body[j]}); err != nil {
						return
					}
					select {
					case <-stop:
						return
					case <-tick.C:
					}
				}
			}()
			res, err := http.ReadResponse(c.br, nil)
			if err != nil {
				results <- result{path: path, took: time.Since(start)}
				return
			}
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			closed, _ := c.closed()
			results <- result{path: path, status: res.StatusCode, closed: closed, took: time.Since(start)}
		})
	}
	wg.Wait()
	close(results)
	for r := range results {
		if r.status != http.StatusRequestTimeout && r.status != http.StatusBadRequest {
			t.Errorf("%s: status %d, want the body cut (408, or 400 from a handler that reads it itself)", r.path, r.status)
		}
		if !r.closed {
			t.Errorf("%s: connection left open after the body was cut", r.path)
		}
		if r.took > grace+1500*time.Millisecond {
			t.Errorf("%s: cut after %v, want within %v of the start", r.path, r.took, grace+1500*time.Millisecond)
		}
	}
	eventually(t, 2*time.Second, "the documents back end sees every slow body cut", func() bool {
		return backendCut.Load() == n
	})
	// The chat cap is one stream per user: a lease still held by a slow body would refuse this.
	for _, u := range users {
		wantStatus(t, call(t, g, "POST", "/api/v2/chat/stream", u, `{"message":"hi"}`), http.StatusOK)
	}
}
