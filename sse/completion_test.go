package sse

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// frame runs src through a framer made by mk, chunk boundaries at the cuts given, and
// returns everything it produced, then the upstream's end with err.
func frame(mk func() framer, src []byte, err error, cuts ...int) []byte {
	f := mk()
	var out []byte
	prev := 0
	for _, c := range append(cuts, len(src)) {
		f.Write(src[prev:c])
		out = f.Take(out)
		prev = c
	}
	f.End(err)
	return f.Take(out)
}

func testOptions() *HandlerOptions {
	t0 := time.Unix(1_700_000_000, 0)
	return &HandlerOptions{Now: func() time.Time { return t0 }}
}

func completionFramerFor(includeUsage bool) func() framer {
	return func() framer {
		q := &queryRequest{RequestID: CompletionID("r1"), Model: "m"}
		return newCompletionFramer(testOptions(), q, nil, nil, includeUsage)
	}
}

// chunkEvent is one event of an OpenAI stream: its id and its data, decoded unless [DONE].
type chunkEvent struct {
	id   string
	done bool
	data map[string]any
}

// parseChunks parses an OpenAI stream strictly: id and data fields only, one data line each.
func parseChunks(t *testing.T, body []byte) []chunkEvent {
	t.Helper()
	var evs []chunkEvent
	if !bytes.HasSuffix(body, []byte("\n\n")) {
		t.Fatalf("stream does not end with a blank line: %q", body)
	}
	for _, block := range strings.Split(strings.TrimSuffix(string(body), "\n\n"), "\n\n") {
		var ev chunkEvent
		for _, line := range strings.Split(block, "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				t.Fatalf("malformed line %q", line)
			}
			switch k {
			case "id":
				ev.id = v
			case "data":
				if v == "[DONE]" {
					ev.done = true
					continue
				}
				if err := json.Unmarshal([]byte(v), &ev.data); err != nil {
					t.Fatalf("data %q: %v", v, err)
				}
			default:
				t.Fatalf("unexpected field %q", k)
			}
		}
		evs = append(evs, ev)
	}
	return evs
}

// content is the text of a stream's deltas, and whether it ended with [DONE].
func content(t *testing.T, evs []chunkEvent) (text string, done bool, errObj map[string]any) {
	t.Helper()
	for i, ev := range evs {
		if ev.done {
			if i != len(evs)-1 {
				t.Fatalf("[DONE] is event %d of %d", i, len(evs))
			}
			done = true
			continue
		}
		if e, ok := ev.data["error"].(map[string]any); ok {
			errObj = e
			continue
		}
		if ev.data["object"] != "chat.completion.chunk" {
			t.Fatalf("event %d is a %v", i, ev.data["object"])
		}
		for _, c := range ev.data["choices"].([]any) {
			d := c.(map[string]any)["delta"].(map[string]any)
			if s, ok := d["content"].(string); ok {
				text += s
			}
		}
	}
	return text, done, errObj
}

