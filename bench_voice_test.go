package main

// Benchmarks of voice sessions: CPU per relayed frame and memory per idle session, against the
// bare ReverseProxy, with an echoing algorithm service.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
)

// echoAlgo is the algorithm service of the voice benchmarks: it sends every audio frame back as
// a binary frame (TTS audio), decoding audio_chunk messages and echoing raw frames. It reuses
// its buffers, so that its own cost stays small and flat.
func echoAlgo(tb testing.TB) *fakeAlgo {
	return newAlgo(tb, algoOptions{Voice: func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"voice-protocol-v2"},
			CompressionMode: websocket.CompressionDisabled})
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		in, out := make([]byte, 64<<10), make([]byte, 64<<10)
		key := []byte(`"audio_chunk":"`)
		for {
			typ, rd, err := c.Reader(context.Background())
			if err != nil {
				return
			}
			n, err := io.ReadFull(rd, in)
			if err != io.ErrUnexpectedEOF && err != io.EOF {
				return
			}
			msg := in[:n]
			if typ == websocket.MessageText {
				i := bytes.Index(msg, key)
				if i < 0 {
					continue // a control message
				}
				b64 := msg[i+len(key):]
				b64 = b64[:bytes.IndexByte(b64, '"')]
				m, err := base64.StdEncoding.Decode(out, b64)
				if err != nil {
					return
				}
				msg = out[:m]
			}
			if err := c.Write(context.Background(), websocket.MessageBinary, msg); err != nil {
				return
			}
		}
	}})
}

// voiceLoad is a fixed offered load of sessions, each sending a 640-byte frame (20 ms of
// 16 kHz mono PCM) every 20 ms and timing its echo.
type voiceLoad struct {
	conns   []*websocket.Conn
	echoes  atomic.Int64
	mu      sync.Mutex
	rtts    []time.Duration
	measure atomic.Bool
	wg      sync.WaitGroup
}

// run sends frames on every connection until ctx ends, each session at its own phase.
func (l *voiceLoad) run(ctx context.Context, conns []*websocket.Conn) {
	l.conns = conns
	for i, c := range conns {
		l.wg.Go(func() { l.read(c) })
		l.wg.Go(func() {
			frame := make([]byte, 640)
			phase := time.Duration(i) * 20 * time.Millisecond / time.Duration(len(conns))
			select {
			case <-time.After(phase):
			case <-ctx.Done():
				return
			}
			t := time.NewTicker(20 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				binary.LittleEndian.PutUint64(frame, uint64(time.Now().UnixNano()))
				wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err := c.Write(wctx, websocket.MessageBinary, frame)
				cancel()
				if err != nil {
					return
				}
			}
		})
	}
}

func (l *voiceLoad) read(c *websocket.Conn) {
	buf := make([]byte, 4096)
	for {
		_, rd, err := c.Reader(context.Background())
		if err != nil {
			return
		}
		n, _ := io.ReadFull(rd, buf)
		if n < 8 {
			continue
		}
		rtt := time.Duration(time.Now().UnixNano() - int64(binary.LittleEndian.Uint64(buf)))
		if l.measure.Load() {
			l.echoes.Add(1)
			l.mu.Lock()
			l.rtts = append(l.rtts, rtt)
			l.mu.Unlock()
		}
	}
}

func (l *voiceLoad) stop() {
	for _, c := range l.conns {
		c.CloseNow()
	}
	l.wg.Wait()
}

// relayFigures are one relay's figures at one load.
type relayFigures struct {
	name          string
	cpuPerFrame   time.Duration
	p50, p99      time.Duration
	echoes, sent  int64
	cpu, measured time.Duration
	rtts          []time.Duration
}

