package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/proxy"
)

// logBuffer is a bytes.Buffer behind a lock: servers log from their own goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// lines decodes every JSON log line.
func (b *logBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for line := range strings.Lines(b.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func (b *logBuffer) withMsg(t *testing.T, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range b.lines(t) {
		if l["msg"] == msg {
			out = append(out, l)
		}
	}
	return out
}

// requests returns the access log lines.
func (b *logBuffer) requests(t *testing.T) []map[string]any {
	t.Helper()
	return b.withMsg(t, "request")
}

func newLog(level slog.Level) (*slog.Logger, *logBuffer) {
	buf := &logBuffer{}
	return slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: level})), buf
}

// startServer starts a real loopback server that is closed when the test ends.
func startServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// newTransport returns a proxy transport whose idle connections are closed when the test ends.
func newTransport(t *testing.T, o proxy.TransportOptions) *http.Transport {
	t.Helper()
	tr := proxy.NewTransport(o)
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

func get(t *testing.T, c *http.Client, url string) (string, int) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b), resp.StatusCode
}

type errorDoc struct {
	Error     string          `json:"error"`
	Code      string          `json:"code"`
	RequestID string          `json:"request_id"`
	Details   json.RawMessage `json:"details"`
}

func decodeError(t *testing.T, body []byte) errorDoc {
	t.Helper()
	var doc errorDoc
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatalf("body %q is not a JSON error document: %v", body, err)
	}
	return doc
}

func decodeErrorMap(t *testing.T, body []byte) map[string]any {
	t.Helper()
	var doc map[string]any
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatalf("body %q is not a JSON error document: %v", body, err)
	}
	return doc
}

func keys(m map[string]any) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func mustPrefixes(t *testing.T, s string) proxy.Prefixes {
	t.Helper()
	ps, err := proxy.ParsePrefixes(s)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	// 127.0.0.2: no test server binds there, so the freed port stays refused.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// seen is what a backend received.
type seen struct {
	Method, Path, RawQuery, Body, Host string
	Header                             http.Header
}

// recordingBackend starts a backend that records each request and answers "backend ok".
func recordingBackend(t *testing.T) (*httptest.Server, <-chan seen) {
	t.Helper()
	ch := make(chan seen, 16)
	srv := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		ch <- seen{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Body: string(b),
			Host: r.Host, Header: r.Header.Clone()}
		w.Header().Set("X-Backend", "yes")
		_, _ = io.WriteString(w, "backend ok")
	}))
	return srv, ch
}

// edge is the gateway's middleware stack around a handler.
func edge(h http.Handler, logger *slog.Logger) http.Handler {
	return proxy.Chain(h, proxy.Recover(logger), proxy.RequestID(), proxy.ClientIP(nil),
		proxy.AccessLog(logger))
}

func TestNewForwardsRequest(t *testing.T) {
	tests := []struct {
		name      string
		target    string // path and query appended to the backend URL
		method    string
		path      string
		body      string
		wantPath  string
		wantQuery string
	}{
		{name: "GET with query", target: "/base", method: "GET", path: "/api/v2/admin/users?x=1&y=two",
			wantPath: "/base/api/v2/admin/users", wantQuery: "x=1&y=two"},
		{name: "POST with body", target: "/base/", method: "POST", path: "/api/v2/documents/d1",
			body: `{"title":"t"}`, wantPath: "/base/api/v2/documents/d1"},
		{name: "PUT with body", target: "", method: "PUT", path: "/docs/1", body: "replace",
			wantPath: "/docs/1"},
		{name: "DELETE", target: "/svc", method: "DELETE", path: "/docs/1", wantPath: "/svc/docs/1"},
		{name: "target query is merged", target: "/svc?tenant=t1", method: "GET", path: "/docs?page=2",
			wantPath: "/svc/docs", wantQuery: "tenant=t1&page=2"},
		{name: "escaped path", target: "/svc", method: "GET", path: "/docs/a%20b",
			wantPath: "/svc/docs/a b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			backend, got := recordingBackend(t)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL+tt.target), Transport: tr})
			front := startServer(t, edge(p, logger))

			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			req, err := http.NewRequestWithContext(t.Context(), tt.method, front.URL+tt.path, body)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := front.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			respBody, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(respBody) != "backend ok" || resp.Header.Get("X-Backend") != "yes" {
				t.Errorf("response = %d %q %v, want the backend's", resp.StatusCode, respBody, resp.Header)
			}
			s := <-got
			if s.Method != tt.method {
				t.Errorf("method = %s, want %s", s.Method, tt.method)
			}
			if s.Path != tt.wantPath {
				t.Errorf("path = %q, want %q", s.Path, tt.wantPath)
			}
			if s.RawQuery != tt.wantQuery {
				t.Errorf("query = %q, want %q", s.RawQuery, tt.wantQuery)
			}
			if s.Body != tt.body {
				t.Errorf("body = %q, want %q", s.Body, tt.body)
			}
			if s.Host != mustURL(t, backend.URL).Host {
				t.Errorf("Host = %q, want the backend's %q (SetURL)", s.Host, mustURL(t, backend.URL).Host)
			}
			if id := s.Header.Get("X-Request-ID"); id == "" || id != resp.Header.Get("X-Request-ID") {
				t.Errorf("backend X-Request-ID = %q, client got %q", id, resp.Header.Get("X-Request-ID"))
			}
		})
	}
}

