package main

// The edge and the proxied back ends: admin and documents proxies (identity headers, credentials,
// replicas), error documents, and the protocol level over raw TCP connections — request
// smuggling with Content-Length and Transfer-Encoding, malformed chunked bodies, bodies trickled a
// byte at a time, upgrades and CONNECT/TRACE on routes that may not tunnel, and proxied responses
// to clients that stop reading.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// detailsOf returns the details of a JSON error as generic JSON.
func detailsOf(t *testing.T, res *http.Response, status int, code string) any {
	t.Helper()
	doc := wantError(t, res, status, code)
	var d any
	if err := json.Unmarshal(doc.Details, &d); err != nil {
		t.Fatalf("details %s: %v", doc.Details, err)
	}
	return d
}

// TestErrorDetailsAreArrays: an error's details have one shape, an array of objects with a
// reason, for 400 and for 403 alike.
func TestErrorDetailsAreArrays(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL})
	for _, tt := range []struct {
		name   string
		res    *http.Response
		status int
		code   string
		key    string // what the one detail is about
	}{
		{"400", call(t, g, "POST", "/api/v2/chat/stream", tokenFor(t, "u-edge2", []string{"user"}, nil), `{"message":"hi","temperature":5}`),
			http.StatusBadRequest, "VALIDATION_ERROR", "field"},
		{"403", call(t, g, "GET", "/api/v2/voice/sessions", tokenFor(t, "u-edge2", []string{"user"}, nil), ""),
			http.StatusForbidden, "PERMISSION_DENIED", "permission"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := detailsOf(t, tt.res, tt.status, tt.code)
			l, ok := d.([]any)
			if !ok || len(l) != 1 {
				t.Fatalf("details = %v, want an array of one object", d)
			}
			obj, _ := l[0].(map[string]any)
			if obj[tt.key] == nil || obj["reason"] == nil {
				t.Errorf("detail = %v, want %q and reason", l[0], tt.key)
			}
		})
	}
}

// TestBackendProxyCredentials: ADMIN_URL and DOCS_URL receive the caller's identity headers but
// not the client's Authorization or Cookie, unless BACKEND_FORWARD_CREDENTIALS passes them on.
func TestBackendProxyCredentials(t *testing.T) {
	for _, tt := range []struct {
		setting       string
		authorization bool
		cookie        bool
	}{
		{"", false, false},
		{"none", false, false},
		{"authorization", true, false},
		{"cookie", false, true},
		{"authorization,cookie", true, true},
	} {
		t.Run("BACKEND_FORWARD_CREDENTIALS="+tt.setting, func(t *testing.T) {
			backend := okBackend(t)
			g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL,
				"DOCS_URL": backend.URL, "BACKEND_FORWARD_CREDENTIALS": tt.setting})
			tok := tokenFor(t, "u-edge8", []string{"admin"}, nil)
			for _, path := range []string{"/api/v2/admin/users", "/api/v2/documents/d-1"} {
				wantStatus(t, callWith(t, g, "GET", path, tok, "", map[string]string{"Cookie": "session=abc"}), http.StatusOK)
				reqs := backend.requests()
				h := reqs[len(reqs)-1].Header
				if got := h.Get("Authorization") != ""; got != tt.authorization {
					t.Errorf("%s: Authorization forwarded = %v, want %v", path, got, tt.authorization)
				}
				if got := h.Get("Cookie") != ""; got != tt.cookie {
					t.Errorf("%s: Cookie forwarded = %v, want %v", path, got, tt.cookie)
				}
				if h.Get("X-User-Id") != "u-edge8" {
					t.Errorf("%s: X-User-Id = %q, want the caller", path, h.Get("X-User-Id"))
				}
			}
		})
	}
	_, err := parseConfig([]string{"voicegate"}, envFunc(map[string]string{"ALGO_URL": "http://a", "BACKEND_FORWARD_CREDENTIALS": "everything"}), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "BACKEND_FORWARD_CREDENTIALS") {
		t.Errorf("error = %v, want one naming BACKEND_FORWARD_CREDENTIALS", err)
	}
}

