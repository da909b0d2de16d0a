package main

import (
	"bufio"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// runStreams opens a concurrent chat stream to url per token, reads every event, and returns
// how many upstream lines arrived (events carrying sent_ns) and their latencies.
func runStreams(tb testing.TB, client *http.Client, url string, tokens []string) (lines int64, lat []time.Duration) {
	tb.Helper()
	var n atomic.Int64
	var mu sync.Mutex
	err := inParallel(len(tokens), len(tokens), func(i int) error {
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(`{"message":"benchmark question"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tokens[i])
		res, err := client.Do(req)
		if err != nil {
			return err
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("stream %d: status %d", i, res.StatusCode)
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
// algorithm service, at the same load: SSE_BENCH_STREAMS (default 100) concurrent streams of
// 100 lines 20 ms apart, SSE_BENCH_ROUNDS (default 3) times each, alternating. It reports CPU
// per event (user+sys from /proc, divided by the upstream lines relayed).
func BenchmarkSSEProcess(b *testing.B) {
	needProcfs(b)
	streams := envInt(b, "SSE_BENCH_STREAMS", 100)
	rounds := envInt(b, "SSE_BENCH_ROUNDS", 3)
	const lines = 100
	algo := pacedUpstream(b, lines, 20*time.Millisecond)
	bin := buildGateway(b)
	bare := startBare(b, algo.URL)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.URL})
	b.Logf("bare on %s, gateway on %s", bare.addr, gw.addr)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * streams}}
	// A user per stream, each of its own tenant, so that the default policy's caps apply as in
	// production; a user keeps its token from one question to the next.
	tokens := make([]string, streams)
	for i := range tokens {
		tokens[i] = tokenFor(b, "u-"+strconv.Itoa(i), []string{"user"}, map[string]any{"tenant_id": "t-" + strconv.Itoa(i)})
	}
	b.ResetTimer()
	for range b.N {
		type figures struct {
			cpu    time.Duration
			events int64
			lat    []time.Duration
		}
		var fb, fg figures
		measure := func(c *child, url string, f *figures, round int) {
			if round == 0 { // the users' first questions, before the measured ones
				runStreams(b, client, url, tokens)
			}
			cpu0 := c.cpu(b)
			stopProfile := func() {}
			if round == 0 {
				stopProfile = c.profile(b, 2*time.Second*time.Duration(lines)/100)
			}
			n, lat := runStreams(b, client, url, tokens)
			stopProfile()
			f.cpu += c.cpu(b) - cpu0
			f.events += n
			f.lat = append(f.lat, lat...)
		}
		for round := range rounds {
			if round%2 == 0 {
				measure(bare, "http://"+bare.addr+"/api/v2/chat/stream", &fb, round)
				measure(gw, "http://"+gw.addr+"/api/v2/chat/stream", &fg, round)
			} else {
				measure(gw, "http://"+gw.addr+"/api/v2/chat/stream", &fg, round)
				measure(bare, "http://"+bare.addr+"/api/v2/chat/stream", &fb, round)
			}
		}
		if want := int64(rounds * streams * lines); fb.events != want || fg.events != want {
			b.Fatalf("events relayed: bare %d, gateway %d, want %d each", fb.events, fg.events, want)
		}
		per := func(f figures) time.Duration { return f.cpu / time.Duration(f.events) }
		for _, f := range []struct {
			name string
			f    figures
		}{{"bare ReverseProxy", fb}, {"voicegate", fg}} {
			slices.Sort(f.f.lat)
			b.Logf("%-18s %5.1f µs CPU/event (%.2f× bare)  p50 %v p99 %v  (%d events, CPU %v)", f.name,
				micros(per(f.f)), float64(per(f.f))/float64(per(fb)), percentile(f.f.lat, 0.5).Round(time.Microsecond),
				percentile(f.f.lat, 0.99).Round(time.Microsecond), f.f.events, f.f.cpu)
		}
		b.ReportMetric(micros(per(fb)), "bare-µs/event")
		b.ReportMetric(micros(per(fg)), "gateway-µs/event")
		b.ReportMetric(float64(per(fg))/float64(per(fb)), "gateway/bare")
	}
}
