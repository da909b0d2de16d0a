package main

// Chat streams end to end: the gateway started through run in front of a fake algorithm
// service, streams read as Server-Sent Events over real connections — events and their order,
// bad input, upstream faults, clients that go away, cancels, what a stream costs in allocations
// and Redis round trips, and the README's chat reader run under node.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestChatStreamHappyPath(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		// Odd chunk boundaries, flushed separately: the gateway must reassemble lines.
		w.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(w)
		all := strings.Join(happyLines, "\n") + "\n"
		for len(all) > 0 {
			n := min(7, len(all))
			_, _ = io.WriteString(w, all[:n])
			_ = rc.Flush()
			all = all[n:]
		}
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	tests := []struct {
		name   string
		body   string
		header map[string]string
		wantID string // the request ID expected end to end
	}{
		{"request_id from the body", `{"message":"hi","request_id":"client-req-1"}`,
			map[string]string{"X-Request-ID": "header-req-1"}, "client-req-1"},
		{"request_id from X-Request-ID", `{"message":"hi"}`,
			map[string]string{"X-Request-ID": "header-req-2"}, "header-req-2"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := map[string]string{
				"Accept-Encoding": "gzip", // set by hand, so the client would not hide a Content-Encoding
				"Authorization":   "Bearer " + tokenFor(t, "u-chat", []string{"user"}, map[string]any{"tenant_id": "tenant-c"}),
				"Cookie":          "session=secret",
				"X-User-ID":       "forged-user",
				"X_Tenant_ID":     "forged-tenant",
				"X-Forwarded-For": "203.0.113.9",
			}
			for k, v := range tt.header {
				hdr[k] = v
			}
			res := postChat(t, g, tt.body, hdr)
			s := wantStream(t, res)
			for h, want := range map[string]string{"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} {
				if got := res.Header.Get(h); got != want {
					t.Errorf("%s = %q, want %q", h, got, want)
				}
			}
			if ce := res.Header.Get("Content-Encoding"); ce != "" || res.Uncompressed {
				t.Errorf("Content-Encoding = %q (uncompressed by client: %v), want none", ce, res.Uncompressed)
			}

			evs := readEvents(t, s)
			wantNames := []string{"stream_start", "retrieval_start", "generation_chunk", "generation_chunk", "generation_done", "stream_end"}
			if !reflect.DeepEqual(eventNames(evs), wantNames) {
				t.Fatalf("events = %v, want %v\nraw:\n%s", eventNames(evs), wantNames, s.raw.String())
			}
			start := evs[0].fields(t)
			if start["request_id"] != tt.wantID || numField(t, start, "timestamp") <= 0 {
				t.Errorf("stream_start data = %s, want request_id %q and a timestamp", evs[0].Data, tt.wantID)
			}
			if evs[0].ID != "" {
				t.Errorf("stream_start has id %q, want none", evs[0].ID)
			}
			for j, line := range happyLines {
				ev := evs[j+1]
				if ev.ID != strconv.Itoa(j+1) {
					t.Errorf("event %d id = %q, want %d", j+1, ev.ID, j+1)
				}
				got := ev.fields(t)
				var up map[string]any
				if err := json.Unmarshal([]byte(line), &up); err != nil {
					t.Fatal(err)
				}
				for k, v := range up {
					if !reflect.DeepEqual(got[k], v) {
						t.Errorf("event %d: %s = %#v, want the upstream's %#v", j+1, k, got[k], v)
					}
				}
				if got["request_id"] != tt.wantID {
					t.Errorf("event %d request_id = %#v, want %q", j+1, got["request_id"], tt.wantID)
				}
				if numField(t, got, "line_number") != float64(j+1) {
					t.Errorf("event %d line_number = %v, want %d", j+1, got["line_number"], j+1)
				}
				// The origin's Unix seconds, and milliseconds beside them.
				if ts, ms := numField(t, got, "timestamp"), numField(t, got, "timestamp_ms"); ts <= 0 || int64(ms)/1000 != int64(ts) {
					t.Errorf("event %d timestamp = %v, timestamp_ms = %v", j+1, got["timestamp"], got["timestamp_ms"])
				}
				if len(got) != len(up)+4 {
					t.Errorf("event %d data = %s, want the upstream fields plus request_id, line_number, timestamp, timestamp_ms", j+1, ev.Data)
				}
			}
			end := evs[len(evs)-1].fields(t)
			if numField(t, end, "lines_processed") != 4 || end["request_id"] != tt.wantID {
				t.Errorf("stream_end data = %s, want lines_processed 4 and request_id %q", evs[len(evs)-1].Data, tt.wantID)
			}

			reqs := algo.requests()
			if len(reqs) != i+1 {
				t.Fatalf("algorithm service received %d requests, want %d", len(reqs), i+1)
			}
			up := reqs[i]
			if up.Method != http.MethodPost || up.Path != "/query" {
				t.Errorf("upstream request = %s %s, want POST /query", up.Method, up.Path)
			}
			for h, want := range map[string]string{
				"Accept":       "application/x-ndjson",
				"Content-Type": "application/json",
				"X-Request-ID": tt.wantID,
			} {
				if got := up.Header.Get(h); got != want {
					t.Errorf("upstream %s = %q, want %q", h, got, want)
				}
			}
			for _, h := range []string{"Authorization", "Cookie"} {
				if v := up.Header.Values(h); len(v) > 0 {
					t.Errorf("client header %s reached the algorithm service: %q", h, v)
				}
			}
			// Identity headers carry the verified token's claims, never the client's.
			for h, want := range map[string]string{"X-User-ID": "u-chat", "X-Tenant-ID": "tenant-c",
				"X-Username": "u-chat-name", "X-User-Roles": "user"} {
				if v := up.Header.Values(h); len(v) != 1 || v[0] != want {
					t.Errorf("upstream %s = %q, want %q from the token", h, v, want)
				}
			}
			if xff := up.Header.Get("X-Forwarded-For"); strings.Contains(xff, "203.0.113.9") {
				t.Errorf("untrusted client's X-Forwarded-For was passed on: %q", xff)
			}
			wantBody := map[string]any{
				"messages":    []any{map[string]any{"role": "user", "content": "hi"}},
				"request_id":  tt.wantID,
				"model":       "default",
				"temperature": 0.7,
				"max_tokens":  float64(2048),
			}
			if !reflect.DeepEqual(up.Body, wantBody) {
				t.Errorf("upstream body = %s\nwant %v", up.RawBody, wantBody)
			}
		})
	}
}

