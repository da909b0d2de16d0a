package proxy_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"voicegate/proxy"
)

func TestChain(t *testing.T) {
	tests := []struct {
		name string
		mws  []string
		want []string
	}{
		{"no middleware", nil, []string{"handler"}},
		{"one", []string{"a"}, []string{"a in", "handler", "a out"}},
		{"first runs outermost", []string{"a", "b", "c"},
			[]string{"a in", "b in", "c in", "handler", "c out", "b out", "a out"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			mw := func(name string) proxy.Middleware {
				return func(next http.Handler) http.Handler {
					return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
						got = append(got, name+" in")
						next.ServeHTTP(w, r)
						got = append(got, name+" out")
					})
				}
			}
			var mws []proxy.Middleware
			for _, name := range tt.mws {
				mws = append(mws, mw(name))
			}
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				got = append(got, "handler")
			}), mws...)
			h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
			if !slices.Equal(got, tt.want) {
				t.Errorf("order = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRecover(t *testing.T) {
	tests := []struct {
		name       string
		handler    http.HandlerFunc
		wantStatus int
		wantPanic  bool // a JSON 500 and a "panic in handler" line
		secret     string
	}{
		{
			name:       "string panic",
			handler:    func(w http.ResponseWriter, r *http.Request) { panic("db password hunter2") },
			wantStatus: http.StatusInternalServerError,
			wantPanic:  true,
			secret:     "hunter2",
		},
		{
			name: "error panic after headers were set",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/plain")
				panic(errors.New("nil map at 10.1.2.3"))
			},
			wantStatus: http.StatusInternalServerError,
			wantPanic:  true,
			secret:     "10.1.2.3",
		},
		{
			name: "no panic passes through",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusCreated)
				_, _ = io.WriteString(w, "made")
			},
			wantStatus: http.StatusCreated,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, logs := newLog(slog.LevelDebug)
			h := proxy.Chain(tt.handler, proxy.Recover(logger), proxy.RequestID(), proxy.AccessLog(logger))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/x", nil))

			if rec.Code != tt.wantStatus {
				t.Fatalf("status = %d, want %d", rec.Code, tt.wantStatus)
			}
			panicLines := logs.withMsg(t, "panic in handler")
			if !tt.wantPanic {
				if len(panicLines) != 0 {
					t.Errorf("unexpected panic log: %v", panicLines)
				}
				if rec.Body.String() != "made" {
					t.Errorf("body = %q, want %q", rec.Body.String(), "made")
				}
				return
			}
			if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type = %q, want JSON", ct)
			}
			doc := decodeErrorMap(t, rec.Body.Bytes())
			if len(doc) != 3 {
				t.Errorf("error document has keys %v, want exactly error, code, request_id", keys(doc))
			}
			if doc["code"] != proxy.CodeInternal {
				t.Errorf("code = %v, want %s", doc["code"], proxy.CodeInternal)
			}
			if msg, _ := doc["error"].(string); msg == "" {
				t.Errorf("error message is empty")
			}
			if id := rec.Header().Get("X-Request-ID"); id == "" || doc["request_id"] != id {
				t.Errorf("request_id = %v, header = %q; want equal and non-empty", doc["request_id"], id)
			}
			if strings.Contains(rec.Body.String(), tt.secret) {
				t.Errorf("panic value reached the client: %s", rec.Body.String())
			}
			if len(panicLines) != 1 {
				t.Fatalf("got %d panic log lines, want 1:\n%s", len(panicLines), logs)
			}
			if panicLines[0]["level"] != "ERROR" {
				t.Errorf("panic logged at %v, want ERROR", panicLines[0]["level"])
			}
			if p, _ := panicLines[0]["panic"].(string); !strings.Contains(p, tt.secret) {
				t.Errorf("panic line %v does not carry the panic value", panicLines[0])
			}
			if panicLines[0]["request_id"] != doc["request_id"] {
				t.Errorf("panic line request_id = %v, want %v", panicLines[0]["request_id"], doc["request_id"])
			}
			reqLines := logs.requests(t)
			if len(reqLines) != 1 || reqLines[0]["status"] != float64(500) || reqLines[0]["level"] != "WARN" {
				t.Errorf("access log = %v, want one WARN line with status 500", reqLines)
			}
		})
	}
}

// TestRecoverAbortHandler checks that http.ErrAbortHandler is re-panicked, not turned into a 500.
func TestRecoverAbortHandler(t *testing.T) {
	abort := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { panic(http.ErrAbortHandler) })
	chains := []struct {
		name  string
		chain func(*slog.Logger) http.Handler
	}{
		{"recover only", func(l *slog.Logger) http.Handler { return proxy.Chain(abort, proxy.Recover(l)) }},
		{"full edge", func(l *slog.Logger) http.Handler {
			return proxy.Chain(abort, proxy.Recover(l), proxy.RequestID(), proxy.AccessLog(l))
		}},
	}
	for _, c := range chains {
		t.Run(c.name+"/recorder", func(t *testing.T) {
			logger, logs := newLog(slog.LevelDebug)
			rec := httptest.NewRecorder()
			got := func() (v any) {
				defer func() { v = recover() }()
				c.chain(logger).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
				return nil
			}()
			if got != http.ErrAbortHandler {
				t.Fatalf("recovered %v, want http.ErrAbortHandler", got)
			}
			if rec.Code == http.StatusInternalServerError || rec.Body.Len() != 0 ||
				rec.Header().Get("Content-Type") != "" {
				t.Errorf("abort was answered: %d %q %v", rec.Code, rec.Body.String(), rec.Header())
			}
			if l := logs.withMsg(t, "panic in handler"); len(l) != 0 {
				t.Errorf("abort logged as a panic: %v", l)
			}
		})
		t.Run(c.name+"/server", func(t *testing.T) {
			logger, _ := newLog(slog.LevelDebug)
			srv := startServer(t, c.chain(logger))
			resp, err := srv.Client().Get(srv.URL)
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				t.Fatalf("got a response %d %q, want the connection aborted", resp.StatusCode, body)
			}
		})
	}
}

