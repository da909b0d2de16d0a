package proxy_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"voicegate/proxy"
)

func TestValidLabel(t *testing.T) {
	for _, tc := range []struct {
		s  string
		ok bool
	}{
		{"", true},
		{"conv-1", true},
		{"a:b", true},
		{"会话 一", true},
		{"emoji 🎙", true},
		{"tab\there", false},
		{"nl\n", false},
		{"del\x7f", false},
		{"c1 \u0085", false},
		{"c1 \u009b[31m", false},
		{"ls \u2028", false},
		{"ps \u2029", false},
		{"rlo \u202e", false},
		{"lri \u2066", false},
		{"pdi \u2069", false},
		{"lrm \u200e", false},
		{"alm \u061c", false},
		{"bom \ufeff", false},
		{"repl \ufffd", false},
		{"bad utf8 \xff", false},
		{strings.Repeat("x", 256), true},
		{strings.Repeat("x", 257), false},
	} {
		if got := proxy.ValidLabel(tc.s, 0); got != tc.ok {
			t.Errorf("ValidLabel(%q) = %v, want %v", tc.s, got, tc.ok)
		}
	}
	if proxy.ValidLabel("abcd", 3) {
		t.Error("a label longer than its bound is refused")
	}
}

// FuzzValidLabel: whatever a label holds once accepted, it is UTF-8 without a character that
// breaks a line, a log or the reading direction.
func FuzzValidLabel(f *testing.F) {
	for _, s := range []string{"", "conv-1", "a\u2028b", "\u202eabc", "\x85", "会话"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !proxy.ValidLabel(s, 0) {
			return
		}
		if !utf8.ValidString(s) || len(s) > proxy.MaxLabelLen {
			t.Fatalf("accepted %q", s)
		}
		for _, r := range s {
			if r < 0x20 || (r >= 0x7f && r <= 0x9f) || r == 0x2028 || r == 0x2029 ||
				(r >= 0x202a && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069) || r == 0x200e || r == 0x200f || r == 0x061c {
				t.Fatalf("accepted %q with %U", s, r)
			}
		}
	})
}
