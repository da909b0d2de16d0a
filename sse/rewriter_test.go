package sse_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"voicegate/sse"
)

var update = flag.Bool("update", false, "rewrite the golden .sse files in testdata/sse")

// fixedClock makes timestamps and durations deterministic for golden files.
func fixedClock() time.Time { return time.UnixMilli(1700000000000) }

// rewrite runs a whole body through a Rewriter, in the reads src gives, and returns the SSE
// output.
func rewrite(t testing.TB, src io.Reader, o sse.Options) []byte {
	t.Helper()
	if o.RequestID == "" {
		o.RequestID = "req-golden"
	}
	if o.Now == nil {
		o.Now = fixedClock
	}
	rw := sse.NewRewriter(o)
	buf := make([]byte, 2<<10) // production's read buffer
	var out []byte
	for !rw.Finished() {
		n, err := src.Read(buf)
		rw.Write(buf[:n])
		if err != nil {
			rw.End(err)
		}
		out = rw.Take(out)
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

// lineEnds are the characters some line-based readers take for line ends, which JSON lets a
// string hold raw.
var lineEnds = []rune{'\u0085', '\u2028', '\u2029'}

// event is one parsed SSE event.
type event struct {
	id, name, retry string
	data            map[string]any
}

// parseEvents parses an SSE body strictly: only id, event, data and retry fields and ping
// comments.
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
			case "retry":
				ev.retry = v
			case "event":
				ev.name = v
			case "data":
				// Numbers stay text: the upstream's are passed on as written, and JSON allows
				// some (1e700) that no float64 holds.
				dec := json.NewDecoder(strings.NewReader(v))
				dec.UseNumber()
				if err := dec.Decode(&ev.data); err != nil || dec.More() {
					t.Fatalf("data %q is not one JSON object: %v", v, err)
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
	// Line ends to other readers than SSE's: JavaScript's (U+2028, U+2029), and NEL (U+0085)
	// to readers that split lines as Unicode does. Inside a data line they must be escaped.
	for _, r := range lineEnds {
		if bytes.ContainsRune(body, r) {
			t.Fatalf("output contains a raw %U: %q", r, body)
		}
	}
	evs := parseEvents(t, body)
	if len(evs) < 2 || evs[0].name != sse.EventStart {
		t.Fatalf("stream does not open with stream_start: %q", body)
	}
	last := evs[len(evs)-1].name
	if last != sse.EventEnd && last != sse.EventCancelled {
		t.Fatalf("stream does not end with stream_end: %q", body)
	}
	// The reconnect delay comes with stream_start; every later event has an id, one more than
	// the event before it, so a client that resumes after an id is owed exactly what follows.
	if evs[0].retry != "2000" || evs[0].id != "" {
		t.Fatalf("stream_start has retry %q and id %q, want retry 2000 and no id", evs[0].retry, evs[0].id)
	}
	for i, ev := range evs[1:] {
		if ev.id != strconv.Itoa(i+1) || ev.retry != "" {
			t.Fatalf("event %d (%s) has id %q (retry %q), want id %d", i+1, ev.name, ev.id, ev.retry, i+1)
		}
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
	if end["lines_processed"] != json.Number("3") || end["outcome"] != "incomplete" {
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
	if evs[3].data["content"] != "after" || evs[3].data["line_number"] != json.Number("3") {
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

func TestInterrupt(t *testing.T) {
	tests := []struct {
		why, events string
	}{
		{"cancelled", "stream_start,generation_chunk,stream_cancelled"},
		{"shutdown", "stream_start,generation_chunk,server_shutdown,stream_end"},
	}
	for _, tt := range tests {
		t.Run(tt.why, func(t *testing.T) {
			rw := sse.NewRewriter(sse.Options{RequestID: "r", Now: fixedClock, RetryAfter: 3 * time.Second})
			rw.Write([]byte(`{"type":"generation_chunk","content":"a"}` + "\n" + `{"type":"generation_ch`))
			rw.Interrupt(tt.why)
			rw.Write([]byte(`unk"}` + "\n")) // after the end: ignored
			rw.End(io.EOF)
			evs := parseEvents(t, rw.Take(nil))
			if got := names(evs); got != tt.events {
				t.Fatalf("events %s, want %s", got, tt.events)
			}
			if rw.Stats().Outcome != tt.why || !rw.Finished() {
				t.Errorf("outcome %q, finished %v", rw.Stats().Outcome, rw.Finished())
			}
			if tt.why == "shutdown" && evs[2].data["retry_after_ms"] != json.Number("3000") {
				t.Errorf("server_shutdown %v, want retry_after_ms 3000", evs[2].data)
			}
		})
	}
}

// TestTakeSwapsBuffers checks that taking events copies nothing: the caller's buffer and the
// rewriter's trade places, and a line written and taken allocates nothing.
func TestTakeSwapsBuffers(t *testing.T) {
	rw := sse.NewRewriter(sse.Options{RequestID: "r", Now: fixedClock})
	line := []byte(`{"type":"generation_chunk","content":"x"}` + "\n")
	rw.Take(nil) // stream_start
	big := make([]byte, 0, 4096)
	rw.Write(line)
	b := rw.Take(big) // the line's event; the rewriter goes on in big
	rw.Write(line)
	if b = rw.Take(b[:0]); &b[:1][0] != &big[:1][0] {
		t.Error("the buffer handed in did not come back filled: a copy was made")
	}
	allocs := testing.AllocsPerRun(100, func() {
		rw.Write(line)
		b = rw.Take(b[:0])
	})
	if allocs != 0 {
		t.Errorf("%v allocations per line written and taken, want 0", allocs)
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