// TestRecoverAfterResponseStarted checks that a panic once the response is on the wire aborts
// the connection instead of appending a JSON error to the body.
func TestRecoverAfterResponseStarted(t *testing.T) {
	late := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "partial\n")
		_ = http.NewResponseController(w).Flush()
		panic("late failure")
	})
	tests := []struct {
		name  string
		chain func(*slog.Logger) http.Handler
	}{
		{name: "full edge", chain: func(l *slog.Logger) http.Handler {
			return proxy.Chain(late, proxy.Recover(l), proxy.RequestID(), proxy.AccessLog(l))
		}},
		{name: "recover only", chain: func(l *slog.Logger) http.Handler {
			return proxy.Chain(late, proxy.Recover(l))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, logs := newLog(slog.LevelDebug)
			srv := startServer(t, tt.chain(logger))
			resp, err := srv.Client().Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status = %d, want the 200 that was already sent", resp.StatusCode)
			}
			body, err := io.ReadAll(resp.Body)
			if string(body) != "partial\n" {
				t.Errorf("body = %q, want only %q", body, "partial\n")
			}
			if err == nil {
				t.Errorf("body ended cleanly; want the stream aborted so the client sees the failure")
			}
			srv.Close() // wait for the handler, so the panic line is written
			if l := logs.withMsg(t, "panic in handler"); len(l) != 1 {
				t.Errorf("got %d panic lines, want 1", len(l))
			}
		})
	}
}

func TestValidRequestID(t *testing.T) {
	tests := []struct {
		id   string
		want bool
	}{
		{"abc", true},
		{"A-b_c.d:9", true},
		{"x", true},
		{strings.Repeat("a", 128), true},
		{"", false},
		{strings.Repeat("a", 129), false},
		{"has space", false},
		{"new\nline", false},
		{"cr\rlf", false},
		{`quo"te`, false},
		{"semi;colon", false},
		{"slash/path", false},
		{"tab\there", false},
		{"é", false},
		{"nul\x00", false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("len %d %.12q", len(tt.id), tt.id), func(t *testing.T) {
			if got := proxy.ValidRequestID(tt.id); got != tt.want {
				t.Errorf("ValidRequestID(%q) = %v, want %v", tt.id, got, tt.want)
			}
		})
	}
}

func TestRequestID(t *testing.T) {
	tests := []struct {
		name     string
		incoming []string // X-Request-ID values sent; nil sends none
		keep     bool
	}{
		{"absent", nil, false},
		{"sane is kept", []string{"req-123_abc.def:9"}, true},
		{"128 chars is kept", []string{strings.Repeat("Z", 128)}, true},
		{"129 chars is replaced", []string{strings.Repeat("Z", 129)}, false},
		{"space is replaced", []string{"two words"}, false},
		{"newline is replaced", []string{"abc\nforged: line"}, false},
		{"quote is replaced", []string{`abc"def`}, false},
		{"empty is replaced", []string{""}, false},
		{"unicode is replaced", []string{"réq"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var inHandler, headerInHandler string
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				inHandler = proxy.RequestIDFrom(r.Context())
				headerInHandler = r.Header.Get("X-Request-ID")
			}), proxy.RequestID())
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			for _, v := range tt.incoming {
				req.Header.Add("X-Request-ID", v)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)

			echoed := rec.Header().Get("X-Request-ID")
			if tt.keep {
				if echoed != tt.incoming[0] {
					t.Errorf("echoed %q, want the incoming %q", echoed, tt.incoming[0])
				}
			} else {
				if !proxy.ValidRequestID(echoed) {
					t.Errorf("fresh ID %q is not valid", echoed)
				}
				if len(tt.incoming) > 0 && echoed == tt.incoming[0] {
					t.Errorf("insane ID %q was kept", echoed)
				}
			}
			if inHandler != echoed {
				t.Errorf("RequestIDFrom = %q, echoed %q", inHandler, echoed)
			}
			if headerInHandler != echoed {
				t.Errorf("request header seen by the handler (and forwarded upstream) = %q, want %q",
					headerInHandler, echoed)
			}
		})
	}

	t.Run("fresh IDs differ", func(t *testing.T) {
		h := proxy.Chain(http.NotFoundHandler(), proxy.RequestID())
		seen := map[string]bool{}
		for range 50 {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
			id := rec.Header().Get("X-Request-ID")
			if seen[id] {
				t.Fatalf("ID %q repeated", id)
			}
			seen[id] = true
		}
	})

	t.Run("outside the middleware", func(t *testing.T) {
		if id := proxy.RequestIDFrom(t.Context()); id != "" {
			t.Errorf("RequestIDFrom(bare context) = %q, want empty", id)
		}
		if info := proxy.InfoFrom(t.Context()); info != nil {
			t.Errorf("InfoFrom(bare context) = %+v, want nil", info)
		}
	})
}

