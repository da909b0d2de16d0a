package sse

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// scanCases are lines with their expected validity; they also seed FuzzScanObject.
var scanCases = []struct {
	line string
	ok   bool
	slow bool
	typ  string
}{
	{`{}`, true, false, ""},
	{` {"type":"a"} `, true, false, "a"},
	{`{"type":"generation_chunk","content":"hi"}`, true, false, "generation_chunk"},
	{`{"a":{"type":"nested"},"type":"top"}`, true, false, "top"},
	{`{"a":[1,-2.5e3,true,false,null,"s",{"b":[]}]}`, true, false, ""},
	{`{"type":"x\ny"}`, true, true, ""},
	{`{"t\u0079pe":"x"}`, true, true, ""},
	{`{"request_id":"x"}`, true, true, ""},
	{`{"timestamp":1}`, true, true, ""},
	{`{"type":1}`, true, true, ""},
	{`{"type":{"a":1}}`, true, true, ""},
	{"{\"a\":1,\r\"b\":2}", true, true, ""},
	{"{\"a\":\"\xff\"}", true, true, ""},
	{`{"a":"é🎙"}`, true, false, ""},
	{``, false, false, ""},
	{`   `, false, false, ""},
	{`[]`, false, false, ""},
	{`"s"`, false, false, ""},
	{`1`, false, false, ""},
	{`{`, false, false, ""},
	{`{"a"}`, false, false, ""},
	{`{"a":}`, false, false, ""},
	{`{"a":1,}`, false, false, ""},
	{`{"a":[1,]}`, false, false, ""},
	{`{"a":01}`, false, false, ""},
	{`{"a":1.}`, false, false, ""},
	{`{"a":-}`, false, false, ""},
	{`{"a":1e}`, false, false, ""},
	{`{"a":tru}`, false, false, ""},
	{`{"a":"\x"}`, false, false, ""},
	{`{"a":"\u12"}`, false, false, ""},
	{"{\"a\":\"\x01\"}", false, false, ""},
	{`{} {}`, false, false, ""},
	{`{}x`, false, false, ""},
	{`{'a':1}`, false, false, ""},
	{`{"a":1]`, false, false, ""},
	{strings.Repeat("[", maxDepth+1), false, false, ""},
	{`{"a":` + strings.Repeat("[", maxDepth) + strings.Repeat("]", maxDepth) + `}`, false, false, ""},
}

func TestScanObject(t *testing.T) {
	for _, tc := range scanCases {
		obj, ok := scanObject([]byte(tc.line), nil)
		if ok != tc.ok {
			t.Errorf("scanObject(%q) ok = %v, want %v", tc.line, ok, tc.ok)
			continue
		}
		if !ok {
			continue
		}
		if obj.slow != tc.slow {
			t.Errorf("scanObject(%q) slow = %v, want %v", tc.line, obj.slow, tc.slow)
		}
		if string(obj.typ) != tc.typ {
			t.Errorf("scanObject(%q) type = %q, want %q", tc.line, obj.typ, tc.typ)
		}
	}
}

// FuzzScanObject checks the hand-written scanner against encoding/json: the same lines are
// valid, and a fast-path event carries exactly the upstream members plus the gateway's.
func FuzzScanObject(f *testing.F) {
	for _, tc := range scanCases {
		f.Add([]byte(tc.line))
	}
	enc := newEncoder("req-1")
	f.Fuzz(func(t *testing.T, line []byte) {
		if bytes.Count(line, []byte("["))+bytes.Count(line, []byte("{")) >= maxDepth {
			return // deeper than the scanner's deliberate limit
		}
		obj, ok := scanObject(line, nil)
		trimmed := bytes.TrimLeft(line, " \t\r\n")
		want := json.Valid(line) && len(trimmed) > 0 && trimmed[0] == '{'
		if ok != want {
			t.Fatalf("scanObject(%q) = %v, encoding/json says %v", line, ok, want)
		}
		if !ok {
			return
		}
		out, typ, ok := enc.appendLine(nil, line, 3, 42)
		if !ok {
			t.Fatalf("appendLine refused a valid object %q", line)
		}
		data := dataOf(t, out)
		for _, r := range []rune{'\u0085', '\u2028', '\u2029'} {
			if bytes.ContainsRune(data, r) {
				t.Fatalf("event data %q holds a raw %U", data, r)
			}
		}
		// Numbers stay text: JSON allows some (1e700) that no float64 holds, and the upstream's
		// are passed on as written.
		decode := func(b []byte, v *map[string]any) error {
			dec := json.NewDecoder(bytes.NewReader(b))
			dec.UseNumber()
			return dec.Decode(v)
		}
		var got map[string]any
		if err := decode(data, &got); err != nil {
			t.Fatalf("event data %q is not JSON: %v", data, err)
		}
		if got["request_id"] != "req-1" || got["line_number"] != json.Number("3") || got["timestamp"] != json.Number("0") || got["timestamp_ms"] != json.Number("42") {
			t.Fatalf("gateway members wrong in %s", data)
		}
		if obj.slow {
			return // re-encoded: may differ in invalid UTF-8 and duplicate keys
		}
		var orig map[string]any
		if err := decode(line, &orig); err != nil {
			t.Fatal(err)
		}
		orig["request_id"], orig["line_number"], orig["timestamp"], orig["timestamp_ms"] = "req-1", json.Number("3"), json.Number("0"), json.Number("42")
		if !reflect.DeepEqual(orig, got) {
			t.Fatalf("fast path changed the object:\n in  %s\n out %s", line, data)
		}
		if s, isStr := orig["type"].(string); isStr && string(typ) != s {
			t.Fatalf("type = %q, want %q", typ, s)
		}
	})
}

