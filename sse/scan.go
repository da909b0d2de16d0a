package sse

import "unicode/utf8"

// object is what scanObject learns about one NDJSON line.
type object struct {
	end   int    // index of the closing brace of the top-level object
	empty bool   // the object has no members
	typ   []byte // the raw text of a plain top-level "type" string; nil when absent
	// slow means the line is valid but cannot be passed through byte for byte: it holds a
	// carriage return (an SSE line break), invalid UTF-8, an escaped key, an escaped or
	// non-string "type", or one of the members the gateway adds. The caller then decodes and
	// re-encodes it with encoding/json.
	slow bool
	// lineEnds means a string holds U+0085, U+2028 or U+2029 raw, as JSON allows: valid, but
	// a line end to some line-based readers, so the encoder writes each as a \u escape.
	lineEnds bool
	// content is the raw JSON string (quotes included) of the last top-level "content" member,
	// when it is a string; contentOdd says a "content" member held something else. OpenAI's
	// chunks copy the text from it without decoding it (completionFramer).
	content    []byte
	contentOdd bool
}

// maxDepth bounds nesting so a hostile line cannot make the scanner's stack grow without limit.
const maxDepth = 512

// Member names the gateway sets on every event; an upstream line carrying them takes the slow
// path so the gateway's values replace the upstream's rather than duplicating keys.
var reservedKeys = [...]string{"request_id", "line_number", "timestamp", "timestamp_ms"}

// plain marks bytes that may appear unescaped in a JSON string and need no further attention.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// scanObject validates line as exactly one JSON object (RFC 8259; surrounding whitespace
// allowed) in a single pass without allocating. It does what json.Valid does plus what the
// rewriter needs to know about the top-level members.
func scanObject(line []byte, stack []byte) (obj object, ok bool) {
	const (
		stValue    = iota // expecting a value
		stAfter           // after a value
		stKey             // expecting an object key
		stKeyOrEnd        // just after '{'
		stValOrEnd        // just after '['
	)
	i, n := 0, len(line)
	stack = stack[:0]
	state := stValue
	// topKey is the index of the top-level key whose value comes next: -1 none, 0 "type",
	// 1 a reserved key, 2 anything else.
	topKey := 2
	for {
		// Skip insignificant whitespace.
		for i < n {
			c := line[i]
			if c == ' ' || c == '\t' {
				i++
				continue
			}
			if c == '\r' || c == '\n' {
				obj.slow = true
				i++
				continue
			}
			break
		}
		if i >= n {
			return obj, false
		}
		c := line[i]
		switch state {
		case stKeyOrEnd:
			if c == '}' {
				i++
				stack = stack[:len(stack)-1]
				if len(stack) == 0 {
					obj.end = i - 1
					obj.empty = true
					return obj, trailingSpace(line[i:], &obj)
				}
				state = stAfter
				continue
			}
			fallthrough
		case stKey:
			if c != '"' {
				return obj, false
			}
			start := i + 1
			var esc, good bool
			i, esc, good = scanString(line, i, &obj)
			if !good {
				return obj, false
			}
			if len(stack) == 1 {
				key := line[start : i-1]
				switch {
				case esc:
					obj.slow = true
					topKey = 2
				case string(key) == "type":
					topKey = 0
				case string(key) == "content":
					topKey = 3
				case isReserved(key):
					obj.slow = true
					topKey = 1
				default:
					topKey = 2
				}
			}
			for i < n && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r' || line[i] == '\n') {
				obj.slow = obj.slow || line[i] == '\r' || line[i] == '\n'
				i++
			}
			if i >= n || line[i] != ':' {
				return obj, false
			}
			i++
			state = stValue
		case stValOrEnd:
			if c == ']' {
				i++
				stack = stack[:len(stack)-1]
				state = stAfter
				continue
			}
			fallthrough
		case stValue:
			isTop := len(stack) == 1 && topKey == 0
			isContent := len(stack) == 1 && topKey == 3
			if isContent {
				obj.content, obj.contentOdd = nil, c != '"'
			}
			if len(stack) == 1 {
				topKey = 2
			}
			switch {
			case c == '{':
				if len(stack) >= maxDepth {
					return obj, false
				}
				stack = append(stack, '{')
				i++
				state = stKeyOrEnd
				if isTop {
					obj.slow = true
				}
				continue
			case len(stack) == 0:
				return obj, false // the top level must be an object
			case c == '[':
				if len(stack) >= maxDepth {
					return obj, false
				}
				stack = append(stack, '[')
				i++
				state = stValOrEnd
				if isTop {
					obj.slow = true
				}
				continue
			case c == '"':
				start := i + 1
				var esc, good bool
				i, esc, good = scanString(line, i, &obj)
				if !good {
					return obj, false
				}
				if isTop {
					if esc {
						obj.slow = true
					} else {
						obj.typ = line[start : i-1]
					}
				}
				if isContent {
					obj.content = line[start-1 : i]
				}
			case c == 't':
				if !hasLiteral(line[i:], "true") {
					return obj, false
				}
				i += 4
			case c == 'f':
				if !hasLiteral(line[i:], "false") {
					return obj, false
				}
				i += 5
			case c == 'n':
				if !hasLiteral(line[i:], "null") {
					return obj, false
				}
				i += 4
			default:
				var good bool
				if i, good = scanNumber(line, i); !good {
					return obj, false
				}
			}
			if isTop {
				// "type" was not a plain string: decode to decide the event name.
				if c != '"' {
					obj.slow = true
				}
			}
			state = stAfter
		case stAfter:
			top := stack[len(stack)-1]
			switch {
			case c == ',':
				i++
				if top == '{' {
					state = stKey
				} else {
					state = stValue
				}
			case c == '}' && top == '{', c == ']' && top == '[':
				i++
				stack = stack[:len(stack)-1]
				if len(stack) == 0 {
					obj.end = i - 1
					return obj, trailingSpace(line[i:], &obj)
				}
			default:
				return obj, false
			}
		}
	}
}

