package main

// Benchmarks of the proxied admin routes: CPU per request at a fixed rate, and throughput, against
// the bare ReverseProxy.

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"testing"
	"time"

	"voicegate/proxy"
)

// BenchmarkAdminProcess runs the built gateway (its defaults, access log on; JWT, revocation,
// RBAC and rate limits in the path, by the benchmark policy, whose limits are never reached)
// beside a bare httputil.ReverseProxy, each a child process in front of the same back end, at
// the same fixed load, offered by the load generator (a process of its own): ADMIN_BENCH_RATE
// (default 2000) authenticated small GETs per second over 64 keep-alive connections,
// ADMIN_BENCH_SECONDS (default 5) per turn, three turns each, alternating. It reports CPU per
// request (user+sys from /proc) and the clients' answer times; with VOICEGATE_BENCH_PERF, each
// turn is profiled.
func BenchmarkAdminProcess(b *testing.B) {
	needProcfs(b)
	rate := envInt(b, "ADMIN_BENCH_RATE", 2000)
	window := envInt(b, "ADMIN_BENCH_SECONDS", 5)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	bin := buildGateway(b)
	bare := startBare(b, backend.URL)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": backend.URL,
		"ADMIN_URL": backend.URL, "POLICY_FILE": "testdata/policy/bench.json"})
	load := startLoad(b)
	token := tokenFor(b, "u-bench", []string{"admin"}, nil)
	b.ResetTimer()
	for range b.N {
		type figures struct {
			cpu  time.Duration
			reqs int64
			lat  []int64
		}
		var figs [2]figures
		children := [2]*child{bare, gw}
		for round := range 6 {
			i := round % 2
			c := children[i]
			rep, cpu, _ := load.measured(b, c, fmt.Sprint("round ", round/2), loadCmd{Op: "get",
				URL: "http://" + c.addr + "/api/v2/admin/users", Token: token, N: 64, Rate: float64(rate),
				Warm: 1, Seconds: float64(window)})
			if len(rep.Failures) > 0 {
				b.Errorf("%s: %v", c.name, rep.Failures)
			}
			figs[i].cpu += cpu
			figs[i].reqs += rep.OK
			figs[i].lat = append(figs[i].lat, rep.Lat...)
		}
		per := func(f figures) time.Duration { return f.cpu / time.Duration(max(f.reqs, 1)) }
		for i, name := range []string{"bare ReverseProxy", "voicegate"} {
			slices.Sort(figs[i].lat)
			b.Logf("%-18s %6.1f µs CPU/request (%.2f× bare)  p50 %v p99 %v  (%d requests, CPU %v)", name,
				micros(per(figs[i])), float64(per(figs[i]))/float64(per(figs[0])),
				quantile(figs[i].lat, 0.5), quantile(figs[i].lat, 0.99), figs[i].reqs, figs[i].cpu)
		}
		b.ReportMetric(micros(per(figs[0])), "bare-µs/req")
		b.ReportMetric(micros(per(figs[1])), "gateway-µs/req")
		b.ReportMetric(float64(per(figs[1]))/float64(per(figs[0])), "gateway/bare")
	}
}

// BenchmarkAdminProxy compares small proxied requests on the admin route with a bare
// httputil.ReverseProxy to the same back end, with parallel keep-alive clients.
func BenchmarkAdminProxy(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	backendURL, _ := url.Parse(backend.URL)
	gw, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL})
	bare := bareProxy(b, backendURL, "")
	// The bare proxy allocates a 32 KiB copy buffer per request; a pooled one shows what that
	// costs and keeps the comparison honest.
	pooledTr := &http.Transport{MaxIdleConnsPerHost: 1024}
	b.Cleanup(pooledTr.CloseIdleConnections)
	pooled := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite:    func(pr *httputil.ProxyRequest) { pr.SetURL(backendURL) },
		Transport:  pooledTr,
		BufferPool: proxy.NewBufferPool(0),
	})
	b.Cleanup(pooled.Close)
	client := benchClient(b)
	for _, target := range []struct{ name, url string }{
		{"bare", bare.URL + "/api/v2/admin/users"},
		{"bare-pooled", pooled.URL + "/api/v2/admin/users"},
		{"gateway", gw.URL + "/api/v2/admin/users"},
	} {
		b.Run(target.name, func(b *testing.B) { parallelGets(b, client, target.url) })
	}
}