// TestChatStreamEventsArriveOneByOne has the upstream wait, after each line, until the client
// has read that line's event: any buffering in the gateway deadlocks it until its timeout.
func TestChatStreamEventsArriveOneByOne(t *testing.T) {
	read := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		for i := 1; i <= 3; i++ {
			ndjson(w, fmt.Sprintf(`{"type":"step","n":%d}`, i))
			select {
			case <-read:
			case <-r.Context().Done():
				return
			}
		}
		ndjson(w, `{"type":"done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hi"}`))
	res, err := g.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	s := wantStream(t, res)
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	for i := 1; i <= 3; i++ {
		ev := nextEvent(t, s) // times out if the gateway held the event back
		if ev.Event != "step" || ev.ID != strconv.Itoa(i) {
			t.Fatalf("event = %q id %q, want step id %d", ev.Event, ev.ID, i)
		}
		select {
		case read <- struct{}{}:
		case <-ctx.Done():
			t.Fatalf("upstream never waited for event %d", i)
		}
	}
	if got := eventNames(readEvents(t, s)); !reflect.DeepEqual(got, []string{"done", "stream_end"}) {
		t.Errorf("last events = %v, want [done stream_end]", got)
	}
}

func TestChatStreamRejectsBadInput(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CHAT_MAX_BODY_BYTES": "1024"})

	big := `{"message":"` + strings.Repeat("a", 2048) + `"}`
	tests := []struct {
		name        string
		method      string
		path        string
		body        io.Reader
		contentType string
		status      int
		code        string
		field       string // a field named in details, when set
	}{
		{"missing message", "POST", "", strings.NewReader(`{"model":"x"}`), "", 400, "VALIDATION_ERROR", "message"},
		{"blank message", "POST", "", strings.NewReader(`{"message":"  "}`), "", 400, "VALIDATION_ERROR", "message"},
		{"temperature too high", "POST", "", strings.NewReader(`{"message":"hi","temperature":3}`), "", 400, "VALIDATION_ERROR", "temperature"},
		{"max_tokens zero", "POST", "", strings.NewReader(`{"message":"hi","max_tokens":0}`), "", 400, "VALIDATION_ERROR", "max_tokens"},
		{"message of the wrong type", "POST", "", strings.NewReader(`{"message":5}`), "", 400, "VALIDATION_ERROR", "message"},
		{"not JSON", "POST", "", strings.NewReader(`hello there`), "", 400, "INVALID_JSON", ""},
		{"JSON array", "POST", "", strings.NewReader(`[{"message":"hi"}]`), "", 400, "INVALID_JSON", ""},
		{"body over the limit", "POST", "", strings.NewReader(big), "", 413, "PAYLOAD_TOO_LARGE", ""},
		{"body over the limit, chunked", "POST", "", struct{ io.Reader }{strings.NewReader(big)}, "", 413, "PAYLOAD_TOO_LARGE", ""},
		{"text/plain", "POST", "", strings.NewReader(`{"message":"hi"}`), "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE", ""},
		{"invalid request_id", "POST", "", strings.NewReader(`{"message":"hi","request_id":"no spaces allowed"}`), "", 400, "VALIDATION_ERROR", "request_id"},
		{"wrong method", "GET", "", nil, "", 405, "METHOD_NOT_ALLOWED", ""},
		{"unknown path", "GET", "/api/v2/nope", nil, "", 404, "NOT_FOUND", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path
			if path == "" {
				path = "/api/v2/chat/stream"
			}
			res := doRequest(t, g.Client, tt.method, g.URL+path, tt.body, map[string]string{"Content-Type": tt.contentType})
			doc := wantError(t, res, tt.status, tt.code)
			if tt.field != "" {
				var details []struct{ Field, Reason string }
				if err := json.Unmarshal(doc.Details, &details); err != nil || len(details) == 0 {
					t.Fatalf("details = %s, want a list of field errors", doc.Details)
				}
				if details[0].Field != tt.field || details[0].Reason == "" {
					t.Errorf("details = %s, want field %q with a reason", doc.Details, tt.field)
				}
			}
			if tt.status == 405 {
				if allow := res.Header.Get("Allow"); allow != "POST" {
					t.Errorf("Allow = %q, want POST", allow)
				}
			}
		})
	}
	if n := len(algo.requests()); n != 0 {
		t.Errorf("the algorithm service received %d requests for bad input, want 0", n)
	}
}

