package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"voicegate/proxy"
)

// benchGateway serves the gateway's real handler (middleware, routes, proxies) with env as its
// configuration; access logs are formatted and discarded so their cost counts.
func benchGateway(tb testing.TB, env map[string]string) (*httptest.Server, *gateway) {
	tb.Helper()
	env["JWT_SECRET"] = testSecret
	if env["POLICY_FILE"] == "" {
		// Every limit is in the path but none is ever reached.
		env["POLICY_FILE"] = "testdata/policy/bench.json"
	}
	cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		tb.Fatal(err)
	}
	tel, err := newTelemetry(context.Background(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	gw, err := newGateway(context.Background(), cfg, slog.New(slog.NewJSONHandler(io.Discard, nil)), tel)
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(gw.handler)
	tb.Cleanup(func() {
		srv.Close()
		gw.close()
		tel.shutdown(context.Background())
	})
	return srv, gw
}

// bareProxy serves bareReverseProxy in this process.
func bareProxy(tb testing.TB, target *url.URL, path string) *httptest.Server {
	tb.Helper()
	rp := bareReverseProxy(target, path)
	srv := httptest.NewServer(rp)
	tb.Cleanup(func() {
		srv.Close()
		rp.Transport.(*http.Transport).CloseIdleConnections()
	})
	return srv
}

// benchClient is a keep-alive client that authenticates as an admin (the bare proxies ignore the
// header).
func benchClient(tb testing.TB) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 2048, MaxConnsPerHost: 0}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: withToken{tr, tokenFor(tb, "u-bench", []string{"admin"}, nil)}}
}

// pacedUpstream streams lines NDJSON lines spaced by gap, each carrying its send time, so the
// client can measure each event's latency.
func pacedUpstream(tb testing.TB, lines int, gap time.Duration) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(w)
		rc.Flush()
		// Start at a random phase so streams do not tick in lockstep.
		t := time.NewTimer(rand.N(gap) + time.Millisecond)
		defer t.Stop()
		buf := make([]byte, 0, 256)
		for i := 0; i < lines; i++ {
			select {
			case <-t.C:
			case <-r.Context().Done():
				return
			}
			t.Reset(gap)
			typ := "generation_chunk"
			if i == lines-1 {
				typ = "generation_done"
			}
			buf = append(buf[:0], `{"type":"`...)
			buf = append(buf, typ...)
			buf = append(buf, `","content":"some tokens of the answer","sent_ns":`...)
			buf = strconv.AppendInt(buf, time.Now().UnixNano(), 10)
			buf = append(buf, "}\n"...)
			if _, err := w.Write(buf); err != nil {
				return
			}
			rc.Flush()
		}
	}))
	tb.Cleanup(srv.Close)
	return srv
}

// readLatencies reads an NDJSON or SSE body and records, for every line carrying sent_ns, how
// long it took to arrive.
func readLatencies(body io.Reader, lat []time.Duration) ([]time.Duration, error) {
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 4096), 1<<20)
	key := []byte(`"sent_ns":`)
	for sc.Scan() {
		line := sc.Bytes()
		i := bytes.Index(line, key)
		if i < 0 {
			continue
		}
		now := time.Now().UnixNano()
		rest := line[i+len(key):]
		end := bytes.IndexAny(rest, ",}")
		sent, err := strconv.ParseInt(string(rest[:end]), 10, 64)
		if err != nil {
			return lat, err
		}
		lat = append(lat, time.Duration(now-sent))
	}
	return lat, sc.Err()
}

// BenchmarkStreamLatency measures the per-event latency a chat stream adds, through the gateway
// (NDJSON→SSE with all middleware) and through a bare httputil.ReverseProxy with
// FlushInterval -1 relaying the same upstream unchanged, at 1 and 500 concurrent streams of 200
// events. Rounds alternate between the two, so machine noise falls on both alike. One op is ten
// rounds of each at one stream, one round of each at 500; p50/p99 are over every event.
func BenchmarkStreamLatency(b *testing.B) {
	for _, conc := range []int{1, 500} {
		gap, rounds := 2*time.Millisecond, 10 // enough events for a steady p99
		if conc > 1 {
			gap, rounds = 40*time.Millisecond, 1 // 12,500 events/s in all: the proxies, not the box, are measured
		}
		up := pacedUpstream(b, 200, gap)
		upURL, _ := url.Parse(up.URL)
		gw, _ := benchGateway(b, map[string]string{"ALGO_URL": up.URL})
		bare := bareProxy(b, upURL, "/query")
		client := benchClient(b)
		b.Run(fmt.Sprintf("streams=%d", conc), func(b *testing.B) {
			var bareLat, gwLat []time.Duration
			for b.Loop() {
				for range rounds {
					bareLat = append(bareLat, streamRound(b, client, bare.URL+"/query", conc)...)
					gwLat = append(gwLat, streamRound(b, client, gw.URL+"/api/v2/chat/stream", conc)...)
				}
			}
			slices.Sort(bareLat)
			slices.Sort(gwLat)
			p := func(l []time.Duration, q int) float64 { return float64(l[len(l)*q/100].Microseconds()) }
			b.ReportMetric(p(bareLat, 50), "bare-p50-µs")
			b.ReportMetric(p(bareLat, 99), "bare-p99-µs")
			b.ReportMetric(p(gwLat, 50), "gateway-p50-µs")
			b.ReportMetric(p(gwLat, 99), "gateway-p99-µs")
			b.ReportMetric(p(gwLat, 99)/p(bareLat, 99), "p99-ratio")
		})
	}
}