func trailingSpace(rest []byte, obj *object) bool {
	for _, c := range rest {
		switch c {
		case ' ', '\t':
		case '\r', '\n':
			obj.slow = true
		default:
			return false
		}
	}
	return true
}

func isReserved(key []byte) bool {
	for _, k := range reservedKeys {
		if string(key) == k {
			return true
		}
	}
	return false
}

func hasLiteral(b []byte, lit string) bool {
	return len(b) >= len(lit) && string(b[:len(lit)]) == lit
}

// scanString scans the string starting at line[i] == '"' and returns the index after its closing
// quote and whether it held escapes.
func scanString(line []byte, i int, obj *object) (next int, esc, ok bool) {
	n := len(line)
	i++
	for i < n {
		c := line[i]
		if plain[c] {
			i++
			continue
		}
		switch {
		case c == '"':
			return i + 1, esc, true
		case c == '\\':
			esc = true
			if i+1 >= n {
				return i, esc, false
			}
			switch line[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+5 >= n || !isHex(line[i+2]) || !isHex(line[i+3]) || !isHex(line[i+4]) || !isHex(line[i+5]) {
					return i, esc, false
				}
				i += 6
			default:
				return i, esc, false
			}
		case c < 0x20:
			return i, esc, false
		default:
			r, size := utf8.DecodeRune(line[i:])
			switch {
			case r == utf8.RuneError && size == 1:
				obj.slow = true // re-encoding replaces it with U+FFFD, as encoding/json does
			case r == '\u2028', r == '\u2029', r == '\u0085':
				obj.lineEnds = true
			}
			i += size
		}
	}
	return i, esc, false
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// scanNumber scans a JSON number starting at line[i].
func scanNumber(line []byte, i int) (int, bool) {
	n := len(line)
	if i < n && line[i] == '-' {
		i++
	}
	switch {
	case i < n && line[i] == '0':
		i++
	case i < n && line[i] >= '1' && line[i] <= '9':
		for i < n && line[i] >= '0' && line[i] <= '9' {
			i++
		}
	default:
		return i, false
	}
	if i < n && line[i] == '.' {
		i++
		start := i
		for i < n && line[i] >= '0' && line[i] <= '9' {
			i++
		}
		if i == start {
			return i, false
		}
	}
	if i < n && (line[i] == 'e' || line[i] == 'E') {
		i++
		if i < n && (line[i] == '+' || line[i] == '-') {
			i++
		}
		start := i
		for i < n && line[i] >= '0' && line[i] <= '9' {
			i++
		}
		if i == start {
			return i, false
		}
	}
	return i, true
}