func TestNewForwardedHeaders(t *testing.T) {
	tests := []struct {
		name      string
		trusted   string
		xff       []string
		host      string
		clientHdr map[string]string
		wantXFF   string
	}{
		{name: "untrusted peer, no XFF", wantXFF: "127.0.0.1"},
		{name: "untrusted peer, client XFF dropped", xff: []string{"1.2.3.4"}, wantXFF: "127.0.0.1"},
		{name: "other network trusted, client XFF dropped", trusted: "10.0.0.0/8",
			xff: []string{"1.2.3.4"}, wantXFF: "127.0.0.1"},
		{name: "trusted peer, chain kept", trusted: "127.0.0.0/8", xff: []string{"1.2.3.4"},
			wantXFF: "1.2.3.4, 127.0.0.1"},
		{name: "trusted peer, several XFF lines", trusted: "127.0.0.1", xff: []string{"1.2.3.4", "5.6.7.8, 10.0.0.1"},
			wantXFF: "1.2.3.4, 5.6.7.8, 10.0.0.1, 127.0.0.1"},
		{name: "trusted peer, no XFF", trusted: "127.0.0.1", wantXFF: "127.0.0.1"},
		{name: "host and proto are ours, not the client's", host: "gateway.example",
			clientHdr: map[string]string{"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
				"Forwarded": "for=6.6.6.6;host=evil.example"},
			xff: []string{"6.6.6.6"}, wantXFF: "127.0.0.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			backend, got := recordingBackend(t)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
			// ClientIP decides whether the peer is trusted; Outbound acts on it.
			front := startServer(t, proxy.Chain(p, proxy.Recover(logger), proxy.RequestID(),
				proxy.ClientIP(mustPrefixes(t, tt.trusted)), proxy.AccessLog(logger)))

			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, front.URL+"/x", nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range tt.xff {
				req.Header.Add("X-Forwarded-For", v)
			}
			for k, v := range tt.clientHdr {
				req.Header.Set(k, v)
			}
			wantHost := mustURL(t, front.URL).Host
			if tt.host != "" {
				req.Host = tt.host
				wantHost = tt.host
			}
			_, status := doClose(t, front.Client(), req)
			if status != 200 {
				t.Fatalf("status = %d", status)
			}
			s := <-got
			if xff := s.Header.Values("X-Forwarded-For"); len(xff) != 1 || xff[0] != tt.wantXFF {
				t.Errorf("X-Forwarded-For = %q, want [%q]", xff, tt.wantXFF)
			}
			if v := s.Header.Get("X-Forwarded-Host"); v != wantHost {
				t.Errorf("X-Forwarded-Host = %q, want %q", v, wantHost)
			}
			if v := s.Header.Get("X-Forwarded-Proto"); v != "http" {
				t.Errorf("X-Forwarded-Proto = %q, want http", v)
			}
			if v := s.Header.Get("Forwarded"); v != "" {
				t.Errorf("client's Forwarded header reached the backend: %q", v)
			}
		})
	}
}

func doClose(t *testing.T, c *http.Client, req *http.Request) (*http.Response, int) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp, resp.StatusCode
}

func TestNewRemovesHopByHopHeaders(t *testing.T) {
	backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header
		var bad []string
		for _, k := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Upgrade"} {
			if v := h.Get(k); v != "" {
				bad = append(bad, k+": "+v)
			}
		}
		if h.Get("X-End") != "kept" {
			bad = append(bad, "X-End missing")
		}
		if len(bad) > 0 {
			http.Error(w, strings.Join(bad, "; "), http.StatusTeapot)
			return
		}
		w.Header().Set("Connection", "X-Resp-Hop")
		w.Header().Set("X-Resp-Hop", "secret")
		w.Header().Set("Keep-Alive", "timeout=99")
		w.Header().Set("X-Resp-End", "kept")
		_, _ = io.WriteString(w, "ok")
	}))
	tr := newTransport(t, proxy.TransportOptions{})
	logger, _ := newLog(slog.LevelDebug)
	front := startServer(t, edge(proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr}), logger))

	// A raw client, so the hop-by-hop headers go out exactly as written.
	conn, err := net.Dial("tcp", front.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = io.WriteString(conn, "GET /x HTTP/1.1\r\nHost: gw\r\n"+
		"Connection: X-Hop, close\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"+
		"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\nX-End: kept\r\n\r\n")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("backend saw hop-by-hop headers: %d %s", resp.StatusCode, body)
	}
	if v := resp.Header.Get("X-Resp-Hop"); v != "" {
		t.Errorf("response header named in Connection reached the client: %q", v)
	}
	if v := resp.Header.Get("Keep-Alive"); v != "" {
		t.Errorf("response Keep-Alive reached the client: %q", v)
	}
	if v := resp.Header.Get("X-Resp-End"); v != "kept" {
		t.Errorf("end-to-end response header lost: %q", v)
	}
}

// TestNewStreams checks that an event stream passes through the proxy and the edge middleware
// event by event.
func TestNewStreams(t *testing.T) {
	next := make(chan struct{})
	backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 2 {
			fmt.Fprintf(w, "data: %d\n\n", i)
			_ = http.NewResponseController(w).Flush()
			select {
			case <-next:
			case <-r.Context().Done():
				return
			case <-time.After(5 * time.Second):
				return
			}
		}
	}))
	tr := newTransport(t, proxy.TransportOptions{})
	logger, _ := newLog(slog.LevelDebug)
	front := startServer(t, edge(proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr}), logger))

	resp, err := front.Client().Get(front.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := range 2 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if want := fmt.Sprintf("data: %d\n", i); line != want {
			t.Fatalf("event %d = %q, want %q", i, line, want)
		}
		if _, err := br.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		next <- struct{}{} // the backend writes the next event only once this one arrived
	}
}

