package main

// The rough edges of issue 15, one test each (numbered as in the issue), through run.

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// 1. Requests refused as invalid do not use up the built-in chat rate (30/min, burst 10).
// The chat handler lives in sse/, where admission (rate charge and lease) is being moved after
// request validation; until then ten bad requests still exhaust the burst.
func TestEdge01InvalidChatNotRateLimited(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "POLICY_FILE": ""}) // the built-in policy
	tok := tokenFor(t, "u-edge1", []string{"user"}, nil)
	for i := range 10 {
		res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":""}`)
		if res.StatusCode != http.StatusBadRequest {
			t.Fatalf("invalid chat request %d = %d %s, want 400", i+1, res.StatusCode, errorCode(res))
		}
	}
	res := call(t, g, "POST", "/api/v2/chat/stream", tok, `{"message":"hi"}`)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("a valid chat request after ten invalid ones = %d %s, want 200: invalid requests used up the rate",
			res.StatusCode, errorCode(res))
	}
}

// detailsOf returns the details of a JSON error as generic JSON.
func detailsOf(t *testing.T, res *http.Response, status int, code string) any {
	t.Helper()
	doc := wantError(t, res, status, code)
	var d any
	if err := json.Unmarshal(doc.Details, &d); err != nil {
		t.Fatalf("details %s: %v", doc.Details, err)
	}
	return d
}

// 2. details has one shape, an array of objects with a reason, for 400 and for 403 alike.
func TestEdge02ErrorDetailsAreArrays(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL})
	for _, tt := range []struct {
		name   string
		res    *http.Response
		status int
		code   string
		key    string // what the one detail is about
	}{
		{"400", call(t, g, "POST", "/api/v2/chat/stream", tokenFor(t, "u-edge2", []string{"user"}, nil), `{"message":"hi","temperature":5}`),
			http.StatusBadRequest, "VALIDATION_ERROR", "field"},
		{"403", call(t, g, "GET", "/api/v2/voice/sessions", tokenFor(t, "u-edge2", []string{"user"}, nil), ""),
			http.StatusForbidden, "PERMISSION_DENIED", "permission"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := detailsOf(t, tt.res, tt.status, tt.code)
			l, ok := d.([]any)
			if !ok || len(l) != 1 {
				t.Fatalf("details = %v, want an array of one object", d)
			}
			obj, _ := l[0].(map[string]any)
			if obj[tt.key] == nil || obj["reason"] == nil {
				t.Errorf("detail = %v, want %q and reason", l[0], tt.key)
			}
		})
	}
}

// 3. A token in the query string, or two tokens, are 401 TOKEN_INVALID like any unusable token.
func TestEdge03MisplacedTokensAre401(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL})
	tok := tokenFor(t, "u-edge3", []string{"admin"}, nil)
	for _, tt := range []struct {
		name    string
		path    string
		headers int // Authorization headers
	}{
		{"in the query", "/api/v2/voice/sessions?access_token=" + tok, 0},
		{"twice", "/api/v2/voice/sessions", 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, g.URL+tt.path, nil)
			req.Header.Set("X-Test-No-Token", "1") // exactly the Authorization headers below
			for range tt.headers {
				req.Header.Add("Authorization", "Bearer "+tok)
			}
			res, err := g.Client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			wantError(t, res, http.StatusUnauthorized, "TOKEN_INVALID")
			if got := res.Header.Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
				t.Errorf("WWW-Authenticate = %q", got)
			}
		})
	}
}

// 4. DRAIN_DELAY above half of SHUTDOWN_GRACE stops the gateway with one line naming it,
// instead of being cut silently.
func TestEdge04DrainDelayOverHalfRefused(t *testing.T) {
	for _, tt := range []struct {
		name string
		env  map[string]string
		want string // "" means valid
	}{
		{"set too long", map[string]string{"SHUTDOWN_GRACE": "25s", "DRAIN_DELAY": "20s"}, "DRAIN_DELAY"},
		{"the default over a short grace", map[string]string{"SHUTDOWN_GRACE": "8s"}, "DRAIN_DELAY (default 5s)"},
		{"exactly half", map[string]string{"SHUTDOWN_GRACE": "10s", "DRAIN_DELAY": "5s"}, ""},
		{"the demo drains nothing", map[string]string{"SHUTDOWN_GRACE": "1s", "-demo": "1"}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := with(map[string]string{"ALGO_URL": "http://127.0.0.1:9"}, tt.env)
			args := []string{"voicegate"}
			if env["-demo"] != "" {
				args = append(args, "-demo")
			}
			cfg, err := parseConfig(args, envFunc(env), io.Discard)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("error %v, want none", err)
				}
				if cfg.DrainDelay > cfg.ShutdownGrace/2 {
					t.Errorf("DrainDelay %v over half of %v", cfg.DrainDelay, cfg.ShutdownGrace)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "SHUTDOWN_GRACE") || strings.Contains(err.Error(), "\n") {
				t.Errorf("error = %v, want one line naming %s and SHUTDOWN_GRACE", err, tt.want)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			if err := run(ctx, args, envFunc(env), io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run = %v, want the same refusal", err)
			}
		})
	}
}

