package main

// The operator's kit (issue 15), end to end through run: tokens of real identity providers,
// voicegate token, voicegate demo-algo, -version and the build and readiness metrics.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// ---- identity providers ----------------------------------------------------------------------

// providerToken is one token of testdata/auth/providers.json, made by PyJWT
// (testdata/auth/mktokens.py) in the shape of a real provider's access token.
type providerToken struct {
	Token    string `json:"token"`
	Issuer   string `json:"issuer"`
	Audience string `json:"audience"`
}

func providerTokens(t *testing.T) map[string]providerToken {
	t.Helper()
	raw, err := os.ReadFile("testdata/auth/providers.json")
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]providerToken
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAuthProviderTokens: tokens shaped like Keycloak's, Auth0's and Azure AD's, verified against
// the fixture JWKS, authorize what their roles and permissions allow with the claim settings the
// README gives for each provider, and the back ends receive the identity those claims hold.
func TestAuthProviderTokens(t *testing.T) {
	jwks, err := os.ReadFile("testdata/auth/jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	keys := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(jwks)
	}))
	defer keys.Close()
	tokens := providerTokens(t)
	backend := okBackend(t)
	algo := doneAlgo(t)

	type check struct {
		method, path string
		header       map[string]string
		status       int
	}
	tests := []struct {
		provider string
		env      map[string]string // the README's settings for the provider
		checks   []check
		identity map[string]string // identity headers the admin or documents back end receives
	}{
		{
			provider: "keycloak",
			env: map[string]string{
				"JWT_ROLES_CLAIM":    "realm_access.roles,resource_access.voicegate.web.roles",
				"JWT_TENANT_CLAIM":   "tenant",
				"JWT_USERNAME_CLAIM": "preferred_username",
			},
			checks: []check{
				{"GET", "/api/v2/voice/sessions", nil, 200}, // voice:admin, from the client role admin
				{"GET", "/api/v2/admin/users", nil, 200},
				{"GET", "/api/v2/admin/users", map[string]string{"X-Tenant-ID": "globex"}, 403},
			},
			identity: map[string]string{"X-User-Id": "f3b2c1d0-1111-4a2b-8c3d-5e6f7a8b9c0d", "X-Username": "alice",
				"X-Tenant-Id": "acme", "X-User-Roles": "default-roles-voice,offline_access,uma_authorization,user,admin"},
		},
		{
			provider: "keycloak",
			env:      map[string]string{}, // without the claim settings: no roles at all
			checks: []check{
				{"GET", "/api/v2/voice/sessions", nil, 403},
				{"GET", "/api/v2/documents/d-1", nil, 403},
			},
		},
		{
			provider: "auth0",
			env: map[string]string{
				"JWT_ROLES_CLAIM":  "https://voicegate.example/roles",
				"JWT_TENANT_CLAIM": "org_id",
			},
			checks: []check{
				{"PUT", "/api/v2/documents/d-1", nil, 200},    // document:write, from the role editor
				{"DELETE", "/api/v2/documents/d-1", nil, 200}, // document:delete, from the permissions claim
				{"GET", "/api/v2/admin/users", nil, 403},
				{"POST", "/api/v2/chat/stream", nil, 200},
			},
			identity: map[string]string{"X-User-Id": "auth0|64f0c2a1b2c3d4e5f6a7b8c9", "X-Tenant-Id": "org_9ZyX8wV7uT6sR5qP",
				"X-User-Roles": "editor"},
		},
		{
			provider: "azure",
			env: map[string]string{
				"JWT_USER_CLAIM":     "oid",
				"JWT_TENANT_CLAIM":   "tid",
				"JWT_USERNAME_CLAIM": "preferred_username",
				"JWT_SCOPES_CLAIM":   "scp",
			},
			checks: []check{
				{"GET", "/api/v2/documents/d-1", nil, 200},
				{"PUT", "/api/v2/documents/d-1", nil, 403},
				{"POST", "/api/v2/chat/stream", nil, 200},
			},
			identity: map[string]string{"X-User-Id": "00000000-0000-0000-66f3-3332eca7ea81", "X-Username": "carol@contoso.example",
				"X-Tenant-Id": "72f988bf-86f1-41af-91ab-2d7cd011db47", "X-User-Roles": "user"},
		},
	}
	for _, tt := range tests {
		name := tt.provider
		if len(tt.env) == 0 {
			name += " without claim settings"
		}
		t.Run(name, func(t *testing.T) {
			tok, ok := tokens[tt.provider]
			if !ok {
				t.Fatalf("no %s token in providers.json", tt.provider)
			}
			env := with(map[string]string{
				"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL,
				"JWT_JWKS_URL": keys.URL, "JWT_ISSUER": tok.Issuer, "JWT_AUDIENCE": tok.Audience,
				// The fixtures are made to outlive the test suite, far beyond any real token.
				"JWT_MAX_LIFETIME": "876000h",
			}, tt.env)
			g := startRun(t, nil, env)
			for _, c := range tt.checks {
				body := ""
				if c.method != "GET" && c.method != "DELETE" {
					body = `{"message":"hi"}`
				}
				res := callWith(t, g, c.method, c.path, tok.Token, body, c.header)
				if res.StatusCode != c.status {
					t.Errorf("%s %s %v = %d %s, want %d", c.method, c.path, c.header, res.StatusCode, errorCode(res), c.status)
				}
			}
			if tt.identity == nil {
				return
			}
			reqs := backend.requests()
			if len(reqs) == 0 {
				t.Fatal("the back end received nothing")
			}
			got := reqs[len(reqs)-1].Header
			for h, v := range tt.identity {
				if got.Get(h) != v {
					t.Errorf("back end got %s = %q, want %q", h, got.Get(h), v)
				}
			}
		})
	}
}

