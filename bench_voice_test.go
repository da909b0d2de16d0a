package main

// Benchmarks of voice sessions: CPU per relayed frame and memory per idle session, against the
// bare ReverseProxy, with an echoing algorithm service.

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
)

// relayFigures are one relay's figures at one load.
type relayFigures struct {
	name          string
	cpuPerFrame   time.Duration
	p50, p99      time.Duration
	echoes, sent  int64
	cpu, measured time.Duration
	rtts          []int64 // µs, sorted
}

// relayLoad is the fixed load the relay benchmarks offer, from the environment:
// VOICE_BENCH_SESSIONS (default 100) sessions × 50 frames/s × 640 B on each relay, the relays
// taking turns for VOICE_BENCH_ROUNDS (default 3) windows of VOICE_BENCH_SECONDS (default 5).
type relayLoad struct {
	sessions, rounds int
	window           time.Duration
}

func relayLoadFromEnv(b *testing.B) relayLoad {
	return relayLoad{sessions: envInt(b, "VOICE_BENCH_SESSIONS", 100), rounds: envInt(b, "VOICE_BENCH_ROUNDS", 3),
		window: time.Duration(envInt(b, "VOICE_BENCH_SECONDS", 5)) * time.Second}
}

// relayUnderTest is one relay a benchmark measures: the child process, the URL its sessions
// open, whether they wait for session_initialized and speak OpenAI's Realtime API, and the name
// its figures go by (the child's, unless set).
type relayUnderTest struct {
	c              *child
	url            string
	init, realtime bool
	name           string
}

// bareRelay is the bare httputil.ReverseProxy child c as a relay; gatewayRelay is the gateway
// child c's voice route.
func bareRelay(c *child) relayUnderTest {
	return relayUnderTest{c: c, url: "ws://" + c.addr + "/voice/stream"}
}
func gatewayRelay(c *child) relayUnderTest {
	return relayUnderTest{c: c, url: "ws://" + c.addr + "/api/v2/voice/stream", init: true}
}

// measure measures each relay l.rounds times, in turns whose order rotates each round so that
// the machine's noise, and going first, fall on all alike, and returns each relay's figures
// over all its windows: CPU per relayed frame, and the round trip's p50 and p99.
func (l relayLoad) measure(b *testing.B, load *loadGen, relays []relayUnderTest) []relayFigures {
	b.Helper()
	figs := make([]relayFigures, len(relays))
	for round := range l.rounds {
		for k := range relays {
			i := (k + round) % len(relays)
			r := relays[i]
			f := measureRelayAs(b, load, r.c, r.url, l.sessions, r.init, r.realtime, time.Second, l.window)
			figs[i].name = cmp.Or(r.name, f.name)
			figs[i].cpu += f.cpu
			figs[i].echoes += f.echoes
			figs[i].sent += f.sent
			figs[i].measured += f.measured
			figs[i].rtts = append(figs[i].rtts, f.rtts...)
		}
	}
	for i := range figs {
		figs[i].cpuPerFrame = figs[i].cpu / time.Duration(max(2*figs[i].echoes, 1))
		slices.Sort(figs[i].rtts)
		figs[i].p50, figs[i].p99 = quantile(figs[i].rtts, 0.5), quantile(figs[i].rtts, 0.99)
	}
	return figs
}

// measureRelay has the load generator open sessions through the child at url and offer
// sessions × 50 frames/s for the given time, after a warm-up, timing the echoes on the clients'
// side, and reads the child's CPU over the measured window. The load generator and the echoing
// algorithm service are processes of their own: only the relay's CPU is counted, and nothing
// else in the relay's process competes with it.
func measureRelay(tb testing.TB, load *loadGen, c *child, url string, sessions int, init bool, warm, window time.Duration) relayFigures {
	tb.Helper()
	return measureRelayAs(tb, load, c, url, sessions, init, false, warm, window)
}

