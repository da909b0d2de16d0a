package sse

import (
	"bytes"
	"encoding/json"
	"strconv"
)

// Event names the gateway itself emits; all others come from the upstream lines' "type".
const (
	EventStart     = "stream_start"
	EventEnd       = "stream_end"
	EventError     = "error"
	EventCancelled = "stream_cancelled"
	EventShutdown  = "server_shutdown"
	// EventMessage names an upstream line without a usable "type".
	EventMessage = "message"
)

// In-stream error codes, sent as the "code" of an error event.
const (
	CodeInvalidLine        = "INVALID_LINE"
	CodeLineTooLong        = "LINE_TOO_LONG"
	CodeUpstreamIncomplete = "UPSTREAM_INCOMPLETE"
	CodeResumeGap          = "RESUME_GAP"
	CodeTokenRevoked       = "TOKEN_REVOKED"
)

// knownEvent returns the metrics label of an upstream type, without allocating: the types of
// DESIGN.md's stream stand for themselves, anything else is "other", so labels stay few.
func knownEvent(typ []byte) string {
	switch string(typ) {
	case "retrieval_start":
		return "retrieval_start"
	case "retrieval_progress":
		return "retrieval_progress"
	case "retrieval_result":
		return "retrieval_result"
	case "generation_start":
		return "generation_start"
	case "generation_chunk":
		return "generation_chunk"
	case "generation_done":
		return "generation_done"
	case "done":
		return "done"
	case "error":
		return EventError
	case "":
		return EventMessage
	}
	return "other"
}

// isTerminal reports whether an upstream line of this type ends the answer.
func isTerminal(typ []byte) bool {
	switch string(typ) {
	case "generation_done", "done", "error":
		return true
	}
	return false
}

// maxEventName bounds an event name taken from upstream text.
const maxEventName = 64

// eventName returns typ when it is safe as an SSE event name, else "message". Only a plain
// token may pass: anything else could break the event framing or confuse clients.
func eventName(typ []byte) []byte {
	if len(typ) == 0 || len(typ) > maxEventName {
		return []byte(EventMessage)
	}
	for _, c := range typ {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '_', c == '-', c == '.', c == ':':
		default:
			return []byte(EventMessage)
		}
	}
	return typ
}

// encoder turns upstream lines into SSE events. It keeps scratch space between calls, so one
// encoder serves one stream.
type encoder struct {
	reqField []byte // `"request_id":"…"`, encoded once per stream
	stack    []byte // scanObject's nesting stack
}

func newEncoder(requestID string) *encoder {
	id, _ := json.Marshal(requestID)
	f := make([]byte, 0, len(`"request_id":`)+len(id))
	f = append(f, `"request_id":`...)
	f = append(f, id...)
	return &encoder{reqField: f, stack: make([]byte, 0, 16)}
}

// appendLine appends the event for one upstream line to dst. ok is false when the line is not
// a JSON object; typ is the line's "type" (nil when absent or unusable).
func (e *encoder) appendLine(dst, line []byte, lineNo, now int64) (out, typ []byte, ok bool) {
	obj, ok := scanObject(line, e.stack)
	if !ok {
		return dst, nil, false
	}
	if obj.slow {
		return e.appendSlow(dst, line, lineNo, now)
	}
	typ = obj.typ
	dst = append(dst, "id: "...)
	dst = strconv.AppendInt(dst, lineNo, 10)
	dst = append(dst, "\nevent: "...)
	if typ == nil {
		dst = append(dst, EventMessage...)
	} else {
		dst = append(dst, eventName(typ)...)
	}
	dst = append(dst, "\ndata: "...)
	// The line is a valid object without CR or LF, so its bytes up to the closing brace are
	// safe inside one data field, once any other line end is escaped; the gateway's members
	// go before that brace.
	start := 0
	for line[start] != '{' {
		start++
	}
	if obj.lineEnds {
		dst = appendEscapingLineEnds(dst, line[start:obj.end])
	} else {
		dst = append(dst, line[start:obj.end]...)
	}
	if !obj.empty {
		dst = append(dst, ',')
	}
	dst = e.appendFields(dst, lineNo, now)
	dst = append(dst, "}\n\n"...)
	return dst, typ, true
}

func (e *encoder) appendFields(dst []byte, lineNo, now int64) []byte {
	dst = append(dst, e.reqField...)
	dst = append(dst, `,"line_number":`...)
	dst = strconv.AppendInt(dst, lineNo, 10)
	return appendTimestamp(dst, now)
}

