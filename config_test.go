package main

// Configuration: every setting from the environment or a flag (the flag wins), refused with one
// line naming it when invalid, without credentials in the message; the command line's errors;
// README.md's configuration table complete; and a fuzz target.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"voicegate/auth"
)

// TestConfigRejectsInvalidValues checks, for parseConfig and for run, that every invalid value
// stops the gateway with one line naming the variable.
func TestConfigRejectsInvalidValues(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string // added to a valid ALGO_URL; a "" value removes it
		args    []string
		wantVar string
	}{
		{"LISTEN_ADDR without port", map[string]string{"LISTEN_ADDR": "nohost"}, nil, "LISTEN_ADDR"},
		{"ALGO_URL not http", map[string]string{"ALGO_URL": "ftp://x"}, nil, "ALGO_URL"},
		{"ALGO_URL missing", map[string]string{"ALGO_URL": ""}, nil, "ALGO_URL"},
		{"ADMIN_URL relative", map[string]string{"ADMIN_URL": "admin.internal/api"}, nil, "ADMIN_URL"},
		{"DOCS_URL with query", map[string]string{"DOCS_URL": "http://docs.internal/?a=1"}, nil, "DOCS_URL"},
		{"SHUTDOWN_GRACE not a duration", map[string]string{"SHUTDOWN_GRACE": "abc"}, nil, "SHUTDOWN_GRACE"},
		{"LOG_FORMAT unknown", map[string]string{"LOG_FORMAT": "xml"}, nil, "LOG_FORMAT"},
		{"REDIS_PREFIX with a brace", map[string]string{"REDIS_PREFIX": "app{1}:"}, nil, "REDIS_PREFIX"},
		{"LOG_LEVEL unknown", map[string]string{"LOG_LEVEL": "loud"}, nil, "LOG_LEVEL"},
		{"LOG_LEVEL with a line break", map[string]string{"LOG_LEVEL": "loud\nvery"}, nil, "LOG_LEVEL"},
		{"TRUSTED_PROXIES junk", map[string]string{"TRUSTED_PROXIES": "junk"}, nil, "TRUSTED_PROXIES"},
		{"CORS_ORIGINS not an origin", map[string]string{"CORS_ORIGINS": "notanorigin"}, nil, "CORS_ORIGINS"},
		{"CORS_ORIGINS with a path", map[string]string{"CORS_ORIGINS": "https://app.example.com/x"}, nil, "CORS_ORIGINS"},
		{"CONSOLE_GATEWAYS with a path", map[string]string{"CONSOLE_GATEWAYS": "https://gw.example.com/api"}, nil, "CONSOLE_GATEWAYS"},
		{"CONSOLE_GATEWAYS any", map[string]string{"CONSOLE_GATEWAYS": "*"}, nil, "CONSOLE_GATEWAYS"},
		{"CHAT_MAX_MESSAGE negative", map[string]string{"CHAT_MAX_MESSAGE": "-1"}, nil, "CHAT_MAX_MESSAGE"},
		{"CHAT_MAX_BODY_BYTES zero", map[string]string{"CHAT_MAX_BODY_BYTES": "0"}, nil, "CHAT_MAX_BODY_BYTES"},
		{"UPSTREAM_TIMEOUT zero", map[string]string{"UPSTREAM_TIMEOUT": "0s"}, nil, "UPSTREAM_TIMEOUT"},
		{"SSE_PING_INTERVAL junk", map[string]string{"SSE_PING_INTERVAL": "often"}, nil, "SSE_PING_INTERVAL"},
		{"SSE_MAX_LINE_BYTES tiny", map[string]string{"SSE_MAX_LINE_BYTES": "10"}, nil, "SSE_MAX_LINE_BYTES"},
		{"SSE_MAX_LINE_BYTES huge", map[string]string{"SSE_MAX_LINE_BYTES": "999999999999"}, nil, "SSE_MAX_LINE_BYTES"},
		{"SSE_MAX_LINE_BYTES over 16 MiB", map[string]string{"SSE_MAX_LINE_BYTES": "16777217"}, nil, "SSE_MAX_LINE_BYTES"},
		{"CHAT_MAX_BODY_BYTES huge", map[string]string{"CHAT_MAX_BODY_BYTES": "999999999999"}, nil, "CHAT_MAX_BODY_BYTES"},
		{"JWT_SECRET of 40 spaces", map[string]string{"JWT_SECRET": strings.Repeat(" ", 40)}, nil, "JWT_SECRET"},
		{"JWT_SECRET with a trailing newline", map[string]string{"JWT_SECRET": testSecret + "\n"}, nil, "JWT_SECRET"},
		{"JWT_SECRET of one letter", map[string]string{"JWT_SECRET": strings.Repeat("x", 48)}, nil, "JWT_SECRET"},
		{"BODY_READ_TIMEOUT junk", map[string]string{"BODY_READ_TIMEOUT": "soon"}, nil, "BODY_READ_TIMEOUT"},
		{"BODY_MIN_RATE zero", map[string]string{"BODY_MIN_RATE": "0"}, nil, "BODY_MIN_RATE"},
		{"invalid flag value", nil, []string{"-log-format", "xml"}, "-log-format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"ALGO_URL": "http://127.0.0.1:9"}
			for k, v := range tt.env {
				env[k] = v
			}
			args := append([]string{"voicegate"}, tt.args...)
			check := func(t *testing.T, err error) {
				t.Helper()
				if err == nil {
					t.Fatal("no error, want one naming " + tt.wantVar)
				}
				msg := err.Error()
				if strings.ContainsAny(msg, "\r\n") {
					t.Errorf("error is more than one line: %q", msg)
				}
				if !strings.Contains(msg, tt.wantVar) {
					t.Errorf("error %q does not name %s", msg, tt.wantVar)
				}
			}

			_, err := parseConfig(args, envFunc(env), io.Discard)
			check(t, err)

			var stdout, stderr bytes.Buffer
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			err = run(ctx, args, envFunc(env), &stdout, &stderr)
			check(t, err)
			if strings.Contains(stderr.String(), "listening") {
				t.Errorf("run started listening despite the invalid value:\n%s", stderr.String())
			}
		})
	}
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := parseConfig([]string{"voicegate"}, envFunc(map[string]string{"ALGO_URL": "http://algo.internal:8000/base"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.AlgoURLs) != 1 || cfg.AlgoURLs[0].String() != "http://algo.internal:8000/base" {
		t.Errorf("AlgoURLs = %v", cfg.AlgoURLs)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"ListenAddr", cfg.ListenAddr, ":8080"},
		{"Demo", cfg.Demo, false},
		{"AdminURLs", cfg.AdminURLs == nil, true},
		{"DocsURLs", cfg.DocsURLs == nil, true},
		{"LogFormat", cfg.LogFormat, ""},
		{"LogLevel", cfg.LogLevel, slog.LevelInfo},
		{"ShutdownGrace", cfg.ShutdownGrace, 25 * time.Second},
		{"UpstreamTimeout", cfg.UpstreamTimeout, 30 * time.Second},
		{"MaxBodyBytes", cfg.MaxBodyBytes, int64(10 << 20)},
		{"ChatMaxBodyBytes", cfg.ChatMaxBodyBytes, int64(64 << 10)},
		{"ChatMaxMessage", cfg.ChatMaxMessage, 4000},
		{"ChatMaxTokens", cfg.ChatMaxTokens, 8192},
		{"ChatDefaultModel", cfg.ChatDefaultModel, "default"},
		{"SSEPingInterval", cfg.SSEPingInterval, 15 * time.Second},
		{"SSEMaxLineBytes", cfg.SSEMaxLineBytes, 1 << 20},
		{"BodyReadTimeout", cfg.BodyReadTimeout, 5 * time.Second},
		{"BodyMinRate", cfg.BodyMinRate, int64(16 << 10)},
		{"CORSOrigins", len(cfg.CORSOrigins), 0},
		{"TrustedProxies", len(cfg.TrustedProxies), 0},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestConfigFlagOverridesEnvironment(t *testing.T) {
	env := map[string]string{"LISTEN_ADDR": "127.0.0.1:1111", "ALGO_URL": "http://env.internal", "LOG_LEVEL": "warn"}
	tests := []struct {
		name  string
		args  []string
		check func(*config) bool
	}{
		{"listen-addr", []string{"-listen-addr", "127.0.0.1:9999"}, func(c *config) bool { return c.ListenAddr == "127.0.0.1:9999" }},
		{"listen-addr=", []string{"-listen-addr=127.0.0.1:9998"}, func(c *config) bool { return c.ListenAddr == "127.0.0.1:9998" }},
		{"algo-url", []string{"--algo-url", "http://flag.internal"}, func(c *config) bool { return c.AlgoURLs[0].Host == "flag.internal" }},
		{"log-level", []string{"-log-level", "debug"}, func(c *config) bool { return c.LogLevel == slog.LevelDebug }},
		{"no flag: environment", nil, func(c *config) bool {
			return c.ListenAddr == "127.0.0.1:1111" && c.AlgoURLs[0].Host == "env.internal" && c.LogLevel == slog.LevelWarn
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parseConfig(append([]string{"voicegate"}, tt.args...), envFunc(env), io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(cfg) {
				t.Errorf("config = %+v", cfg)
			}
		})
	}

	t.Run("a valid flag hides an invalid variable", func(t *testing.T) {
		_, err := parseConfig([]string{"voicegate", "-listen-addr", ":0"},
			envFunc(map[string]string{"LISTEN_ADDR": "nohost", "ALGO_URL": "http://a"}), io.Discard)
		if err != nil {
			t.Errorf("error %v, want the flag to win over the invalid LISTEN_ADDR", err)
		}
	})

	t.Run("through run", func(t *testing.T) {
		g := startRun(t, []string{"-listen-addr", "127.0.0.1:0"},
			map[string]string{"LISTEN_ADDR": "nohost", "ALGO_URL": "http://127.0.0.1:1"})
		if !strings.HasPrefix(g.Addr, "127.0.0.1:") {
			t.Errorf("listening on %q, want the flag's 127.0.0.1:0", g.Addr)
		}
		res := doRequest(t, g.Client, http.MethodGet, g.URL+"/healthz", nil, nil)
		if res.StatusCode != http.StatusOK {
			t.Errorf("GET /healthz = %d", res.StatusCode)
		}
	})
}

func TestConfigDemo(t *testing.T) {
	t.Run("needs no ALGO_URL and stays on loopback", func(t *testing.T) {
		cfg, err := parseConfig([]string{"voicegate", "-demo"}, envFunc(nil), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if !cfg.Demo || cfg.AlgoURLs != nil || cfg.ListenAddr != "127.0.0.1:8080" {
			t.Errorf("Demo=%v AlgoURLs=%v ListenAddr=%q, want demo on 127.0.0.1:8080", cfg.Demo, cfg.AlgoURLs, cfg.ListenAddr)
		}
	})
	t.Run("LISTEN_ADDR still wins", func(t *testing.T) {
		cfg, err := parseConfig([]string{"voicegate", "-demo"}, envFunc(map[string]string{"LISTEN_ADDR": ":7000"}), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.ListenAddr != ":7000" {
			t.Errorf("ListenAddr = %q, want :7000", cfg.ListenAddr)
		}
	})
}

func TestConfigCommandLine(t *testing.T) {
	t.Run("-h prints usage naming the variables", func(t *testing.T) {
		var stderr bytes.Buffer
		_, err := parseConfig([]string{"voicegate", "-h"}, envFunc(nil), &stderr)
		if !errors.Is(err, errHelp) {
			t.Errorf("error = %v, want errHelp", err)
		}
		for _, s := range settings() {
			if !strings.Contains(stderr.String(), "-"+flagName(s.env)) || !strings.Contains(stderr.String(), "env "+s.env) {
				t.Errorf("usage does not show -%s (env %s):\n%s", flagName(s.env), s.env, stderr.String())
			}
		}
	})
	for _, args := range [][]string{{"-no-such-flag"}, {"extra"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			_, err := parseConfig(append([]string{"voicegate"}, args...), envFunc(map[string]string{"ALGO_URL": "http://a"}), io.Discard)
			if err == nil || strings.ContainsAny(err.Error(), "\r\n") {
				t.Errorf("error = %v, want one line", err)
			}
		})
	}
}

// TestConfigUnknownFlag: a mistyped flag is one line that names it as typed and says where the
// list is, for the gateway and its subcommands; the usage (90 lines) is printed only for -h,
// and nothing is written to stderr besides the error main prints, so it shows once.
func TestConfigUnknownFlag(t *testing.T) {
	tests := []struct {
		args       []string
		typed, cmd string
	}{
		{[]string{"-no-such-flag"}, "-no-such-flag", "voicegate -h"},
		{[]string{"--no-such-flag=1"}, "--no-such-flag", "voicegate -h"},
		{[]string{"-listen-addr", ":0", "-lisen-addr", ":1"}, "-lisen-addr", "voicegate -h"},
		{[]string{"token", "-rols", "admin"}, "-rols", "voicegate token -h"},
		{[]string{"demo-algo", "-port", "9000"}, "-port", "voicegate demo-algo -h"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			err := run(ctx, append([]string{"voicegate"}, tt.args...), envFunc(map[string]string{"ALGO_URL": "http://127.0.0.1:9"}), &stdout, &stderr)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if strings.ContainsAny(msg, "\r\n") || !strings.Contains(msg, "unknown flag "+tt.typed+" ") || !strings.Contains(msg, tt.cmd) {
				t.Errorf("error = %q, want one line naming %s and pointing to %s", msg, tt.typed, tt.cmd)
			}
			if stderr.Len() > 0 || stdout.Len() > 0 {
				t.Errorf("run wrote besides returning the error:\nstdout: %s\nstderr: %s", stdout.String(), stderr.String())
			}
		})
	}
}

// TestConfigInvalidValueNamesItsSource: a bad value names where it came from: the flag as it
// was typed (one dash or two), or the environment variable.
func TestConfigInvalidValueNamesItsSource(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		env        map[string]string
		want, not  string
		wantPrefix bool
	}{
		{"flag", []string{"-shutdown-grace", "abc"}, nil, `-shutdown-grace: invalid value "abc": want a duration`, "SHUTDOWN_GRACE", true},
		{"flag with two dashes and =", []string{"--shutdown-grace=abc"}, nil, `--shutdown-grace: invalid value "abc"`, "SHUTDOWN_GRACE", true},
		{"last of a flag given twice", []string{"-log-level", "info", "--log-level", "loud"}, nil, `--log-level: invalid value "loud"`, "LOG_LEVEL", true},
		{"flag over a valid variable", []string{"-shutdown-grace", "abc"}, map[string]string{"SHUTDOWN_GRACE": "10s"}, "-shutdown-grace: ", "SHUTDOWN_GRACE", true},
		{"variable", nil, map[string]string{"SHUTDOWN_GRACE": "abc"}, `invalid SHUTDOWN_GRACE "abc": want a duration`, "-shutdown-grace", false},
		{"secret flag", []string{"-jwt-secret", "short"}, nil, "-jwt-secret: ", "short", true},
		{"drain delay against grace, by flag", []string{"-drain-delay", "20s", "-shutdown-grace", "30s"}, nil,
			"invalid -drain-delay: 20s is more than half of -shutdown-grace (30s)", "DRAIN_DELAY", true},
		{"drain delay against grace, by variable", nil, map[string]string{"DRAIN_DELAY": "20s", "SHUTDOWN_GRACE": "30s"},
			"invalid DRAIN_DELAY: 20s is more than half of SHUTDOWN_GRACE (30s)", "-drain-delay", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"ALGO_URL": "http://127.0.0.1:9"}
			maps.Copy(env, tt.env)
			_, err := parseConfig(append([]string{"voicegate"}, tt.args...), envFunc(env), io.Discard)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if (tt.wantPrefix && !strings.HasPrefix(msg, tt.want)) || !strings.Contains(msg, tt.want) || strings.Contains(msg, tt.not) {
				t.Errorf("error = %q, want %q in it and not %q", msg, tt.want, tt.not)
			}
		})
	}
}

