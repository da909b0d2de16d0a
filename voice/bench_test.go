package voice_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
)

// envInt reads a positive integer from the environment, or returns def.
func envInt(tb testing.TB, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// dialer opens one WebSocket: to the gateway or directly to the fake.
type dialer func(ctx context.Context) (*websocket.Conn, error)

func (e *env) gatewayDialer() dialer {
	return func(ctx context.Context) (*websocket.Conn, error) {
		c, _, err := e.dial(ctx, "", nil)
		return c, err
	}
}

func (e *env) directDialer() dialer {
	return func(ctx context.Context) (*websocket.Conn, error) {
		c, _, err := websocket.Dial(ctx, e.fake.srv.URL+"/voice/stream", &websocket.DialOptions{
			HTTPClient: e.fake.srv.Client(), Subprotocols: []string{voice.Subprotocol},
		})
		if c != nil {
			c.SetReadLimit(8 << 20)
		}
		return c, err
	}
}

// openAll opens n connections, a few at a time; each is passed to ready once open.
func openAll(b *testing.B, n int, dial dialer, ready func(*websocket.Conn) error) []*websocket.Conn {
	b.Helper()
	conns := make([]*websocket.Conn, n)
	sem := make(chan struct{}, 16)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 3*wait)
			defer cancel()
			c, err := dial(ctx)
			if err == nil && ready != nil {
				err = ready(c)
			}
			if err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
				return
			}
			conns[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		for _, c := range conns {
			if c != nil {
				c.CloseNow()
			}
		}
		b.Fatal(err)
	}
	return conns
}

// closeAll closes conns with 1000, a few at a time.
func closeAll(conns []*websocket.Conn) {
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if c.Close(websocket.StatusNormalClosure, "") != nil {
				c.CloseNow()
			}
		}()
	}
	wg.Wait()
}

// echoClient sends timestamped 640-byte frames and times their echoes.
type echoClient struct {
	c     *websocket.Conn
	frame []byte
	sent  int64        // owned by the round's sender
	recv  atomic.Int64 // echoes read
	rtts  []time.Duration
	done  chan struct{}
}

// read times every binary echo until the connection ends; text (session_initialized) is
// skipped.
func (ec *echoClient) read(base time.Time) {
	defer close(ec.done)
	for {
		typ, b, err := ec.c.Read(context.Background())
		if err != nil {
			return
		}
		if typ != websocket.MessageBinary || len(b) < 8 {
			continue
		}
		sent := time.Duration(binary.LittleEndian.Uint64(b))
		ec.rtts = append(ec.rtts, time.Since(base)-sent)
		ec.recv.Add(1) // publishes the append to whoever sees the count
	}
}