func TestNewUpstreamRefused(t *testing.T) {
	tests := []struct {
		name     string
		code     string
		upstream string
		wantCode string
		wantMsg  string
	}{
		{name: "default code", wantCode: proxy.CodeUpstream, wantMsg: "upstream is unreachable"},
		{name: "algorithm service", code: proxy.CodeAlgoService, upstream: "algorithm service",
			wantCode: proxy.CodeAlgoService, wantMsg: "algorithm service is unreachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := closedAddr(t)
			_, port, _ := net.SplitHostPort(addr)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, logs := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, "http://"+addr+"/base"), Transport: tr,
				Code: tt.code, Name: tt.upstream})
			front := startServer(t, edge(p, logger))

			resp, err := front.Client().Get(front.URL + "/x")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadGateway {
				t.Errorf("status = %d, want 502", resp.StatusCode)
			}
			doc := decodeError(t, body)
			if doc.Code != tt.wantCode || doc.Error != tt.wantMsg {
				t.Errorf("error document = %+v, want code %s, message %q", doc, tt.wantCode, tt.wantMsg)
			}
			if doc.RequestID == "" || doc.RequestID != resp.Header.Get("X-Request-ID") {
				t.Errorf("request_id = %q, header %q", doc.RequestID, resp.Header.Get("X-Request-ID"))
			}
			if strings.Contains(string(body), "127.0.0.") || strings.Contains(string(body), port) {
				t.Errorf("upstream address reached the client: %s", body)
			}
			front.Close()
			lines := logs.requests(t)
			if len(lines) != 1 {
				t.Fatalf("got %d access lines, want 1", len(lines))
			}
			if lines[0]["code"] != tt.wantCode || lines[0]["status"] != float64(502) {
				t.Errorf("access line = %v", lines[0])
			}
			if cause, _ := lines[0]["cause"].(string); !strings.Contains(cause, "connection refused") {
				t.Errorf("cause = %q, want the refusal", cause)
			}
			if s := logs.String(); strings.Contains(s, "127.0.0.1:"+port) || strings.Contains(s, port) {
				t.Errorf("upstream address reached the log: %s", s)
			}
		})
	}
}

func TestNewUpstreamTimeout(t *testing.T) {
	release := make(chan struct{})
	backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select { // think longer than the proxy waits for headers
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release) }) // runs before backend.Close
	tr := newTransport(t, proxy.TransportOptions{ResponseHeaderTimeout: 100 * time.Millisecond})
	logger, logs := newLog(slog.LevelDebug)
	p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr, Code: proxy.CodeAlgoService})
	front := startServer(t, edge(p, logger))

	// Bounded, so a proxy that waits forever fails the test instead of hanging it.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, front.URL+"/slow", nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	resp, err := front.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("took %v; the header timeout was 100ms", elapsed)
	}
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("status = %d, want 504", resp.StatusCode)
	}
	if doc := decodeError(t, body); doc.Code != proxy.CodeUpstreamTimeout {
		t.Errorf("code = %s, want %s", doc.Code, proxy.CodeUpstreamTimeout)
	}
	front.Close()
	if l := logs.requests(t); len(l) != 1 || l[0]["status"] != float64(504) || l[0]["level"] != "WARN" {
		t.Errorf("access log = %v", l)
	}
}

func TestNewUpstreamStatus(t *testing.T) {
	tests := []struct {
		upstream       int
		retryAfter     string
		wantStatus     int
		wantCode       string
		wantRetryAfter string
	}{
		{upstream: 503, retryAfter: "7", wantStatus: 503, wantCode: proxy.CodeAlgoService, wantRetryAfter: "7"},
		{upstream: 503, wantStatus: 503, wantCode: proxy.CodeAlgoService},
		{upstream: 429, retryAfter: "30", wantStatus: 429, wantCode: proxy.CodeRateLimited, wantRetryAfter: "30"},
		{upstream: 429, wantStatus: 429, wantCode: proxy.CodeRateLimited, wantRetryAfter: "1"},
		{upstream: 429, retryAfter: "Wed, 21 Oct 2015 07:28:00 GMT", wantStatus: 429,
			wantCode: proxy.CodeRateLimited, wantRetryAfter: "1"},
		{upstream: 504, wantStatus: 504, wantCode: proxy.CodeUpstreamTimeout},
		{upstream: 500, wantStatus: 502, wantCode: proxy.CodeAlgoService},
		{upstream: 404, wantStatus: 502, wantCode: proxy.CodeAlgoService},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%d retry-after %q", tt.upstream, tt.retryAfter), func(t *testing.T) {
			backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				w.Header().Set("X-Internal", "leak")
				w.WriteHeader(tt.upstream)
				_, _ = io.WriteString(w, "stack trace from upstream.internal")
			}))
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr,
				Code: proxy.CodeAlgoService, Name: "algorithm service",
				ModifyResponse: func(resp *http.Response) error {
					if resp.StatusCode != http.StatusOK {
						return &proxy.UpstreamStatusError{Status: resp.StatusCode,
							RetryAfter: proxy.ParseRetryAfter(resp.Header.Get("Retry-After"))}
					}
					return nil
				}})
			front := startServer(t, edge(p, logger))

			resp, err := front.Client().Get(front.URL + "/query")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			doc := decodeError(t, body)
			if doc.Code != tt.wantCode {
				t.Errorf("code = %s, want %s", doc.Code, tt.wantCode)
			}
			if !strings.HasPrefix(doc.Error, "algorithm service") {
				t.Errorf("message %q does not name the upstream", doc.Error)
			}
			if got := resp.Header.Get("Retry-After"); got != tt.wantRetryAfter {
				t.Errorf("Retry-After = %q, want %q", got, tt.wantRetryAfter)
			}
			if strings.Contains(string(body), "upstream.internal") || resp.Header.Get("X-Internal") != "" {
				t.Errorf("upstream's answer leaked to the client: %v %s", resp.Header, body)
			}
		})
	}
}