// dataOf returns the data field of one encoded event and checks its framing.
func dataOf(t *testing.T, event []byte) []byte {
	t.Helper()
	if !bytes.HasSuffix(event, []byte("\n\n")) || bytes.Count(event, []byte("\n")) != 4 {
		t.Fatalf("event %q is not id, event, data and a blank line", event)
	}
	lines := bytes.Split(event[:len(event)-2], []byte("\n"))
	if !bytes.HasPrefix(lines[0], []byte("id: ")) || !bytes.HasPrefix(lines[1], []byte("event: ")) ||
		!bytes.HasPrefix(lines[2], []byte("data: ")) {
		t.Fatalf("bad event framing %q", event)
	}
	if bytes.ContainsRune(event, '\r') {
		t.Fatalf("event contains a carriage return: %q", event)
	}
	return bytes.TrimPrefix(lines[2], []byte("data: "))
}

func TestAppendLineAllocations(t *testing.T) {
	enc := newEncoder("req-1")
	line := []byte(`{"type":"generation_chunk","content":"Hello, this is a chunk of an answer that is about two hundred bytes long, which is typical for token streaming with some metadata.","index":12}`)
	buf := make([]byte, 0, 1024)
	allocs := testing.AllocsPerRun(1000, func() {
		buf, _, _ = enc.appendLine(buf[:0], line, 12, 1700000000000)
	})
	if allocs != 0 {
		t.Fatalf("appendLine allocated %v times per line on the fast path, want 0", allocs)
	}
}

// TestLineEndsEscaped: a raw U+2028, U+2029 or U+0085 in an upstream string, whether the line
// passes through byte for byte or is re-encoded, reaches the data line as a \u escape, and the
// data decodes to what the upstream sent.
func TestLineEndsEscaped(t *testing.T) {
	enc := newEncoder("req-1")
	for _, line := range []string{
		"{\"type\":\"generation_chunk\",\"content\":\"a\u2028b\u2029c\u0085d\"}",
		"{\"content\":\"\u2028\",\"nested\":{\"k\u2029\":[\"\u0085\u2028\"]}}",
		"{\"type\":\"x\",\"request_id\":\"slow\u2028path\",\"content\":\"\u2029\"}",
		"{\"content\":\"invalid \xff and \u2028\"}",
		"{\"type\":\"é\u2028\"}",
	} {
		out, _, ok := enc.appendLine(nil, []byte(line), 1, 2)
		if !ok {
			t.Fatalf("appendLine refused %q", line)
		}
		data := dataOf(t, out)
		for _, r := range []rune{'\u0085', '\u2028', '\u2029'} {
			if bytes.ContainsRune(data, r) {
				t.Errorf("data %q holds a raw %U", data, r)
			}
		}
		var in, got map[string]any
		if err := json.Unmarshal([]byte(line), &in); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &got); err != nil {
			t.Fatalf("data %q is not JSON: %v", data, err)
		}
		in["request_id"], in["line_number"], in["timestamp"], in["timestamp_ms"] = "req-1", 1.0, 0.0, 2.0
		if !reflect.DeepEqual(in, got) {
			t.Errorf("data %s, want the upstream's object %v", data, in)
		}
	}
}

// TestLineEndsEscapedWithoutAllocating: escaping line ends keeps the fast path free of
// allocations.
func TestLineEndsEscapedWithoutAllocating(t *testing.T) {
	enc := newEncoder("req-1")
	line := []byte("{\"type\":\"generation_chunk\",\"content\":\"a line\u2028another\u2029and NEL\u0085end\",\"index\":12}")
	if obj, _ := scanObject(line, nil); obj.slow {
		t.Fatal("a line with line ends takes the slow path")
	}
	buf := make([]byte, 0, 1024)
	allocs := testing.AllocsPerRun(1000, func() {
		buf, _, _ = enc.appendLine(buf[:0], line, 12, 1700000000000)
	})
	if allocs != 0 {
		t.Fatalf("appendLine allocated %v times per line with line ends, want 0", allocs)
	}
}