// ---- voicegate token -----------------------------------------------------------------------

// runCommand runs run with args and env as its whole environment, and returns its output.
func runCommand(t *testing.T, env map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = run(t.Context(), append([]string{"voicegate"}, args...), func(k string) string { return env[k] }, &out, &errOut)
	return out.String(), errOut.String(), err
}

// tokenPayload decodes a token's claims without verifying it.
func tokenPayload(t *testing.T, tok string) map[string]any {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q is not a compact JWS", tok)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestTokenSubcommand: voicegate token refuses without JWT_SECRET, always warns on stderr that
// it is for development only, and prints a token that a gateway with the same settings accepts
// for the given subject, roles and tenant — with its claims where JWT_*_CLAIM look.
func TestTokenSubcommand(t *testing.T) {
	t.Run("refuses without a secret", func(t *testing.T) {
		stdout, stderr, err := runCommand(t, nil, "token", "-sub", "alice")
		if err == nil || !strings.Contains(err.Error(), "JWT_SECRET") || strings.ContainsAny(err.Error(), "\n") {
			t.Errorf("error = %v, want one line naming JWT_SECRET", err)
		}
		if stdout != "" {
			t.Errorf("stdout = %q, want no token", stdout)
		}
		if !strings.Contains(stderr, "development and tests only") {
			t.Errorf("stderr = %q, want the warning", stderr)
		}
	})
	t.Run("refuses a lifetime beyond JWT_MAX_LIFETIME", func(t *testing.T) {
		_, _, err := runCommand(t, map[string]string{"JWT_SECRET": testSecret, "JWT_MAX_LIFETIME": "1h"}, "token", "-lifetime", "2h")
		if err == nil || !strings.Contains(err.Error(), "JWT_MAX_LIFETIME") {
			t.Errorf("error = %v, want one naming JWT_MAX_LIFETIME", err)
		}
	})

	backend := okBackend(t)
	for _, tt := range []struct {
		name   string
		env    map[string]string
		claims func(map[string]any) bool
	}{
		{"default claims", map[string]string{"JWT_ISSUER": "https://id.example", "JWT_AUDIENCE": "voicegate"},
			func(c map[string]any) bool {
				return c["sub"] == "alice" && c["tenant_id"] == "t-9" && c["iss"] == "https://id.example" &&
					slices.Equal(strList(c["roles"]), []string{"admin", "editor"})
			}},
		{"Keycloak and Auth0 style paths", map[string]string{"JWT_ROLES_CLAIM": "realm_access.roles",
			"JWT_TENANT_CLAIM": "https://example.com/tenant", "JWT_USER_CLAIM": "oid"},
			func(c map[string]any) bool {
				return c["oid"] == "alice" && c["https://example.com/tenant"] == "t-9" &&
					slices.Equal(strList(dig(c, "realm_access", "roles")), []string{"admin", "editor"})
			}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := with(map[string]string{"JWT_SECRET": testSecret}, tt.env)
			stdout, stderr, err := runCommand(t, env, "token", "-sub", "alice", "-roles", "admin,editor",
				"-tenant", "t-9", "-username", "Alice", "-lifetime", "10m")
			if err != nil {
				t.Fatalf("voicegate token: %v\n%s", err, stderr)
			}
			if !strings.Contains(stderr, "not for production identity") {
				t.Errorf("stderr = %q, want a warning that it is not for production", stderr)
			}
			tok := strings.TrimSpace(stdout)
			c := tokenPayload(t, tok)
			if !tt.claims(c) {
				t.Errorf("claims = %v", c)
			}
			if exp, iat := c["exp"].(float64), c["iat"].(float64); exp-iat != 600 {
				t.Errorf("exp - iat = %v, want the 10m lifetime", exp-iat)
			}
			g := startRun(t, nil, with(env, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL}))
			wantStatus(t, call(t, g, "GET", "/api/v2/voice/sessions", tok, ""), http.StatusOK)
			wantStatus(t, call(t, g, "GET", "/api/v2/admin/users", tok, ""), http.StatusOK)
			reqs := backend.requests()
			h := reqs[len(reqs)-1].Header
			if h.Get("X-User-Id") != "alice" || h.Get("X-Tenant-Id") != "t-9" || h.Get("X-User-Roles") != "admin,editor" || h.Get("X-Username") != "Alice" {
				t.Errorf("back end got identity %v", h)
			}
		})
	}
}

