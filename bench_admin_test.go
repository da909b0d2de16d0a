package main

// Benchmarks of the proxied admin routes: CPU per request at a fixed rate, and throughput, against
// the bare ReverseProxy.

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"voicegate/proxy"
)

// fixedGets offers rate GETs per second to url over conns keep-alive connections, for d, and
// returns how many answered 200 and their latencies.
func fixedGets(tb testing.TB, url, token string, conns, rate int, d time.Duration) (int64, []time.Duration) {
	tb.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var ok atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	period := time.Duration(conns) * time.Second / time.Duration(rate)
	for i := range conns {
		wg.Go(func() {
			select { // each connection at its own phase
			case <-time.After(period * time.Duration(i) / time.Duration(conns)):
			case <-ctx.Done():
				return
			}
			t := time.NewTicker(period)
			defer t.Stop()
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			req.Header.Set("Authorization", "Bearer "+token)
			var mine []time.Duration
			for {
				select {
				case <-ctx.Done():
					mu.Lock()
					lat = append(lat, mine...)
					mu.Unlock()
					return
				case <-t.C:
				}
				start := time.Now()
				res, err := client.Do(req)
				if err != nil {
					continue
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode == http.StatusOK {
					ok.Add(1)
					mine = append(mine, time.Since(start))
				}
			}
		})
	}
	wg.Wait()
	return ok.Load(), lat
}

// BenchmarkAdminProcess runs the built gateway (its defaults, access log on; the benchmark
// policy, whose limits are all in the path and never reached) beside a bare
// httputil.ReverseProxy, each a child process in front of the same back end, at the same fixed
// load: ADMIN_BENCH_RATE (default 2000) authenticated small GETs per second over 64 keep-alive
// connections, ADMIN_BENCH_SECONDS (default 5) per turn, three turns each, alternating. It
// reports CPU per request (user+sys from /proc); with VOICEGATE_BENCH_PERF, the first turn of
// each is profiled.
func BenchmarkAdminProcess(b *testing.B) {
	needProcfs(b)
	rate := envInt(b, "ADMIN_BENCH_RATE", 2000)
	window := time.Duration(envInt(b, "ADMIN_BENCH_SECONDS", 5)) * time.Second
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	bin := buildGateway(b)
	bare := startBare(b, backend.URL)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": backend.URL,
		"ADMIN_URL": backend.URL, "POLICY_FILE": "testdata/policy/bench.json"})
	token := tokenFor(b, "u-bench", []string{"admin"}, nil)
	b.ResetTimer()
	for range b.N {
		type figures struct {
			cpu  time.Duration
			reqs int64
			lat  []time.Duration
		}
		var figs [2]figures
		children := [2]*child{bare, gw}
		for round := range 6 {
			i := round % 2
			c := children[i]
			fixedGets(b, "http://"+c.addr+"/api/v2/admin/users", token, 64, rate, time.Second) // warm
			cpu0 := c.cpu(b)
			stopProfile := func() {}
			if round < 2 {
				stopProfile = c.profile(b, window)
			}
			n, lat := fixedGets(b, "http://"+c.addr+"/api/v2/admin/users", token, 64, rate, window)
			stopProfile()
			figs[i].cpu += c.cpu(b) - cpu0
			figs[i].reqs += n
			figs[i].lat = append(figs[i].lat, lat...)
		}
		per := func(f figures) time.Duration { return f.cpu / time.Duration(max(f.reqs, 1)) }
		for i, name := range []string{"bare ReverseProxy", "voicegate"} {
			slices.Sort(figs[i].lat)
			n := len(figs[i].lat)
			b.Logf("%-18s %6.1f µs CPU/request (%.2f× bare)  p50 %v p99 %v  (%d requests, CPU %v)", name,
				micros(per(figs[i])), float64(per(figs[i]))/float64(per(figs[0])),
				figs[i].lat[n/2].Round(time.Microsecond), figs[i].lat[n*99/100].Round(time.Microsecond), figs[i].reqs, figs[i].cpu)
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
