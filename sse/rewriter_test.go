package sse_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"voicegate/sse"
)

var update = flag.Bool("update", false, "rewrite the golden .sse files in testdata/sse")

// fixedClock makes timestamps and durations deterministic for golden files.
func fixedClock() time.Time { return time.UnixMilli(1700000000000) }

func newRewriter(src io.Reader, o sse.Options) *sse.Rewriter {
	if o.RequestID == "" {
		o.RequestID = "req-golden"
	}
	if o.Now == nil {
		o.Now = fixedClock
	}
	if o.PingInterval == 0 {
		o.PingInterval = -1
	}
	return sse.NewRewriter(io.NopCloser(src), o)
}

// rewrite runs a whole body through a Rewriter and returns the SSE output.
func rewrite(t testing.TB, src io.Reader, o sse.Options) []byte {
	t.Helper()
	rw := newRewriter(src, o)
	defer rw.Close()
	out, err := io.ReadAll(rw)
	if err != nil {
		t.Fatalf("reading the rewriter: %v", err)
	}
	return out
}

func TestGolden(t *testing.T) {
	inputs, err := filepath.Glob("../testdata/sse/*.ndjson")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".ndjson")
		t.Run(name, func(t *testing.T) {
			src, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			got := rewrite(t, bytes.NewReader(src), sse.Options{})
			checkWellFormed(t, got)
			golden := strings.TrimSuffix(in, ".ndjson") + ".sse"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("output differs from %s\n--- got\n%s\n--- want\n%s", golden, got, want)
			}
			// The same events whatever chunk boundaries the upstream used.
			for _, r := range map[string]io.Reader{
				"one byte": iotest.OneByteReader(bytes.NewReader(src)),
				"half":     iotest.HalfReader(bytes.NewReader(src)),
			} {
				if split := rewrite(t, r, sse.Options{}); !bytes.Equal(split, got) {
					t.Errorf("split reads changed the output:\n%s", split)
				}
			}
		})
	}
}

// TestEverySplit cuts the upstream body at every byte boundary and expects the same events.
func TestEverySplit(t *testing.T) {
	src, err := os.ReadFile("../testdata/sse/injection.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	want := rewrite(t, bytes.NewReader(src), sse.Options{})
	for cut := 1; cut < len(src); cut++ {
		r := io.MultiReader(bytes.NewReader(src[:cut]), bytes.NewReader(src[cut:]))
		if got := rewrite(t, r, sse.Options{}); !bytes.Equal(got, want) {
			t.Fatalf("cut at byte %d changed the output:\n%s", cut, got)
		}
	}
}

// event is one parsed SSE event.
type event struct {
	id, name string
	data     map[string]any
}

// parseEvents parses an SSE body strictly: only id, event and data fields and ping comments.
func parseEvents(t testing.TB, body []byte) []event {
	t.Helper()
	var evs []event
	for _, block := range strings.Split(strings.TrimSuffix(string(body), "\n\n"), "\n\n") {
		if block == ": ping" || block == "" {
			continue
		}
		var ev event
		for _, line := range strings.Split(block, "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				t.Fatalf("malformed SSE line %q in %q", line, body)
			}
			switch k {
			case "id":
				ev.id = v
			case "event":
				ev.name = v
			case "data":
				if err := json.Unmarshal([]byte(v), &ev.data); err != nil {
					t.Fatalf("data %q is not a JSON object: %v", v, err)
				}
			default:
				t.Fatalf("unexpected SSE field %q in %q", k, body)
			}
		}
		evs = append(evs, ev)
	}
	return evs
}

// checkWellFormed asserts the invariants every stream keeps: stream_start first, a final
// stream_end or stream_cancelled, request IDs on every event, safe event names.
func checkWellFormed(t testing.TB, body []byte) []event {
	t.Helper()
	if bytes.ContainsRune(body, '\r') {
		t.Fatalf("output contains a carriage return")
	}
	evs := parseEvents(t, body)
	if len(evs) < 2 || evs[0].name != sse.EventStart {
		t.Fatalf("stream does not open with stream_start: %q", body)
	}
	last := evs[len(evs)-1].name
	if last != sse.EventEnd && last != sse.EventCancelled {
		t.Fatalf("stream does not end with stream_end: %q", body)
	}
	for _, ev := range evs {
		if ev.data["request_id"] == nil || ev.data["timestamp"] == nil {
			t.Fatalf("event %q lacks request_id or timestamp", ev.name)
		}
		for _, c := range ev.name {
			if !strings.ContainsRune("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:", c) {
				t.Fatalf("unsafe event name %q", ev.name)
			}
		}
	}
	return evs
}