func TestRequestIDInErrorJSON(t *testing.T) {
	tests := []struct {
		name     string
		incoming string
	}{
		{"kept", "client-id-7"},
		{"generated", ""},
		{"replaced", "bad id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeValidation, "message is required")
			}), proxy.RequestID())
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			if tt.incoming != "" {
				req.Header.Set("X-Request-ID", tt.incoming)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			doc := decodeError(t, rec.Body.Bytes())
			echoed := rec.Header().Get("X-Request-ID")
			if doc.RequestID == "" || doc.RequestID != echoed {
				t.Errorf("request_id = %q, header = %q", doc.RequestID, echoed)
			}
			if tt.name == "kept" && doc.RequestID != tt.incoming {
				t.Errorf("request_id = %q, want %q", doc.RequestID, tt.incoming)
			}
			if tt.name == "replaced" && doc.RequestID == tt.incoming {
				t.Errorf("insane request ID reached the error document")
			}
		})
	}
}

// accessLogMux is a route table like the gateway's, each handler wrapped with proxy.Route.
func accessLogMux() *http.ServeMux {
	mux := http.NewServeMux()
	handle := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, proxy.Route(h)) }
	handle("GET /items/{id}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "item "+r.PathValue("id"))
	})
	handle("GET /healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })
	handle("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "draining", http.StatusServiceUnavailable)
	})
	handle("POST /upstream", func(w http.ResponseWriter, r *http.Request) {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadGateway, Code: proxy.CodeUpstream,
			Message: "upstream is unreachable", Cause: fmt.Errorf("call upstream: %w", refusedOpError())})
	})
	handle("GET /created", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, "new")
	})
	handle("GET /write-only", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "0123456789")
	})
	handle("GET /early-hints", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</app.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.WriteHeader(http.StatusAccepted)
	})
	handle("GET /user", func(w http.ResponseWriter, r *http.Request) {
		proxy.InfoFrom(r.Context()).UserID = "u-42"
		w.WriteHeader(http.StatusNoContent)
	})
	handle("GET /panic", func(w http.ResponseWriter, r *http.Request) { panic("boom") })
	return mux
}

// refusedOpError is what dialing a closed local port returns, address included.
func refusedOpError() error {
	return &net.OpError{Op: "dial", Net: "tcp",
		Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 39999},
		Err:  &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}
}

func TestAccessLog(t *testing.T) {
	tests := []struct {
		method, path string
		route        string
		status       int
		bytes        int
		level        string
		code         string
		cause        string
		userID       string
	}{
		{method: "GET", path: "/items/42", route: "GET /items/{id}", status: 200, bytes: 7, level: "INFO"},
		{method: "GET", path: "/nowhere", route: "unmatched", status: 404, bytes: 19, level: "INFO"},
		{method: "GET", path: "/healthz", route: "GET /healthz", status: 200, bytes: 2, level: "DEBUG"},
		{method: "GET", path: "/readyz", route: "GET /readyz", status: 503, bytes: 9, level: "WARN"},
		{method: "POST", path: "/upstream", route: "POST /upstream", status: 502, level: "WARN",
			code: proxy.CodeUpstream, cause: "connection refused"},
		{method: "GET", path: "/created", route: "GET /created", status: 201, bytes: 3, level: "INFO"},
		{method: "GET", path: "/write-only", route: "GET /write-only", status: 200, bytes: 10, level: "INFO"},
		{method: "GET", path: "/early-hints", route: "GET /early-hints", status: 202, level: "INFO"},
		{method: "GET", path: "/user", route: "GET /user", status: 204, level: "INFO", userID: "u-42"},
		{method: "GET", path: "/panic", route: "GET /panic", status: 500, level: "WARN"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			logger, logs := newLog(slog.LevelDebug)
			h := proxy.Chain(accessLogMux(), proxy.Recover(logger), proxy.RequestID(),
				proxy.ClientIP(nil), proxy.AccessLog(logger))
			req := httptest.NewRequest(tt.method, tt.path, nil)
			req.RemoteAddr = "192.0.2.7:5555"
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)

			lines := logs.requests(t)
			if len(lines) != 1 {
				t.Fatalf("got %d request lines, want 1:\n%s", len(lines), logs)
			}
			l := lines[0]
			want := map[string]any{
				"level":      tt.level,
				"method":     tt.method,
				"route":      tt.route,
				"status":     float64(tt.status),
				"request_id": rec.Header().Get("X-Request-ID"),
				"client_ip":  "192.0.2.7",
			}
			if tt.code == "" { // a WriteError body has a request ID of varying length
				want["bytes"] = float64(tt.bytes)
			}
			for k, v := range want {
				if l[k] != v {
					t.Errorf("%s = %#v, want %#v", k, l[k], v)
				}
			}
			if _, ok := l["duration"]; !ok {
				t.Errorf("no duration in %v", l)
			}
			if tt.code != "" {
				if l["code"] != tt.code {
					t.Errorf("code = %v, want %s", l["code"], tt.code)
				}
				if b, _ := l["bytes"].(float64); int(b) != rec.Body.Len() {
					t.Errorf("bytes = %v, want the %d written", l["bytes"], rec.Body.Len())
				}
			} else if _, ok := l["code"]; ok {
				t.Errorf("unexpected code in %v", l)
			}
			cause, hasCause := l["cause"].(string)
			switch {
			case tt.cause != "" && !strings.Contains(cause, tt.cause):
				t.Errorf("cause = %q, want it to contain %q", cause, tt.cause)
			case tt.cause == "" && hasCause:
				t.Errorf("unexpected cause %q", cause)
			}
			if s := logs.String(); strings.Contains(s, "127.0.0.1") || strings.Contains(s, "39999") {
				t.Errorf("upstream address reached the log: %s", s)
			}
			if tt.userID != "" && l["user_id"] != tt.userID {
				t.Errorf("user_id = %v, want %s", l["user_id"], tt.userID)
			}
		})
	}
}