func TestChatStreamUpstreamRefused(t *testing.T) {
	// 127.0.0.2: no test server binds there, so the freed port stays refused.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + addr})

	doc := wantError(t, postChat(t, g, `{"message":"hi"}`, nil), http.StatusBadGateway, "ALGO_SERVICE_ERROR")
	for _, secret := range []string{port, "127.0.0."} {
		if strings.Contains(doc.raw, secret) {
			t.Errorf("error body leaks the upstream address (%q): %s", secret, doc.raw)
		}
	}
	g.stop() // flushes the access log line
	if log := g.Stderr.String(); strings.Contains(log, addr) {
		t.Errorf("the log shows the upstream address %s:\n%s", addr, log)
	}
}

// TestChatStreamUpstreamFaults drives one gateway against an algorithm service that misbehaves
// in the way the message asks for.
func TestChatStreamUpstreamFaults(t *testing.T) {
	t.Parallel()
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var q struct {
			Messages []struct{ Content string }
		}
		_ = json.NewDecoder(r.Body).Decode(&q)
		ctx := r.Context()
		switch q.Messages[0].Content {
		case "503":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "429":
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
		case "slow":
			sleepCtx(ctx, 3*time.Second)
			ndjson(w, `{"type":"done"}`)
		case "die":
			ndjson(w, `{"type":"a"}`, `{"type":"b"}`, `{"type":"c"}`)
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(http.ErrAbortHandler)
			}
			conn.Close()
		case "no-done":
			ndjson(w, `{"type":"generation_chunk","content":"x"}`, `{"type":"generation_chunk","content":"y"}`)
		case "invalid-line":
			ndjson(w, `{"type":"a"}`, `{not json`, `{"type":"c"}`, `{"type":"generation_done"}`)
		case "long-line":
			ndjson(w, `{"type":"a"}`, `{"type":"huge","pad":"`+strings.Repeat("x", 2<<20)+`"}`,
				`{"type":"after"}`, `{"type":"generation_done"}`)
		case "silent":
			ndjson(w, `{"type":"a"}`)
			if sleepCtx(ctx, 450*time.Millisecond) {
				ndjson(w, `{"type":"generation_done"}`)
			}
		default:
			http.Error(w, "unknown mode", http.StatusBadRequest)
		}
	})
	g := startRun(t, nil, map[string]string{
		"ALGO_URL":          algo.URL,
		"UPSTREAM_TIMEOUT":  "200ms",
		"SSE_PING_INTERVAL": "100ms",
	})
	chat := func(t *testing.T, mode string) *http.Response {
		return postChat(t, g, `{"message":"`+mode+`"}`, nil)
	}
	// errorEvent returns the data of the only error event, checking its code.
	errorEvent := func(t *testing.T, evs []sseEvent, code string) map[string]any {
		t.Helper()
		var found []map[string]any
		for _, e := range evs {
			if e.Event == "error" {
				found = append(found, e.fields(t))
			}
		}
		if len(found) != 1 || found[0]["code"] != code {
			t.Fatalf("error events = %v, want one with code %s", found, code)
		}
		return found[0]
	}

	t.Run("503 is passed on", func(t *testing.T) {
		wantError(t, chat(t, "503"), http.StatusServiceUnavailable, "ALGO_SERVICE_ERROR")
	})
	t.Run("429 becomes RATE_LIMITED with Retry-After", func(t *testing.T) {
		res := chat(t, "429")
		wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
		if ra := res.Header.Get("Retry-After"); ra != "7" {
			t.Errorf("Retry-After = %q, want 7", ra)
		}
	})
	t.Run("slow headers time out", func(t *testing.T) {
		start := time.Now()
		wantError(t, chat(t, "slow"), http.StatusGatewayTimeout, "UPSTREAM_TIMEOUT")
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("the timeout took %v, want about 200ms", d)
		}
	})
	t.Run("upstream dies mid-stream", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "die")))
		want := []string{"stream_start", "a", "b", "c", "error", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "UPSTREAM_INCOMPLETE")
		if end := evs[5].fields(t); numField(t, end, "lines_processed") != 3 {
			t.Errorf("stream_end = %s, want lines_processed 3", evs[5].Data)
		}
	})
	t.Run("upstream ends without a terminal event", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "no-done")))
		want := []string{"stream_start", "generation_chunk", "generation_chunk", "error", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "UPSTREAM_INCOMPLETE")
	})
	t.Run("invalid line is skipped", func(t *testing.T) {
		evs := readEvents(t, wantStream(t, chat(t, "invalid-line")))
		want := []string{"stream_start", "a", "error", "c", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		e := errorEvent(t, evs, "INVALID_LINE")
		if numField(t, e, "line_number") != 2 {
			t.Errorf("error event = %v, want line_number 2", e)
		}
		if evs[3].ID != "3" {
			t.Errorf("the line after the invalid one has id %q, want 3", evs[3].ID)
		}
		end := evs[5].fields(t)
		if numField(t, end, "lines_skipped") != 1 || numField(t, end, "lines_processed") != 3 {
			t.Errorf("stream_end = %s, want lines_skipped 1, lines_processed 3", evs[5].Data)
		}
	})
	t.Run("over-long line is dropped", func(t *testing.T) {
		s := wantStream(t, chat(t, "long-line"))
		evs := readEvents(t, s)
		want := []string{"stream_start", "a", "error", "after", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		errorEvent(t, evs, "LINE_TOO_LONG")
		if s.raw.Len() > 64<<10 {
			t.Errorf("the client received %d bytes: the over-long line leaked through", s.raw.Len())
		}
		if end := evs[5].fields(t); numField(t, end, "lines_skipped") != 1 {
			t.Errorf("stream_end = %s, want lines_skipped 1", evs[5].Data)
		}
	})
	t.Run("pings while the upstream is silent", func(t *testing.T) {
		s := wantStream(t, chat(t, "silent"))
		evs := readEvents(t, s)
		want := []string{"stream_start", "a", "generation_done", "stream_end"}
		if !reflect.DeepEqual(eventNames(evs), want) {
			t.Fatalf("events = %v, want %v", eventNames(evs), want)
		}
		if len(evs[2].Comments) == 0 || evs[2].Comments[0] != "ping" {
			t.Errorf("comments before generation_done = %q, want pings", evs[2].Comments)
		}
		raw := s.raw.String()
		ping, done := strings.Index(raw, "\n: ping\n\n"), strings.Index(raw, "event: generation_done")
		if ping < 0 || ping > done {
			t.Errorf("no \": ping\" comment before generation_done in\n%s", raw)
		}
	})
}

func TestChatStreamClientDisconnectCancelsUpstream(t *testing.T) {
	upstreamDone := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_start"}`)
		<-r.Context().Done()
		close(upstreamDone)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hi"}`))
	res, err := g.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	s := wantStream(t, res)
	nextEvent(t, s)
	if ev := nextEvent(t, s); ev.Event != "generation_start" {
		t.Fatalf("event = %q, want generation_start", ev.Event)
	}
	cancel()
	select {
	case <-upstreamDone:
	case <-time.After(time.Second):
		t.Fatal("the upstream request was still running 1s after the client went away")
	}
}

// TestChatStreamsActiveWhenClientsVanishMidWrite lets clients vanish while the gateway is writing
// to them (the upstream never pauses), and checks that every stream is counted out again and its
// upstream request cancelled.
func TestChatStreamsActiveWhenClientsVanishMidWrite(t *testing.T) {
	t.Parallel()
	const streams = 50
	var cancelled atomic.Int64
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		line := `{"type":"generation_chunk","content":"` + strings.Repeat("x", 8000) + `"}` + "\n"
		rc := http.NewResponseController(w)
		for r.Context().Err() == nil {
			if _, err := io.WriteString(w, line); err != nil || rc.Flush() != nil {
				break
			}
		}
		cancelled.Add(1)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "POLICY_FILE": "testdata/policy/bench.json"})
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/api/v2/chat/stream",
				strings.NewReader(fmt.Sprintf(`{"message":"hi","request_id":"vanish-%d"}`, i)))
			res, err := g.Client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer res.Body.Close()
			io.ReadFull(res.Body, make([]byte, 1<<10)) // mid-stream; then the client is gone
		})
	}
	wg.Wait()
	eventually(t, 5*time.Second, "every upstream request cancelled", func() bool { return cancelled.Load() == streams })
	eventually(t, 5*time.Second, "sse_streams_active back to 0", func() bool {
		v, _ := sample(scrape(t, g.URL+"/metrics"), "sse_streams_active", nil)
		return v == 0
	})
}