// TestNewClientGone checks that a client that leaves while the upstream thinks is recorded as
// 499 and the upstream call is cancelled.
func TestNewClientGone(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	upstreamDone := make(chan error, 1)
	backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cancel() // the client gives up once the upstream has the request
		select {
		case <-r.Context().Done():
			upstreamDone <- nil
		case <-time.After(5 * time.Second):
			upstreamDone <- errors.New("upstream request was not cancelled")
		}
	}))
	tr := newTransport(t, proxy.TransportOptions{})
	logger, logs := newLog(slog.LevelDebug)
	p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
	served := make(chan struct{}, 1)
	front := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		edge(p, logger).ServeHTTP(w, r)
		served <- struct{}{}
	}))

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, front.URL+"/slow", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := front.Client().Do(req)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("request succeeded with %d; want it cancelled", resp.StatusCode)
	}
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatal("the front did not notice the client left")
	}
	if err := <-upstreamDone; err != nil {
		t.Error(err)
	}
	lines := logs.requests(t)
	if len(lines) != 1 {
		t.Fatalf("got %d access lines, want 1:\n%s", len(lines), logs)
	}
	if lines[0]["status"] != float64(proxy.StatusClientClosed) || lines[0]["code"] != "CLIENT_CLOSED" {
		t.Errorf("access line = %v, want status 499, code CLIENT_CLOSED", lines[0])
	}
	if lines[0]["bytes"] != float64(0) {
		t.Errorf("bytes = %v; nothing should be sent to a gone client", lines[0]["bytes"])
	}
}

func TestNewBodyLimit(t *testing.T) {
	const limit = 1 << 10
	tests := []struct {
		name         string
		size         int
		chunked      bool
		wantStatus   int
		wantComplete bool // the backend reads the whole body
	}{
		{name: "chunked under limit", size: limit / 2, chunked: true, wantStatus: 200, wantComplete: true},
		{name: "chunked at limit", size: limit, chunked: true, wantStatus: 200, wantComplete: true},
		{name: "chunked over limit", size: 64 << 10, chunked: true, wantStatus: 413},
		{name: "Content-Length over limit", size: 64 << 10, wantStatus: 413},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var complete, calls atomic.Int32
			backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				b, err := io.ReadAll(r.Body)
				if err == nil && len(b) == tt.size {
					complete.Add(1)
				}
			}))
			backend.Config.ErrorLog = log.New(io.Discard, "", 0)
			backend.Start()
			t.Cleanup(backend.Close)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
			front := startServer(t, proxy.Chain(p, proxy.Recover(logger), proxy.RequestID(),
				proxy.AccessLog(logger), proxy.BodyLimit(limit)))

			payload := strings.Repeat("a", tt.size)
			var body io.Reader = strings.NewReader(payload)
			if tt.chunked {
				body = struct{ io.Reader }{body} // hides the length
			}
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/upload", body)
			if err != nil {
				t.Fatal(err)
			}
			if tt.chunked {
				req.ContentLength = -1
			}
			resp, err := front.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			respBody, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status = %d %s, want %d", resp.StatusCode, respBody, tt.wantStatus)
			}
			if tt.wantStatus == 413 {
				if doc := decodeError(t, respBody); doc.Code != proxy.CodePayloadTooLarge {
					t.Errorf("code = %s, want %s", doc.Code, proxy.CodePayloadTooLarge)
				}
			}
			front.Close()
			tr.CloseIdleConnections()
			backend.Close() // waits for the backend handler
			if got := complete.Load() == 1; got != tt.wantComplete {
				t.Errorf("backend read the complete body = %v (calls %d), want %v",
					got, calls.Load(), tt.wantComplete)
			}
			if !tt.chunked && calls.Load() != 0 {
				t.Errorf("backend was called for a body refused by its Content-Length")
			}
		})
	}
}

func TestErrorMapperMap(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	refused := &url.Error{Op: "Get", URL: "http://10.9.8.7:4000/q", Err: refusedOpError()}
	tests := []struct {
		name           string
		mapper         proxy.ErrorMapper
		ctx            context.Context
		err            error
		wantStatus     int
		wantCode       string
		wantMsg        string
		wantRetryAfter int
	}{
		{name: "client gone", ctx: canceled, err: context.Canceled,
			wantStatus: 499, wantCode: "CLIENT_CLOSED"},
		{name: "client gone wins over a transport error", ctx: canceled, err: refused,
			wantStatus: 499, wantCode: "CLIENT_CLOSED"},
		{name: "body too large", err: fmt.Errorf("write: %w", &http.MaxBytesError{Limit: 99}),
			wantStatus: 413, wantCode: proxy.CodePayloadTooLarge, wantMsg: "request body is larger than 99 bytes"},
		{name: "refused", err: refused, wantStatus: 502, wantCode: proxy.CodeUpstream,
			wantMsg: "upstream is unreachable"},
		{name: "refused, named", mapper: proxy.ErrorMapper{Code: proxy.CodeAlgoService, Name: "admin service"},
			err: refused, wantStatus: 502, wantCode: proxy.CodeAlgoService, wantMsg: "admin service is unreachable"},
		{name: "deadline", err: fmt.Errorf("round trip: %w", context.DeadlineExceeded),
			wantStatus: 504, wantCode: proxy.CodeUpstreamTimeout, wantMsg: "upstream did not answer in time"},
		{name: "net timeout", err: &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded},
			wantStatus: 504, wantCode: proxy.CodeUpstreamTimeout},
		{name: "other", err: io.ErrUnexpectedEOF, wantStatus: 502, wantCode: proxy.CodeUpstream,
			wantMsg: "upstream failed"},
		{name: "status 503", mapper: proxy.ErrorMapper{Code: proxy.CodeAlgoService},
			err: &proxy.UpstreamStatusError{Status: 503, RetryAfter: 5}, wantStatus: 503,
			wantCode: proxy.CodeAlgoService, wantRetryAfter: 5},
		{name: "status 429", err: &proxy.UpstreamStatusError{Status: 429}, wantStatus: 429,
			wantCode: proxy.CodeRateLimited, wantRetryAfter: 1},
		{name: "status 504", err: &proxy.UpstreamStatusError{Status: 504}, wantStatus: 504,
			wantCode: proxy.CodeUpstreamTimeout},
		{name: "status 500", err: &proxy.UpstreamStatusError{Status: 500}, wantStatus: 502,
			wantCode: proxy.CodeUpstream, wantMsg: "upstream failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := tt.ctx
			if ctx == nil {
				ctx = t.Context()
			}
			r := httptest.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
			e := tt.mapper.Map(r, tt.err)
			if e.Status != tt.wantStatus || e.Code != tt.wantCode {
				t.Errorf("Map = %d %s, want %d %s", e.Status, e.Code, tt.wantStatus, tt.wantCode)
			}
			if tt.wantMsg != "" && e.Message != tt.wantMsg {
				t.Errorf("message = %q, want %q", e.Message, tt.wantMsg)
			}
			if e.RetryAfter != tt.wantRetryAfter {
				t.Errorf("RetryAfter = %d, want %d", e.RetryAfter, tt.wantRetryAfter)
			}
			if strings.Contains(e.Message, "10.9.8.7") || strings.Contains(e.Message, "4000") {
				t.Errorf("message %q names the upstream address", e.Message)
			}
			if tt.wantStatus != 413 && !errors.Is(e, tt.err) && e.Cause != tt.err {
				t.Errorf("cause %v does not keep the error %v", e.Cause, tt.err)
			}
		})
	}
}