func TestBackendProxies(t *testing.T) {
	backend := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Backend", "yes")
		w.WriteHeader(http.StatusAccepted)
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":       "http://127.0.0.1:1",
		"ADMIN_URL":      backend.URL,
		"DOCS_URL":       backend.URL,
		"MAX_BODY_BYTES": "100",
	})

	for _, path := range []string{"/api/v2/admin/users?x=1", "/api/v2/documents/d-1?x=1"} {
		t.Run("GET "+path, func(t *testing.T) {
			n := len(backend.requests())
			res := doRequest(t, g.Client, http.MethodGet, g.URL+path, nil, nil)
			body, _ := io.ReadAll(res.Body)
			p, q, _ := strings.Cut(path, "?")
			if res.StatusCode != http.StatusAccepted || res.Header.Get("X-Backend") != "yes" ||
				string(body) != fmt.Sprintf(`{"path":%q}`, p) {
				t.Errorf("answer = %d %q X-Backend=%q, want the back end's 202 passed through",
					res.StatusCode, body, res.Header.Get("X-Backend"))
			}
			reqs := backend.requests()
			if len(reqs) != n+1 {
				t.Fatalf("back end received %d new requests, want 1", len(reqs)-n)
			}
			if got := reqs[n]; got.Method != "GET" || got.Path != p || got.RawQuery != q {
				t.Errorf("back end saw %s %s?%s, want GET %s", got.Method, got.Path, got.RawQuery, path)
			}
		})
	}
	t.Run("body over MAX_BODY_BYTES", func(t *testing.T) {
		n := len(backend.requests())
		res := doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/admin/users", strings.NewReader(strings.Repeat("x", 1024)), nil)
		wantError(t, res, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE")
		if got := len(backend.requests()); got != n {
			t.Errorf("back end received %d requests for an over-limit body, want 0", got-n)
		}
	})

	t.Run("unset back ends answer 404", func(t *testing.T) {
		base, stop := startGateway(t, map[string]string{"ALGO_URL": "http://127.0.0.1:1"})
		client := &http.Client{Transport: withToken{&http.Transport{}, tokenFor(t, "u-admin", []string{"admin"}, nil)}}
		for _, path := range []string{"/api/v2/admin/users?x=1", "/api/v2/documents/d-1"} {
			wantError(t, doRequest(t, client, http.MethodGet, base+path, nil, nil), http.StatusNotFound, "NOT_FOUND")
		}
		client.CloseIdleConnections()
		stop()
	})
}

// TestBackendProxyDropsClientIdentityHeaders: DESIGN.md ("Identity to upstreams") says client-sent
// identity headers never reach an upstream, which trusts them; the gateway sets them from the
// verified token, also when the client lists them in Connection to have them dropped.
func TestBackendProxyDropsClientIdentityHeaders(t *testing.T) {
	backend := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL})
	forged := map[string]string{
		"X-User-ID": "root", "X-Username": "root", "X-Tenant-ID": "tenant-a", "X-User-Roles": "super_admin",
		"X-Session-ID": "s-1", "X_User_ID": "root", "x-user_roles": "super_admin",
		"Connection": "X-User-ID, X-User-Roles",
	}
	res := doRequest(t, g.Client, http.MethodGet, g.URL+"/api/v2/admin/users", nil, forged)
	res.Body.Close()
	got := backend.only(t)
	want := map[string]string{"X-User-Id": "u-admin", "X-Username": "u-admin-name", "X-Tenant-Id": "tenant-a",
		"X-User-Roles": "admin"}
	for h, v := range want {
		if vals := got.Header.Values(h); len(vals) != 1 || vals[0] != v {
			t.Errorf("back end got %s = %q, want only %q from the token", h, vals, v)
		}
	}
	for h := range got.Header {
		if strings.Contains(strings.ToLower(h), "_") || strings.EqualFold(h, "X-Session-Id") {
			t.Errorf("forged header %s = %q reached the admin back end", h, got.Header[h])
		}
	}
}

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
	t.Parallel()
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

// tunnelBackend is a documents back end that would become a tunnel: on raw TCP it answers an
// upgrade (or, with always, any request) with 101 Switching Protocols, and then goes on reading
// whatever arrives on that connection as more requests, which is what a back end behind a
// relayed 101 gets. It records every request it reads.
type tunnelBackend struct {
	ln     net.Listener
	always bool
	mu     sync.Mutex
	seen   []tunnelRequest
	wg     sync.WaitGroup
}