func TestChatCancel(t *testing.T) {
	upstreamDone := make(chan struct{}, 1)
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		<-r.Context().Done()
		upstreamDone <- struct{}{}
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	cancelReq := func(t *testing.T, id string) *http.Response {
		return doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/cancel", strings.NewReader(`{"request_id":"`+id+`"}`), nil)
	}

	s := wantStream(t, postChat(t, g, `{"message":"hi","request_id":"cancel-me-1"}`, nil))
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}

	t.Run("same request_id while running is 409", func(t *testing.T) {
		wantError(t, postChat(t, g, `{"message":"again","request_id":"cancel-me-1"}`, nil), http.StatusConflict, "CONFLICT")
	})
	t.Run("unknown request_id is 404", func(t *testing.T) {
		wantError(t, cancelReq(t, "no-such-stream"), http.StatusNotFound, "NOT_FOUND")
	})
	t.Run("cancel ends the stream", func(t *testing.T) {
		res := cancelReq(t, "cancel-me-1")
		if res.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(res.Body)
			t.Fatalf("cancel: status %d, want 200; body %s", res.StatusCode, body)
		}
		var ack map[string]string
		if err := json.NewDecoder(res.Body).Decode(&ack); err != nil || ack["request_id"] != "cancel-me-1" {
			t.Errorf("cancel answer = %v (%v), want the request_id", ack, err)
		}
		evs := readEvents(t, s)
		if len(evs) == 0 || evs[len(evs)-1].Event != "stream_cancelled" {
			t.Fatalf("events after cancel = %v, want stream_cancelled last", eventNames(evs))
		}
		if got := evs[len(evs)-1].fields(t)["request_id"]; got != "cancel-me-1" {
			t.Errorf("stream_cancelled request_id = %v", got)
		}
		select {
		case <-upstreamDone:
		case <-time.After(time.Second):
			t.Fatal("the upstream request was still running 1s after the cancel")
		}
	})
	t.Run("request_id is free again", func(t *testing.T) {
		// The stream is gone from the registry once it ended.
		deadline := time.Now().Add(time.Second)
		for {
			res := cancelReq(t, "cancel-me-1")
			res.Body.Close()
			if res.StatusCode == http.StatusNotFound {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("cancel of a finished stream answers %d, want 404", res.StatusCode)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	if n := len(algo.requests()); n != 1 {
		t.Errorf("algorithm service received %d requests, want 1 (the 409 must not reach it)", n)
	}
}

// TestChatCancelBeforeUpstreamAnswers cancels a stream whose upstream has not answered its
// headers yet: the cancel says "cancelled", so the upstream request must end at once rather
// than whenever the upstream answers or UPSTREAM_TIMEOUT passes.
func TestChatCancelBeforeUpstreamAnswers(t *testing.T) {
	var upstreamCalled atomic.Bool
	upstreamDone := make(chan struct{})
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		upstreamCalled.Store(true)
		sleepCtx(r.Context(), 5*time.Second) // thinking, no headers yet
		close(upstreamDone)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "UPSTREAM_TIMEOUT": "4s"})

	answered := make(chan int, 1)
	var body []byte
	go func() {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, g.URL+"/api/v2/chat/stream",
			strings.NewReader(`{"message":"hi","request_id":"early-cancel"}`))
		res, err := g.Client.Do(req)
		if err != nil {
			answered <- -1
			return
		}
		body, _ = io.ReadAll(res.Body)
		res.Body.Close()
		answered <- res.StatusCode
	}()
	deadline := time.Now().Add(2 * time.Second)
	for {
		res := doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/cancel", strings.NewReader(`{"request_id":"early-cancel"}`), nil)
		res.Body.Close()
		if res.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream never became cancellable (last status %d)", res.StatusCode)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The cancel may land before the request even left the gateway; if it did leave, it must
	// end at once.
	select {
	case <-upstreamDone:
	case <-time.After(time.Second):
		if upstreamCalled.Load() {
			t.Error("the upstream request was still running 1s after a successful cancel")
		}
	}
	select {
	case status := <-answered:
		// The client gets the stream it asked for, opened and cancelled at once.
		if status != http.StatusOK || !strings.Contains(string(body), "event: stream_start\n") ||
			!strings.HasSuffix(strings.TrimSpace(string(body)), "}") ||
			!strings.Contains(string(body), "event: stream_cancelled\n") {
			t.Errorf("client got %d %q, want 200 with stream_start then stream_cancelled", status, body)
		}
	case <-time.After(time.Second):
		t.Error("the client's request was still open 1s after a successful cancel")
		<-answered
	}
	if upstreamCalled.Load() {
		select {
		case <-upstreamDone:
		case <-time.After(5 * time.Second):
			t.Error("the upstream request never ended")
		}
	}
}

// TestStreamAllocationsPerEvent streams answers of 100 and of 2,100 lines through the whole
// gateway (middleware, metrics, access log) and counts the process's allocations: the fake
// algorithm service and the client allocate nothing per line, so the difference is what the
// gateway allocates per event. It must be none.
//
// One allocation is net/http's, not the gateway's, and comes with timing: the server writes each
// chunk's size with fmt.Fprintf, which boxes a size of 256 or more, so a flush that carries
// several events (lines that arrived together) allocates once. The client reads the chunks off
// the wire itself and takes those off.
func TestStreamAllocationsPerEvent(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	var lines int
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		rc := http.NewResponseController(w)
		chunk := []byte(`{"type":"generation_chunk","content":"some tokens of the answer"}` + "\n")
		done := []byte(`{"type":"generation_done"}` + "\n")
		for i := range lines {
			if i == lines-1 {
				w.Write(done)
			} else {
				w.Write(chunk)
			}
			rc.Flush()
		}
	})
	srv, _ := benchGateway(t, map[string]string{"ALGO_URL": algo.URL})
	body := `{"message":"hi"}`
	request := "POST /api/v2/chat/stream HTTP/1.1\r\nHost: voicegate\r\nConnection: close\r\n" +
		"Authorization: Bearer " + tokenFor(t, "u-bench", []string{"admin"}, nil) + "\r\n" +
		"Content-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	// run streams n lines and returns the process's allocations less the chunks of 256 bytes or
	// more.
	run := func(n int) int64 {
		lines = n
		var a, b runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&a)
		conn, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, request); err != nil {
			t.Fatal(err)
		}
		big, err := readChunked(bufio.NewReader(conn))
		if err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&b)
		return int64(b.Mallocs-a.Mallocs) - int64(big)
	}
	run(10)
	// The least of a few runs: the process's background work (the policy watcher, the metric
	// readers) allocates now and then too.
	small, big := run(100), run(2100)
	for range 2 {
		small, big = min(small, run(100)), min(big, run(2100))
	}
	// What a stream costs besides its events varies by a few allocations from run to run.
	perEvent := float64(max(big-small, 0)) / 2000
	t.Logf("about %d allocations per stream; %.3f per event", small, perEvent)
	if perEvent > 0.05 {
		t.Errorf("%.3f allocations per event, want none", perEvent)
	}
}