// TestConfigErrorKeepsCredentialsOut: a URL refused for carrying credentials must not have them
// printed back in the startup error, which ends up in logs.
func TestConfigErrorKeepsCredentialsOut(t *testing.T) {
	for _, v := range []string{"ALGO_URL", "ADMIN_URL", "DOCS_URL"} {
		env := map[string]string{"ALGO_URL": "http://a", v: "http://svc:hunter2@svc.internal"}
		_, err := parseConfig([]string{"voicegate"}, envFunc(env), io.Discard)
		if err == nil || !strings.Contains(err.Error(), v) {
			t.Fatalf("error = %v, want one naming %s", err, v)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("error shows the password: %v", err)
		}
	}
}

// TestConfigTableInREADME: docs/configuration.md's table is the complete list of settings:
// every variable the code reads is there, with the code's default.
func TestConfigTableInREADME(t *testing.T) {
	raw, err := os.ReadFile("docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	start := strings.Index(doc, "## Settings")
	if start < 0 {
		t.Fatal("docs/configuration.md has no ## Settings section")
	}
	end := strings.Index(doc[start+1:], "\n## ")
	table := doc[start : start+1+end]
	rows := map[string]string{} // variable → its row
	for _, line := range strings.Split(table, "\n") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		first := strings.Split(line, "|")[1]
		for _, v := range strings.Split(first, ",") {
			rows[strings.Trim(strings.TrimSpace(v), "`")] = line
		}
	}
	for _, s := range settings() {
		row, ok := rows[s.env]
		if !ok {
			t.Errorf("%s is not in docs/configuration.md's table", s.env)
			continue
		}
		if s.def != "" && !strings.Contains(row, "`"+s.def+"`") {
			t.Errorf("docs/configuration.md's row for %s does not give its default `%s`: %s", s.env, s.def, row)
		}
	}
}