// appendTimestamp appends the time now (unix ms) as the origin document has it, in Unix
// seconds ("timestamp"), and in milliseconds beside it ("timestamp_ms").
func appendTimestamp(dst []byte, now int64) []byte {
	dst = append(dst, `,"timestamp":`...)
	dst = strconv.AppendInt(dst, now/1000, 10)
	dst = append(dst, `,"timestamp_ms":`...)
	return strconv.AppendInt(dst, now, 10)
}

// appendSlow handles the rare lines that need decoding: encoding/json re-encodes them, which
// removes line breaks, replaces invalid UTF-8 and lets the gateway's members win.
func (e *encoder) appendSlow(dst, line []byte, lineNo, now int64) ([]byte, []byte, bool) {
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber() // keep numbers exactly as the upstream wrote them
	if err := dec.Decode(&m); err != nil || m == nil {
		return dst, nil, false
	}
	var typ []byte
	if s, isString := m["type"].(string); isString {
		typ = []byte(s)
	}
	delete(m, "request_id")
	delete(m, "line_number")
	delete(m, "timestamp")
	delete(m, "timestamp_ms")
	body, err := json.Marshal(m)
	if err != nil {
		return dst, nil, false
	}
	// Marshal writes no CR or LF, escapes U+2028 and U+2029, and replaces invalid UTF-8; it
	// leaves U+0085 raw.
	dst = append(dst, "id: "...)
	dst = strconv.AppendInt(dst, lineNo, 10)
	dst = append(dst, "\nevent: "...)
	dst = append(dst, eventName(typ)...)
	dst = append(dst, "\ndata: "...)
	dst = appendEscapingLineEnds(dst, bytes.TrimSuffix(body, []byte("}")))
	if len(m) > 0 {
		dst = append(dst, ',')
	}
	dst = e.appendFields(dst, lineNo, now)
	dst = append(dst, "}\n\n"...)
	return dst, typ, true
}

// appendGatewayEvent appends an event the gateway makes itself, with the id given (none when
// negative): its data is the encoded members in fields (each `"key":value`) plus request_id
// and timestamp.
func (e *encoder) appendGatewayEvent(dst []byte, id int64, name string, now int64, fields ...string) []byte {
	if id >= 0 {
		dst = append(dst, "id: "...)
		dst = strconv.AppendInt(dst, id, 10)
		dst = append(dst, '\n')
	}
	dst = append(dst, "event: "...)
	dst = append(dst, name...)
	dst = append(dst, "\ndata: {"...)
	dst = append(dst, e.reqField...)
	for _, f := range fields {
		dst = append(dst, ',')
		dst = append(dst, f...)
	}
	dst = appendTimestamp(dst, now)
	dst = append(dst, "}\n\n"...)
	return dst
}

// field encodes one JSON member for appendGatewayEvent.
func field(key string, value any) string {
	v, _ := json.Marshal(value)
	if indexLineEnd(v) >= 0 {
		v = appendEscapingLineEnds(nil, v)
	}
	return strconv.Quote(key) + ":" + string(v)
}

// appendEscapingLineEnds appends the JSON text text to dst with every U+0085, U+2028 and
// U+2029 written as a \u escape. JSON lets a string hold them raw, but a data line must
// stay one line to every reader: JavaScript ends lines at U+2028 and U+2029 (a regular
// expression's "." and "$" stop there, as in the fetch() reader of docs/chat.md), and readers that
// split lines as Unicode does end them at U+0085 too. In valid JSON they can only be inside
// strings, where the escape means the same character; text must be valid UTF-8, in which
// their encodings cannot be part of another character's.
func appendEscapingLineEnds(dst, text []byte) []byte {
	for {
		i := indexLineEnd(text)
		if i < 0 {
			return append(dst, text...)
		}
		dst = append(dst, text[:i]...)
		if text[i] == 0xc2 { // C2 85
			dst = append(dst, `\u0085`...)
			text = text[i+2:]
			continue
		}
		if text[i+2] == 0xa8 { // E2 80 A8
			dst = append(dst, `\u2028`...)
		} else { // E2 80 A9
			dst = append(dst, `\u2029`...)
		}
		text = text[i+3:]
	}
}

// indexLineEnd returns the index of the first U+0085, U+2028 or U+2029 in the UTF-8 text b,
// or -1.
func indexLineEnd(b []byte) int {
	for i := 0; i < len(b); i++ {
		switch b[i] {
		case 0xc2:
			if i+1 < len(b) && b[i+1] == 0x85 {
				return i
			}
		case 0xe2:
			if i+2 < len(b) && b[i+1] == 0x80 && (b[i+2] == 0xa8 || b[i+2] == 0xa9) {
				return i
			}
		}
	}
	return -1
}
