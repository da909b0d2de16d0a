package main

// Benchmarks of chat streams: CPU per SSE event and time to the first event against the bare
// ReverseProxy, per-event latency, memory per silent stream, and what the replay log costs.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// runStreamsSpread is runStreams with the streams' starts spread evenly over spread, as
// clients' questions are: 500 at the same instant is a burst no deployment sees.
func runStreamsSpread(tb testing.TB, client *http.Client, url string, tokens []string, spread time.Duration) (lines int64, lat []time.Duration) {
	tb.Helper()
	var n atomic.Int64
	var mu sync.Mutex
	err := inParallel(len(tokens), len(tokens), func(i int) error {
		time.Sleep(spread * time.Duration(i) / time.Duration(len(tokens)))
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(`{"message":"benchmark question"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tokens[i])
		res, err := client.Do(req)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(io.LimitReader(res.Body, 512))
			return fmt.Errorf("%s stream %d: status %d: %s", url, i, res.StatusCode, body)
		}
		l, err := readLatencies(bufio.NewReader(res.Body), nil)
		if err != nil {
			return fmt.Errorf("%s stream %d after %d lines: %w", url, i, len(l), err)
		}
		n.Add(int64(len(l)))
		mu.Lock()
		lat = append(lat, l...)
		mu.Unlock()
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return n.Load(), lat
}

// BenchmarkSSEProcess runs the built gateway (its defaults, access log on) beside a bare
// httputil.ReverseProxy passing the NDJSON through, each a child process in front of the same
// algorithm service, at the same load, offered by the load generator (a process of its own):
// SSE_BENCH_STREAMS (default 100) concurrent streams of 100 lines 20 ms apart, their starts
// spread over a second, SSE_BENCH_ROUNDS (default 3) times each, alternating. It reports CPU
// per event (user+sys from /proc, divided by the upstream lines relayed) and each line's
// one-way time, from the algorithm service's send to the client's read.
func BenchmarkSSEProcess(b *testing.B) {
	needProcfs(b)
	streams := envInt(b, "SSE_BENCH_STREAMS", 100)
	rounds := envInt(b, "SSE_BENCH_ROUNDS", 3)
	const lines = 100
	algo := pacedUpstream(b, lines, 20*time.Millisecond)
	bin := buildGateway(b)
	bare := startBare(b, algo.URL)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.URL})
	load := startLoad(b)
	// A user per stream, each of its own tenant (the load generator's clients), so that the
	// default policy's caps apply as in production; a user keeps its token from one question
	// to the next.
	cmd := func(c *child) loadCmd {
		return loadCmd{Op: "sse", URL: "http://" + c.addr + "/api/v2/chat/stream", N: streams, Secret: testSecret,
			Body: `{"message":"benchmark question"}`, Seconds: 2}
	}
	b.ResetTimer()
	for range b.N {
		type figures struct {
			cpu    time.Duration
			events int64
			lat    []int64
		}
		var fb, fg figures
		measure := func(c *child, f *figures, round int) {
			if round == 0 { // the users' first questions, before the measured ones
				load.do(b, cmd(c), nil)
			}
			rep, cpu, _ := load.measured(b, c, fmt.Sprint("round ", round), cmd(c))
			if len(rep.Failures) > 0 {
				// The bare proxy, not the gateway, breaks a stream now and then at the start of a
				// round: it logs "use of closed network connection" reading from the algorithm
				// service. Its figures are per event relayed, so they stand; the gateway must
				// lose none.
				if c == gw {
					b.Errorf("%s: %v", c.name, rep.Failures)
				} else {
					b.Logf("%s: %v", c.name, rep.Failures)
				}
			}
			f.cpu += cpu
			f.events += rep.Got
			f.lat = append(f.lat, rep.Lat...)
		}
		for round := range rounds {
			if round%2 == 0 {
				measure(bare, &fb, round)
				measure(gw, &fg, round)
			} else {
				measure(gw, &fg, round)
				measure(bare, &fb, round)
			}
		}
		if want := int64(rounds * streams * lines); fg.events != want {
			b.Fatalf("events relayed by the gateway: %d, want %d", fg.events, want)
		}
		per := func(f figures) time.Duration { return f.cpu / time.Duration(f.events) }
		for _, f := range []struct {
			name string
			f    figures
		}{{"bare ReverseProxy", fb}, {"voicegate", fg}} {
			slices.Sort(f.f.lat)
			b.Logf("%-18s %5.1f µs CPU/event (%.2f× bare)  p50 %v p99 %v  (%d events, CPU %v)", f.name,
				micros(per(f.f)), float64(per(f.f))/float64(per(fb)), quantile(f.f.lat, 0.5),
				quantile(f.f.lat, 0.99), f.f.events, f.f.cpu)
		}
		slices.Sort(fb.lat)
		slices.Sort(fg.lat)
		b.ReportMetric(micros(per(fb)), "bare-µs/event")
		b.ReportMetric(micros(per(fg)), "gateway-µs/event")
		b.ReportMetric(float64(per(fg))/float64(per(fb)), "gateway/bare")
		b.ReportMetric(micros(quantile(fb.lat, 0.99)), "bare-p99-µs")
		b.ReportMetric(micros(quantile(fg.lat, 0.99)), "gateway-p99-µs")
	}
}

// firstLineUpstream answers every chat at once: one chunk stamped with its send time, then done.
func firstLineUpstream(tb testing.TB) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		fmt.Fprintf(w, `{"type":"generation_chunk","content":"first","sent_ns":%d}`+"\n", time.Now().UnixNano())
		http.NewResponseController(w).Flush()
		io.WriteString(w, `{"type":"generation_done"}`+"\n")
	}))
	tb.Cleanup(srv.Close)
	return srv
}

// BenchmarkFirstEvent measures the time to a chat stream's first event through the built gateway
// with Redis on (its defaults, the benchmark policy: rates, quota and caps all in the path, and
// the stream announced in the stream directory) and through a bare httputil.ReverseProxy
// passing the NDJSON through, each a child process in front of the same algorithm service, which
// answers at once. The load generator (a process of its own) sends one stream at a time and
// times it: FIRST_EVENT_STREAMS (default 2000) through each, in alternating rounds of 100
// (FIRST_EVENT_REDIS=off runs the gateway without Redis). The target is gateway ≤ 1.2 × bare +
// 200 µs, at p50 and p99.
func BenchmarkFirstEvent(b *testing.B) {
	needProcfs(b)
	total := envInt(b, "FIRST_EVENT_STREAMS", 2000)
	r := startRedis(b)
	algo := firstLineUpstream(b)
	bin := buildGateway(b)
	bare := startBare(b, algo.URL)
	env := map[string]string{"ALGO_URL": algo.URL, "REDIS_URL": r.URL(), "POLICY_FILE": "testdata/policy/bench.json"}
	if os.Getenv("FIRST_EVENT_REDIS") == "off" { // to tell Redis's share from the rest
		delete(env, "REDIS_URL")
	}
	gw := startGatewayProcess(b, bin, "voicegate", env)
	load := startLoad(b)
	token := tokenFor(b, "u-first", []string{"user"}, map[string]any{"tenant_id": "t-first"})
	urls := [2]string{"http://" + bare.addr + "/api/v2/chat/stream", "http://" + gw.addr + "/api/v2/chat/stream"}
	streams := func(i, n int) []int64 {
		rep := load.do(b, loadCmd{Op: "first-event", URL: urls[i], N: n, Token: token, Body: `{"message":"benchmark question"}`}, nil)
		if rep.OK != int64(n) {
			b.Fatalf("%s: %d of %d streams: %v", urls[i], rep.OK, n, rep.Failures)
		}
		return rep.Lat
	}
	for i := range urls { // warm: connections, scripts, the token's revocation cache
		streams(i, 50)
	}
	b.ResetTimer()
	for range b.N {
		var lat [2][]int64
		for round := 0; round < total/100; round++ {
			for k := range 2 {
				i := (round + k) % 2
				lat[i] = append(lat[i], streams(i, 100)...)
			}
		}
		for i := range lat {
			slices.Sort(lat[i])
		}
		p := func(i int, q float64) time.Duration { return quantile(lat[i], q) }
		for _, q := range []float64{0.5, 0.99} {
			bound := time.Duration(1.2*float64(p(0, q))) + 200*time.Microsecond
			verdict := "within"
			if p(1, q) > bound {
				verdict = "OVER"
			}
			b.Logf("p%02.0f: bare %v, gateway %v (added %v; bound 1.2× bare + 200 µs = %v: %s)", q*100,
				p(0, q), p(1, q), p(1, q)-p(0, q), bound.Round(time.Microsecond), verdict)
		}
		b.ReportMetric(micros(p(0, 0.5)), "bare-p50-µs")
		b.ReportMetric(micros(p(1, 0.5)), "gateway-p50-µs")
		b.ReportMetric(micros(p(0, 0.99)), "bare-p99-µs")
		b.ReportMetric(micros(p(1, 0.99)), "gateway-p99-µs")
	}
}

// redisCalls is the number of commands Redis has run for its clients (INFO commandstats, the
// commands scripts run left out).
func redisCalls(tb testing.TB, r *testRedis) int64 {
	tb.Helper()
	info, _ := r.Do(tb, "INFO", "commandstats").(string)
	var total int64
	for _, line := range strings.Split(info, "\n") {
		_, stats, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || !strings.HasPrefix(line, "cmdstat_") {
			continue
		}
		for _, kv := range strings.Split(stats, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				total += n
			}
		}
	}
	return total
}

// counter sums the samples of a counter in the Prometheus text at url.
func counter(tb testing.TB, url, name string) float64 {
	tb.Helper()
	res, err := http.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	defer res.Body.Close()
	var sum float64
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, name); ok && (strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "{")) {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}

// BenchmarkReplayLog measures what resuming costs: the built gateway with SSE_RESUME_WINDOW on
// (its events appended to the Redis replay log) beside the same gateway with it off, each a
// child process on the same Redis, at the same load: REPLAY_BENCH_STREAMS (default 500)
// concurrent streams of 100 lines 100 ms apart (their starts spread over 2 s), twice each,
// alternating. It reports CPU per event
// (user+sys from /proc) and Redis commands per event (INFO commandstats, which also counts the
// admission scripts of both), then the latency of resuming: from a GET with Last-Event-ID to its
// first replayed event, over REPLAY_BENCH_RESUMES (default 500) resumes of finished streams.
func BenchmarkReplayLog(b *testing.B) {
	needProcfs(b)
	streams := envInt(b, "REPLAY_BENCH_STREAMS", 500)
	resumes := envInt(b, "REPLAY_BENCH_RESUMES", 500)
	const lines = 100
	r := startRedis(b)
	// 100 ms apart: 500 streams make 5,000 events a second, a load this box carries beside
	// Redis and the clients; at 20 ms it would be saturated, and saturation measures nothing.
	algo := pacedUpstream(b, lines, 100*time.Millisecond)
	bin := buildGateway(b)
	env := func(window string) map[string]string {
		return map[string]string{"ALGO_URL": algo.URL, "REDIS_URL": r.URL(), "SSE_RESUME_WINDOW": window,
			"POLICY_FILE": "testdata/policy/bench.json"}
	}
	off := startGatewayProcess(b, bin, "resume off", env("0s"))
	on := startGatewayProcess(b, bin, "resume on", env("30s"))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * streams}}
	b.Cleanup(client.CloseIdleConnections)
	tokens := make([]string, streams)
	for i := range tokens {
		tokens[i] = tokenFor(b, "u-"+strconv.Itoa(i), []string{"user"}, map[string]any{"tenant_id": "t-" + strconv.Itoa(i%10)})
	}
	b.ResetTimer()
	for range b.N {
		type figures struct {
			cpu           time.Duration
			events, calls int64
			pipes         float64 // the replay log's round trips
		}
		var figs [2]figures
		children := [2]*child{off, on}
		for round := range 4 {
			i := (round + round/2) % 2 // off, on, on, off
			c := children[i]
			url := "http://" + c.addr + "/api/v2/chat/stream"
			if round < 2 {
				// Warm: connections, tokens, scripts (a first request looks its token up in Redis,
				// and 500 at once from a cold cache can outrun AUTH_BUDGET).
				runStreamsSpread(b, client, url, tokens, 5*time.Second)
			}
			metrics := "http://" + c.addr + "/metrics"
			cpu0, calls0, pipes0 := c.cpu(b), redisCalls(b, r), counter(b, metrics, "sse_replay_pipelines_total")
			n, _ := runStreamsSpread(b, client, url, tokens, 2*time.Second)
			figs[i].cpu += c.cpu(b) - cpu0
			figs[i].calls += redisCalls(b, r) - calls0
			figs[i].pipes += counter(b, metrics, "sse_replay_pipelines_total") - pipes0
			figs[i].events += n
		}
		for i, name := range []string{"resume off", "resume on"} {
			f := figs[i]
			b.Logf("%-10s %5.1f µs CPU/event  %.3f Redis commands/event  %.3f replay round trips/event  (%d events, CPU %v, %d commands)", name,
				micros(f.cpu/time.Duration(f.events)), float64(f.calls)/float64(f.events), f.pipes/float64(f.events), f.events, f.cpu, f.calls)
		}
		b.ReportMetric(micros(figs[0].cpu/time.Duration(figs[0].events)), "off-µs/event")
		b.ReportMetric(micros(figs[1].cpu/time.Duration(figs[1].events)), "on-µs/event")
		b.ReportMetric(float64(figs[1].calls-figs[0].calls)/float64(figs[1].events), "log-commands/event")
		b.ReportMetric(figs[1].pipes/float64(figs[1].events), "log-round-trips/event")

		// Resume latency: finished streams with known request IDs, run all at once, then each
		// resumed from its tenth event, one at a time.
		ids := make([]string, resumes)
		err := inParallel(resumes, streams, func(i int) error {
			ids[i] = "bench-resume-" + strconv.Itoa(i)
			req, _ := http.NewRequest(http.MethodPost, "http://"+on.addr+"/api/v2/chat/stream",
				strings.NewReader(`{"message":"benchmark question","request_id":"`+ids[i]+`"}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer "+tokens[i%len(tokens)])
			res, err := client.Do(req)
			if err != nil {
				return err
			}
			defer res.Body.Close()
			_, err = io.Copy(io.Discard, res.Body)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		lat := make([]time.Duration, 0, resumes)
		for i, id := range ids {
			req, _ := http.NewRequest(http.MethodGet, "http://"+on.addr+"/api/v2/chat/stream/"+id, nil)
			req.Header.Set("Authorization", "Bearer "+tokens[i%len(tokens)])
			req.Header.Set("Last-Event-ID", "10")
			start := time.Now()
			res, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			sc := bufio.NewScanner(res.Body)
			for sc.Scan() {
				if bytes.HasPrefix(sc.Bytes(), []byte("id: 11")) {
					lat = append(lat, time.Since(start))
					break
				}
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if len(lat) != i+1 {
				b.Fatalf("resume %d (status %d) did not replay event 11", i, res.StatusCode)
			}
		}
		slices.Sort(lat)
		b.Logf("resume: first replayed event after p50 %v, p99 %v (%d resumes)", percentile(lat, 0.5).Round(time.Microsecond),
			percentile(lat, 0.99).Round(time.Microsecond), len(lat))
		b.ReportMetric(micros(percentile(lat, 0.5)), "resume-p50-µs")
		b.ReportMetric(micros(percentile(lat, 0.99)), "resume-p99-µs")
	}
}

// pacedUpstream streams lines NDJSON lines spaced by gap, each carrying its send time, so the
// client can measure each event's latency.
func pacedUpstream(tb testing.TB, lines int, gap time.Duration) *httptest.Server {
	return pacedLines(tb, lines, gap, func(buf []byte, last bool) []byte {
		typ := "generation_chunk"
		if last {
			typ = "generation_done"
		}
		buf = append(buf, `{"type":"`...)
		buf = append(buf, typ...)
		buf = append(buf, `","content":"some tokens of the answer","sent_ns":`...)
		buf = strconv.AppendInt(buf, time.Now().UnixNano(), 10)
		return append(buf, "}\n"...)
	})
}

// pacedLines is an algorithm service that answers every query with lines NDJSON lines spaced by
// gap, each made by appendLine (last for the last), starting at a random phase so that streams
// do not tick in lockstep. It allocates nothing per line.
func pacedLines(tb testing.TB, lines int, gap time.Duration, appendLine func(buf []byte, last bool) []byte) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(w)
		rc.Flush()
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
			buf = appendLine(buf[:0], i == lines-1)
			if _, err := w.Write(buf); err != nil {
				return
			}
			rc.Flush()
		}
	}))
	tb.Cleanup(srv.Close)
	return srv
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