// latencies runs one round: every client sends frames, one every 20 ms, staggered across the
// 20 ms so the load is even; it waits for every echo and returns the round trips.
func latencies(b *testing.B, clients []*echoClient, frames int, base time.Time) []time.Duration {
	b.Helper()
	const period = 20 * time.Millisecond
	start := time.Now()
	var wg sync.WaitGroup
	for i, ec := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			offset := period * time.Duration(i) / time.Duration(len(clients))
			for k := range frames {
				time.Sleep(time.Until(start.Add(offset + time.Duration(k)*period)))
				binary.LittleEndian.PutUint64(ec.frame, uint64(time.Since(base)))
				if err := ec.c.Write(context.Background(), websocket.MessageBinary, ec.frame); err != nil {
					return
				}
				ec.sent++
			}
		}()
	}
	wg.Wait()
	var want, got int64
	deadline := time.Now().Add(2 * wait)
	for {
		want, got = 0, 0
		for _, ec := range clients {
			want += ec.sent
			got += ec.recv.Load()
		}
		if got >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if want != int64(frames*len(clients)) || got != want {
		b.Fatalf("frames lost: planned %d, sent %d, echoed %d", frames*len(clients), want, got)
	}
	var all []time.Duration
	for _, ec := range clients {
		all = append(all, ec.rtts...)
		ec.rtts = ec.rtts[:0]
		ec.recv.Store(0)
		ec.sent = 0
	}
	return all
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// BenchmarkVoiceLatency measures the round trip of 640-byte audio frames, 50 a second per
// session, echoed by the fake algorithm service: through the gateway, and directly to the same
// fake, in alternating one-second rounds so that both halves share the machine's noise.
// VOICE_BENCH_SESSIONS (default 500) and VOICE_BENCH_SECONDS (per path, default 10) shrink it.
func BenchmarkVoiceLatency(b *testing.B) {
	sessions := envInt(b, "VOICE_BENCH_SESSIONS", 500)
	seconds := envInt(b, "VOICE_BENCH_SECONDS", 10)
	e := newEnv(b, setup{opts: voice.Options{RawAudio: true}, serve: echo, quiet: true})

	base := time.Now()
	start := func(conns []*websocket.Conn) []*echoClient {
		clients := make([]*echoClient, len(conns))
		for i, c := range conns {
			clients[i] = &echoClient{c: c, frame: make([]byte, 640), done: make(chan struct{})}
			go clients[i].read(base)
		}
		return clients
	}
	stop := func(clients []*echoClient) {
		conns := make([]*websocket.Conn, len(clients))
		for i, ec := range clients {
			conns[i] = ec.c
		}
		closeAll(conns)
		for _, ec := range clients {
			<-ec.done
		}
	}
	direct := start(openAll(b, sessions, e.directDialer(), nil))
	defer stop(direct)
	gateway := start(openAll(b, sessions, e.gatewayDialer(), nil))
	defer stop(gateway)
	if n := e.reg.Len(); n != sessions {
		b.Fatalf("%d gateway sessions open, want %d", n, sessions)
	}

	b.ResetTimer()
	for range b.N {
		var d, g []time.Duration
		for round := range seconds {
			if round%2 == 0 {
				d = append(d, latencies(b, direct, 50, base)...)
				g = append(g, latencies(b, gateway, 50, base)...)
			} else {
				g = append(g, latencies(b, gateway, 50, base)...)
				d = append(d, latencies(b, direct, 50, base)...)
			}
		}
		slices.Sort(d)
		slices.Sort(g)
		b.ReportMetric(micros(percentile(d, 0.50)), "direct-p50-µs")
		b.ReportMetric(micros(percentile(d, 0.99)), "direct-p99-µs")
		b.ReportMetric(micros(percentile(g, 0.50)), "gateway-p50-µs")
		b.ReportMetric(micros(percentile(g, 0.99)), "gateway-p99-µs")
		b.ReportMetric(micros(percentile(g, 0.99)-percentile(d, 0.99)), "added-p99-µs")
		b.ReportMetric(float64(len(g)), "frames/path")
		b.Logf("%d sessions × 50 frames/s × %d s per path, no frame lost (%d echoed per path)", sessions, seconds, len(g))
		for _, p := range []struct {
			name string
			rtts []time.Duration
		}{{"direct ", d}, {"gateway", g}} {
			b.Logf("%s p50 %v  p90 %v  p99 %v  p99.9 %v  max %v", p.name, percentile(p.rtts, 0.5),
				percentile(p.rtts, 0.9), percentile(p.rtts, 0.99), percentile(p.rtts, 0.999), p.rtts[len(p.rtts)-1])
		}
	}
}

// inUse is the heap and stack memory in use after the garbage is collected.
func inUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

// BenchmarkIdleSessionMemory measures what an idle session costs: 2,000 sessions are opened
// client ↔ gateway ↔ fake, then the same number of connections client ↔ fake directly; the
// difference per session is the gateway's share (both of its connections, heap and stacks).
// VOICE_BENCH_IDLE (default 2000) changes the count.
func BenchmarkIdleSessionMemory(b *testing.B) {
	n := envInt(b, "VOICE_BENCH_IDLE", 2000)
	e := newEnv(b, setup{opts: voice.Options{PingInterval: time.Hour, IdleTimeout: time.Hour}, serve: echo, quiet: true})
	readInit := func(c *websocket.Conn) error {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		_, _, err := c.Read(ctx)
		return err
	}
	settle := func(sessions, fakes int) uint64 {
		eventually(b, 3*wait, "sessions settle", func() bool { return e.reg.Len() == sessions && e.fake.open() == fakes })
		time.Sleep(100 * time.Millisecond) // let every goroutine park
		return inUse()
	}

	b.ResetTimer()
	for range b.N {
		m0 := settle(0, 0)
		conns := openAll(b, n, e.gatewayDialer(), readInit)
		m1 := settle(n, n)
		closeAll(conns)
		m2 := settle(0, 0)
		conns = openAll(b, n, e.directDialer(), nil)
		m3 := settle(0, n)
		closeAll(conns)
		settle(0, 0)

		whole := float64(int64(m1)-int64(m0)) / float64(n) / 1024
		direct := float64(int64(m3)-int64(m2)) / float64(n) / 1024
		b.ReportMetric(whole-direct, "gateway-KiB/session")
		b.ReportMetric(direct, "direct-KiB/session")
		b.ReportMetric(whole, "path-KiB/session")
		b.Logf("%d idle sessions: whole path %.1f KiB each, direct %.1f KiB each, gateway's share %.1f KiB",
			n, whole, direct, whole-direct)
	}
}