func TestWriteError(t *testing.T) {
	cause := errors.New("redis at 10.0.0.5:6379 down")
	tests := []struct {
		name       string
		err        *proxy.Error
		wantStatus int
		wantCode   string
		wantMsg    string
		wantHeader map[string]string
		wantBody   bool
	}{
		{name: "zero value", err: &proxy.Error{}, wantStatus: 500, wantCode: proxy.CodeInternal,
			wantMsg: "Internal Server Error", wantBody: true},
		{name: "status text as message", err: &proxy.Error{Status: 404, Code: proxy.CodeNotFound},
			wantStatus: 404, wantCode: proxy.CodeNotFound, wantMsg: "Not Found", wantBody: true},
		{name: "401 with header", err: &proxy.Error{Status: 401, Code: proxy.CodeTokenExpired,
			Message: "token expired", Header: http.Header{"Www-Authenticate": {`Bearer error="invalid_token"`}}},
			wantStatus: 401, wantCode: proxy.CodeTokenExpired, wantMsg: "token expired", wantBody: true,
			wantHeader: map[string]string{"WWW-Authenticate": `Bearer error="invalid_token"`}},
		{name: "retry after", err: &proxy.Error{Status: 429, Code: proxy.CodeRateLimited, Message: "slow down",
			RetryAfter: 12}, wantStatus: 429, wantCode: proxy.CodeRateLimited, wantMsg: "slow down",
			wantBody: true, wantHeader: map[string]string{"Retry-After": "12"}},
		{name: "cause stays out", err: &proxy.Error{Status: 503, Code: proxy.CodeAuthService,
			Message: "auth unavailable", Cause: cause}, wantStatus: 503, wantCode: proxy.CodeAuthService,
			wantMsg: "auth unavailable", wantBody: true},
		{name: "client closed sends no body", err: &proxy.Error{Status: proxy.StatusClientClosed,
			Code: "CLIENT_CLOSED", Cause: context.Canceled}, wantStatus: 499, wantCode: "CLIENT_CLOSED"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var info *proxy.Info
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "3") // a stale length must not survive
				proxy.WriteError(w, r, tt.err)
				info = proxy.InfoFrom(r.Context())
			}), proxy.RequestID())
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
			if rec.Code != tt.wantStatus {
				t.Errorf("status = %d, want %d", rec.Code, tt.wantStatus)
			}
			if info.ErrCode != tt.wantCode || info.ErrCause != tt.err.Cause {
				t.Errorf("Info records %q %v, want %q %v", info.ErrCode, info.ErrCause, tt.wantCode, tt.err.Cause)
			}
			if !tt.wantBody {
				if rec.Body.Len() != 0 {
					t.Errorf("body = %q, want none", rec.Body.String())
				}
				return
			}
			hd := rec.Header()
			if ct := hd.Get("Content-Type"); ct != "application/json; charset=utf-8" {
				t.Errorf("Content-Type = %q", ct)
			}
			if v := hd.Get("X-Content-Type-Options"); v != "nosniff" {
				t.Errorf("X-Content-Type-Options = %q", v)
			}
			if v := hd.Get("Content-Length"); v != "" {
				t.Errorf("stale Content-Length %q kept", v)
			}
			for k, v := range tt.wantHeader {
				if got := hd.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if tt.err.RetryAfter == 0 && hd.Get("Retry-After") != "" {
				t.Errorf("unexpected Retry-After %q", hd.Get("Retry-After"))
			}
			doc := decodeError(t, rec.Body.Bytes())
			if doc.Code != tt.wantCode || doc.Error != tt.wantMsg || doc.RequestID != hd.Get("X-Request-ID") {
				t.Errorf("document = %+v, want %s %q with the request ID", doc, tt.wantCode, tt.wantMsg)
			}
			if strings.Contains(rec.Body.String(), "10.0.0.5") {
				t.Errorf("cause reached the client: %s", rec.Body.String())
			}
		})
	}

	t.Run("details and no request ID outside the edge", func(t *testing.T) {
		rec := httptest.NewRecorder()
		proxy.WriteError(rec, httptest.NewRequest(http.MethodPost, "/", nil), &proxy.Error{
			Status: 400, Code: proxy.CodeValidation, Message: "invalid request",
			Details: map[string]string{"field": "temperature"}})
		doc := decodeErrorMap(t, rec.Body.Bytes())
		if _, ok := doc["request_id"]; ok {
			t.Errorf("request_id present without RequestID middleware: %v", doc)
		}
		d, _ := doc["details"].(map[string]any)
		if d["field"] != "temperature" {
			t.Errorf("details = %v", doc["details"])
		}
	})

	t.Run("Errorf", func(t *testing.T) {
		rec := httptest.NewRecorder()
		proxy.Errorf(rec, httptest.NewRequest(http.MethodGet, "/", nil), 403, proxy.CodePermission, "no")
		doc := decodeErrorMap(t, rec.Body.Bytes())
		if rec.Code != 403 || doc["code"] != proxy.CodePermission || doc["error"] != "no" {
			t.Errorf("got %d %v", rec.Code, doc)
		}
		if _, ok := doc["details"]; ok {
			t.Errorf("empty details serialised: %v", doc)
		}
	})
}