// streamRound runs conc concurrent streams to url and returns every event's latency.
func streamRound(b *testing.B, client *http.Client, url string, conc int) []time.Duration {
	lats := make([][]time.Duration, conc)
	errs := make(chan error, conc)
	var wg sync.WaitGroup
	for s := 0; s < conc; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Post(url, "application/json", strings.NewReader(`{"message":"hello"}`))
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			lats[s], err = readLatencies(resp.Body, make([]time.Duration, 0, 200))
			if err == nil && len(lats[s]) != 200 {
				err = fmt.Errorf("%s: got %d events, want 200", url, len(lats[s]))
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	return all
}

// silentUpstream answers /query with 200 and then says nothing until the request ends.
func silentUpstream(tb testing.TB) (*httptest.Server, func() int) {
	var mu sync.Mutex
	open := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		mu.Lock()
		open++
		mu.Unlock()
		<-r.Context().Done()
		mu.Lock()
		open--
		mu.Unlock()
	}))
	tb.Cleanup(srv.Close)
	return srv, func() int { mu.Lock(); defer mu.Unlock(); return open }
}

// openStreams opens n streams to url and returns once each has its first bytes.
func openStreams(tb testing.TB, client *http.Client, url string, n int) (closeAll func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	ready := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(`{"message":"hello"}`))
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				ready <- err
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				ready <- fmt.Errorf("status %d", resp.StatusCode)
				return
			}
			ready <- nil
			io.Copy(io.Discard, resp.Body)
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-ready; err != nil {
			tb.Fatal(err)
		}
	}
	return func() { cancel(); wg.Wait() }
}

func liveBytes() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// BenchmarkSilentStreamMemory measures what 1,000 open chat streams with a silent upstream cost
// (heap + stacks per stream), through the gateway and through a bare httputil.ReverseProxy. The
// same streams opened straight to the upstream are measured too and subtracted, which leaves
// each proxy's own share: its server connection, its upstream connection and its stream state.
func BenchmarkSilentStreamMemory(b *testing.B) {
	const n = 1000
	up, open := silentUpstream(b)
	upURL, _ := url.Parse(up.URL)
	gw, _ := benchGateway(b, map[string]string{"ALGO_URL": up.URL})
	bare := bareProxy(b, upURL, "/query")
	client := benchClient(b)
	measure := func(url string) float64 {
		base := liveBytes()
		closeAll := openStreams(b, client, url, n)
		for open() < n {
			time.Sleep(10 * time.Millisecond)
		}
		used := liveBytes()
		closeAll()
		for open() > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		client.CloseIdleConnections()
		return (float64(used) - float64(base)) / n / 1024
	}
	for b.Loop() {
		direct := measure(up.URL + "/query")
		b.ReportMetric(measure(gw.URL+"/api/v2/chat/stream")-direct, "gateway-KiB/stream")
		b.ReportMetric(measure(bare.URL+"/query")-direct, "bare-KiB/stream")
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

// BenchmarkAuthThroughput compares small proxied requests on the admin route with a token (JWT
// verification cache, revocation check, policy decision, rate limit) against the same route made
// public with AUTH_PUBLIC_PATHS, through the same gateway in the same run.
func BenchmarkAuthThroughput(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	gw, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"AUTH_PUBLIC_PATHS": "/api/v2/admin/public/"})
	client := benchClient(b)
	for _, target := range []struct{ name, url string }{
		{"unauthenticated", gw.URL + "/api/v2/admin/public/users"},
		{"authenticated", gw.URL + "/api/v2/admin/users"},
	} {
		b.Run(target.name, func(b *testing.B) { parallelGets(b, client, target.url) })
	}
}

// parallelGets is the small-request load of the throughput benchmarks: 16 goroutines per CPU
// doing keep-alive GETs that must answer 200. It reports requests per second.
func parallelGets(b *testing.B, client *http.Client, url string) float64 {
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Get(url)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	})
	rate := float64(b.N) / b.Elapsed().Seconds()
	b.ReportMetric(rate, "req/s")
	return rate
}