func names(evs []event) string {
	var s []string
	for _, e := range evs {
		s = append(s, e.name)
	}
	return strings.Join(s, ",")
}

func TestUpstreamDiesAfterThreeLines(t *testing.T) {
	body := `{"type":"generation_chunk","content":"a"}` + "\n" +
		`{"type":"generation_chunk","content":"b"}` + "\n" +
		`{"type":"generation_chunk","content":"c"}` + "\n" + `{"type":"gener`
	src := io.MultiReader(strings.NewReader(body), iotest.ErrReader(io.ErrUnexpectedEOF))
	evs := checkWellFormed(t, rewrite(t, src, sse.Options{}))
	want := "stream_start,generation_chunk,generation_chunk,generation_chunk,error,stream_end"
	if got := names(evs); got != want {
		t.Fatalf("events = %s, want %s", got, want)
	}
	errEv := evs[4]
	if errEv.data["code"] != sse.CodeUpstreamIncomplete || errEv.data["fatal"] != true {
		t.Fatalf("error event = %v", errEv.data)
	}
	end := evs[5].data
	if end["lines_processed"] != 3.0 || end["outcome"] != "incomplete" {
		t.Fatalf("stream_end = %v", end)
	}
}

// longLine streams one line of n bytes without holding it in memory.
type longLine struct{ left int }

func (l *longLine) Read(p []byte) (int, error) {
	if l.left == 0 {
		return 0, io.EOF
	}
	n := min(len(p), l.left)
	for i := range p[:n] {
		p[i] = 'x'
	}
	l.left -= n
	return n, nil
}

func TestOverlongLineKeepsMemoryBounded(t *testing.T) {
	const lineLen = 64 << 20
	src := io.MultiReader(
		strings.NewReader(`{"type":"generation_chunk","content":"before"}`+"\n"+`{"content":"`),
		&longLine{left: lineLen},
		strings.NewReader(`"}`+"\n"+`{"type":"generation_chunk","content":"after"}`+"\n"+`{"type":"done"}`+"\n"),
	)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	out := rewrite(t, src, sse.Options{MaxLineBytes: 1 << 20})
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 8<<20 {
		t.Errorf("a %d MiB line allocated %d MiB; memory must stay bounded by the line limit", lineLen>>20, grew>>20)
	}
	evs := checkWellFormed(t, out)
	if got, want := names(evs), "stream_start,generation_chunk,error,generation_chunk,done,stream_end"; got != want {
		t.Fatalf("events = %s, want %s", got, want)
	}
	if evs[2].data["code"] != sse.CodeLineTooLong || evs[2].data["fatal"] != false {
		t.Fatalf("error event = %v", evs[2].data)
	}
	if evs[3].data["content"] != "after" || evs[3].data["line_number"] != 3.0 {
		t.Fatalf("line after the long one = %v", evs[3].data)
	}
}

func TestExactlyMaxLineIsAccepted(t *testing.T) {
	line := `{"type":"done","pad":"` + strings.Repeat("p", 100) + `"}`
	out := rewrite(t, strings.NewReader(line+"\n"), sse.Options{MaxLineBytes: len(line)})
	if got := names(checkWellFormed(t, out)); got != "stream_start,done,stream_end" {
		t.Fatalf("events = %s", got)
	}
	out = rewrite(t, iotest.OneByteReader(strings.NewReader(line+"\n")), sse.Options{MaxLineBytes: len(line) - 1})
	if got := names(checkWellFormed(t, out)); got != "stream_start,error,error,stream_end" {
		t.Fatalf("events = %s", got)
	}
}

// readEvent reads from rw until it returns something, or fails the test after timeout.
func readEvent(t *testing.T, rw io.Reader, timeout time.Duration) string {
	t.Helper()
	type result struct {
		s   string
		err error
	}
	ch := make(chan result, 1)
	go func() {
		buf := make([]byte, 64<<10)
		n, err := rw.Read(buf)
		ch <- result{string(buf[:n]), err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("read: %v", r.err)
		}
		return r.s
	case <-time.After(timeout):
		t.Fatalf("no event within %v", timeout)
	}
	return ""
}

