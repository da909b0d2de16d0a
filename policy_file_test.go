package main

// Tests of POLICY_FILE across upgrades: a file written for an earlier release, which does not
// bind the routes added since, still starts the gateway, with one warning naming those routes,
// which take the built-in binding; and "voicegate policy check FILE", which prints the binding in
// force for every route and fails on a file the gateway would refuse.

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"voicegate/policy"
)

// previousRelease is a policy file as written for the release before the last one, which
// added chat resume and the per-session voice routes: it binds every other route.
const previousRelease = "testdata/policy/previous-release.json"

// routesSincePreviousRelease are the routes previousRelease does not bind, in the route table's
// order.
func routesSincePreviousRelease(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(previousRelease)
	if err != nil {
		t.Fatal(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for _, b := range routeBindings(&config{}) {
		if !slices.ContainsFunc(f.Routes, func(fb policy.Binding) bool { return fb.Route == b.Route }) {
			missing = append(missing, b.Route)
		}
	}
	// The four routes of the last release, and the OpenAI-compatible ones and POST /api/v2/chat
	// since.
	if len(missing) != 8 {
		t.Fatalf("%s leaves out %q, want the eight routes added since", previousRelease, missing)
	}
	return missing
}

// TestPolicyFileFromAnEarlierRelease: the gateway starts with a policy file that does not bind
// the routes added since it was written, says so in one warning naming them, and binds them as
// the built-in policy does; a reload of a changed version warns again.
func TestPolicyFileFromAnEarlierRelease(t *testing.T) {
	missing := routesSincePreviousRelease(t)
	file := filepath.Join(t.TempDir(), "policy.json")
	old, err := os.ReadFile(previousRelease)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, file, old)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "POLICY_FILE": file, "POLICY_WATCH_INTERVAL": "20ms"})

	const warning = "the policy file does not bind every route"
	n, rec := logCount(t, g, warning)
	if n != 1 {
		t.Fatalf("%d warnings at start, want 1", n)
	}
	if rec["level"] != "WARN" || rec["routes"] != strings.Join(missing, ", ") || rec["file"] != file {
		t.Errorf("the warning is %v, want level WARN naming %s and the routes %q", rec, file, missing)
	}

	// A route the file does not bind is bound as the built-in policy binds it: voice:admin to
	// close a session. The file's own roles decide who has it.
	w := watchTokens(t, g)
	user := w.token(t, "u-old-policy", []string{"user"}, nil)
	support := w.token(t, "u-old-support", []string{"support"}, nil)
	admin := w.token(t, "u-old-admin", []string{"admin"}, nil)
	wantError(t, call(t, g, "DELETE", "/api/v2/voice/sessions/no-such-session", user, ""), http.StatusForbidden, "PERMISSION_DENIED")
	wantError(t, call(t, g, "DELETE", "/api/v2/voice/sessions/no-such-session", support, ""), http.StatusForbidden, "PERMISSION_DENIED")
	wantError(t, call(t, g, "DELETE", "/api/v2/voice/sessions/no-such-session", admin, ""), http.StatusNotFound, "NOT_FOUND")
	// The file's own bindings stand: its support role may read the admin service.
	wantError(t, call(t, g, "GET", "/api/v2/admin/users", support, ""), http.StatusNotFound, "NOT_FOUND")

	// A new version of the same file, put in force by the watch, is warned about once more.
	writeAtomic(t, file, bytes.Replace(old, []byte(`"daily_requests_per_user": 20000`), []byte(`"daily_requests_per_user": 25000`), 1))
	eventually(t, 5*time.Second, "the changed file is reloaded", func() bool {
		n, _ := logCount(t, g, "policy reloaded")
		return n == 1
	})
	if n, _ := logCount(t, g, warning); n != 2 {
		t.Errorf("%d warnings after one reload, want 2", n)
	}
}

