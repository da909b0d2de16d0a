package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestGatewayReleasesWhatItBuilt: newGateway acquires Redis (the shared client and the replay
// log's own), a JWKS refresher and the renewer. A gateway that is closed, and one whose build
// fails part way (a bad POLICY_FILE; no key to verify tokens with), leave none of it behind:
// no connection to Redis and no goroutine.
func TestGatewayReleasesWhatItBuilt(t *testing.T) {
	r := startRedis(t)
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"keys":[]}`)
	}))
	defer jwks.Close()
	before := goleak.IgnoreCurrent()

	// The gateway's connections: every client Redis has but the one asking.
	clients := func() int {
		info, _ := r.Do(t, "INFO", "clients").(string)
		for line := range strings.Lines(info) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_clients:"); ok {
				n, _ := strconv.Atoi(v)
				return n - 1
			}
		}
		t.Fatalf("INFO clients without connected_clients:\n%s", info)
		return 0
	}
	build := func(t *testing.T, more map[string]string, broken func(*config)) (*gateway, func(), error) {
		t.Helper()
		env := map[string]string{
			"ALGO_URL":          "http://127.0.0.1:1",
			"REDIS_URL":         r.URL(),
			"JWT_SECRET":        testSecret,
			"JWT_JWKS_URL":      jwks.URL,
			"SSE_RESUME_WINDOW": "30s",
			"METRICS_ENABLED":   "true",
		}
		for k, v := range more {
			env[k] = v
		}
		cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if broken != nil {
			broken(cfg)
		}
		tel, err := newTelemetry(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		gw, err := newGateway(context.Background(), cfg, slog.New(slog.DiscardHandler), tel)
		return gw, func() { tel.shutdown(context.Background()) }, err
	}

	t.Run("closed", func(t *testing.T) {
		gw, stopTel, err := build(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer stopTel()
		// The shared client and the replay log's are both connected while it runs.
		eventually(t, 5*time.Second, "the gateway's two Redis clients connected", func() bool { return clients() >= 2 })
		gw.close()
		eventually(t, 5*time.Second, "no Redis connection left after close", func() bool { return clients() == 0 })
	})
	for _, tt := range []struct {
		name   string
		more   map[string]string
		broken func(*config)
		want   string
	}{
		{"bad policy file", map[string]string{"POLICY_FILE": "testdata/policy/e2e-bad-unknown-role.json"}, nil, "POLICY_FILE"},
		{"no key for tokens", nil, func(c *config) { c.JWTSecret, c.JWKSURL = nil, nil }, "HMAC secret or a JWKS"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			gw, stopTel, err := build(t, tt.more, tt.broken)
			defer stopTel()
			if err == nil {
				gw.close()
				t.Fatal("newGateway built a gateway")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error = %q, want it to name %q", err, tt.want)
			}
			eventually(t, 5*time.Second, "no Redis connection left after a failed build", func() bool { return clients() == 0 })
		})
	}

	// The JWKS client's connections end with its server.
	jwks.Close()
	goleak.VerifyNone(t, before)
}
