package policy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/policy"
)

// syncBuffer collects log output written from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// lines decodes the JSON log lines written so far.
func (b *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func (b *syncBuffer) count(t *testing.T, level string) int {
	n := 0
	for _, l := range b.lines(t) {
		if l["level"] == level {
			n++
		}
	}
	return n
}

// writeAtomically replaces path's content the way an operator's tooling (or a ConfigMap) does,
// so a watcher never reads half a file.
func writeAtomically(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// policyVersions are file contents for the store tests: the default, the default where users may
// also read the admin service, and a bad file (a route bound twice). Their sizes differ, so a
// change is visible to a watcher even on a file system with coarse modification times.
func policyVersions(t *testing.T) (v1, v2, bad []byte) {
	v1 = readFixture(t, "good/default.json")
	v2 = bytes.Replace(v1, []byte(`"document:read"]}`), []byte(`"document:read", "admin:read"]}`), 1)
	if bytes.Equal(v1, v2) {
		t.Fatal("could not derive v2 from good/default.json")
	}
	bad = readFixture(t, "bad/route-twice.json")
	return v1, v2, bad
}

// userMayReadAdmin asks p whether a plain user may GET the admin service.
func userMayReadAdmin(p *policy.Policy) bool {
	r := httptest.NewRequest("GET", "/api/v2/admin/x", nil)
	r.Pattern = "/api/v2/admin/"
	return p.Decide(r, alice, true) == nil
}

func TestNewStore(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(good, readFixture(t, "good/decide.json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, readFixture(t, "bad/perm-upper.json"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		o      policy.StoreOptions
		errMsg string // "" means success
	}{
		{"built-in default", policy.StoreOptions{Routes: gatewayBindings, ExtraPerms: handlerPerms}, ""},
		{"built-in default, more routes", policy.StoreOptions{Routes: decideBindings, ExtraPerms: handlerPerms}, ""},
		{"built-in default, a route bound to a bad permission", policy.StoreOptions{
			Routes: append(slices.Clip(gatewayBindings), policy.Binding{Route: "GET /x", Permission: "X:read"})},
			`route "GET /x": permission "X:read" is not resource:action`},
		{"file", policy.StoreOptions{Path: good, Routes: decideBindings, ExtraPerms: handlerPerms}, ""},
		{"file for other routes", policy.StoreOptions{Path: good, Routes: gatewayBindings}, "not a route of the gateway"},
		{"bad file", policy.StoreOptions{Path: bad, Routes: gatewayBindings}, `permission "Document:read" is not resource:action`},
		{"missing file", policy.StoreOptions{Path: filepath.Join(dir, "nope.json"), Routes: gatewayBindings}, "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := policy.NewStore(tc.o)
			if tc.errMsg != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errMsg) {
					t.Fatalf("error %v, want one containing %q", err, tc.errMsg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.Policy() == nil || s.Policy().Rules == nil {
				t.Fatal("no policy in force")
			}
		})
	}
}

func TestStoreWithoutFile(t *testing.T) {
	s, err := policy.NewStore(policy.StoreOptions{Routes: gatewayBindings})
	if err != nil {
		t.Fatal(err)
	}
	p := s.Policy()
	if err := s.Reload(); err != nil || s.Policy() != p {
		t.Fatalf("Reload without a file: %v, policy replaced: %v", err, s.Policy() != p)
	}
	done := make(chan struct{})
	go func() {
		s.Watch(context.Background(), time.Millisecond) // nothing to watch: returns at once
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("Watch without a file did not return")
	}
}

func TestStoreReload(t *testing.T) {
	v1, v2, bad := policyVersions(t)
	path := filepath.Join(t.TempDir(), "policy.json")
	writeAtomically(t, path, v1)
	log := &syncBuffer{}
	s, err := policy.NewStore(policy.StoreOptions{Path: path, Routes: gatewayBindings, ExtraPerms: handlerPerms,
		Log: slog.New(slog.NewJSONHandler(log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	p1 := s.Policy()
	if userMayReadAdmin(p1) {
		t.Fatal("v1 lets users read the admin service")
	}

	t.Run("unchanged file", func(t *testing.T) {
		if err := s.Reload(); err != nil {
			t.Fatal(err)
		}
		if s.Policy() != p1 {
			t.Fatal("an unchanged file replaced the policy")
		}
		if n := len(log.lines(t)); n != 0 {
			t.Fatalf("%d log lines for an unchanged file", n)
		}
	})

	t.Run("bad file refused", func(t *testing.T) {
		writeAtomically(t, path, bad)
		err := s.Reload()
		if err == nil || !strings.Contains(err.Error(), "bound twice") {
			t.Fatalf("Reload of a bad file: %v", err)
		}
		if s.Policy() != p1 {
			t.Fatal("a bad file replaced the policy")
		}
		lines := log.lines(t)
		if len(lines) != 1 || lines[0]["level"] != "ERROR" {
			t.Fatalf("log %v, want one ERROR line", lines)
		}
		if e, _ := lines[0]["err"].(string); !strings.Contains(e, "bound twice") {
			t.Fatalf("log line %v does not say why", lines[0])
		}
	})

	t.Run("missing file refused", func(t *testing.T) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := s.Reload(); err == nil {
			t.Fatal("Reload of a missing file succeeded")
		}
		if s.Policy() != p1 {
			t.Fatal("a missing file replaced the policy")
		}
		if n := log.count(t, "ERROR"); n != 2 {
			t.Fatalf("%d ERROR lines, want 2", n)
		}
	})

	t.Run("good change in force", func(t *testing.T) {
		writeAtomically(t, path, v2)
		if err := s.Reload(); err != nil {
			t.Fatal(err)
		}
		p2 := s.Policy()
		if p2 == p1 {
			t.Fatal("the policy was not replaced")
		}
		if !userMayReadAdmin(p2) {
			t.Fatal("the new policy is not the one in force")
		}
		if userMayReadAdmin(p1) {
			t.Fatal("the old policy changed under its readers")
		}
		if n := log.count(t, "INFO"); n != 1 {
			t.Fatalf("%d INFO lines, want 1 (policy reloaded)", n)
		}
	})
}

// TestStoreWatch: a watched file that changes is reloaded, a bad one is refused once and leaves
// the policy in force, and Watch ends with its context. Time is synctest's: the polls and the
// waits below are on its clock, so a busy machine cannot make them late.
func TestStoreWatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		v1, v2, bad := policyVersions(t)
		path := filepath.Join(t.TempDir(), "policy.json")
		writeAtomically(t, path, v1)
		log := &syncBuffer{}
		s, err := policy.NewStore(policy.StoreOptions{Path: path, Routes: gatewayBindings, ExtraPerms: handlerPerms,
			Log: slog.New(slog.NewJSONHandler(log, nil))})
		if err != nil {
			t.Fatal(err)
		}
		p1 := s.Policy()

		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan struct{})
		go func() {
			s.Watch(ctx, 20*time.Millisecond)
			close(done)
		}()

		waitFor := func(what string, cond func() bool) {
			t.Helper()
			deadline := time.Now().Add(time.Second)
			for !cond() {
				if time.Now().After(deadline) {
					t.Fatalf("not within a second: %s", what)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}

		writeAtomically(t, path, v2)
		waitFor("the changed file is in force", func() bool { return s.Policy() != p1 })
		p2 := s.Policy()
		if !userMayReadAdmin(p2) {
			t.Fatal("the watched change is not the policy in force")
		}

		writeAtomically(t, path, bad)
		waitFor("the bad file is refused in the log", func() bool { return log.count(t, "ERROR") > 0 })
		time.Sleep(100 * time.Millisecond) // several more polls of the same bad file
		if s.Policy() != p2 {
			t.Fatal("a bad file replaced the policy")
		}
		if n := log.count(t, "ERROR"); n != 1 {
			t.Fatalf("%d ERROR lines for one bad write, want 1", n)
		}

		cancel()
		select {
		case <-done:
		case <-time.After(time.Second):
			t.Fatal("Watch did not stop when its context ended")
		}
	})
}

// newestRoutes are the routes the release before last did not have; previous-release.json
// binds all the others, as written for that release.
var newestRoutes = []string{
	"GET /api/v2/chat/stream/{request_id}",
	"GET /api/v2/voice/sessions/{session_id}",
	"DELETE /api/v2/voice/sessions/{session_id}",
	"POST /api/v2/voice/broadcast",
	"POST /api/v2/chat",
	"POST /v1/chat/completions",
	"GET /v1/models",
	"GET /v1/realtime",
}

// TestStoreFileFromAnEarlierRelease: a policy file that does not bind routes added since it was
// written still loads; those routes take the built-in binding, and one warning names them, at
// start and at each reload that puts a new version in force. A binding for a route the gateway
// does not have is still refused.
func TestStoreFileFromAnEarlierRelease(t *testing.T) {
	old := readFixture(t, "previous-release.json")
	f, err := policy.Parse(old)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(f.Routes), len(gatewayRoutes)-len(newestRoutes); got != want {
		t.Fatalf("previous-release.json binds %d routes, want all %d but the newest four", got, want)
	}
	path := filepath.Join(t.TempDir(), "policy.json")
	writeAtomically(t, path, old)
	log := &syncBuffer{}
	s, err := policy.NewStore(policy.StoreOptions{Path: path, Routes: gatewayBindings, ExtraPerms: handlerPerms,
		Log: slog.New(slog.NewJSONHandler(log, nil))})
	if err != nil {
		t.Fatalf("a file written for the previous release was refused: %v", err)
	}
	// The routes it leaves out, in the route table's order.
	var want []string
	for _, r := range gatewayRoutes {
		if slices.Contains(newestRoutes, r) {
			want = append(want, r)
		}
	}
	if got := s.Policy().Unbound(); !slices.Equal(got, want) {
		t.Errorf("Unbound() = %q, want %q", got, want)
	}
	warned := func() []map[string]any {
		var ws []map[string]any
		for _, l := range log.lines(t) {
			if l["level"] == "WARN" {
				ws = append(ws, l)
			}
		}
		return ws
	}
	ws := warned()
	if len(ws) != 1 {
		t.Fatalf("%d warnings at start, want 1: %v", len(ws), log.lines(t))
	}
	if got, _ := ws[0]["routes"].(string); got != strings.Join(want, ", ") || ws[0]["file"] != path {
		t.Errorf("the warning names %q in %v, want %q in %s", got, ws[0]["file"], strings.Join(want, ", "), path)
	}

	// Each route is bound as the built-in policy binds it, the others as the file says.
	builtIn := map[string]policy.Binding{}
	for _, b := range gatewayBindings {
		builtIn[b.Route] = b
	}
	written := map[string]policy.Binding{}
	for _, b := range f.Routes {
		written[b.Route] = b
	}
	got := s.Policy().Bindings()
	if len(got) != len(gatewayRoutes) {
		t.Fatalf("%d bindings in force, want one for each of the %d routes", len(got), len(gatewayRoutes))
	}
	for i, b := range got {
		if b.Route != gatewayRoutes[i] {
			t.Errorf("binding %d is for %q, want %q (the route table's order)", i, b.Route, gatewayRoutes[i])
		}
		w, ok := written[b.Route]
		if !ok {
			w = builtIn[b.Route]
		}
		if !sameBinding(b, w) {
			t.Errorf("%s is bound %+v, want %+v", b.Route, b, w)
		}
	}
	// And decided so: closing another's voice session needs voice:admin, which a support
	// role of this file does not have and an admin does.
	closeSession := httptest.NewRequest("DELETE", "/api/v2/voice/sessions/s1", nil)
	closeSession.Pattern = "DELETE /api/v2/voice/sessions/{session_id}"
	sue := &policy.Subject{UserID: "sue", TenantID: "acme", Roles: []string{"support"}}
	boss := &policy.Subject{UserID: "bo", TenantID: "acme", Roles: []string{"admin"}}
	if e := s.Policy().Decide(closeSession, sue, true); e == nil || e.Status != 403 {
		t.Errorf("support closing a session: %v, want 403", e)
	}
	if e := s.Policy().Decide(closeSession, boss, true); e != nil {
		t.Errorf("admin closing a session: %v, want allowed", e)
	}

	t.Run("warned again when a new version is put in force", func(t *testing.T) {
		writeAtomically(t, path, bytes.Replace(old, []byte(`"daily_requests_per_user": 20000`), []byte(`"daily_requests_per_user": 30000`), 1))
		if err := s.Reload(); err != nil {
			t.Fatal(err)
		}
		if n := len(warned()); n != 2 {
			t.Errorf("%d warnings after a reload, want 2", n)
		}
		if err := s.Reload(); err != nil { // unchanged: nothing to say
			t.Fatal(err)
		}
		if n := len(warned()); n != 2 {
			t.Errorf("%d warnings after reloading an unchanged file, want still 2", n)
		}
	})

	t.Run("a file that binds every route says nothing", func(t *testing.T) {
		full := filepath.Join(t.TempDir(), "full.json")
		writeAtomically(t, full, readFixture(t, "good/readme.json"))
		quiet := &syncBuffer{}
		s, err := policy.NewStore(policy.StoreOptions{Path: full, Routes: gatewayBindings, ExtraPerms: handlerPerms,
			Log: slog.New(slog.NewJSONHandler(quiet, nil))})
		if err != nil {
			t.Fatal(err)
		}
		if u := s.Policy().Unbound(); len(u) != 0 {
			t.Errorf("Unbound() = %q, want none", u)
		}
		if n := len(quiet.lines(t)); n != 0 {
			t.Errorf("%d log lines, want none", n)
		}
	})

	t.Run("a binding for a route the gateway does not have is refused", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "bad.json")
		writeAtomically(t, bad, bytes.Replace(old, []byte(`"route": "POST /api/v2/chat/cancel"`), []byte(`"route": "POST /api/v2/chat/cancle"`), 1))
		_, err := policy.NewStore(policy.StoreOptions{Path: bad, Routes: gatewayBindings, ExtraPerms: handlerPerms})
		if err == nil || !strings.Contains(err.Error(), `binding for "POST /api/v2/chat/cancle", which is not a route of the gateway`) {
			t.Errorf("error %v, want the binding for a route that does not exist refused", err)
		}
	})

	t.Run("a lease the file does not cap is left out", func(t *testing.T) {
		// A file from before concurrency caps existed, and the routes that hold a lease in the
		// built-in policy: they take their binding without the lease, which would cap nothing.
		noCaps := bytes.Replace(old, []byte(`,
    "concurrency": {"chat": {"per_user": 4, "per_tenant": 200}, "voice": {"per_user": 2, "per_tenant": 100}}`), nil, 1)
		var nf policy.File
		if err := json.Unmarshal(noCaps, &nf); err != nil || nf.Limits.Concurrency != nil {
			t.Fatalf("could not drop the caps: %v", err)
		}
		nf.Routes = slices.DeleteFunc(nf.Routes, func(b policy.Binding) bool { return b.Lease != "" })
		data, _ := json.Marshal(nf)
		p := filepath.Join(t.TempDir(), "nocaps.json")
		writeAtomically(t, p, data)
		s, err := policy.NewStore(policy.StoreOptions{Path: p, Routes: gatewayBindings, ExtraPerms: handlerPerms})
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range s.Policy().Bindings() {
			if b.Route == "POST /api/v2/chat/stream" && (b.Lease != "" || b.Permission != "chat:write" || b.Class != "chat") {
				t.Errorf("the chat stream is bound %+v, want chat:write, class chat and no lease", b)
			}
		}
	})
}

// sameBinding compares two bindings, a nil and an empty Methods alike.
func sameBinding(a, b policy.Binding) bool {
	return a.Route == b.Route && a.Permission == b.Permission && maps.Equal(a.Methods, b.Methods) &&
		a.OwnerOverride == b.OwnerOverride && a.Class == b.Class && a.Lease == b.Lease
}
