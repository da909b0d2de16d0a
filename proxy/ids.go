package proxy

import (
	"strconv"
	"unicode/utf8"
)

// What a client-supplied identifier or label may contain is decided here, once, for every
// route: chat's request, conversation and stream IDs and model; voice's conversation ID and
// language; the control routes' IDs (a resumed or cancelled request_id, a voice session_id in
// a path, a broadcast's tenant_id and user_id, a revocation's jti, user_id and tenant_id); the
// X-Request-ID and X-Tenant-ID headers; and the identity a token carries. Each of these ends up
// in log lines, upstream headers and JSON, in Redis key names (escaped by policy.Keys), and on
// the console's screen. The reasons below are what a client is told when a check fails, so
// that every route says the same thing of the same rule.

// maxRequestIDLen bounds a request ID, incoming X-Request-ID or chat request_id alike.
const maxRequestIDLen = 128

// MaxLabelLen is the longest label in bytes that ValidLabel accepts unless told otherwise.
const MaxLabelLen = 256

// RequestIDReason is what a client is told of an ID that ValidRequestID refuses.
const RequestIDReason = "must be 1-128 characters of A-Z a-z 0-9 . _ : -"

// ValidRequestID reports whether id is a sane request ID: 1 to 128 characters from
// [A-Za-z0-9._:-]. Anything else could smuggle text into logs or upstream headers. The IDs the
// gateway makes itself and clients send back (request IDs, voice session IDs) have this shape.
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

// LabelReason is what a client is told of a label that ValidLabel(s, max) refuses.
func LabelReason(max int) string {
	if max <= 0 {
		max = MaxLabelLen
	}
	return "must be at most " + strconv.Itoa(max) + " bytes of text without control, line-separator or bidi characters"
}

// maxLanguageLen bounds a language tag.
const maxLanguageLen = 16

// LanguageReason is what a client is told of a language that ValidLanguage refuses.
const LanguageReason = "must be a language tag such as en-US: at most 16 characters of A-Z a-z 0-9 - _"

// ValidLanguage reports whether s may be a language a client asks for (voice's language): at
// most 16 characters of [A-Za-z0-9_-], the alphabet of BCP 47 tags and of the underscore forms
// (zh_CN) that speech services accept too. Empty is valid: the caller's default applies.
func ValidLanguage(s string) bool {
	if len(s) > maxLanguageLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
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

// ResumeTokenLen is the length of a voice resume token: crypto/rand.Text's 26 characters of
// base32 (A-Z, 2-7), 130 random bits.
const ResumeTokenLen = 26

// ResumeTokenReason is what a client is told of a resume token that ValidResumeToken refuses.
const ResumeTokenReason = "must be the 26 characters of A-Z 2-7 that session_initialized or session_resumed gave"

// ValidResumeToken reports whether t has the shape of a resume token the gateway made. The
// check is only of shape: whether it names a session is the store's to say.
func ValidResumeToken(t string) bool {
	if len(t) != ResumeTokenLen {
		return false
	}
	for i := 0; i < len(t); i++ {
		if c := t[i]; !(c >= 'A' && c <= 'Z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}