func TestCompletionStream(t *testing.T) {
	src := []byte(`{"type":"retrieval_start"}
{"type":"generation_start"}
{"type":"generation_chunk","content":"Hel"}
not json
{"type":"generation_chunk","content":"lo \u2028 \"x\"\n"}
{"type":"generation_done","finish_reason":"length","usage":{"prompt_tokens":3,"completion_tokens":2}}
{"type":"generation_chunk","content":"after the end"}
`)
	evs := parseChunks(t, frame(completionFramerFor(true), src, io.EOF))
	text, done, errObj := content(t, evs)
	if text != "Hello \u2028 \"x\"\n" || !done || errObj != nil {
		t.Fatalf("text %q, done %v, error %v", text, done, errObj)
	}
	first := evs[0].data["choices"].([]any)[0].(map[string]any)["delta"].(map[string]any)
	if first["role"] != "assistant" || evs[0].id != "1" {
		t.Fatalf("first event %v, want the assistant role with id 1", evs[0])
	}
	fin := evs[len(evs)-3].data["choices"].([]any)[0].(map[string]any)
	if fin["finish_reason"] != "length" {
		t.Fatalf("finish chunk %v, want finish_reason length", fin)
	}
	usage := evs[len(evs)-2].data["usage"].(map[string]any)
	if usage["prompt_tokens"] != 3.0 || usage["completion_tokens"] != 2.0 || usage["total_tokens"] != 5.0 {
		t.Fatalf("usage %v", usage)
	}
	for i, ev := range evs {
		if want := i + 1; ev.id != strings.TrimSpace(ev.id) || ev.id != itoa(want) {
			t.Fatalf("event %d has id %q, want %d", i, ev.id, want)
		}
	}
	// Without include_usage: no usage chunk, and no usage member on the chunks.
	evs = parseChunks(t, frame(completionFramerFor(false), src, io.EOF))
	for _, ev := range evs {
		if _, has := ev.data["usage"]; has {
			t.Fatalf("usage without include_usage: %v", ev.data)
		}
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

// TestCompletionEverySplit: the same answer whatever the upstream's chunk boundaries, a cut at
// every byte offset, each golden NDJSON file.
func TestCompletionEverySplit(t *testing.T) {
	files, _ := filepath.Glob("../testdata/sse/*.ndjson")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, file := range files {
		src, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for k, mk := range []func() framer{completionFramerFor(true), collectorFor(true), collectorFor(false)} {
			want := frame(mk, src, io.EOF)
			// An event's data line stays one line to every reader (a single answer is no SSE).
			if i := indexLineEnd(want); i >= 0 && k == 0 {
				t.Fatalf("%s: a raw U+0085, U+2028 or U+2029 in the output at %d: %q", file, i, want[max(i-20, 0):])
			}
			for cut := 1; cut < len(src); cut++ {
				if got := frame(mk, src, io.EOF, cut); !bytes.Equal(got, want) {
					t.Fatalf("%s: a cut at byte %d changed the output:\n%s\nwant:\n%s", file, cut, got, want)
				}
			}
		}
	}
}

// TestCompletionNoTerminal: an upstream that ends without generation_done, cleanly or
// broken, is an error object and never [DONE].
func TestCompletionNoTerminal(t *testing.T) {
	src := []byte("{\"type\":\"generation_chunk\",\"content\":\"half\"}\n{\"type\":\"generation_chunk\",\"content\":\" an\"}")
	for _, end := range []error{io.EOF, io.ErrUnexpectedEOF, errors.New("connection reset")} {
		evs := parseChunks(t, frame(completionFramerFor(true), src, end))
		text, done, errObj := content(t, evs)
		if done || errObj == nil || errObj["code"] != "upstream_incomplete" || errObj["type"] != "server_error" {
			t.Fatalf("end %v: done %v, error %v", end, done, errObj)
		}
		// The last line lacked its newline: kept on a clean end only.
		if want := map[bool]string{true: "half an", false: "half"}[end == io.EOF]; text != want {
			t.Fatalf("end %v: text %q, want %q", end, text, want)
		}
	}
	// An error line of the upstream ends the stream with its message, without [DONE].
	evs := parseChunks(t, frame(completionFramerFor(false), []byte(`{"type":"error","message":"model overloaded"}`+"\n"), io.EOF))
	_, done, errObj := content(t, evs)
	if done || errObj["message"] != "model overloaded" {
		t.Fatalf("upstream error: done %v, error %v", done, errObj)
	}
}

func TestCompletionInterrupt(t *testing.T) {
	for why, code := range map[string]string{stopCancelled: "stream_cancelled", stopShutdown: "server_shutdown"} {
		f := completionFramerFor(false)()
		f.Write([]byte(`{"type":"generation_chunk","content":"a"}` + "\n"))
		f.Interrupt(why)
		f.Write([]byte(`{"type":"generation_chunk","content":"b"}` + "\n"))
		_, done, errObj := content(t, parseChunks(t, f.Take(nil)))
		if done || errObj["code"] != code || !f.Finished() {
			t.Fatalf("%s: done %v error %v", why, done, errObj)
		}
	}
	f := completionFramerFor(false)()
	f.Fail(CodeTokenRevoked, "revoked", "revoked")
	if _, _, errObj := content(t, parseChunks(t, f.Take(nil))); errObj["code"] != "token_revoked" {
		t.Fatalf("revocation: %v", errObj)
	}
}

// TestCompletionOverlongLine: a line over the limit is skipped, memory bounded, the stream
// goes on.
func TestCompletionOverlongLine(t *testing.T) {
	f := newCompletionFramer(&HandlerOptions{Now: time.Now, MaxLineBytes: 64}, &queryRequest{RequestID: "chatcmpl-x", Model: "m"}, nil, nil, false)
	big := `{"type":"generation_chunk","content":"` + strings.Repeat("x", 1000) + `"}` + "\n"
	for i := 0; i < len(big); i += 7 {
		f.Write([]byte(big[i:min(i+7, len(big))]))
		if c := cap(f.a.lines.partial); c > 256 {
			t.Fatalf("partial line grew to %d bytes", c)
		}
	}
	f.Write([]byte(`{"type":"generation_chunk","content":"ok"}` + "\n" + `{"type":"done"}` + "\n"))
	text, done, _ := content(t, parseChunks(t, f.Take(nil)))
	if text != "ok" || !done || f.Stats().LinesSkipped != 1 {
		t.Fatalf("text %q done %v stats %+v", text, done, f.Stats())
	}
}

func collectorFor(openAI bool) func() framer {
	return func() framer {
		return newCollector(testOptions(), &queryRequest{RequestID: "chatcmpl-r1", Model: "m", ConversationID: "c"}, nil, nil, openAI)
	}
}

func TestCollector(t *testing.T) {
	src := []byte(`{"type":"generation_chunk","content":"Hel"}` + "\n" + `{"type":"generation_chunk","text":"lo"}` + "\n" +
		`{"type":"generation_done","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}` + "\n")
	f := collectorFor(true)()
	f.Write(src[:10])
	if f.Pending() != 0 || len(f.Take(nil)) != 0 {
		t.Fatal("a single answer wrote before it was complete")
	}
	f.Write(src[10:])
	if f.Head(http.Header{}) != http.StatusOK {
		t.Fatal("status")
	}
	var c completion
	if err := json.Unmarshal(f.Take(nil), &c); err != nil {
		t.Fatal(err)
	}
	if c.Object != "chat.completion" || c.Choices[0].Message.Content != "Hello" || c.Choices[0].FinishReason != "stop" || c.Usage.TotalTokens != 3 {
		t.Fatalf("completion %+v", c)
	}
	// An incomplete answer is an error with its status, never a partial answer.
	f = collectorFor(false)()
	f.Write(src[:len(src)/2])
	f.End(io.EOF)
	h := http.Header{}
	if st := f.Head(h); st != http.StatusBadGateway {
		t.Fatalf("status %d", st)
	}
	var doc map[string]string
	if err := json.Unmarshal(f.Take(nil), &doc); err != nil || doc["code"] != CodeUpstreamIncomplete {
		t.Fatalf("error document %v (%v)", doc, err)
	}
	f = collectorFor(true)()
	f.Interrupt(stopShutdown)
	if st := f.Head(h); st != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
		t.Fatalf("drain: status %d, Retry-After %q", st, h.Get("Retry-After"))
	}
	// An answer over the bound fails rather than growing.
	f = collectorFor(true)()
	chunk := []byte(`{"type":"generation_chunk","content":"` + strings.Repeat("y", 64<<10) + `"}` + "\n")
	for i := 0; i < maxAnswerBytes/(64<<10)+2 && !f.Finished(); i++ {
		f.Write(chunk)
	}
	if !f.Finished() || f.Head(http.Header{}) != http.StatusBadGateway {
		t.Fatal("an answer over maxAnswerBytes was not refused")
	}
}

// FuzzCompletionFramer: whatever the upstream sends, split anywhere, the OpenAI stream is
// well framed: id and one data line per event, each valid JSON or [DONE], [DONE] last if at
// all, no raw line ends, and it always ends ([DONE] or an error object).
func FuzzCompletionFramer(f *testing.F) {
	files, _ := filepath.Glob("../testdata/sse/*.ndjson")
	for _, file := range files {
		src, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(src, uint16(len(src)/2))
	}
	f.Fuzz(func(t *testing.T, src []byte, cut uint16) {
		out := frame(completionFramerFor(true), src, io.EOF, int(cut)%(len(src)+1))
		if indexLineEnd(out) >= 0 {
			t.Fatalf("a raw line end in %q", out)
		}
		evs := parseChunks(t, out)
		last := evs[len(evs)-1]
		if !last.done && last.data["error"] == nil {
			t.Fatalf("the stream ends with neither [DONE] nor an error: %v", last.data)
		}
		for i, ev := range evs[:len(evs)-1] {
			if ev.done || ev.data["error"] != nil {
				t.Fatalf("event %d of %d ends the stream", i, len(evs))
			}
		}
	})
}