// TestDemoBannerTokens: the -demo banner tells how to mint more tokens with voicegate token;
// started with the user's own JWT_SECRET it says so, and tokens minted for that secret work
// against it.
func TestDemoBannerTokens(t *testing.T) {
	waitBanner := func(g *testGateway) string {
		eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(g.Stdout.String(), "Ctrl-C") })
		return g.Stdout.String()
	}
	made := startRun(t, []string{"-demo"}, map[string]string{"JWT_SECRET": ""})
	banner := waitBanner(made)
	for _, want := range []string{"voicegate token", "JWT_SECRET", "made up for this run"} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner without JWT_SECRET does not mention %q:\n%s", want, banner)
		}
	}

	own := startRun(t, []string{"-demo"}, nil) // startRun sets JWT_SECRET=testSecret
	banner = waitBanner(own)
	if !strings.Contains(banner, "your JWT_SECRET") || !strings.Contains(banner, "voicegate token -sub") {
		t.Errorf("banner with JWT_SECRET does not say it is used, with a token command:\n%s", banner)
	}
	stdout, _, err := runCommand(t, map[string]string{"JWT_SECRET": testSecret}, "token", "-sub", "bob", "-roles", "admin")
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, call(t, own, "GET", "/api/v2/voice/sessions", strings.TrimSpace(stdout), ""), http.StatusOK)
}

// ---- voicegate demo-algo -------------------------------------------------------------------

