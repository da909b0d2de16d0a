package main

import (
	"io"
	"net/url"
	"strings"
	"testing"

	"voicegate/auth"
)

// FuzzConfig gives one setting an arbitrary value, the others valid ones, and parses the
// configuration: it never panics; a refusal is one line that names the variable and never
// repeats a secret's value; what is accepted stays within the bounds the code relies on.
func FuzzConfig(f *testing.F) {
	all := settings()
	index := map[string]uint8{}
	for i, s := range all {
		index[s.env] = uint8(i)
		f.Add(uint8(i), s.def)
		f.Add(uint8(i), "junk\nwith a line break")
	}
	for env, v := range map[string]string{
		"JWT_SECRET":          strings.Repeat(" ", 40),
		"REDIS_URL":           "redis://user:hunter2hunter2@127.0.0.1:6379/0",
		"ALGO_URL":            "http://a:1,http://b:2",
		"TRUSTED_PROXIES":     "10.0.0.0/8, ::ffff:10.0.0.0/104",
		"CORS_ORIGINS":        "https://app.example.com",
		"CONSOLE_GATEWAYS":    "https://gw.example.com, http://127.0.0.1:8081",
		"BODY_READ_TIMEOUT":   "1ms",
		"SSE_MAX_LINE_BYTES":  "999999999999",
		"CHAT_MAX_BODY_BYTES": "16777216",
	} {
		f.Add(index[env], v)
	}
	f.Fuzz(func(t *testing.T, which uint8, value string) {
		s := all[int(which)%len(all)]
		env := map[string]string{"ALGO_URL": "http://127.0.0.1:9", "JWT_SECRET": testSecret, s.env: value}
		cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
		if err != nil {
			msg := err.Error()
			if strings.ContainsAny(msg, "\r\n") {
				t.Fatalf("%s=%q: the error is more than one line: %q", s.env, value, msg)
			}
			if !strings.Contains(msg, s.env) && !(s.env == "ALGO_URL" || s.env == "JWT_SECRET") {
				t.Fatalf("%s=%q: the error %q does not name the variable", s.env, value, msg)
			}
			for _, sec := range secretsIn(s.env, value) {
				if len(sec) >= 8 && strings.Contains(msg, sec) {
					t.Fatalf("%s: the error repeats a secret: %q", s.env, msg)
				}
			}
			return
		}
		switch {
		case cfg.SSEMaxLineBytes < 64 || cfg.SSEMaxLineBytes > maxLineBytes:
			t.Fatalf("SSE_MAX_LINE_BYTES %d accepted", cfg.SSEMaxLineBytes)
		case cfg.ChatMaxBodyBytes < 1 || cfg.ChatMaxBodyBytes > maxChatBody:
			t.Fatalf("CHAT_MAX_BODY_BYTES %d accepted", cfg.ChatMaxBodyBytes)
		case cfg.BodyMinRate < 1 || cfg.BodyReadTimeout < 1:
			t.Fatalf("BODY_MIN_RATE %d, BODY_READ_TIMEOUT %v accepted", cfg.BodyMinRate, cfg.BodyReadTimeout)
		case cfg.JWTSecret != nil && auth.CheckHMACSecret(cfg.JWTSecret) != nil:
			t.Fatalf("a weak JWT_SECRET accepted: %v", auth.CheckHMACSecret(cfg.JWTSecret))
		case len(cfg.AlgoURLs) == 0:
			t.Fatal("no ALGO_URL accepted")
		}
		for _, u := range append(append(cfg.AlgoURLs, cfg.AdminURLs...), cfg.DocsURLs...) {
			if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				t.Fatalf("upstream %v accepted", u)
			}
		}
	})
}

// secretsIn returns the parts of a setting's value that must never be repeated: the whole
// JWT secret, the passwords of Redis URLs, the values of collector headers.
func secretsIn(env, value string) []string {
	var out []string
	switch env {
	case "JWT_SECRET":
		out = append(out, value)
	case "REDIS_URL":
		for _, part := range strings.Split(value, ",") {
			if u, err := url.Parse(strings.TrimSpace(part)); err == nil && u.User != nil {
				if p, ok := u.User.Password(); ok {
					out = append(out, p)
				}
			}
		}
	case "OTEL_EXPORTER_OTLP_HEADERS":
		for _, kv := range strings.Split(value, ",") {
			if _, v, ok := strings.Cut(kv, "="); ok {
				out = append(out, strings.TrimSpace(v))
			}
		}
	}
	return out
}