func TestErrorType(t *testing.T) {
	cause := io.ErrUnexpectedEOF
	e := &proxy.Error{Code: proxy.CodeUpstream, Message: "upstream failed", Cause: cause}
	if got, want := e.Error(), "UPSTREAM_ERROR: upstream failed: unexpected EOF"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(e, cause) {
		t.Errorf("errors.Is does not see the cause")
	}
	if got, want := (&proxy.Error{Code: "X", Message: "m"}).Error(), "X: m"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	var target *proxy.Error
	if !errors.As(fmt.Errorf("wrap: %w", e), &target) || target != e {
		t.Errorf("errors.As does not find *proxy.Error")
	}
	if got := (&proxy.UpstreamStatusError{Status: 503}).Error(); got != "upstream answered 503" {
		t.Errorf("UpstreamStatusError.Error() = %q", got)
	}
}

func TestDescribe(t *testing.T) {
	// A real dial error, as the transport produces it.
	addr := closedAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	_, dialErr := net.Dial("tcp", addr)
	if dialErr == nil {
		t.Fatal("dial to a closed port succeeded")
	}

	tests := []struct {
		name    string
		err     error
		want    string // exact, when set
		contain string
		absent  []string
	}{
		{name: "nil", err: nil, want: ""},
		{name: "plain", err: errors.New("boom"), want: "boom"},
		{name: "url and op error", err: &url.Error{Op: "Post", URL: "http://127.0.0.1:39999/query",
			Err: refusedOpError()}, want: "post: dial: connection refused",
			absent: []string{"127.0.0.1", "39999"}},
		{name: "wrapped op error", err: fmt.Errorf("call: %w", refusedOpError()),
			want: "dial: connection refused", absent: []string{"127.0.0.1", "39999"}},
		{name: "DNS", err: &url.Error{Op: "Get", URL: "http://admin.internal/x",
			Err: &net.OpError{Op: "dial", Net: "tcp",
				Err: &net.DNSError{Err: "no such host", Name: "admin.internal", Server: "10.0.0.53:53"}}},
			want: "get: lookup failed: no such host", absent: []string{"admin.internal", "10.0.0.53"}},
		{name: "real dial error", err: dialErr, contain: "connection refused",
			absent: []string{"127.0.0.", port}},
		{name: "real dial error in url error", err: &url.Error{Op: "Get", URL: "http://" + addr, Err: dialErr},
			contain: "connection refused", absent: []string{"127.0.0.", port}},
		{name: "TLS host name mismatch", err: &url.Error{Op: "Get", URL: "https://admin.internal:8443/x",
			Err: &tls.CertificateVerificationError{Err: x509.HostnameError{
				Certificate: &x509.Certificate{DNSNames: []string{"other.internal"}}, Host: "admin.internal"}}},
			contain: "certificate", absent: []string{"admin.internal", "other.internal"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := proxy.Describe(tt.err)
			if tt.contain == "" && got != tt.want {
				t.Errorf("Describe = %q, want %q", got, tt.want)
			}
			if tt.contain != "" && !strings.Contains(got, tt.contain) {
				t.Errorf("Describe = %q, want it to contain %q", got, tt.contain)
			}
			for _, a := range tt.absent {
				if strings.Contains(got, a) {
					t.Errorf("Describe = %q leaks %q", got, a)
				}
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	tests := []struct {
		in   string
		want int
	}{
		{"", 0},
		{"0", 0},
		{"5", 5},
		{"3600", 3600},
		{"99999", 3600},
		{"-3", 0},
		{"1.5", 0},
		{"soon", 0},
		{"Wed, 21 Oct 2015 07:28:00 GMT", 0},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if got := proxy.ParseRetryAfter(tt.in); got != tt.want {
				t.Errorf("ParseRetryAfter(%q) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestBufferPool(t *testing.T) {
	tests := []struct {
		name string
		size int
		want int
	}{
		{"default", 0, 32 << 10},
		{"negative means default", -1, 32 << 10},
		{"custom", 4096, 4096},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bp := proxy.NewBufferPool(tt.size)
			for i := range 20 {
				b := bp.Get()
				if len(b) != tt.want || cap(b) != tt.want {
					t.Fatalf("Get #%d: len %d cap %d, want %d", i, len(b), cap(b), tt.want)
				}
				// Shortened buffers come back full length; foreign sizes are dropped.
				bp.Put(b[:i])
				bp.Put(make([]byte, 7))
				bp.Put(make([]byte, tt.want+1))
			}
		})
	}
	var _ httputil.BufferPool = proxy.NewBufferPool(0)
}

func TestNewTransport(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		tr := newTransport(t, proxy.TransportOptions{})
		if tr.Proxy != nil {
			t.Errorf("Proxy is set; upstreams must not go through an environment proxy")
		}
		if tr.MaxIdleConnsPerHost != 1024 {
			t.Errorf("MaxIdleConnsPerHost = %d, want 1024", tr.MaxIdleConnsPerHost)
		}
		for name, d := range map[string]time.Duration{
			"TLSHandshakeTimeout":   tr.TLSHandshakeTimeout,
			"ResponseHeaderTimeout": tr.ResponseHeaderTimeout,
			"IdleConnTimeout":       tr.IdleConnTimeout,
		} {
			if d <= 0 {
				t.Errorf("%s = %v, want a bound", name, d)
			}
		}
		if tr.ResponseHeaderTimeout != 30*time.Second || tr.IdleConnTimeout != 90*time.Second ||
			tr.TLSHandshakeTimeout != 5*time.Second {
			t.Errorf("timeouts = %v %v %v, want 30s 90s 5s",
				tr.ResponseHeaderTimeout, tr.IdleConnTimeout, tr.TLSHandshakeTimeout)
		}
		if tr.DialContext == nil {
			t.Errorf("no DialContext: the dial timeout is lost")
		}
		if !tr.DisableCompression {
			t.Errorf("compression enabled: streamed bodies would be decoded here")
		}
	})
	t.Run("overrides", func(t *testing.T) {
		tr := newTransport(t, proxy.TransportOptions{ResponseHeaderTimeout: time.Second,
			IdleConnTimeout: 2 * time.Second, TLSHandshakeTimeout: 3 * time.Second, MaxIdleConnsPerHost: 7})
		if tr.ResponseHeaderTimeout != time.Second || tr.IdleConnTimeout != 2*time.Second ||
			tr.TLSHandshakeTimeout != 3*time.Second || tr.MaxIdleConnsPerHost != 7 {
			t.Errorf("overrides not applied: %v %v %v %d", tr.ResponseHeaderTimeout, tr.IdleConnTimeout,
				tr.TLSHandshakeTimeout, tr.MaxIdleConnsPerHost)
		}
	})
	t.Run("dial timeout", func(t *testing.T) {
		tr := newTransport(t, proxy.TransportOptions{DialTimeout: time.Nanosecond})
		// 192.0.2.0/24 is TEST-NET-1; with a 1ns budget the dial times out before any packet matters.
		_, err := tr.DialContext(t.Context(), "tcp", "192.0.2.1:80")
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("dial err = %v, want a timeout", err)
		}
	})
	t.Run("reaches a backend", func(t *testing.T) {
		backend := startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, strconv.Itoa(len(r.Header.Values("Accept-Encoding"))))
		}))
		tr := newTransport(t, proxy.TransportOptions{})
		body, status := get(t, &http.Client{Transport: tr}, backend.URL)
		if status != 200 || body != "0" {
			t.Errorf("got %d %q; want 200 and no Accept-Encoding added", status, body)
		}
	})
}

