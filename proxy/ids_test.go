package proxy_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"unicode/utf8"

	"voicegate/proxy"
)

// attack is one entry of testdata/ids/attacks.json: a value no ID or label may hold, shared by
// these tests and the gateway's tests of every route that takes one.
type attack struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

func attacks(t testing.TB) []attack {
	t.Helper()
	b, err := os.ReadFile("../testdata/ids/attacks.json")
	if err != nil {
		t.Fatal(err)
	}
	var as []attack
	if err := json.Unmarshal(b, &as); err != nil || len(as) == 0 {
		t.Fatalf("testdata/ids/attacks.json: %v (%d entries)", err, len(as))
	}
	return as
}

// TestAttacksRefused: every value of the shared table is refused as a label, a request ID and
// a language.
func TestAttacksRefused(t *testing.T) {
	for _, a := range attacks(t) {
		if proxy.ValidLabel(a.Value, 0) {
			t.Errorf("ValidLabel accepts the %s: %q", a.Name, a.Value)
		}
		if proxy.ValidRequestID(a.Value) {
			t.Errorf("ValidRequestID accepts the %s: %q", a.Name, a.Value)
		}
		if proxy.ValidLanguage(a.Value) {
			t.Errorf("ValidLanguage accepts the %s: %q", a.Name, a.Value)
		}
	}
}

func TestValidLanguage(t *testing.T) {
	for _, tc := range []struct {
		s  string
		ok bool
	}{
		{"", true},
		{"en-US", true},
		{"zh_CN", true},
		{"sr-Latn-RS", true},
		{"en US", false},
		{"en-US;", false},
		{"日本語", false},
		{strings.Repeat("a", 16), true},
		{strings.Repeat("a", 17), false},
	} {
		if got := proxy.ValidLanguage(tc.s); got != tc.ok {
			t.Errorf("ValidLanguage(%q) = %v, want %v", tc.s, got, tc.ok)
		}
	}
}

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
	for _, a := range attacks(f) {
		f.Add(a.Value)
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

// TestValidResumeToken: only the shape crypto/rand.Text makes passes: 26 characters of A-Z 2-7.
func TestValidResumeToken(t *testing.T) {
	for _, ok := range []string{"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "234567ABCDEFGHIJKLMNOPQRST"} {
		if !proxy.ValidResumeToken(ok) {
			t.Errorf("ValidResumeToken(%q) = false, want true", ok)
		}
	}
	for _, bad := range []string{"", "ABC", "ABCDEFGHIJKLMNOPQRSTUVWXY", "ABCDEFGHIJKLMNOPQRSTUVWXYZA",
		"abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXY1", "ABCDEFGHIJKLMNOPQRSTUVWXY:", "ABCDEFGHIJKLMNOPQRSTUVWXY\x00",
		"ABCDEFGHIJKLMNOPQRSTUVWX\u00e9"} {
		if proxy.ValidResumeToken(bad) {
			t.Errorf("ValidResumeToken(%q) = true, want false", bad)
		}
	}
}
