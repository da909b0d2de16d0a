package main

// Benchmarks of what operations cost: telemetry on the request path, and timing Redis calls.

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
)

// BenchmarkTelemetryOverhead compares small proxied GETs on the admin route through a gateway
// with metrics and tracing on (OTLP to a collector that accepts and discards the spans, every
// request sampled) and one with both off (METRICS_ENABLED=false, no OTLP endpoint), in the same
// run. benchGateway logs without the trace_id handler run adds.
func BenchmarkTelemetryOverhead(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	collector := newFakeCollector(b, false)
	off, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"METRICS_ENABLED": "false"})
	on, gwOn := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL, "OTEL_TRACES_SAMPLER_ARG": "1"})
	if !gwOn.tel.tracing {
		b.Fatal("tracing is not on in the \"on\" gateway")
	}
	// What most deployments run: every request measured, one trace in ten kept.
	sampled, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL, "OTEL_TRACES_SAMPLER_ARG": "0.1"})
	client := benchClient(b)
	targets := []struct{ name, url string }{
		{"off", off.URL + "/api/v2/admin/users"},
		{"on", on.URL + "/api/v2/admin/users"},
		{"on-sampled-10pct", sampled.URL + "/api/v2/admin/users"},
	}
	// Warm both alike (connections, token cache, attribute sets), so the first measured
	// variant does not pay for it.
	for _, target := range targets {
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 50 {
					if resp, err := client.Get(target.url); err == nil {
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}
			})
		}
		wg.Wait()
	}
	rates := map[string]float64{}
	for _, target := range targets {
		b.Run(target.name, func(b *testing.B) {
			rate := parallelGets(b, client, target.url)
			rates[target.name] = rate
			if target.name == "on" && rates["off"] > 0 {
				b.ReportMetric(rate/rates["off"], "on/off")
			}
		})
	}
	// The machine's load drifts between the two sub-benchmarks above; alternating short rounds
	// of the same parallel load puts the drift on both alike, for a fairer ratio.
	b.Run("interleaved", func(b *testing.B) {
		var spent [3]time.Duration
		const workers, perWorker = 16, 25
		round := func(url string) time.Duration {
			start := time.Now()
			var wg sync.WaitGroup
			for range workers {
				wg.Go(func() {
					for range perWorker {
						resp, err := client.Get(url)
						if err != nil {
							b.Error(err)
							return
						}
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				})
			}
			wg.Wait()
			return time.Since(start)
		}
		rounds := 0
		for b.Loop() {
			for i, target := range targets {
				spent[i] += round(target.url)
			}
			rounds++
		}
		n := float64(rounds * workers * perWorker)
		off, on, sampledRate := n/spent[0].Seconds(), n/spent[1].Seconds(), n/spent[2].Seconds()
		b.ReportMetric(off, "off-req/s")
		b.ReportMetric(on, "on-req/s")
		b.ReportMetric(on/off, "on/off")
		b.ReportMetric(sampledRate/off, "sampled10pct/off")
	})
	collector.mu.Lock()
	exports, n := collector.exports, collector.bytes
	collector.mu.Unlock()
	b.Logf("collector: %d exports, %s bytes", exports, strconv.FormatInt(n, 10))
}

// BenchmarkRedisTiming: what timing a Redis call costs (reading its key's class, two clock
// reads, a histogram record on the gateway's own meter), beside what it times: one GET to a
// real Redis on loopback through the guarded client, with timing off and on.
func BenchmarkRedisTiming(b *testing.B) {
	tel, err := newTelemetry(b.Context(), &config{MetricsEnabled: true, ServiceName: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	keys := policy.NewKeys("voicegate:")
	rt := redisTiming{keys: keys, record: tel.redisCall}
	script := []string{"EVALSHA", "0123456789abcdef0123456789abcdef01234567", "2",
		keys.Tenant(policy.KindRateLimit, "acme", "u", "alice"), keys.Tenant(policy.KindRateLimit, "acme", "t"), "1"}
	b.Run("timing-only", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			rt.done(rt.class(script), time.Now(), nil, false)
		}
	})
	r := startRedisB(b)
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.Addr()}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(client.Close)
	key := keys.Tenant(policy.KindRevoked, "acme", "jti", "t-1")
	for _, v := range []struct {
		name   string
		timing redisTiming
	}{{"get-untimed", redisTiming{}}, {"get-timed", rt}} {
		g := guardRedis(client, slog.New(slog.DiscardHandler), v.timing)
		b.Run(v.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := g.Do(b.Context(), g.B().Get().Key(key).Build()).Error(); err != nil && !rueidis.IsRedisNil(err) {
					b.Fatal(err)
				}
			}
		})
	}
}