// TestConfigDrainDelayOverHalfRefused: DRAIN_DELAY above half of SHUTDOWN_GRACE stops the
// gateway with one line naming it, instead of being cut silently.
func TestConfigDrainDelayOverHalfRefused(t *testing.T) {
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

// readmeSettings returns the variables of docs/configuration.md's table.
func readmeSettings(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(raw), "\n## Settings\n")
	if !ok {
		t.Fatal(`docs/configuration.md has no "## Settings" section`)
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

// TestConfigTableComplete: the configuration table (docs/configuration.md) lists every setting
// the gateway reads (METRICS_ENABLED among them), and nothing else; METRICS_ENABLED=false turns
// /metrics off.
func TestConfigTableComplete(t *testing.T) {
	var code []string
	for _, s := range settings() {
		code = append(code, s.env)
	}
	slices.Sort(code)
	if got := readmeSettings(t); !slices.Equal(got, code) {
		t.Errorf("docs/configuration.md table = %v\nsettings in the code     = %v", got, code)
	}
	g := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "METRICS_ENABLED": "false"})
	wantError(t, call(t, g, "GET", "/metrics", "", ""), http.StatusNotFound, "NOT_FOUND")
}

// TestMainCommandLineErrors: what a user who mistyped sees. A mistyped flag is one line, once,
// naming it and where the list is (not the error, ninety lines of usage, and the error again);
// a bad value names the flag as typed or the variable it came from; -h prints the usage.
func TestMainCommandLineErrors(t *testing.T) {
	env := map[string]string{"ALGO_URL": "http://127.0.0.1:9", "JWT_SECRET": testSecret, "SHUTDOWN_GRACE": ""}
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"unknown flag", nil, []string{"-no-such-flag"}, "voicegate: unknown flag -no-such-flag (voicegate -h lists the flags)\n"},
		{"bad flag value", nil, []string{"-shutdown-grace", "abc"}, `voicegate: -shutdown-grace: invalid value "abc": want a duration of at least 0s, such as 15s` + "\n"},
		{"bad variable", map[string]string{"SHUTDOWN_GRACE": "abc"}, nil, `voicegate: invalid SHUTDOWN_GRACE "abc": want a duration of at least 0s, such as 15s` + "\n"},
		{"unknown flag of a subcommand", nil, []string{"token", "--rols", "admin"}, "voicegate: unknown flag --rols (voicegate token -h lists the flags)\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := map[string]string{}
			for k, v := range env {
				e[k] = v
			}
			for k, v := range tt.env {
				e[k] = v
			}
			stderr, code := runMain(t, e, tt.args...)
			if stderr != tt.want || code != 1 {
				t.Errorf("exit %d, stderr:\n%s\nwant exit 1 and:\n%s", code, stderr, tt.want)
			}
		})
	}
	t.Run("-h", func(t *testing.T) {
		stderr, _ := runMain(t, env, "-h")
		if !strings.HasPrefix(stderr, "Usage: voicegate [flags]") || !strings.Contains(stderr, "-shutdown-grace") {
			t.Errorf("-h printed:\n%s", stderr)
		}
	})
}

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