// TestDemoAlgoSubcommand: voicegate demo-algo serves the demo's algorithm service alone on its
// LISTEN_ADDR; a gateway pointed at it streams a chat answer and runs a voice session; it ends
// cleanly with its context.
func TestDemoAlgoSubcommand(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newLogBuffer()
	done := make(chan error, 1)
	env := map[string]string{"LISTEN_ADDR": "127.0.0.1:0", "LOG_FORMAT": "json"}
	go func() {
		done <- run(ctx, []string{"voicegate", "demo-algo"}, func(k string) string { return env[k] }, &bytes.Buffer{}, logs)
	}()
	var addr string
	select {
	case addr = <-logs.addr:
	case err := <-done:
		t.Fatalf("demo-algo returned before listening: %v\n%s", err, logs)
	case <-time.After(5 * time.Second):
		t.Fatalf("demo-algo did not listen within 5s:\n%s", logs)
	}
	if err := healthCheck(t.Context(), addr); err != nil {
		t.Errorf("-healthcheck against demo-algo: %v", err)
	}

	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + addr})
	evs := readEvents(t, wantStream(t, postChat(t, g, `{"message":"hello there"}`, nil)))
	if n := len(evs); n < 4 || evs[n-2].Event != "generation_done" || evs[n-1].Event != "stream_end" {
		t.Errorf("chat through demo-algo: events %v", eventNames(evs))
	}
	v := dialVoice(t, g, nil)
	vctx, vcancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer vcancel()
	if err := v.conn.Write(vctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	for {
		typ, msg, err := v.conn.Read(vctx)
		if err != nil {
			t.Fatalf("voice through demo-algo: %v", err)
		}
		if typ == websocket.MessageText && strings.Contains(string(msg), `"tts_complete"`) {
			break
		}
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	waitNoVoice(t, g)
	g.stop()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("demo-algo returned %v, want nil", err)
		}
	case <-time.After(6 * time.Second):
		t.Fatal("demo-algo did not return after its context ended")
	}
}

// ---- version, build info, readiness --------------------------------------------------------

// TestVersion: -version prints the version and the Go version, even with settings that would
// stop the gateway; voicegate_build_info carries the same, and voicegate_ready follows /readyz,
// dropping to 0 while the gateway drains.
func TestVersion(t *testing.T) {
	stdout, _, err := runCommand(t, map[string]string{"LOG_LEVEL": "loud"}, "-version")
	if err != nil {
		t.Fatalf("-version: %v", err)
	}
	want := "voicegate " + buildVersion() + " (" + runtime.Version() + ", "
	if !strings.HasPrefix(stdout, want) || strings.Count(stdout, "\n") != 1 {
		t.Errorf("-version printed %q, want one line starting %q", stdout, want)
	}
	if !regexp.MustCompile(`^(v\d+\.\d+\.\d+\S*|devel(-[0-9a-f]+(-dirty)?)?)$`).MatchString(buildVersion()) {
		t.Errorf("buildVersion() = %q, want a module version or devel", buildVersion())
	}

	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + deadAddr(t), "SHUTDOWN_GRACE": "2s", "DRAIN_DELAY": "1s"})
	fams := scrape(t, g.URL+"/metrics")
	if v, ok := sample(fams, "voicegate_build_info", map[string]string{"version": buildVersion(), "go_version": runtime.Version()}); !ok || v != 1 {
		t.Errorf("voicegate_build_info{version=%q,go_version=%q} = %v (present %v), want 1", buildVersion(), runtime.Version(), v, ok)
	}
	checkFamily(t, fams, "voicegate_build_info", []string{"go_version", "version"})
	if v, ok := sample(fams, "voicegate_ready", nil); !ok || v != 1 {
		t.Errorf("voicegate_ready = %v (present %v) on a ready gateway, want 1", v, ok)
	}
	g.cancel()
	eventually(t, 900*time.Millisecond, "voicegate_ready 0 while draining", func() bool {
		v, ok := sample(scrape(t, g.URL+"/metrics"), "voicegate_ready", nil)
		return ok && v == 0
	})
}