func TestAccessLogLevels(t *testing.T) {
	tests := []struct {
		name      string
		level     slog.Level
		path      string
		wantLines int
	}{
		{"healthz hidden at info", slog.LevelInfo, "/healthz", 0},
		{"healthz shown at debug", slog.LevelDebug, "/healthz", 1},
		{"route shown at info", slog.LevelInfo, "/items/1", 1},
		{"route hidden at warn", slog.LevelWarn, "/items/1", 0},
		{"5xx health probe shown at warn", slog.LevelWarn, "/readyz", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, logs := newLog(tt.level)
			h := proxy.Chain(accessLogMux(), proxy.AccessLog(logger))
			for range 3 {
				h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, tt.path, nil))
			}
			if got := len(logs.requests(t)); got != 3*tt.wantLines {
				t.Errorf("got %d lines for 3 requests, want %d", got, 3*tt.wantLines)
			}
		})
	}
}

// TestAccessLogRecordsStatus checks what the wrapper records in Info as the handler writes.
func TestAccessLogRecordsStatus(t *testing.T) {
	tests := []struct {
		name  string
		write func(w http.ResponseWriter)
		want  int
	}{
		{"nothing yet", func(w http.ResponseWriter) {}, 0},
		{"Write only", func(w http.ResponseWriter) { _, _ = io.WriteString(w, "x") }, 200},
		{"Flush only", func(w http.ResponseWriter) { w.(http.Flusher).Flush() }, 200},
		{"WriteHeader then Write", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusTeapot)
			_, _ = io.WriteString(w, "x")
		}, 418},
		{"second WriteHeader ignored", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusNotFound)
			w.WriteHeader(http.StatusOK)
		}, 404},
		{"1xx then final", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusEarlyHints)
			w.WriteHeader(http.StatusOK)
		}, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, _ := newLog(slog.LevelDebug)
			var got int
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				tt.write(w)
				got = proxy.InfoFrom(r.Context()).Status
			}), proxy.AccessLog(logger))
			h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
			if got != tt.want {
				t.Errorf("Info.Status = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestAccessLogPassesThrough checks that the access-log writer hides none of the optional
// interfaces of the writer beneath it.
func TestAccessLogPassesThrough(t *testing.T) {
	t.Run("recorder", func(t *testing.T) {
		logger, _ := newLog(slog.LevelDebug)
		rec := httptest.NewRecorder()
		var unwrapped http.ResponseWriter
		var flushErr error
		var isFlusher bool
		h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, isFlusher = w.(http.Flusher)
			if u, ok := w.(interface{ Unwrap() http.ResponseWriter }); ok {
				unwrapped = u.Unwrap()
			}
			flushErr = http.NewResponseController(w).Flush()
		}), proxy.AccessLog(logger))
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
		if !isFlusher {
			t.Errorf("wrapper is not an http.Flusher")
		}
		if unwrapped != rec {
			t.Errorf("Unwrap() = %T, want the recorder", unwrapped)
		}
		if flushErr != nil || !rec.Flushed {
			t.Errorf("Flush err = %v, flushed = %v", flushErr, rec.Flushed)
		}
	})

	t.Run("controller through Unwrap", func(t *testing.T) {
		logger, _ := newLog(slog.LevelDebug)
		srv := startServer(t, proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			// The wrapper does not implement these; they only work through Unwrap.
			if err := rc.SetWriteDeadline(time.Now().Add(time.Minute)); err != nil {
				http.Error(w, "SetWriteDeadline: "+err.Error(), 500)
				return
			}
			if err := rc.EnableFullDuplex(); err != nil {
				http.Error(w, "EnableFullDuplex: "+err.Error(), 500)
				return
			}
			_, _ = io.WriteString(w, "ok")
		}), proxy.RequestID(), proxy.AccessLog(logger)))
		body, status := get(t, srv.Client(), srv.URL)
		if status != 200 || body != "ok" {
			t.Errorf("got %d %q", status, body)
		}
	})

	t.Run("hijack", func(t *testing.T) {
		logger, _ := newLog(slog.LevelDebug)
		srv := startServer(t, proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if _, ok := w.(http.Hijacker); !ok {
				http.Error(w, "not a Hijacker", 500)
				return
			}
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			defer conn.Close()
			_, _ = brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhijacked")
			_ = brw.Flush()
		}), proxy.AccessLog(logger)))
		body, status := get(t, srv.Client(), srv.URL)
		if status != 200 || body != "hijacked" {
			t.Errorf("got %d %q", status, body)
		}
	})
}