// measureRelay offers sessions × 50 frames/s through the child at url for the given time, after
// a warm-up, and reads the child's CPU over the measured window.
func measureRelay(tb testing.TB, c *child, url string, sessions int, init bool, warm, window time.Duration) relayFigures {
	tb.Helper()
	conns := openSessions(tb, url, sessions, init)
	ctx, cancel := context.WithCancel(context.Background())
	l := &voiceLoad{}
	l.run(ctx, conns)
	settle(ctx, warm)
	cpu0 := c.cpu(tb)
	l.measure.Store(true)
	start := time.Now()
	stopProfile := c.profile(tb, window)
	settle(ctx, window)
	stopProfile()
	l.measure.Store(false)
	elapsed := time.Since(start)
	cpu1 := c.cpu(tb)
	cancel()
	l.stop()
	rtts := l.rtts
	slices.Sort(rtts)
	f := relayFigures{name: c.name, echoes: l.echoes.Load(), sent: int64(float64(sessions) * 50 * elapsed.Seconds()),
		cpu: cpu1 - cpu0, measured: elapsed, rtts: rtts}
	if len(rtts) > 0 {
		f.p50, f.p99 = rtts[len(rtts)/2], rtts[len(rtts)*99/100]
	}
	// Each echo is two frames relayed: one up, its echo down.
	if f.echoes > 0 {
		f.cpuPerFrame = f.cpu / time.Duration(2*f.echoes)
	}
	return f
}

// benchVoicePolicy is the built-in policy with voice governance on: daily audio quotas no
// session reaches, a maximum session length, and ten of the sessions' tenants named.
func benchVoicePolicy(tb testing.TB) string {
	return voicePolicy(tb, "good/default.json", func(l *policy.Limits) {
		l.VoiceAudioSecondsPerDay = &policy.AudioQuota{PerUser: 36000, PerTenant: 3600000}
		l.VoiceMaxSession = policy.Duration(2 * time.Hour)
		l.Tenants = map[string]policy.TenantLimits{}
		for i := range 10 {
			l.Tenants["t-"+strconv.Itoa(i)] = policy.TenantLimits{}
		}
	})
}

// BenchmarkVoiceRelay runs the built gateway (its defaults: audio_chunk JSON, access log on),
// the same on a real redis-server (without a voice quota: the built-in policy), the same on
// Redis with voice governance on (a policy with daily audio quotas, a maximum session length
// and named tenants: every session metered, its audio charged as it arrives against reservations
// taken across instances every VOICE_RESERVATION of audio, and its latencies recorded per
// tenant) and, in raw-audio mode, a fourth
// one, beside a bare httputil.ReverseProxy relaying the WebSocket as bytes, each a child
// process in front of the same echoing algorithm service, at the same fixed load:
// VOICE_BENCH_SESSIONS (default 100) sessions × 50 frames/s × 640 B. The five take turns, VOICE_BENCH_ROUNDS (default 3) windows of VOICE_BENCH_SECONDS (default 5)
// each, so that the machine's noise falls on all alike. It reports CPU per relayed frame
// (user+sys from /proc, divided by frames up and echoes down) and the round trip's p50 and p99.
func BenchmarkVoiceRelay(b *testing.B) {
	needProcfs(b)
	sessions := envInt(b, "VOICE_BENCH_SESSIONS", 100)
	rounds := envInt(b, "VOICE_BENCH_ROUNDS", 3)
	window := time.Duration(envInt(b, "VOICE_BENCH_SECONDS", 5)) * time.Second
	algo := echoAlgo(b)
	bin := buildGateway(b)
	redis := startRedis(b)
	relays := []struct {
		c    *child
		path string
		init bool
	}{
		{startBare(b, algo.URL), "/voice/stream", false},
		{startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.URL}), "/api/v2/voice/stream", true},
		{startGatewayProcess(b, bin, "voicegate redis", map[string]string{"ALGO_URL": algo.URL,
			"REDIS_URL": redis.URL(), "INSTANCE_NAME": "plain"}), "/api/v2/voice/stream", true},
		{startGatewayProcess(b, bin, "voicegate governed", map[string]string{"ALGO_URL": algo.URL,
			"REDIS_URL": redis.URL(), "INSTANCE_NAME": "governed",
			"POLICY_FILE": benchVoicePolicy(b)}), "/api/v2/voice/stream", true},
		{startGatewayProcess(b, bin, "voicegate raw", map[string]string{"ALGO_URL": algo.URL, "VOICE_RAW_AUDIO": "true"}), "/api/v2/voice/stream", true},
	}
	b.ResetTimer()
	for range b.N {
		figs := make([]relayFigures, len(relays))
		var rtts [][]time.Duration = make([][]time.Duration, len(relays))
		for round := range rounds {
			for k := range relays {
				i := (k + round) % len(relays)
				r := relays[i]
				f := measureRelay(b, r.c, "ws://"+r.c.addr+r.path, sessions, r.init, time.Second, window)
				figs[i].name = f.name
				figs[i].cpu += f.cpu
				figs[i].echoes += f.echoes
				figs[i].sent += f.sent
				figs[i].measured += f.measured
				rtts[i] = append(rtts[i], f.rtts...)
			}
		}
		for i := range figs {
			figs[i].cpuPerFrame = figs[i].cpu / time.Duration(max(2*figs[i].echoes, 1))
			slices.Sort(rtts[i])
			if n := len(rtts[i]); n > 0 {
				figs[i].p50, figs[i].p99 = rtts[i][n/2], rtts[i][n*99/100]
			}
		}
		base := figs[0].cpuPerFrame
		for _, f := range figs {
			b.Logf("%-18s %6.1f µs CPU/frame (%.2f× bare)  p50 %-9v p99 %-9v  %d echoes of %d frames sent (%.1f%%), CPU %v over %v",
				f.name, micros(f.cpuPerFrame), float64(f.cpuPerFrame)/float64(base), f.p50.Round(10*time.Microsecond),
				f.p99.Round(10*time.Microsecond), f.echoes, f.sent, 100*float64(f.echoes)/float64(max(f.sent, 1)), f.cpu, f.measured.Round(time.Millisecond))
		}
		b.ReportMetric(micros(figs[0].cpuPerFrame), "bare-µs/frame")
		b.ReportMetric(micros(figs[1].cpuPerFrame), "gateway-µs/frame")
		b.ReportMetric(micros(figs[2].cpuPerFrame), "redis-µs/frame")
		b.ReportMetric(micros(figs[3].cpuPerFrame), "governed-µs/frame")
		b.ReportMetric(micros(figs[4].cpuPerFrame), "raw-µs/frame")
		b.ReportMetric(float64(figs[1].cpuPerFrame)/float64(base), "gateway/bare")
		b.ReportMetric(float64(figs[3].cpuPerFrame)/float64(figs[2].cpuPerFrame), "governed/ungoverned")
		b.ReportMetric(float64(figs[4].cpuPerFrame)/float64(base), "raw/bare")
		b.ReportMetric(micros(figs[0].p99), "bare-p99-µs")
		b.ReportMetric(micros(figs[1].p99), "gateway-p99-µs")
		b.ReportMetric(micros(figs[3].p99), "governed-p99-µs")
		b.ReportMetric(micros(figs[4].p99), "raw-p99-µs")
	}
}