// tunnelRequest is one request a tunnelBackend read.
type tunnelRequest struct {
	method, path string
	header       http.Header
	afterSwitch  bool // read on a connection it had already answered 101 on
}

func newTunnelBackend(t *testing.T, always bool) *tunnelBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &tunnelBackend{ln: ln, always: always}
	var conns []net.Conn
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			conns = append(conns, c)
			b.mu.Unlock()
			b.wg.Go(func() { b.serve(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		b.mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		b.mu.Unlock()
		b.wg.Wait()
	})
	return b
}

func (b *tunnelBackend) URL() string { return "http://" + b.ln.Addr().String() }

func (b *tunnelBackend) serve(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	switched := false
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		b.mu.Lock()
		b.seen = append(b.seen, tunnelRequest{method: req.Method, path: req.URL.Path, header: req.Header, afterSwitch: switched})
		b.mu.Unlock()
		proto := req.Header.Get("Upgrade")
		if proto == "" && b.always {
			proto = "websocket"
		}
		if proto != "" && !switched {
			switched = true
			fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", proto)
			continue
		}
		const body = `{"ok":true}`
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
}

func (b *tunnelBackend) requests() []tunnelRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.seen)
}

// TestEdgeUpgradeOnProxiedRoute: a plain user's request to a proxied route asking to upgrade
// (websocket, h2c, anything) is served as a plain request: the back end never sees the Upgrade,
// no 101 reaches the client even from a back end that answers 101 to everything (502 instead),
// and what the client sends next on its connection is a new request to the gateway — a forged
// identity without a token is refused (401), an internal path is not found (404) — never bytes
// in a tunnel that reach the back end as a request with those headers.
func TestEdgeUpgradeOnProxiedRoute(t *testing.T) {
	for _, always := range []bool{false, true} {
		backend := newTunnelBackend(t, always)
		g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": backend.URL()})
		w := watchTokens(t, g)
		user := w.token(t, "u-plain", []string{"user"}, nil)
		for _, proto := range []string{"websocket", "h2c", "foo/1", ""} {
			name := fmt.Sprintf("upgrade %q, back end answers 101 %s", proto, map[bool]string{false: "when asked", true: "always"}[always])
			t.Run(name, func(t *testing.T) {
				c := dialEdge(t, g)
				head := "GET /api/v2/documents/readme HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + user + "\r\n"
				if proto != "" {
					head += "Connection: Upgrade\r\nUpgrade: " + proto + "\r\n"
				}
				c.send(head + "\r\n")
				res, body := c.response()
				want := http.StatusOK
				if always {
					want = http.StatusBadGateway
				}
				next := "DELETE /api/v2/documents/readme HTTP/1.1\r\nHost: gw\r\nX-User-ID: admin\r\nX-User-Roles: super_admin\r\n\r\n" +
					"GET /internal/admin HTTP/1.1\r\nHost: gw\r\nX-User-ID: admin\r\nX-User-Roles: super_admin\r\n\r\n"
				if res.StatusCode == http.StatusSwitchingProtocols {
					// Show what the tunnel carries: the back end's record is checked below.
					t.Errorf("answer = 101: the client has a tunnel to the back end")
					before := len(backend.requests())
					c.send(next)
					eventually(t, 2*time.Second, "the tunnel delivers", func() bool { return len(backend.requests()) >= before+2 })
					return
				}
				if res.StatusCode != want {
					t.Fatalf("answer = %d %s, want %d", res.StatusCode, body, want)
				}
				if res.StatusCode == http.StatusBadGateway && !strings.Contains(body, "UPSTREAM_ERROR") {
					t.Errorf("502 body %s, want UPSTREAM_ERROR", body)
				}
				c.send(next)
				for _, want := range []int{http.StatusUnauthorized, http.StatusNotFound} {
					res, body := c.response()
					if res.StatusCode != want {
						t.Errorf("a request sent after the upgrade attempt: %d %s, want %d from the gateway", res.StatusCode, body, want)
					}
				}
			})
		}
		for _, r := range backend.requests() {
			if r.afterSwitch {
				t.Errorf("the back end read %s %s on a connection it had switched: a tunnel past the gateway", r.method, r.path)
			}
			if r.header.Get("Upgrade") != "" {
				t.Errorf("the back end saw Upgrade: %q", r.header.Get("Upgrade"))
			}
			if v := r.header.Values("X-User-Id"); len(v) != 1 || v[0] != "u-plain" || r.header.Get("X-User-Roles") != "user" {
				t.Errorf("the back end saw %s %s with X-User-Id %q, X-User-Roles %q: not the token's", r.method, r.path, v, r.header.Values("X-User-Roles"))
			}
			if r.method != http.MethodGet || r.path != "/api/v2/documents/readme" {
				t.Errorf("the back end saw %s %s", r.method, r.path)
			}
		}
		g.stop()
	}
}