// TestAccessLogStreaming checks that each flushed chunk reaches a real client while the handler
// is still running.
func TestAccessLogStreaming(t *testing.T) {
	logger, logs := newLog(slog.LevelDebug)
	const chunks = 3
	received := make(chan struct{})
	handlerErr := make(chan error, 1)
	srv := startServer(t, proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range chunks {
			fmt.Fprintf(w, "chunk %d\n", i)
			if err := http.NewResponseController(w).Flush(); err != nil {
				handlerErr <- err
				return
			}
			// Without a working Flush the client never sees the chunk and this times out.
			select {
			case <-received:
			case <-time.After(5 * time.Second):
				handlerErr <- fmt.Errorf("chunk %d did not reach the client while the handler ran", i)
				return
			case <-r.Context().Done():
				handlerErr <- r.Context().Err()
				return
			}
		}
		handlerErr <- nil
	}), proxy.Recover(logger), proxy.RequestID(), proxy.AccessLog(logger)))

	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := range chunks {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading chunk %d: %v", i, err)
		}
		if want := fmt.Sprintf("chunk %d\n", i); line != want {
			t.Fatalf("chunk %d = %q, want %q", i, line, want)
		}
		received <- struct{}{}
	}
	if err := <-handlerErr; err != nil {
		t.Fatal(err)
	}
	if rest, _ := io.ReadAll(br); len(rest) != 0 {
		t.Errorf("unexpected trailing body %q", rest)
	}
	srv.Close() // the log line is written after the handler returns
	lines := logs.requests(t)
	if len(lines) != 1 || lines[0]["status"] != float64(200) ||
		lines[0]["bytes"] != float64(chunks*len("chunk 0\n")) {
		t.Errorf("access log = %v, want status 200 and %d bytes", lines, chunks*len("chunk 0\n"))
	}
}

func TestClientIP(t *testing.T) {
	trusted := mustPrefixes(t, "10.0.0.0/8, fd00::/8")
	tests := []struct {
		name    string
		trusted proxy.Prefixes
		remote  string
		xff     []string // one element per header line
		want    string   // "" means invalid
	}{
		{"no trusted proxies, XFF ignored", nil, "203.0.113.5:1234", []string{"1.2.3.4"}, "203.0.113.5"},
		{"untrusted peer, XFF ignored", trusted, "203.0.113.5:1234", []string{"1.2.3.4"}, "203.0.113.5"},
		{"trusted peer without XFF", trusted, "10.0.0.1:1234", nil, "10.0.0.1"},
		{"trusted peer, one hop", trusted, "10.0.0.1:1234", []string{"1.2.3.4"}, "1.2.3.4"},
		{"rightmost untrusted hop wins", trusted, "10.0.0.1:1234",
			[]string{"6.6.6.6, 1.2.3.4, 10.0.0.2"}, "1.2.3.4"},
		{"spoofed leftmost entry is ignored", trusted, "10.0.0.1:1234",
			[]string{"127.0.0.1, 198.51.100.9"}, "198.51.100.9"},
		{"whitespace around hops", trusted, "10.0.0.1:1234", []string{"  1.2.3.4 ,10.0.0.2  "}, "1.2.3.4"},
		{"multiple header lines, last line trusted", trusted, "10.0.0.1:1234",
			[]string{"1.2.3.4", "10.0.0.3"}, "1.2.3.4"},
		{"multiple header lines, untrusted in last line", trusted, "10.0.0.1:1234",
			[]string{"1.2.3.4", "5.6.7.8, 10.0.0.3"}, "5.6.7.8"},
		{"all hops trusted gives the leftmost", trusted, "10.0.0.1:1234",
			[]string{"10.0.0.5, 10.0.0.6"}, "10.0.0.5"},
		{"malformed hop stops at the last believed", trusted, "10.0.0.1:1234",
			[]string{"1.2.3.4, garbage, 10.0.0.2"}, "10.0.0.2"},
		{"malformed rightmost hop gives the peer", trusted, "10.0.0.1:1234",
			[]string{"1.2.3.4, not-an-ip"}, "10.0.0.1"},
		{"hop with a port is malformed", trusted, "10.0.0.1:1234", []string{"1.2.3.4:80"}, "10.0.0.1"},
		{"empty hop is malformed", trusted, "10.0.0.1:1234", []string{"1.2.3.4,,10.0.0.2"}, "10.0.0.2"},
		{"IPv6 untrusted peer", trusted, "[2001:db8::1]:443", []string{"1.2.3.4"}, "2001:db8::1"},
		{"IPv6 trusted peer and hop", trusted, "[fd00::1]:443", []string{"2001:db8::5, fd00::2"}, "2001:db8::5"},
		{"IPv4-mapped trusted peer", trusted, "[::ffff:10.0.0.1]:1234", []string{"1.2.3.4"}, "1.2.3.4"},
		{"IPv4-mapped untrusted peer is unmapped", trusted, "[::ffff:203.0.113.5]:1234",
			[]string{"1.2.3.4"}, "203.0.113.5"},
		{"IPv4-mapped hop is unmapped and trusted", trusted, "10.0.0.1:1234",
			[]string{"1.2.3.4, ::ffff:10.9.9.9"}, "1.2.3.4"},
		{"IPv4-mapped client hop is unmapped", trusted, "10.0.0.1:1234", []string{"::ffff:1.2.3.4"}, "1.2.3.4"},
		{"IPv4-mapped trusted prefix", mustPrefixes(t, "::ffff:10.0.0.0/104"), "10.1.2.3:1",
			[]string{"1.2.3.4"}, "1.2.3.4"},
		{"unparsable peer", trusted, "pipe", []string{"1.2.3.4"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got netip.Addr
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				got = proxy.InfoFrom(r.Context()).ClientIP
			}), proxy.ClientIP(tt.trusted))
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			req.RemoteAddr = tt.remote
			for _, v := range tt.xff {
				req.Header.Add("X-Forwarded-For", v)
			}
			h.ServeHTTP(httptest.NewRecorder(), req)
			if tt.want == "" {
				if got.IsValid() {
					t.Errorf("ClientIP = %v, want invalid", got)
				}
				return
			}
			if got.String() != tt.want {
				t.Errorf("ClientIP = %v, want %s", got, tt.want)
			}
		})
	}
}