// 5. Ctrl-C stops the demo at once, and every shutdown says what it waits for and that a second
// signal ends it.
func TestEdge05ShutdownSaysWhatItWaitsFor(t *testing.T) {
	demo := startRun(t, []string{"-demo"}, map[string]string{"DRAIN_DELAY": ""})
	eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(demo.Stdout.String(), "Ctrl-C") })
	if !strings.Contains(demo.Stdout.String(), "Ctrl-C again stops at once") {
		t.Errorf("the banner does not say a second Ctrl-C stops at once:\n%s", demo.Stdout)
	}
	start := time.Now()
	demo.cancel()
	select {
	case <-demo.finished:
	case <-time.After(time.Second):
		t.Fatal("the demo did not stop within 1s of Ctrl-C")
	}
	t.Logf("the demo stopped %v after Ctrl-C", time.Since(start))

	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "DRAIN_DELAY": "200ms"})
	g.stop()
	found := false
	for _, rec := range logRecords(t, g) {
		if msg, _ := rec["msg"].(string); strings.HasPrefix(msg, "shutting down") {
			found = true
			if !strings.Contains(msg, "second signal stops at once") || !strings.Contains(msg, "DRAIN_DELAY") || rec["drain_delay"] != "200ms" {
				t.Errorf("shutdown line = %v, want what it waits for (DRAIN_DELAY 200ms) and the second-signal hint", rec)
			}
		}
	}
	if !found {
		t.Errorf("no shutting down line:\n%s", g.Stderr)
	}
}

// 6. A refused preflight and a refused WebSocket origin are logged with the path and the
// origin (and, for the preflight, why).
func TestEdge06RefusedOriginsLogged(t *testing.T) {
	algo := newAlgo(t, algoOptions{Replier: answerStop, Query: func(w http.ResponseWriter, r *http.Request) { ndjson(w, `{"type":"done"}`) }})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example"})
	res := callWith(t, g, "OPTIONS", "/api/v2/chat/stream", "", "", map[string]string{
		"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
	wantError(t, res, http.StatusForbidden, "PERMISSION_DENIED")

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, wres, err := websocket.Dial(ctx, "ws://"+g.Addr+"/api/v2/voice/stream", &websocket.DialOptions{
		HTTPClient:   g.Client,
		HTTPHeader:   http.Header{"Origin": {"https://evil.example"}},
		Subprotocols: []string{"voice-protocol-v2"},
	})
	if err == nil || wres == nil || wres.StatusCode != http.StatusForbidden {
		t.Fatalf("voice from a refused origin: %v, want 403", err)
	}

	var preflight, ws map[string]any
	eventually(t, 2*time.Second, "both refusals logged", func() bool {
		for _, rec := range logRecords(t, g) {
			if rec["msg"] != "request" || rec["status"] != float64(403) {
				continue
			}
			switch rec["method"] {
			case "OPTIONS":
				preflight = rec
			case "GET":
				ws = rec
			}
		}
		return preflight != nil && ws != nil
	})
	if preflight["path"] != "/api/v2/chat/stream" || preflight["origin"] != "https://evil.example" ||
		!strings.Contains(str(preflight["cause"]), "CORS_ORIGINS") {
		t.Errorf("preflight refusal logged as %v, want path, origin and the CORS_ORIGINS cause", preflight)
	}
	if ws["path"] != "/api/v2/voice/stream" || ws["origin"] != "https://evil.example" || ws["route"] != "GET /api/v2/voice/stream" {
		t.Errorf("WebSocket origin refusal logged as %v, want path, route and origin", ws)
	}
}

// readmeSettings returns the variables of README.md's configuration table.
func readmeSettings(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(raw), "\n## Configuration\n")
	if !ok {
		t.Fatal(`README.md has no "## Configuration" section`)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	tick := regexp.MustCompile("`([A-Z][A-Z0-9_]+)`")
	var out []string
	for _, line := range strings.Split(sec, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 {
			continue
		}
		for _, m := range tick.FindAllStringSubmatch(cells[1], -1) {
			out = append(out, m[1])
		}
	}
	slices.Sort(out)
	return out
}

// 7. The README's configuration table lists every setting the gateway reads (METRICS_ENABLED
// among them), and nothing else; METRICS_ENABLED=false turns /metrics off.
func TestEdge07ConfigurationTableComplete(t *testing.T) {
	var code []string
	for _, s := range settings() {
		code = append(code, s.env)
	}
	slices.Sort(code)
	if got := readmeSettings(t); !slices.Equal(got, code) {
		t.Errorf("README configuration table = %v\nsettings in the code     = %v", got, code)
	}
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "METRICS_ENABLED": "false"})
	wantError(t, call(t, g, "GET", "/metrics", "", ""), http.StatusNotFound, "NOT_FOUND")
}