// readChunked reads an HTTP/1.1 response with a chunked body to its end, and returns how many of
// its chunks held 256 bytes or more. It allocates nothing per chunk.
func readChunked(r *bufio.Reader) (big uint64, err error) {
	status, err := r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	if !bytes.HasPrefix(status, []byte("HTTP/1.1 200 ")) {
		return 0, fmt.Errorf("status line %q, want 200", status)
	}
	chunked := false
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			break
		}
		chunked = chunked || bytes.EqualFold(bytes.TrimSpace(line), []byte("Transfer-Encoding: chunked"))
	}
	if !chunked {
		return 0, errors.New("the response is not chunked")
	}
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		size, err := strconv.ParseUint(string(bytes.TrimSpace(line)), 16, 32)
		if err != nil {
			return 0, fmt.Errorf("chunk size %q: %w", line, err)
		}
		if size == 0 {
			return big, nil
		}
		if size >= 256 {
			big++
		}
		if _, err := r.Discard(int(size) + 2); err != nil {
			return 0, err
		}
	}
}

// TestChatInvalidRequestsNotRateLimited: requests refused as invalid do not use up the built-in
// chat rate (30/min, burst 10): admission (the rate charge and the lease) comes after request
// validation.
func TestChatInvalidRequestsNotRateLimited(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "POLICY_FILE": ""}) // the built-in policy
	tok := tokenFor(t, "u-edge1", []string{"user"}, nil)
	for i := range 10 {
		res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":""}`)
		if res.StatusCode != http.StatusBadRequest {
			t.Fatalf("invalid chat request %d = %d %s, want 400", i+1, res.StatusCode, errorCode(res))
		}
	}
	res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":"hi"}`)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("a valid chat request after ten invalid ones = %d %s, want 200: invalid requests used up the rate",
			res.StatusCode, errorCode(res))
	}
}