func TestPeerTrusted(t *testing.T) {
	trusted := mustPrefixes(t, "10.0.0.0/8, ::1")
	tests := []struct {
		remote string
		want   bool
	}{
		{"10.1.2.3:80", true},
		{"[::ffff:10.1.2.3]:80", true},
		{"[::1]:80", true},
		{"11.0.0.1:80", false},
		{"[2001:db8::1]:80", false},
		{"", false},
		{"10.1.2.3", false}, // no port: not a RemoteAddr net/http produces
	}
	for _, tt := range tests {
		t.Run(tt.remote, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			req.RemoteAddr = tt.remote
			var got bool
			proxy.ClientIP(trusted)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				got = proxy.InfoFrom(r.Context()).PeerTrusted
			})).ServeHTTP(httptest.NewRecorder(), req)
			if got != tt.want {
				t.Errorf("PeerTrusted for %q = %v, want %v", tt.remote, got, tt.want)
			}
		})
	}
}

func TestParsePrefixes(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []string
		wantErr bool
	}{
		{name: "empty", in: "", want: nil},
		{name: "blanks and commas", in: " , ,", want: nil},
		{name: "CIDRs", in: "10.0.0.0/8,192.168.0.0/16", want: []string{"10.0.0.0/8", "192.168.0.0/16"}},
		{name: "bare IPv4", in: "192.0.2.1", want: []string{"192.0.2.1/32"}},
		{name: "bare IPv6", in: "::1", want: []string{"::1/128"}},
		{name: "IPv6 CIDR", in: "2001:db8::/32", want: []string{"2001:db8::/32"}},
		{name: "host bits are masked", in: "10.1.2.3/8", want: []string{"10.0.0.0/8"}},
		{name: "spaces trimmed", in: "  10.0.0.0/8 ,  127.0.0.1  ", want: []string{"10.0.0.0/8", "127.0.0.1/32"}},
		{name: "IPv4-mapped address is unmapped", in: "::ffff:192.0.2.1", want: []string{"192.0.2.1/32"}},
		{name: "IPv4-mapped CIDR is unmapped", in: "::ffff:10.0.0.0/104", want: []string{"10.0.0.0/8"}},
		{name: "junk word", in: "localhost", wantErr: true},
		{name: "junk after good", in: "10.0.0.0/8,nope", wantErr: true},
		{name: "bits too large", in: "10.0.0.0/33", wantErr: true},
		{name: "missing bits", in: "10.0.0.0/", wantErr: true},
		{name: "octet out of range", in: "300.1.1.1", wantErr: true},
		{name: "address with port", in: "10.0.0.1:80", wantErr: true},
		{name: "IPv4-mapped CIDR shorter than /96", in: "::ffff:0:0/80", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := proxy.ParsePrefixes(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParsePrefixes(%q) = %v, want an error", tt.in, got)
				}
				if !strings.Contains(err.Error(), "not a CIDR or address") {
					t.Errorf("error %q does not say what is wrong", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParsePrefixes(%q): %v", tt.in, err)
			}
			var gotS []string
			for _, p := range got {
				gotS = append(gotS, p.String())
			}
			if !slices.Equal(gotS, tt.want) {
				t.Errorf("ParsePrefixes(%q) = %q, want %q", tt.in, gotS, tt.want)
			}
		})
	}
}

