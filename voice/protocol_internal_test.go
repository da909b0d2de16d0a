package voice

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	tests := []struct {
		name, in string
		want     int // bytes kept
	}{
		{"short", "bye", 3},
		{"exactly the limit", strings.Repeat("a", 123), 123},
		{"ASCII over", strings.Repeat("a", 200), 123},
		{"three-byte characters over", strings.Repeat("语", 50), 123}, // 41 whole ones
		{"three-byte characters cut", "a" + strings.Repeat("语", 50), 121},
		{"four-byte characters over", strings.Repeat("🎤", 40), 120},
		{"mixed, cut inside a character", "ab" + strings.Repeat("语", 50), 122},
		{"invalid bytes at the cut", strings.Repeat("a", 122) + "\xff\xff", 122},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := clip(tt.in)
			if len(got) != tt.want || !strings.HasPrefix(tt.in, got) {
				t.Errorf("clip kept %d bytes %q, want the first %d", len(got), got, tt.want)
			}
			if utf8.ValidString(tt.in[:min(len(tt.in), 123)]) && !utf8.ValidString(got) {
				t.Errorf("clip cut a character: %q", got)
			}
		})
	}
}

// controlSeeds are the table cases of the control message tests.
var controlSeeds = []string{
	`{"type":"start"}`, `{"type":"stop","session_id":"someone-else"}`, `{"type":"config","sample_rate":8000}`,
	`{not json`, `[1,2]`, `null`, `"start"`, `{"type":5}`, `{"kind":"start"}`, `{"type":""}`,
	`{"type":"start"} trailing`, `{"type":"launch_missiles"}`, `{"type":"START"}`,
	`{"type":"text","text":"你好","nested":{"a":[1,"b",null]}}`, `{"type":"ping","type":"stop"}`,
}

// FuzzControl checks the control-message validator on any input: either a refusal with a code
// and a reason, or a JSON object of a known type that carries exactly this session's ID.
func FuzzControl(f *testing.F) {
	for _, s := range controlSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		out, typ, code, reason := control(msg, "session-1")
		if code != "" {
			if out != nil || reason == "" {
				t.Fatalf("refusal %s with output %q and reason %q", code, out, reason)
			}
			if code != CodeInvalidMessage && code != CodeUnknownType {
				t.Fatalf("unknown refusal code %q", code)
			}
			return
		}
		if !controlTypes[typ] {
			t.Fatalf("forwarded a message of unknown type %q", typ)
		}
		var m map[string]any
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatalf("forwarded %q, not a JSON object: %v", out, err)
		}
		if m["session_id"] != "session-1" || m["type"] != typ {
			t.Fatalf("forwarded %v: want type %q and this session's ID", m, typ)
		}
	})
}