func TestChatRefusesIDAttacks(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	for _, a := range idAttacks(t) {
		for _, field := range []string{"conversation_id", "stream_id", "model", "request_id"} {
			t.Run(field+"/"+a.Name, func(t *testing.T) {
				body := jsonBody(t, map[string]any{"message": "hi", field: a.Value})
				wantFieldError(t, postChat(t, g, body, nil), field)
			})
		}
	}
	if n := len(algo.requests()); n != 0 {
		t.Errorf("the algorithm service received %d requests, want none", n)
	}
}

// redisMonitor reads a Redis MONITOR feed. Commands that scripts run are left out (MONITOR
// shows them as "lua"), so what remains is one line per command a client sent.
type redisMonitor struct {
	t     *testing.T
	r     *testRedis
	conn  net.Conn
	lines chan string
	done  sync.WaitGroup
	n     int // markers sent
}

func monitorRedis(t *testing.T, r *testRedis) *redisMonitor {
	t.Helper()
	c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The whole test is bounded by this; a feed that stops fails it instead of hanging.
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := c.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	if line, err := br.ReadString('\n'); err != nil || line != "+OK\r\n" {
		t.Fatalf("MONITOR answered %q, %v", line, err)
	}
	m := &redisMonitor{t: t, r: r, conn: c, lines: make(chan string, 1024)}
	m.done.Add(1)
	go func() {
		defer m.done.Done()
		defer close(m.lines)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			m.lines <- strings.TrimSpace(line)
		}
	}()
	t.Cleanup(func() {
		c.Close()
		for range m.lines { // let the reader finish
		}
		m.done.Wait()
	})
	return m
}