// TestPingWhileSilent checks that Ping is called while the upstream is silent, while Read is
// blocked on it, and not any more once lines flow and the stream has ended.
func TestPingWhileSilent(t *testing.T) {
	pr, pw := io.Pipe()
	pings := make(chan struct{}, 100)
	rw := sse.NewRewriter(pr, sse.Options{RequestID: "r", PingInterval: 20 * time.Millisecond,
		Ping: func() { pings <- struct{}{} }})
	defer rw.Close()
	if ev := readEvent(t, rw, time.Second); !strings.HasPrefix(ev, "event: stream_start\n") {
		t.Fatalf("first read = %q", ev)
	}
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(rw)
		done <- b
	}()
	for i := 0; i < 3; i++ {
		select {
		case <-pings:
		case <-time.After(time.Second):
			t.Fatal("no ping while the upstream was silent")
		}
	}
	if _, err := pw.Write([]byte(`{"type":"done"}` + "\n")); err != nil {
		t.Fatal(err)
	}
	out := <-done
	if got := names(parseEvents(t, out)); got != "done,stream_end" {
		t.Fatalf("events after the pings = %s", got)
	}
	for len(pings) > 0 {
		<-pings
	}
	time.Sleep(60 * time.Millisecond)
	if len(pings) != 0 {
		t.Fatal("pinged after the stream ended")
	}
}

func TestCancel(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithCancel(context.Background())
	rw := sse.NewRewriter(pr, sse.Options{RequestID: "r", Cancel: ctx})
	defer rw.Close()
	readEvent(t, rw, time.Second)
	time.AfterFunc(20*time.Millisecond, cancel) // while Read is blocked on the silent upstream
	out, err := io.ReadAll(rw)
	if err != nil {
		t.Fatal(err)
	}
	evs := parseEvents(t, out)
	if len(evs) != 1 || evs[0].name != sse.EventCancelled {
		t.Fatalf("after cancel got %q, want only stream_cancelled", out)
	}
	if rw.Stats().Outcome != "cancelled" {
		t.Fatalf("outcome = %q", rw.Stats().Outcome)
	}
	// The upstream body was closed: the upstream request is cancelled.
	if _, err := pw.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("upstream still open after cancel: %v", err)
	}
}

func TestShutdown(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, shutdown := context.WithCancel(context.Background())
	rw := sse.NewRewriter(pr, sse.Options{RequestID: "r", Shutdown: ctx, RetryAfter: 3 * time.Second})
	defer rw.Close()
	readEvent(t, rw, time.Second)
	time.AfterFunc(20*time.Millisecond, shutdown)
	out, err := io.ReadAll(rw)
	if err != nil {
		t.Fatal(err)
	}
	evs := parseEvents(t, out)
	if names(evs) != "server_shutdown,stream_end" || evs[0].data["retry_after_ms"] != 3000.0 {
		t.Fatalf("after shutdown got %q", out)
	}
}

// TestCloseUnblocksRead checks that Close wakes a Read blocked on a silent upstream.
func TestCloseUnblocksRead(t *testing.T) {
	pr, _ := io.Pipe()
	rw := sse.NewRewriter(pr, sse.Options{RequestID: "r"})
	readEvent(t, rw, time.Second)
	errc := make(chan error, 1)
	go func() {
		_, err := rw.Read(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("Read after Close returned no error")
		}
	case <-time.After(time.Second):
		t.Fatal("Close did not unblock Read")
	}
	if _, err := rw.Read(make([]byte, 10)); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Read after Close = %v", err)
	}
}

func TestOnEvent(t *testing.T) {
	var seen []string
	src, _ := os.ReadFile("../testdata/sse/invalid_lines.ndjson")
	rewrite(t, bytes.NewReader(src), sse.Options{OnEvent: func(name string) { seen = append(seen, name) }})
	want := "stream_start,generation_chunk,error,error,error,error,generation_chunk,done,stream_end"
	if got := strings.Join(seen, ","); got != want {
		t.Fatalf("OnEvent saw %s, want %s", got, want)
	}
}

// FuzzRewriter feeds arbitrary upstream bodies, whole and one byte at a time: the output is
// always well-formed SSE, the same either way.
func FuzzRewriter(f *testing.F) {
	inputs, _ := filepath.Glob("../testdata/sse/*.ndjson")
	for _, in := range inputs {
		b, _ := os.ReadFile(in)
		f.Add(b)
	}
	f.Add([]byte("{\"type\":\"done\"}"))
	f.Add([]byte("\x00\xff\n{}\n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		whole := rewrite(t, bytes.NewReader(body), sse.Options{MaxLineBytes: 256})
		checkWellFormed(t, whole)
		split := rewrite(t, iotest.OneByteReader(bytes.NewReader(body)), sse.Options{MaxLineBytes: 256})
		if !bytes.Equal(whole, split) {
			t.Fatalf("one-byte reads changed the output:\n%q\n%q", whole, split)
		}
	})
}