func TestStripIdentity(t *testing.T) {
	tests := []struct {
		name string
		in   http.Header
		want http.Header
	}{
		{name: "canonical", in: http.Header{"X-User-Id": {"u"}, "X-Tenant-Id": {"t"}, "Accept": {"*/*"}},
			want: http.Header{"Accept": {"*/*"}}},
		{name: "all five", in: http.Header{"X-User-Id": {"1"}, "X-Username": {"2"}, "X-Tenant-Id": {"3"},
			"X-User-Roles": {"4"}, "X-Session-Id": {"5"}}, want: http.Header{}},
		{name: "odd case and underscores", in: http.Header{"x-user-id": {"u"}, "X_User_Roles": {"admin"},
			"x_tenant_id": {"t"}, "X-SESSION-ID": {"s"}}, want: http.Header{}},
		{name: "look-alikes kept", in: http.Header{"X-User-Idx": {"1"}, "X-User": {"2"}, "User-Id": {"3"},
			"X-Request-Id": {"4"}}, want: http.Header{"X-User-Idx": {"1"}, "X-User": {"2"}, "User-Id": {"3"},
			"X-Request-Id": {"4"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := tt.in.Clone()
			proxy.StripIdentity(h)
			if len(h) != len(tt.want) {
				t.Fatalf("after StripIdentity: %v, want %v", h, tt.want)
			}
			for k, v := range tt.want {
				if !slices.Equal(h[k], v) {
					t.Errorf("%s = %q, want %q", k, h[k], v)
				}
			}
		})
	}
}

// TestSetIdentity: each of a Caller's fields goes out in its own identity header, once, whatever
// the client sent in any spelling; empty fields send nothing; a nil Caller only removes them; and
// every header SetIdentity sets is one StripIdentity removes (one list for both).
func TestSetIdentity(t *testing.T) {
	forged := func() http.Header {
		return http.Header{"X-User-Id": {"root"}, "X_user_roles": {"super_admin"}, "x-tenant-id": {"other"},
			"X-Session-ID": {"s0"}, "X_Username": {"root"}, "Accept": {"*/*"}}
	}
	c := &proxy.Caller{UserID: "u-1", Username: "alice", TenantID: "t-1", Roles: "user,editor", SessionID: "s-1"}
	h := forged()
	proxy.SetIdentity(h, c)
	want := http.Header{proxy.HeaderUserID: {"u-1"}, proxy.HeaderUsername: {"alice"}, proxy.HeaderTenantID: {"t-1"},
		proxy.HeaderUserRoles: {"user,editor"}, proxy.HeaderSessionID: {"s-1"}, "Accept": {"*/*"}}
	if !reflect.DeepEqual(h, want) {
		t.Errorf("SetIdentity over forged headers: %v\nwant %v", h, want)
	}
	proxy.StripIdentity(h)
	if !reflect.DeepEqual(h, http.Header{"Accept": {"*/*"}}) {
		t.Errorf("StripIdentity left %v of what SetIdentity set", h)
	}
	h = forged()
	proxy.SetIdentity(h, &proxy.Caller{UserID: "u-2"})
	if !reflect.DeepEqual(h, http.Header{proxy.HeaderUserID: {"u-2"}, "Accept": {"*/*"}}) {
		t.Errorf("a caller with only a user ID: %v", h)
	}
	h = forged()
	proxy.SetIdentity(h, nil)
	if !reflect.DeepEqual(h, http.Header{"Accept": {"*/*"}}) {
		t.Errorf("no caller: %v", h)
	}
}

// TestNewIdentityHeaders checks that a client cannot claim an identity through the proxy and
// that the outbound identity sets the gateway's own after the strip.
func TestNewIdentityHeaders(t *testing.T) {
	tests := []struct {
		name     string
		set      func(in *http.Request, out http.Header)
		wantUser string
	}{
		{name: "stripped without an identity"},
		{name: "gateway identity set after the strip", set: func(in *http.Request, out http.Header) {
			out.Set("X-User-ID", "verified-"+in.URL.Query().Get("who"))
		}, wantUser: "verified-alice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			backend, got := recordingBackend(t)
			tr := newTransport(t, proxy.TransportOptions{})
			logger, _ := newLog(slog.LevelDebug)
			p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr, Outbound: proxy.Outbound{Identity: tt.set}})
			front := startServer(t, edge(p, logger))

			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, front.URL+"/x?who=alice", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("X-User-ID", "forged")
			req.Header["X_User_Id"] = []string{"forged"}
			req.Header.Set("X-User-Roles", "super_admin")
			req.Header.Set("X-Tenant-ID", "other")
			if _, status := doClose(t, front.Client(), req); status != 200 {
				t.Fatalf("status = %d", status)
			}
			s := <-got
			for k, v := range s.Header {
				if slices.Contains(v, "forged") || slices.Contains(v, "super_admin") || slices.Contains(v, "other") {
					t.Errorf("client identity header %s: %q reached the upstream", k, v)
				}
			}
			if u := s.Header.Get("X-User-ID"); u != tt.wantUser {
				t.Errorf("X-User-ID = %q, want %q", u, tt.wantUser)
			}
		})
	}
}