// TestPolicyCheckSubcommand: "voicegate policy check FILE" prints the binding in force for
// every route, the file's or the built-in one, and exits 1 on a file the gateway refuses.
func TestPolicyCheckSubcommand(t *testing.T) {
	t.Parallel()
	routes := routeBindings(&config{})
	missing := routesSincePreviousRelease(t)

	t.Run("a file from the previous release", func(t *testing.T) {
		stdout, stderr, err := runCommand(t, nil, "policy", "check", previousRelease)
		if err != nil {
			t.Fatalf("policy check: %v\n%s", err, stderr)
		}
		lines := strings.Split(strings.TrimSpace(stdout), "\n")
		if len(lines) != len(routes)+3 || !strings.HasPrefix(lines[0], "ROUTE ") {
			t.Fatalf("%d lines, want a header, one per route (%d) and a summary:\n%s", len(lines), len(routes), stdout)
		}
		for i, b := range routes {
			f := strings.Fields(lines[i+1])
			if len(f) < 2 || f[0]+" "+f[1] != b.Route && f[0] != b.Route {
				t.Errorf("line %d is %q, want route %s (the route table's order)", i+1, lines[i+1], b.Route)
				continue
			}
			builtIn := strings.HasSuffix(lines[i+1], "built-in (not in the file)")
			if builtIn != slices.Contains(missing, b.Route) {
				t.Errorf("%s: shown as built-in %v, want %v", b.Route, builtIn, !builtIn)
			}
			if b.Permission != "" && !slices.Contains(f, b.Permission) {
				t.Errorf("%s: line %q does not show its permission %s", b.Route, lines[i+1], b.Permission)
			}
		}
		if want := fmt.Sprintf("%d routes: %d bound by the file, %d by the built-in policy", len(routes), len(routes)-len(missing), len(missing)); lines[len(lines)-1] != want {
			t.Errorf("summary %q, want %q", lines[len(lines)-1], want)
		}
		// The same warning as at start, one line, naming the routes.
		if n := strings.Count(stderr, "\n"); n != 1 || !strings.Contains(stderr, "WARN") ||
			!strings.Contains(stderr, strings.Join(missing, ", ")) {
			t.Errorf("stderr %q, want one warning naming %q", stderr, missing)
		}
	})

	t.Run("a file that binds every route", func(t *testing.T) {
		stdout, stderr, err := runCommand(t, nil, "policy", "check", "testdata/policy/good/readme.json")
		if err != nil || stderr != "" {
			t.Fatalf("policy check: %v, stderr %q", err, stderr)
		}
		if n := strings.Count(stdout, "built-in (not in the file)"); n != 0 || !strings.Contains(stdout, fmt.Sprintf("%d bound by the file, 0 by the built-in policy", len(routes))) {
			t.Errorf("%d routes shown as built-in, want none:\n%s", n, stdout)
		}
		// The per-method permissions are shown.
		if !strings.Contains(stdout, "GET=document:read") || !strings.Contains(stdout, "DELETE=document:delete") {
			t.Errorf("the documents route's methods are not shown:\n%s", stdout)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tt := range []struct{ name, file, want string }{
			{"a binding for a route that does not exist", "testdata/policy/bad/route-not-in-gateway.json", "not a route of the gateway"},
			{"an unknown role", "testdata/policy/e2e-bad-unknown-role.json", "reader"},
			{"not JSON", "testdata/policy/bad/json-not-json.json", "invalid character"},
			{"no such file", "testdata/policy/no-such-file.json", "no-such-file.json"},
		} {
			t.Run(tt.name, func(t *testing.T) {
				stdout, _, err := runCommand(t, nil, "policy", "check", tt.file)
				if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "policy check: ") {
					t.Errorf("error %v, want one saying %q", err, tt.want)
				}
				if stdout != "" {
					t.Errorf("printed bindings for a refused file:\n%s", stdout)
				}
			})
		}
		for _, args := range [][]string{{"policy"}, {"policy", "check"}, {"policy", "lint", previousRelease}, {"policy", "check", "a.json", "b.json"}} {
			if _, _, err := runCommand(t, nil, args...); err == nil || !strings.Contains(err.Error(), "usage: voicegate policy check FILE") {
				t.Errorf("%q: error %v, want the usage", args, err)
			}
		}
	})

	t.Run("exit codes", func(t *testing.T) {
		if stderr, code := runMain(t, nil, "policy", "check", previousRelease); code != 0 {
			t.Errorf("exit %d for a file that loads, want 0; stderr:\n%s", code, stderr)
		}
		stderr, code := runMain(t, nil, "policy", "check", "testdata/policy/bad/route-not-in-gateway.json")
		if code != 1 || !strings.HasPrefix(stderr, "voicegate: policy check: policy: binding for ") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("exit %d, stderr %q; want 1 and one line saying why", code, stderr)
		}
	})
}
