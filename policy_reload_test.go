package main

// The policy file at run time: reloaded when it changes or on SIGHUP, a bad file refused at
// start and kept out at reload.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"voicegate/policy"
)

// withoutDocumentRead is f with document:read taken from the "user" role.
func withoutDocumentRead(f *policy.File) *policy.File {
	r := f.Roles["user"]
	r.Permissions = slices.DeleteFunc(slices.Clone(r.Permissions), func(p string) bool { return p == "document:read" })
	f.Roles["user"] = r
	return f
}

// TestPolicyHotReload: the policy file is watched (POLICY_WATCH_INTERVAL=50ms). Taking
// document:read from "user" takes effect within a second; a broken file is refused with one
// ERROR line and the running policy stays, unchanged in every other respect.
func TestPolicyHotReload(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, file, e2ePolicy(t))
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DOCS_URL": backend.URL,
		"POLICY_FILE": file, "POLICY_WATCH_INTERVAL": "50ms"})
	w := watchTokens(t, g)
	user := w.token(t, "u-user", []string{"user"}, nil)
	editor := w.token(t, "u-editor", []string{"editor"}, nil)
	const doc = "/api/v2/documents/x"
	wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)

	writePolicy(t, file, withoutDocumentRead(e2ePolicy(t)))
	took := eventually(t, time.Second, "a user's GET is refused after document:read was taken away", func() bool {
		return call(t, g, "GET", doc, user, "").StatusCode == http.StatusForbidden
	})
	t.Logf("the change took effect after %v", took)
	res := wantError(t, call(t, g, "GET", doc, user, ""), http.StatusForbidden, "PERMISSION_DENIED")
	if !strings.Contains(res.Error+string(res.Details), "document:read") {
		t.Errorf("403 = %s, want it to name document:read", res.raw)
	}
	// The line is written just after the new policy takes over, so it may trail the 403.
	eventually(t, time.Second, "the reload is logged", func() bool {
		n, _ := logCount(t, g, "policy reloaded")
		return n > 0
	})
	if n, _ := logCount(t, g, "policy reloaded"); n != 1 {
		t.Errorf("%d \"policy reloaded\" lines, want 1", n)
	}

	broken := e2ePolicy(t)
	broken.Roles["editor"] = policy.Role{Inherits: []string{"reader"}, Permissions: []string{"document:write"}}
	writePolicy(t, file, broken)
	eventually(t, time.Second, "the broken file is refused", func() bool {
		n, _ := logCount(t, g, "policy reload refused")
		return n > 0
	})
	time.Sleep(250 * time.Millisecond) // five more checks of an unchanged file: no more lines
	n, rec := logCount(t, g, "policy reload refused")
	if n != 1 {
		t.Errorf("%d \"policy reload refused\" lines, want exactly 1:\n%s", n, clipText(g.Stderr.String()))
	} else if rec["level"] != "ERROR" || !strings.Contains(fmt.Sprint(rec["err"]), "reader") {
		t.Errorf("refusal line = %v, want level ERROR and an err naming the unknown role", rec)
	}
	wantError(t, call(t, g, "GET", doc, user, ""), http.StatusForbidden, "PERMISSION_DENIED")
	wantStatus(t, call(t, g, "GET", doc, editor, ""), http.StatusOK) // editor inherits user, not "reader"
	wantStatus(t, call(t, g, "POST", "/api/v2/chat/stream", user, `{"message":"hi"}`), http.StatusOK)

	// A good file again: the watcher takes it.
	writePolicy(t, file, e2ePolicy(t))
	eventually(t, time.Second, "a user's GET is allowed again", func() bool {
		return call(t, g, "GET", doc, user, "").StatusCode == http.StatusOK
	})
}