// 8. ADMIN_URL and DOCS_URL receive the caller's identity headers but not the client's
// Authorization or Cookie, unless BACKEND_FORWARD_CREDENTIALS passes them on.
func TestEdge08BackendCredentials(t *testing.T) {
	for _, tt := range []struct {
		setting       string
		authorization bool
		cookie        bool
	}{
		{"", false, false},
		{"none", false, false},
		{"authorization", true, false},
		{"cookie", false, true},
		{"authorization,cookie", true, true},
	} {
		t.Run("BACKEND_FORWARD_CREDENTIALS="+tt.setting, func(t *testing.T) {
			backend := okBackend(t)
			g := startRun(t, nil, map[string]string{"ALGO_URL": "http://127.0.0.1:1", "ADMIN_URL": backend.URL,
				"DOCS_URL": backend.URL, "BACKEND_FORWARD_CREDENTIALS": tt.setting})
			tok := tokenFor(t, "u-edge8", []string{"admin"}, nil)
			for _, path := range []string{"/api/v2/admin/users", "/api/v2/documents/d-1"} {
				wantStatus(t, callWith(t, g, "GET", path, tok, "", map[string]string{"Cookie": "session=abc"}), http.StatusOK)
				reqs := backend.requests()
				h := reqs[len(reqs)-1].Header
				if got := h.Get("Authorization") != ""; got != tt.authorization {
					t.Errorf("%s: Authorization forwarded = %v, want %v", path, got, tt.authorization)
				}
				if got := h.Get("Cookie") != ""; got != tt.cookie {
					t.Errorf("%s: Cookie forwarded = %v, want %v", path, got, tt.cookie)
				}
				if h.Get("X-User-Id") != "u-edge8" {
					t.Errorf("%s: X-User-Id = %q, want the caller", path, h.Get("X-User-Id"))
				}
			}
		})
	}
	_, err := parseConfig([]string{"voicegate"}, envFunc(map[string]string{"ALGO_URL": "http://a", "BACKEND_FORWARD_CREDENTIALS": "everything"}), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "BACKEND_FORWARD_CREDENTIALS") {
		t.Errorf("error = %v, want one naming BACKEND_FORWARD_CREDENTIALS", err)
	}
}