func TestStripUntrusted(t *testing.T) {
	in := http.Header{
		"X-Real-Ip": {"1.2.3.4"}, "X-Client-Ip": {"1.2.3.4"}, "True-Client-Ip": {"1.2.3.4"},
		"x-original-url": {"/admin"}, "X-Rewrite-Url": {"/admin"}, "X-Forwarded-Port": {"443"},
		"X-Forwarded-Prefix": {"/admin"}, "X_Forwarded_For": {"1.2.3.4"}, "X_forwarded_host": {"evil"},
		"X-Http-Method-Override": {"DELETE"}, "X-HTTP-Method": {"DELETE"}, "X-Method-Override": {"DELETE"},
		"X-User-Id": {"forged"}, "Some_Header": {"x"},
		"Accept": {"*/*"}, "X-Request-Id": {"r1"}, "X-Forwarded-For": {"10.0.0.1"}, "Content-Type": {"text/plain"},
	}
	want := http.Header{"Accept": {"*/*"}, "X-Request-Id": {"r1"}, "X-Forwarded-For": {"10.0.0.1"},
		"Content-Type": {"text/plain"}}
	h := in.Clone()
	proxy.StripUntrusted(h)
	if len(h) != len(want) {
		t.Fatalf("after StripUntrusted: %v, want %v", h, want)
	}
	for k, v := range want {
		if !slices.Equal(h[k], v) {
			t.Errorf("%s = %q, want %q", k, h[k], v)
		}
	}
}

// TestNewStripsUntrustedHeaders: client-IP, URL-override, forwarded-port/prefix, method-override
// and underscore-spelled headers never reach a back end; the gateway's own X-Forwarded-* do.
func TestNewStripsUntrustedHeaders(t *testing.T) {
	backend, got := recordingBackend(t)
	tr := newTransport(t, proxy.TransportOptions{})
	logger, _ := newLog(slog.LevelDebug)
	p := proxy.New(proxy.Options{Target: mustURL(t, backend.URL), Transport: tr})
	front := startServer(t, edge(p, logger))

	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, front.URL+"/docs/1", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	forged := map[string]string{
		"X-Real-IP": "6.6.6.6", "X-Client-IP": "6.6.6.6", "True-Client-IP": "6.6.6.6",
		"X-Original-URL": "/admin/secret", "X-Rewrite-URL": "/admin/secret",
		"X-Forwarded-Port": "6666", "X-Forwarded-Prefix": "/evil",
		"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE",
	}
	for k, v := range forged {
		req.Header.Set(k, v)
	}
	// Written as is: the client does not canonicalize keys set directly.
	req.Header["X_Forwarded_For"] = []string{"6.6.6.6"}
	req.Header["X_Real_IP"] = []string{"6.6.6.6"}
	if _, status := doClose(t, front.Client(), req); status != 200 {
		t.Fatalf("status = %d", status)
	}
	s := <-got
	for k, v := range s.Header {
		for _, x := range v {
			if strings.Contains(x, "6.6.6.6") || strings.Contains(x, "6666") || x == "DELETE" ||
				strings.Contains(x, "/admin/secret") || x == "/evil" {
				t.Errorf("client header %s: %q reached the back end", k, x)
			}
		}
		if strings.Contains(k, "_") {
			t.Errorf("header %s with an underscore reached the back end", k)
		}
	}
	if s.Method != http.MethodPost {
		t.Errorf("method = %s, want POST", s.Method)
	}
	if s.Header.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q, want the gateway's 127.0.0.1", s.Header.Get("X-Forwarded-For"))
	}
}