// TestPolicyReloadOnSIGHUP: with a watch interval of an hour, the file is reloaded on SIGHUP; a
// broken file is refused then too, and the good file after it is taken.
func TestPolicyReloadOnSIGHUP(t *testing.T) {
	file := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, file, e2ePolicy(t))
	backend := okBackend(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "DOCS_URL": backend.URL,
		"POLICY_FILE": file, "POLICY_WATCH_INTERVAL": "1h"})
	w := watchTokens(t, g)
	user := w.token(t, "u-user", []string{"user"}, nil)
	const doc = "/api/v2/documents/x"

	// run relays SIGHUP while it runs; this test's own subscription makes sure a signal that
	// arrives around the gateway's start or stop can never take the default action (exit).
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)
	hup := func() {
		t.Helper()
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}

	wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)
	writePolicy(t, file, withoutDocumentRead(e2ePolicy(t)))
	time.Sleep(200 * time.Millisecond)
	if res := call(t, g, "GET", doc, user, ""); res.StatusCode != http.StatusOK {
		t.Fatalf("the file was reloaded without SIGHUP (status %d) with POLICY_WATCH_INTERVAL=1h", res.StatusCode)
	}

	writeAtomic(t, file, []byte(`{"roles": {"user": {"permissions": ["document:read"]}}, "routes": [`))
	hup()
	eventually(t, time.Second, "SIGHUP makes the gateway refuse the broken file", func() bool {
		n, _ := logCount(t, g, "policy reload refused")
		return n == 1
	})
	wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)

	writePolicy(t, file, withoutDocumentRead(e2ePolicy(t)))
	hup()
	eventually(t, time.Second, "SIGHUP reloads the restored file", func() bool {
		return call(t, g, "GET", doc, user, "").StatusCode == http.StatusForbidden
	})
	// The policy is in force a moment before its reload is logged.
	eventually(t, time.Second, "the reload is logged", func() bool {
		n, _ := logCount(t, g, "policy reloaded")
		return n > 0
	})
	if n, _ := logCount(t, g, "policy reloaded"); n != 1 {
		t.Errorf("%d \"policy reloaded\" lines, want 1", n)
	}
	if n, _ := logCount(t, g, "policy reload refused"); n != 1 {
		t.Errorf("%d \"policy reload refused\" lines, want 1", n)
	}
}

// TestPolicyBadFileAtStart: run refuses to start on a bad POLICY_FILE, with one line naming the
// variable and the problem, and never listens.
func TestPolicyBadFileAtStart(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "policy.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ name, file, want string }{
		{"binding for a route the gateway does not have", "testdata/policy/bad/route-not-in-gateway.json", "GET /api/v2/users/{user_id}/history"},
		{"unknown role", "testdata/policy/e2e-bad-unknown-role.json", "reader"},
		{"bad permission", "testdata/policy/e2e-bad-permission.json", "document.read"},
		{"missing file", "testdata/policy/e2e-no-such-file.json", "e2e-no-such-file.json"},
		// Neither is read: /dev/zero would fill memory, a FIFO nobody writes to would block.
		{"a device", "/dev/zero", "not a regular file"},
		{"a FIFO", fifo, "not a regular file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			vars := map[string]string{
				"LISTEN_ADDR": "127.0.0.1:0",
				"LOG_FORMAT":  "json",
				"ALGO_URL":    "http://127.0.0.1:1",
				"JWT_SECRET":  testSecret,
				"POLICY_FILE": tt.file,
			}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			stderr := newLogBuffer()
			err := run(ctx, []string{"voicegate"}, func(k string) string { return vars[k] }, io.Discard, stderr)
			if err == nil {
				t.Fatal("run returned nil with a bad POLICY_FILE")
			}
			msg := err.Error()
			if !strings.Contains(msg, "POLICY_FILE") || !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("error = %q, want one line naming POLICY_FILE and %q", msg, tt.want)
			}
			if ctx.Err() != nil {
				t.Errorf("run returned only when its context ended")
			}
			if log := stderr.String(); strings.Contains(log, `"listening"`) {
				t.Errorf("the gateway listened:\n%s", log)
			}
		})
	}
}
