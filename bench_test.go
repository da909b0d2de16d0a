package main

// What the benchmarks share. Benchmarks of servers under load run the built gateway and its
// standard-library baseline as child processes (the harness's startGatewayProcess and
// startBare), at the same fixed offered load, and read each child's CPU time and memory from
// /proc: a figure per unit of work taken that way holds on a busy machine.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/coder/websocket"
)

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

// openSessions dials n sessions to url, as distinct users of distinct tenants, so that the
// default policy's per-user and per-tenant caps apply as in production; the gateway's first
// message (session_initialized) is read when init is set.
func openSessions(tb testing.TB, url string, n int, init bool) []*websocket.Conn {
	tb.Helper()
	conns := make([]*websocket.Conn, n)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	err := inParallel(n, 16, func(i int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		tok := tokenFor(tb, "u-"+strconv.Itoa(i), []string{"user"}, map[string]any{"tenant_id": "t-" + strconv.Itoa(i)})
		c, res, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: client,
			Subprotocols: []string{"voice-protocol-v2"}, CompressionMode: websocket.CompressionDisabled,
			HTTPHeader: http.Header{"Authorization": {"Bearer " + tok}}})
		if err != nil {
			return fmt.Errorf("session %d: %v (%v)", i, err, res)
		}
		c.SetReadLimit(1 << 20)
		if init {
			if _, _, err := c.Read(ctx); err != nil {
				return fmt.Errorf("session %d: session_initialized: %v", i, err)
			}
		}
		conns[i] = c
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return conns
}

// startRedisB is startRedis for benchmarks.
func startRedisB(b *testing.B) *testRedis {
	b.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("VOICEGATE_REQUIRE_REDIS") == "1" {
			b.Fatal("redis-server not found on PATH, and it is required (VOICEGATE_REQUIRE_REDIS=1)")
		}
		b.Skip("redis-server not installed")
	}
	r := &testRedis{bin: bin, dir: b.TempDir()}
	b.Cleanup(r.Kill)
	for range 5 {
		if r.port, err = freePort(); err != nil {
			b.Fatal(err)
		}
		if err = r.launch(); err == nil {
			return r
		}
	}
	b.Fatalf("redis-server did not start: %v", err)
	return nil
}

// envInt reads a benchmark's size from the environment, or def.
func envInt(tb testing.TB, name string, def int) int {
	tb.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