func TestPrefixesContains(t *testing.T) {
	ps := mustPrefixes(t, "10.0.0.0/8, 2001:db8::/32, 192.0.2.1")
	tests := []struct {
		addr string
		want bool
	}{
		{"10.255.0.1", true},
		{"::ffff:10.0.0.1", true},
		{"11.0.0.1", false},
		{"2001:db8::abcd", true},
		{"2001:db9::1", false},
		{"192.0.2.1", true},
		{"192.0.2.2", false},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			if got := ps.Contains(netip.MustParseAddr(tt.addr)); got != tt.want {
				t.Errorf("Contains(%s) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}
	if (proxy.Prefixes(nil)).Contains(netip.MustParseAddr("10.0.0.1")) {
		t.Errorf("empty Prefixes contains an address")
	}
}

func TestCORS(t *testing.T) {
	const app = "https://app.example.com"
	specific := proxy.CORSOptions{Origins: []string{app, "https://admin.example.com"}}
	tests := []struct {
		name       string
		opts       proxy.CORSOptions
		method     string
		origin     string
		reqMethod  string // Access-Control-Request-Method
		reqHeaders string // Access-Control-Request-Headers

		wantInner       bool
		wantStatus      int
		wantAllowOrigin string // "" means absent
		wantCredentials bool
		wantVary        []string
		wantMaxAge      string
		wantJSONCode    string
	}{
		{name: "no origin passes untouched", opts: specific, method: "GET",
			wantInner: true, wantStatus: 200},
		{name: "allowed origin", opts: specific, method: "GET", origin: app,
			wantInner: true, wantStatus: 200, wantAllowOrigin: app, wantCredentials: true,
			wantVary: []string{"Origin"}},
		{name: "allowed origin, other case", opts: specific, method: "POST", origin: "HTTPS://APP.EXAMPLE.COM",
			wantInner: true, wantStatus: 200, wantAllowOrigin: "HTTPS://APP.EXAMPLE.COM", wantCredentials: true,
			wantVary: []string{"Origin"}},
		{name: "disallowed origin gets no CORS headers", opts: specific, method: "GET",
			origin: "https://evil.example", wantInner: true, wantStatus: 200, wantVary: []string{"Origin"}},
		{name: "no origins configured", opts: proxy.CORSOptions{}, method: "GET", origin: app,
			wantInner: true, wantStatus: 200, wantVary: []string{"Origin"}},
		{name: "OPTIONS without request method is not a preflight", opts: specific, method: "OPTIONS",
			origin: app, wantInner: true, wantStatus: 200, wantAllowOrigin: app, wantCredentials: true,
			wantVary: []string{"Origin"}},
		{name: "allowed preflight", opts: specific, method: "OPTIONS", origin: app, reqMethod: "POST",
			reqHeaders: "Authorization, Content-Type, X-Request-ID",
			wantStatus: 204, wantAllowOrigin: app, wantCredentials: true,
			wantVary:   []string{"Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"},
			wantMaxAge: "600"},
		{name: "allowed preflight with MaxAge", opts: proxy.CORSOptions{Origins: []string{app}, MaxAge: time.Hour},
			method: "OPTIONS", origin: app, reqMethod: "DELETE",
			wantStatus: 204, wantAllowOrigin: app, wantCredentials: true, wantVary: []string{"Origin"},
			wantMaxAge: "3600"},
		{name: "disallowed preflight is 403", opts: specific, method: "OPTIONS",
			origin: "https://evil.example", reqMethod: "POST", wantStatus: 403, wantVary: []string{"Origin"},
			wantJSONCode: proxy.CodePermission},
		{name: "wildcard", opts: proxy.CORSOptions{Origins: []string{"*"}}, method: "GET",
			origin: "https://anyone.example", wantInner: true, wantStatus: 200, wantAllowOrigin: "*",
			wantVary: []string{"Origin"}},
		{name: "wildcard preflight", opts: proxy.CORSOptions{Origins: []string{"*"}}, method: "OPTIONS",
			origin: "https://anyone.example", reqMethod: "PUT", reqHeaders: "Content-Type",
			wantStatus: 204, wantAllowOrigin: "*", wantVary: []string{"Origin"}, wantMaxAge: "600"},
		{name: "wildcard among specific origins", opts: proxy.CORSOptions{Origins: []string{app, "*"}},
			method: "GET", origin: app, wantInner: true, wantStatus: 200, wantAllowOrigin: "*",
			wantVary: []string{"Origin"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inner := false
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				inner = true
				_, _ = io.WriteString(w, "inner")
			}), proxy.RequestID(), proxy.CORS(tt.opts))
			req := httptest.NewRequest(tt.method, "/api/v2/chat/stream", nil)
			if tt.origin != "" {
				req.Header.Set("Origin", tt.origin)
			}
			if tt.reqMethod != "" {
				req.Header.Set("Access-Control-Request-Method", tt.reqMethod)
			}
			if tt.reqHeaders != "" {
				req.Header.Set("Access-Control-Request-Headers", tt.reqHeaders)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			hd := rec.Header()

			if inner != tt.wantInner {
				t.Errorf("inner handler called = %v, want %v", inner, tt.wantInner)
			}
			if rec.Code != tt.wantStatus {
				t.Errorf("status = %d, want %d", rec.Code, tt.wantStatus)
			}
			if got := hd.Get("Access-Control-Allow-Origin"); got != tt.wantAllowOrigin {
				t.Errorf("Allow-Origin = %q, want %q", got, tt.wantAllowOrigin)
			}
			if got := hd.Get("Access-Control-Allow-Credentials"); (got == "true") != tt.wantCredentials ||
				(!tt.wantCredentials && got != "") {
				t.Errorf("Allow-Credentials = %q, want credentials %v", got, tt.wantCredentials)
			}
			vary := hd.Values("Vary")
			for _, v := range tt.wantVary {
				if !slices.Contains(vary, v) {
					t.Errorf("Vary = %q, want it to contain %q", vary, v)
				}
			}
			if tt.wantVary == nil && len(vary) != 0 {
				t.Errorf("Vary = %q, want none", vary)
			}
			preflightOK := tt.wantStatus == http.StatusNoContent
			if preflightOK {
				if rec.Body.Len() != 0 {
					t.Errorf("preflight body = %q, want empty", rec.Body.String())
				}
				methods := hd.Get("Access-Control-Allow-Methods")
				for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} {
					if !strings.Contains(methods, m) {
						t.Errorf("Allow-Methods = %q, missing %s", methods, m)
					}
				}
				if got := hd.Get("Access-Control-Allow-Headers"); got != tt.reqHeaders {
					t.Errorf("Allow-Headers = %q, want the request's %q", got, tt.reqHeaders)
				}
				if got := hd.Get("Access-Control-Max-Age"); got != tt.wantMaxAge {
					t.Errorf("Max-Age = %q, want %q", got, tt.wantMaxAge)
				}
			} else {
				for _, k := range []string{"Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
					"Access-Control-Max-Age"} {
					if v := hd.Get(k); v != "" {
						t.Errorf("%s = %q on a non-preflight answer", k, v)
					}
				}
			}
			expose := hd.Get("Access-Control-Expose-Headers")
			if tt.wantInner && tt.wantAllowOrigin != "" {
				if !strings.Contains(expose, "X-Request-ID") || !strings.Contains(expose, "Retry-After") {
					t.Errorf("Expose-Headers = %q, want X-Request-ID and Retry-After", expose)
				}
			} else if expose != "" {
				t.Errorf("Expose-Headers = %q, want none", expose)
			}
			if tt.wantJSONCode != "" {
				doc := decodeError(t, rec.Body.Bytes())
				if doc.Code != tt.wantJSONCode || doc.RequestID == "" {
					t.Errorf("error document = %+v, want code %s with a request ID", doc, tt.wantJSONCode)
				}
			}
		})
	}
}

