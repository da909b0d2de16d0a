package main

// The console's routes on the gateway: served only when enabled.

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestConsoleEnabled: /console is served with CONSOLE_ENABLED=true, which -demo turns on, and
// is a 404 otherwise; the demo's banner says which.
func TestConsoleEnabled(t *testing.T) {
	for _, tt := range []struct {
		name   string
		args   []string
		env    map[string]string
		status int
		banner string
	}{
		{"off by default", nil, map[string]string{"ALGO_URL": "http://127.0.0.1:9"}, http.StatusNotFound, ""},
		{"on with CONSOLE_ENABLED", nil, map[string]string{"ALGO_URL": "http://127.0.0.1:9", "CONSOLE_ENABLED": "true"}, http.StatusOK, ""},
		{"on with -demo", []string{"-demo"}, nil, http.StatusOK, "/console#token="},
		{"off in -demo when asked", []string{"-demo"}, map[string]string{"CONSOLE_ENABLED": "false"}, http.StatusNotFound, "console is off"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			g := startRun(t, tt.args, tt.env)
			for _, path := range []string{"/console", "/console/console.js"} {
				res := call(t, g, "GET", path, "", "")
				if res.StatusCode != tt.status {
					t.Errorf("GET %s = %d, want %d", path, res.StatusCode, tt.status)
				}
				if tt.status == http.StatusOK && res.Header.Get("Content-Security-Policy") == "" {
					t.Errorf("GET %s has no Content-Security-Policy", path)
				}
			}
			if tt.status == http.StatusNotFound {
				wantError(t, call(t, g, "GET", "/console", "", ""), http.StatusNotFound, "NOT_FOUND")
			}
			wantStatus(t, call(t, g, "GET", "/openapi.json", "", ""), http.StatusOK)
			if tt.banner != "" {
				eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(g.Stdout.String(), "Ctrl-C") })
				if !strings.Contains(g.Stdout.String(), tt.banner) {
					t.Errorf("the banner does not say %q:\n%s", tt.banner, g.Stdout)
				}
			}
		})
	}
}