// measureRelayAs is measureRelay with sessions that speak OpenAI's Realtime API when realtime.
func measureRelayAs(tb testing.TB, load *loadGen, c *child, url string, sessions int, init, realtime bool, warm, window time.Duration) relayFigures {
	tb.Helper()
	// Opened at 200 a second, and opened again after a 503 as a client would: the openings are
	// not what is measured here (BenchmarkVoiceScale times them).
	rep := load.do(tb, loadCmd{Op: "voice-open", URL: url, N: sessions, Rate: 200, Width: 16, Init: init,
		Secret: testSecret, Retries: 3, Realtime: realtime}, nil)
	if rep.OK != int64(sessions) {
		tb.Fatalf("%s: %d of %d sessions opened: %v", c.name, rep.OK, sessions, rep.Failures)
	}
	if rep.Retried > 0 {
		tb.Logf("%s: %d openings refused with 503 and opened again", c.name, rep.Retried)
	}
	talk, cpu, elapsed := load.measured(tb, c, "", loadCmd{Op: "voice-talk", N: sessions, Warm: warm.Seconds(), Seconds: window.Seconds()})
	load.do(tb, loadCmd{Op: "voice-close"}, nil)
	f := relayFigures{name: c.name, echoes: talk.Got, sent: talk.Sent, cpu: cpu, measured: elapsed, rtts: talk.Lat}
	f.p50, f.p99 = quantile(talk.Lat, 0.5), quantile(talk.Lat, 0.99)
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
// process in front of the same echoing algorithm service (a process of its own), at the same
// fixed load, offered by the load generator (a process of its own too, so that only the relay's
// CPU is counted, and the round trips are what a client sees):
// VOICE_BENCH_SESSIONS (default 100) sessions × 50 frames/s × 640 B. The five take turns, VOICE_BENCH_ROUNDS (default 3) windows of VOICE_BENCH_SECONDS (default 5)
// each, so that the machine's noise falls on all alike. It reports CPU per relayed frame
// (user+sys from /proc, divided by frames up and echoes down) and the round trip's p50 and p99.
func BenchmarkVoiceRelay(b *testing.B) {
	needProcfs(b)
	// The figures go to stdout: a benchmark's log keeps its first ten lines only.
	logf := func(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }
	rl := relayLoadFromEnv(b)
	algo := startEcho(b, "echoing algorithm service")
	bin := buildGateway(b)
	redis := startRedis(b)
	load := startLoad(b)
	relays := []relayUnderTest{
		bareRelay(startBare(b, algo.url)),
		gatewayRelay(startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.url})),
		// Each with keys of its own: the two must not share rate buckets (the built-in policy
		// lets a user open 5 sessions at once, 10 a minute), and each round opens a session per
		// user on each.
		gatewayRelay(startGatewayProcess(b, bin, "voicegate redis", map[string]string{"ALGO_URL": algo.url,
			"REDIS_URL": redis.URL(), "REDIS_PREFIX": "plain:", "INSTANCE_NAME": "plain"})),
		gatewayRelay(startGatewayProcess(b, bin, "voicegate governed", map[string]string{"ALGO_URL": algo.url,
			"REDIS_URL": redis.URL(), "REDIS_PREFIX": "governed:", "INSTANCE_NAME": "governed",
			"POLICY_FILE": benchVoicePolicy(b)})),
		gatewayRelay(startGatewayProcess(b, bin, "voicegate raw", map[string]string{"ALGO_URL": algo.url, "VOICE_RAW_AUDIO": "true"})),
	}
	b.ResetTimer()
	for range b.N {
		figs := rl.measure(b, load, relays)
		base := figs[0].cpuPerFrame
		for _, f := range figs {
			logf("%-18s %6.1f µs CPU/frame (%.2f× bare)  p50 %-9v p99 %-9v  %d echoes of %d frames sent (%.1f%%), CPU %v over %v",
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
	algo := startEcho(b, "echoing algorithm service")
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
		bare := startBare(b, algo.url)
		bareKiB := measure(bare, "ws://"+bare.addr+"/voice/stream", false)
		gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.url})
		gwKiB := measure(gw, "ws://"+gw.addr+"/api/v2/voice/stream", true)
		b.ReportMetric(bareKiB, "bare-KiB/session")
		b.ReportMetric(gwKiB, "gateway-KiB/session")
	}
}