// BenchmarkVoiceIdleMemory holds VOICE_BENCH_IDLE (default 3000) idle sessions open through
// the built gateway (defaults) and through the bare ReverseProxy, each a child process, and
// reports each child's RSS growth per session.
func BenchmarkVoiceIdleMemory(b *testing.B) {
	needProcfs(b)
	n := envInt(b, "VOICE_BENCH_IDLE", 3000)
	algo := echoAlgo(b)
	bin := buildGateway(b)
	b.ResetTimer()
	for range b.N {
		measure := func(c *child, url string, init bool) float64 {
			// A few sessions first, so that what is made once (pools, the clock, TLS-free
			// transports) is not charged to the held ones.
			for _, c := range openSessions(b, url, 10, init) {
				c.Close(websocket.StatusNormalClosure, "")
			}
			settle(context.Background(), time.Second)
			before := c.rss(b)
			conns := openSessions(b, url, n, init)
			settle(context.Background(), 3*time.Second)
			after := c.rss(b)
			for _, c := range conns {
				c.CloseNow()
			}
			per := float64(after-before) / float64(n) / 1024
			b.Logf("%-18s RSS %d MiB → %d MiB with %d idle sessions: %.1f KiB each", c.name, before>>20, after>>20, n, per)
			return per
		}
		bare := startBare(b, algo.URL)
		bareKiB := measure(bare, "ws://"+bare.addr+"/voice/stream", false)
		gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.URL})
		gwKiB := measure(gw, "ws://"+gw.addr+"/api/v2/voice/stream", true)
		b.ReportMetric(bareKiB, "bare-KiB/session")
		b.ReportMetric(gwKiB, "gateway-KiB/session")
	}
}