// since returns the commands clients sent since the previous call (or since MONITOR began),
// each as its name and first argument, in lower case: it sends a marker of its own and collects every line
// before it.
func (m *redisMonitor) since() []string {
	m.t.Helper()
	m.n++
	marker := fmt.Sprintf("round-trip-marker-%d", m.n)
	m.r.Do(m.t, "ECHO", marker)
	var cmds []string
	for line := range m.lines {
		// 1764687000.123456 [0 127.0.0.1:54321] "evalsha" "ab12…" "2" …
		_, rest, ok := strings.Cut(line, "] ")
		if !ok || strings.Contains(line, " lua] ") {
			continue
		}
		if strings.Contains(rest, `"`+marker+`"`) {
			return cmds
		}
		if strings.HasPrefix(rest, `"echo" "round-trip-marker-`) {
			continue
		}
		f := strings.Fields(rest)
		cmds = append(cmds, strings.ToLower(strings.Join(f[:min(len(f), 2)], " ")))
	}
	m.t.Fatal("the MONITOR feed ended before the marker came back")
	return nil
}

// TestChatRedisRoundTrips: with rates, a quota, a class rate and a concurrency cap all in force
// and the stream announced to other instances, a chat stream sends Redis one command before the
// upstream is called (the admission script) and one after the stream ends (the release
// script), and the release is done before the client sees the end of the response.
func TestChatRedisRoundTrips(t *testing.T) {
	r := startRedis(t)
	release := make(chan struct{})
	algo := holdAlgo(t, release)
	// A long lease TTL keeps the renewer's periodic round out of the counted window.
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-full.json", "LEASE_TTL": "1h"})))
	w := watchTokens(t, g)
	tok := w.token(t, "u-rt", []string{"user"}, nil)
	mon := monitorRedis(t, r)

	// The first stream loads the scripts and fills the revocation cache, which later requests
	// of the token are served from.
	res, s := openStream(t, g, tok, "hello")
	readEvents(t, s)
	res.Body.Close()
	t.Logf("first stream: %q", mon.since())

	res, s = openStream(t, g, tok, "hold") // returns at stream_start: the upstream answered
	defer res.Body.Close()
	before := mon.since()
	if len(before) != 1 || !strings.HasPrefix(before[0], `"evalsha"`) {
		t.Errorf("before the upstream call the gateway sent Redis %q, want exactly one script", before)
	}
	entries := r.Do(t, "KEYS", "voicegate:stream:*")
	if keys, _ := entries.([]any); len(keys) != 1 || !strings.HasPrefix(fmt.Sprint(keys[0]), "voicegate:stream:{tenant-a}:") {
		t.Errorf("stream directory while the stream runs = %#v, want one entry under the tenant's tag", entries)
	}
	if n := r.Do(t, "ZCARD", "voicegate:lease:{tenant-a}:chat:u:u-rt"); n != int64(1) {
		t.Errorf("ZCARD of the user's chat slots = %#v while the stream runs, want 1", n)
	}
	mon.since() // the test's own commands

	close(release)
	if names := eventNames(readEvents(t, s)); len(names) == 0 || names[len(names)-1] != "stream_end" {
		t.Fatalf("events %v, want them to end with stream_end", names)
	}
	after := mon.since()
	if len(after) != 1 || !strings.HasPrefix(after[0], `"evalsha"`) {
		t.Errorf("after the stream the gateway sent Redis %q, want exactly one script", after)
	}
	// Read at EOF, before anything else is asked of the gateway: the release is done by now.
	if n := r.Do(t, "ZCARD", "voicegate:lease:{tenant-a}:chat:u:u-rt"); n != int64(0) {
		t.Errorf("ZCARD of the user's chat slots = %#v once the response ended, want 0", n)
	}
	if keys, _ := r.Do(t, "KEYS", "voicegate:stream:*").([]any); len(keys) != 0 {
		t.Errorf("stream directory once the response ended = %v, want empty", keys)
	}
}