// TestEdgeRefusesConnectAndTrace: CONNECT and TRACE are answered 405 at the edge, on every path
// (proxied, public, unknown, authority form), before authentication or routing; an admin's
// token makes no difference and the back end sees none of them.
func TestEdgeRefusesConnectAndTrace(t *testing.T) {
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": backend.URL, "ADMIN_URL": backend.URL})
	w := watchTokens(t, g)
	admin := w.token(t, "u-admin", []string{"admin"}, nil)
	for _, target := range []struct{ method, uri string }{
		{"CONNECT", "/api/v2/documents/readme"},
		{"CONNECT", "/api/v2/admin/users"},
		{"CONNECT", "127.0.0.1:6379"},
		{"CONNECT", "/healthz"},
		{"TRACE", "/api/v2/documents/readme"},
		{"TRACE", "/api/v2/admin/users"},
		{"TRACE", "/healthz"},
		{"TRACE", "/no/such/route"},
		{"TRACE", "*"},
	} {
		t.Run(target.method+" "+target.uri, func(t *testing.T) {
			c := dialEdge(t, g)
			c.send(target.method + " " + target.uri + " HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + admin + "\r\n\r\n")
			res, body := c.response()
			if res.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(body, `"METHOD_NOT_ALLOWED"`) {
				t.Fatalf("answer = %d %s, want 405 METHOD_NOT_ALLOWED", res.StatusCode, body)
			}
			allow := res.Header.Get("Allow")
			if allow == "" || strings.Contains(allow, "CONNECT") || strings.Contains(allow, "TRACE") {
				t.Errorf("Allow = %q, want the methods the gateway serves", allow)
			}
		})
	}
	if n := len(backend.requests()); n != 0 {
		t.Errorf("the back end received %d requests, want none", n)
	}
}

// TestEdgeProxyWriteDeadline: clients that ask a proxied route for a large document and never
// read are dropped within PROXY_WRITE_TIMEOUT (plus a generous margin), and so are the back
// end's connections serving them, counted by the back end itself.
func TestEdgeProxyWriteDeadline(t *testing.T) {
	t.Parallel()
	const (
		clients  = 12
		size     = 64 << 20
		timeout  = time.Second
		margin   = 5 * time.Second
		rcvSmall = 4 << 10
	)
	var open atomic.Int64
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	docs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	docs.Config.ConnState = func(c net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	docs.Start()
	t.Cleanup(docs.Close)
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": docs.URL,
		"PROXY_WRITE_TIMEOUT": timeout.String()})
	w := watchTokens(t, g)
	user := w.token(t, "u-reader", []string{"user"}, nil)

	// A small receive buffer, set before connecting so the window is small from the start.
	dialer := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvSmall)
		})
		return errors.Join(err, serr)
	}}
	var conns []net.Conn
	for range clients {
		c, err := dialer.Dial("tcp", g.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, "GET /api/v2/documents/big HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "+user+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	eventually(t, 10*time.Second, "every request reaches the back end", func() bool { return open.Load() == clients })
	took := eventually(t, timeout+margin, "the back end's connections are closed", func() bool { return open.Load() == 0 })
	t.Logf("back-end connections closed %v after the last one opened (PROXY_WRITE_TIMEOUT %v)", took, timeout)

	// Each client connection was closed by the gateway, mid-body: reading it now ends (EOF or a
	// reset) before the whole document, instead of waiting on an open keep-alive connection.
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("client %d: connection still open after %d bytes", i, n)
		}
		if n >= size {
			t.Errorf("client %d: read %d bytes, the whole document: the write was never cut", i, n)
		}
	}
}
