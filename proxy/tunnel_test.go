package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"voicegate/proxy"
)

// TestRouterUpgrade: a route registered with Handle sees a request that asks to upgrade without
// its Upgrade and without the upgrade token of Connection (the rest of Connection kept); one
// registered with HandleUpgrade sees the request as sent.
func TestRouterUpgrade(t *testing.T) {
	type seen struct{ upgrade, connection string }
	got := map[string]seen{}
	var mu sync.Mutex
	record := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			got[name] = seen{r.Header.Get("Upgrade"), strings.Join(r.Header.Values("Connection"), "|")}
			mu.Unlock()
			w.WriteHeader(http.StatusNoContent)
		})
	}
	rt := proxy.NewRouter()
	rt.Handle("GET /plain", record("plain"))
	rt.Handle("/subtree/", record("subtree"))
	rt.HandleUpgrade("GET /socket", record("socket"))
	tests := []struct {
		path, connection, upgrade string
		want                      seen
	}{
		{"/plain", "Upgrade", "websocket", seen{}},
		{"/plain", "keep-alive, Upgrade, HTTP2-Settings", "h2c", seen{"", "keep-alive, HTTP2-Settings"}},
		{"/plain", "upgrade", "foo/1", seen{}},
		{"/plain", "", "websocket", seen{}}, // an Upgrade without Connection: still dropped
		{"/subtree/x", "Upgrade", "websocket", seen{}},
		{"/socket", "Upgrade", "websocket", seen{"websocket", "Upgrade"}},
		{"/plain", "keep-alive", "", seen{"", "keep-alive"}},
	}
	for _, tt := range tests {
		t.Run(tt.path+" "+tt.upgrade, func(t *testing.T) {
			r := httptest.NewRequest("GET", tt.path, nil)
			if tt.connection != "" {
				r.Header.Set("Connection", tt.connection)
			}
			if tt.upgrade != "" {
				r.Header.Set("Upgrade", tt.upgrade)
			}
			before := r.Header.Clone()
			rt.ServeHTTP(httptest.NewRecorder(), r)
			name := strings.Trim(strings.SplitN(tt.path[1:], "/", 2)[0], "/")
			mu.Lock()
			defer mu.Unlock()
			if got[name] != tt.want {
				t.Errorf("handler saw Upgrade %q, Connection %q; want %q, %q", got[name].upgrade, got[name].connection,
					tt.want.upgrade, tt.want.connection)
			}
			if r.Header.Get("Upgrade") != before.Get("Upgrade") {
				t.Error("the caller's request was changed: the router must strip on a copy")
			}
		})
	}
}

func TestRefuseMethods(t *testing.T) {
	var reached int
	h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached++ }),
		proxy.RequestID(), proxy.RefuseMethods())
	for _, m := range []string{"CONNECT", "TRACE"} {
		for _, target := range []string{"/", "/api/v2/documents/x", "/nope"} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(m, target, nil))
			if rec.Code != http.StatusMethodNotAllowed || decodeError(t, rec.Body.Bytes()).Code != proxy.CodeMethodNotAllowed {
				t.Errorf("%s %s = %d %s, want 405 METHOD_NOT_ALLOWED", m, target, rec.Code, rec.Body)
			}
			if allow := rec.Header().Get("Allow"); !strings.Contains(allow, "GET") || strings.Contains(allow, m) {
				t.Errorf("%s %s: Allow %q", m, target, allow)
			}
		}
	}
	for _, m := range []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(m, "/x", nil))
	}
	if reached != 7 {
		t.Errorf("%d of the 7 ordinary methods reached the handler", reached)
	}
}

// switchingBackend answers every request with 101 Switching Protocols (whatever it asked), then
// reads what else arrives on the connection. It records the upgrade each request asked for and
// whether anything arrived after the switch.
type switchingBackend struct {
	ln       net.Listener
	wg       sync.WaitGroup // the accept loop
	conns    sync.WaitGroup // the connections
	mu       sync.Mutex
	upgrades []string
	after    int // requests or bytes read on a switched connection
	closed   int // switched connections the proxy closed
}

func newSwitchingBackend(t *testing.T) *switchingBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &switchingBackend{ln: ln}
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.conns.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				b.mu.Lock()
				b.upgrades = append(b.upgrades, req.Header.Get("Upgrade"))
				b.mu.Unlock()
				io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
				n, err := c.Read(make([]byte, 1))
				b.mu.Lock()
				b.after += n
				if err == io.EOF {
					b.closed++
				}
				b.mu.Unlock()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		b.wg.Wait()
		b.conns.Wait()
	})
	return b
}

// TestProxyRefusesSwitch: a back end's 101 is never relayed, whatever the request asked: the
// client gets 502 and the back end's switched connection is closed at once, with nothing sent on
// it. The proxy asks no back end to upgrade even when a request reaches it with an Upgrade (no
// router in front), and a ModifyResponse never sees the 101.
func TestProxyRefusesSwitch(t *testing.T) {
	backend := newSwitchingBackend(t)
	tr := newTransport(t, proxy.TransportOptions{})
	var modified int
	p := proxy.New(proxy.Options{Target: mustURL(t, "http://"+backend.ln.Addr().String()), Transport: tr,
		ModifyResponse: func(*http.Response) error { modified++; return nil }})
	front := startServer(t, proxy.Chain(p, proxy.RequestID()))
	addr := strings.TrimPrefix(front.URL, "http://")
	for i, upgrade := range []string{"websocket", "", "h2c"} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		req := "GET /x HTTP/1.1\r\nHost: front\r\n"
		if upgrade != "" {
			req += "Connection: Upgrade\r\nUpgrade: " + upgrade + "\r\n"
		}
		io.WriteString(c, req+"\r\n")
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		c.Close()
		if res.StatusCode != http.StatusBadGateway || decodeError(t, body).Code != proxy.CodeUpstream {
			t.Errorf("request %d (Upgrade %q): %d %s, want 502 UPSTREAM_ERROR", i, upgrade, res.StatusCode, body)
		}
	}
	backend.conns.Wait() // every switched connection has ended: the proxy closed each
	backend.mu.Lock()
	defer backend.mu.Unlock()
	for _, u := range backend.upgrades {
		if u != "" {
			t.Errorf("the back end was asked to upgrade to %q", u)
		}
	}
	if backend.closed != 3 || backend.after != 0 {
		t.Errorf("switched connections: %d closed by the proxy, %d bytes sent on them; want 3 and 0", backend.closed, backend.after)
	}
	if modified != 0 {
		t.Errorf("ModifyResponse saw the 101 %d times", modified)
	}
}

func ExampleRouter_HandleUpgrade() {
	rt := proxy.NewRouter()
	show := func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("%s sees Upgrade %q\n", r.URL.Path, r.Header.Get("Upgrade"))
	}
	rt.Handle("GET /documents", http.HandlerFunc(show))
	rt.HandleUpgrade("GET /voice", http.HandlerFunc(show))
	for _, path := range []string{"/documents", "/voice"} {
		r := httptest.NewRequest("GET", path, nil)
		r.Header.Set("Connection", "Upgrade")
		r.Header.Set("Upgrade", "websocket")
		rt.ServeHTTP(httptest.NewRecorder(), r)
	}
	// Output:
	// /documents sees Upgrade ""
	// /voice sees Upgrade "websocket"
}