// 9. The image: .dockerignore keeps the repository's history, test data and local binaries out
// of the build context; -healthcheck finds the gateway on the address it really listens on (in
// LISTEN_ADDR_FILE), also when it was started with -listen-addr; the Dockerfile shows a stop
// timeout above SHUTDOWN_GRACE.
func TestEdge09Image(t *testing.T) {
	raw, err := os.ReadFile(".dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	patterns := strings.Fields(string(regexp.MustCompile(`(?m)#.*$`).ReplaceAllString(string(raw), "")))
	for _, want := range []string{".git", "testdata", "**/testdata", "/voicegate", "*.test"} {
		if !slices.Contains(patterns, want) {
			t.Errorf(".dockerignore lacks %s (has %v)", want, patterns)
		}
	}
	dockerfile, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	stop := regexp.MustCompile(`--stop-timeout (\d+)`).FindSubmatch(dockerfile)
	if stop == nil {
		t.Error("the Dockerfile does not show --stop-timeout")
	} else if d, _ := time.ParseDuration(string(stop[1]) + "s"); d <= 25*time.Second {
		t.Errorf("the Dockerfile's --stop-timeout %v is not above SHUTDOWN_GRACE's default 25s", d)
	}
	if !regexp.MustCompile(`(?m)^ENV LISTEN_ADDR_FILE=/run/voicegate/addr$`).Match(dockerfile) {
		t.Error("the Dockerfile does not set LISTEN_ADDR_FILE")
	}

	file := filepath.Join(t.TempDir(), "addr")
	// The container's environment names a wrong address; the gateway was started with a flag.
	wrong := deadAddr(t)
	g := startRun(t, []string{"-listen-addr", "127.0.0.1:0"}, map[string]string{"ALGO_URL": "http://127.0.0.1:1",
		"LISTEN_ADDR": wrong, "LISTEN_ADDR_FILE": file})
	env := map[string]string{"LISTEN_ADDR": wrong, "LISTEN_ADDR_FILE": file}
	if _, _, err := runCommand(t, env, "-healthcheck"); err != nil {
		t.Errorf("-healthcheck with the gateway's LISTEN_ADDR_FILE: %v", err)
	}
	if b, _ := os.ReadFile(file); strings.TrimSpace(string(b)) != g.Addr {
		t.Errorf("LISTEN_ADDR_FILE holds %q, want %s", b, g.Addr)
	}
	if _, _, err := runCommand(t, env, "-healthcheck", "-listen-addr", wrong); err == nil {
		t.Error("-healthcheck -listen-addr <dead address> succeeded: the flag must win over the file")
	}
	g.stop()
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("LISTEN_ADDR_FILE left behind after the gateway stopped: %v", err)
	}
	if _, _, err := runCommand(t, env, "-healthcheck"); err == nil {
		t.Error("-healthcheck succeeded against a stopped gateway")
	}
}

// 10. JSON logs give durations as text, the way they are configured.
func TestEdge10JSONDurations(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "SHUTDOWN_GRACE": "2s"})
	wantStatus(t, call(t, g, "GET", "/healthz", "", ""), http.StatusOK)
	g.stop()
	seen := map[string]bool{}
	for _, rec := range logRecords(t, g) {
		for _, key := range []string{"grace", "duration", "drain_delay"} {
			v, ok := rec[key]
			if !ok {
				continue
			}
			seen[key] = true
			s, isString := v.(string)
			if _, err := time.ParseDuration(s); !isString || err != nil {
				t.Errorf("%q = %#v in %v, want a duration such as 25s", key, v, rec)
			}
		}
	}
	for _, key := range []string{"grace", "duration", "drain_delay"} {
		if !seen[key] {
			t.Errorf("no log line with %q", key)
		}
	}
	for _, rec := range logRecords(t, g) {
		if rec["msg"] == "shutting down" || strings.HasPrefix(str(rec["msg"]), "shutting down") {
			if rec["grace"] != "2s" {
				t.Errorf("grace = %v, want \"2s\"", rec["grace"])
			}
		}
	}
}

// 11. With LISTEN_ADDR=:port the demo's ready-to-paste commands name 127.0.0.1, not [::].
func TestEdge11DemoAddressReachable(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{":8080", "127.0.0.1:8080"}, {"[::]:8080", "127.0.0.1:8080"}, {"0.0.0.0:8080", "127.0.0.1:8080"},
		{"127.0.0.1:8080", "127.0.0.1:8080"}, {"[::1]:8080", "[::1]:8080"}, {"gw.internal:80", "gw.internal:80"},
	} {
		if got := dialAddr(tt.in); got != tt.want {
			t.Errorf("dialAddr(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": ":0"})
	_, port, _ := strings.Cut(g.Addr, "]:")
	want := "curl -N http://127.0.0.1:" + port + "/api/v2/chat/stream"
	eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(g.Stdout.String(), "Ctrl-C") })
	if out := g.Stdout.String(); !strings.Contains(out, want) || strings.Contains(out, "[::]") {
		t.Errorf("banner does not show %q (or shows [::]):\n%s", want, out)
	}
}

// 12. The README states the Go version the module needs and how long the tests take.
func TestEdge12ReadmeGoVersionAndTestTime(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	if want := "Go " + string(goLine[1]) + " or later"; !strings.Contains(string(readme), want) {
		t.Errorf("README.md does not say %q (go.mod: go %s)", want, goLine[1])
	}
	if !regexp.MustCompile(`(?i)tests? take (about|around) \d+`).Match(readme) {
		t.Error("README.md does not say how long the tests take")
	}
}