// readmeChatReader returns the fetch() stream reader of docs/chat.md, as the doc prints it.
func readmeChatReader(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile("docs/chat.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)## Reading a stream from a browser\n.*?```js\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("docs/chat.md has no js block under ## Reading a stream from a browser")
	}
	return string(m[1])
}

// TestREADMEChatReaderUnderNode: the README's fetch() reader, run by node against a real
// gateway, parses every event of an answer whose strings hold raw U+2028 and U+2029 (line
// ends to JavaScript, valid inside JSON strings) and U+0085: the gateway escapes them in the
// data lines, so a reader that takes a data field to the end of its line gets all of it.
func TestREADMEChatReaderUnderNode(t *testing.T) {
	node := requireTool(t, "node", "/usr/bin/node", "nodejs")
	chunks := []string{"first\u2028second", "para\u2029graph", "next\u0085line", "plain"}
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var lines []string
		for _, c := range chunks {
			// Written by hand, raw: encoding/json would escape U+2028 and U+2029 itself.
			lines = append(lines, `{"type":"generation_chunk","content":"`+c+`","meta":{"k`+"\u2028"+`":"v`+"\u2029"+`"}}`)
		}
		lines = append(lines, `{"type":"generation_done","content":"`+"\u2028"+`"}`)
		ndjson(w, lines...)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	w := watchTokens(t, g)
	token := w.token(t, "u-readme-reader", []string{"user"}, nil)

	// The snippet as printed, pointed at this gateway; what it logs is collected and printed
	// as one JSON line at the end.
	snippet := strings.ReplaceAll(readmeChatReader(t), "http://127.0.0.1:8080", g.URL)
	script := "const token = process.env.TOKEN;\n" +
		"const seen = [];\n" +
		"const print = console.log;\n" +
		"console.log = (event, data) => seen.push({ event, data });\n" +
		snippet + "\n" +
		"print(JSON.stringify(seen));\n"
	file := filepath.Join(t.TempDir(), "reader.mjs") // an ES module: top-level await
	if err := os.WriteFile(file, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, file)
	cmd.Env = append(os.Environ(), "TOKEN="+token)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the README's reader failed under node: %v\n%s", err, stderr.String())
	}
	var seen []struct {
		Event string         `json:"event"`
		Data  map[string]any `json:"data"`
	}
	if err := json.Unmarshal(out, &seen); err != nil {
		t.Fatalf("the reader printed %q: %v", out, err)
	}
	var names, content []string
	for _, e := range seen {
		names = append(names, e.Event)
		if e.Event == "generation_chunk" {
			c, _ := e.Data["content"].(string)
			content = append(content, c)
			if m, _ := e.Data["meta"].(map[string]any); m["k\u2028"] != "v\u2029" {
				t.Errorf("a chunk's meta is %v, want the upstream's", e.Data["meta"])
			}
		}
	}
	want := "stream_start generation_chunk generation_chunk generation_chunk generation_chunk generation_done stream_end"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("the reader parsed %q, want %q", got, want)
	}
	if strings.Join(content, "|") != strings.Join(chunks, "|") {
		t.Errorf("the chunks read %q, want %q", content, chunks)
	}
}
