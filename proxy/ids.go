package proxy

import "unicode/utf8"

// What a client-supplied identifier or label may contain is decided here, once, for every
// route: chat's request, conversation and stream IDs and model, voice's conversation ID and
// language, the control routes' IDs, and the identity a token carries. Each of these ends up in
// log lines, upstream headers and JSON, in Redis key names (escaped by policy.Keys), and on the
// console's screen.

// maxRequestIDLen bounds a request ID, incoming X-Request-ID or chat request_id alike.
const maxRequestIDLen = 128

// MaxLabelLen is the longest label in bytes that ValidLabel accepts unless told otherwise.
const MaxLabelLen = 256

// ValidRequestID reports whether id is a sane request ID: 1 to 128 characters from
// [A-Za-z0-9._:-]. Anything else could smuggle text into logs or upstream headers.
func ValidRequestID(id string) bool {
	if id == "" || len(id) > maxRequestIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '-', c == '_', c == '.', c == ':':
		default:
			return false
		}
	}
	return true
}

// ValidLabel reports whether s may be a client-supplied identifier or label of at most max
// bytes (MaxLabelLen when max is 0): valid UTF-8 holding no character that changes how text
// around it is read. Refused are the C0 and C1 control characters and DEL (line breaks and
// terminal escapes in logs), U+2028 and U+2029 (line ends to JavaScript and to line-based
// readers), the bidirectional controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069,
// which make a listing read other than it is), U+FEFF and U+FFFD (the marks of text decoded
// wrongly). Empty is valid: whether a value is required is the caller's to say.
func ValidLabel(s string, max int) bool {
	if max <= 0 {
		max = MaxLabelLen
	}
	if len(s) > max {
		return false
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return false
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError || refusedRune(r) {
			return false
		}
		i += n
	}
	return true
}

func refusedRune(r rune) bool {
	switch {
	case r >= 0x80 && r <= 0x9f: // C1 controls
		return true
	case r == 0x2028, r == 0x2029:
		return true
	case r == 0x061c, r == 0x200e, r == 0x200f, r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true
	case r == 0xfeff:
		return true
	}
	return false
}