func TestCORSAllowOrigin(t *testing.T) {
	tests := []struct {
		origins []string
		origin  string
		want    bool
	}{
		{nil, "https://a.example", false},
		{[]string{"https://a.example"}, "https://a.example", true},
		{[]string{"https://a.example"}, "https://A.EXAMPLE", true},
		{[]string{"https://a.example"}, "http://a.example", false},
		{[]string{"https://a.example"}, "https://a.example.evil", false},
		{[]string{"https://a.example"}, "", false},
		{[]string{"*"}, "https://b.example", true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%v/%s", tt.origins, tt.origin), func(t *testing.T) {
			o := proxy.CORSOptions{Origins: tt.origins}
			if got := o.AllowOrigin(tt.origin); got != tt.want {
				t.Errorf("AllowOrigin(%q) = %v, want %v", tt.origin, got, tt.want)
			}
		})
	}
}

func TestBodyLimit(t *testing.T) {
	const limit = 16
	tests := []struct {
		name          string
		body          string
		chunked       bool // hide the length, as a chunked upload does
		wantInner     bool
		wantStatus    int
		wantReadErr   bool
		wantReadBytes int
	}{
		{name: "no body", wantInner: true, wantStatus: 200},
		{name: "under limit", body: "short", wantInner: true, wantStatus: 200, wantReadBytes: 5},
		{name: "exactly the limit", body: strings.Repeat("x", limit), wantInner: true, wantStatus: 200,
			wantReadBytes: limit},
		{name: "Content-Length over limit", body: strings.Repeat("x", limit+1), wantStatus: 413},
		{name: "chunked under limit", body: "short", chunked: true, wantInner: true, wantStatus: 200,
			wantReadBytes: 5},
		{name: "chunked exactly the limit", body: strings.Repeat("x", limit), chunked: true,
			wantInner: true, wantStatus: 200, wantReadBytes: limit},
		{name: "chunked over limit", body: strings.Repeat("x", 10*limit), chunked: true,
			wantInner: true, wantStatus: 413, wantReadErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inner := false
			var readErr error
			var read int
			h := proxy.Chain(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				inner = true
				b, err := io.ReadAll(r.Body)
				read, readErr = len(b), err
				if proxy.IsTooLarge(err) {
					proxy.WriteError(w, r, proxy.TooLarge(limit))
				}
			}), proxy.RequestID(), proxy.BodyLimit(limit))
			var req *http.Request
			if tt.body == "" {
				req = httptest.NewRequest(http.MethodPost, "/", nil)
			} else {
				req = httptest.NewRequest(http.MethodPost, "/", strings.NewReader(tt.body))
			}
			if tt.chunked {
				req.Body = io.NopCloser(struct{ io.Reader }{strings.NewReader(tt.body)})
				req.ContentLength = -1
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)

			if inner != tt.wantInner {
				t.Fatalf("handler called = %v, want %v", inner, tt.wantInner)
			}
			if rec.Code != tt.wantStatus {
				t.Errorf("status = %d, want %d", rec.Code, tt.wantStatus)
			}
			if tt.wantStatus == 413 {
				doc := decodeError(t, rec.Body.Bytes())
				if doc.Code != proxy.CodePayloadTooLarge || doc.RequestID == "" {
					t.Errorf("error document = %+v, want %s with a request ID", doc, proxy.CodePayloadTooLarge)
				}
			}
			if !inner {
				return
			}
			if tt.wantReadErr {
				if !proxy.IsTooLarge(readErr) {
					t.Errorf("read error = %v, want one IsTooLarge reports", readErr)
				}
				return
			}
			if readErr != nil || read != tt.wantReadBytes {
				t.Errorf("read %d bytes, err %v; want %d bytes", read, readErr, tt.wantReadBytes)
			}
		})
	}
}

func TestIsTooLarge(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"MaxBytesError", &http.MaxBytesError{Limit: 5}, true},
		{"wrapped", fmt.Errorf("read body: %w", &http.MaxBytesError{Limit: 5}), true},
		{"EOF", io.ErrUnexpectedEOF, false},
		{"other", errors.New("request body too large"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := proxy.IsTooLarge(tt.err); got != tt.want {
				t.Errorf("IsTooLarge(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

func TestTooLarge(t *testing.T) {
	e := proxy.TooLarge(1 << 20)
	if e.Status != http.StatusRequestEntityTooLarge || e.Code != proxy.CodePayloadTooLarge {
		t.Errorf("TooLarge = %+v", e)
	}
	if !strings.Contains(e.Message, "1048576") {
		t.Errorf("message %q does not state the limit", e.Message)
	}
}

// TestAccessLogPathEscaped: a path holding characters that change how a log line reads (C1
// controls, line separators, bidi overrides) is logged escaped, as it travels on the wire.
func TestAccessLogPathEscaped(t *testing.T) {
	logger, logs := newLog(slog.LevelDebug)
	h := proxy.Chain(accessLogMux(), proxy.RequestID(), proxy.AccessLog(logger))
	req := httptest.NewRequest("GET", "/nowhere", nil)
	req.URL.Path = "/x\u202e\u0085\u2028y"
	h.ServeHTTP(httptest.NewRecorder(), req)
	lines := logs.requests(t)
	if len(lines) != 1 {
		t.Fatalf("got %d request lines, want 1:\n%s", len(lines), logs)
	}
	if got := lines[0]["path"]; got != "/x%E2%80%AE%C2%85%E2%80%A8y" {
		t.Errorf("path = %q, want it escaped", got)
	}
}
