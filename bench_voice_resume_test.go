package main

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkVoiceResumeCost is the cost of resuming in the normal case, with nobody dropping:
// the built gateway with resuming on (every downlink message numbered and kept in the session's
// ring; a 5 s window) against the same with resuming off (VOICE_RESUME_WINDOW=0s), both on a real
// redis-server, beside the bare ReverseProxy, each a child process in front of the same echoing
// algorithm service, at the same fixed load offered by the load generator (BenchmarkVoiceRelay's
// harness): VOICE_BENCH_SESSIONS (default 100) sessions × 50 frames/s × 640 B, taking turns for
// VOICE_BENCH_ROUNDS (default 3) windows of VOICE_BENCH_SECONDS (default 5). It reports CPU per
// relayed frame of each, and resume-on/resume-off (the target: at most 1.05).
func BenchmarkVoiceResumeCost(b *testing.B) {
	needProcfs(b)
	logf := func(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }
	rl := relayLoadFromEnv(b)
	algo := startEcho(b, "echoing algorithm service")
	bin := buildGateway(b)
	redis := startRedis(b)
	load := startLoad(b)
	relays := []relayUnderTest{
		bareRelay(startBare(b, algo.url)),
		// Each with keys of its own: the two must not share rate buckets and slots. The load
		// generator ends its sessions by dropping their connections, which a session with
		// resuming on outlives by its window: 5 s lets them go before its next turn.
		gatewayRelay(startGatewayProcess(b, bin, "resume off", map[string]string{"ALGO_URL": algo.url,
			"REDIS_URL": redis.URL(), "REDIS_PREFIX": "off:", "INSTANCE_NAME": "off", "VOICE_RESUME_WINDOW": "0s"})),
		gatewayRelay(startGatewayProcess(b, bin, "resume on", map[string]string{"ALGO_URL": algo.url,
			"REDIS_URL": redis.URL(), "REDIS_PREFIX": "on:", "INSTANCE_NAME": "on", "VOICE_RESUME_WINDOW": "5s"})),
	}
	b.ResetTimer()
	for range b.N {
		figs := rl.measure(b, load, relays)
		base := figs[0].cpuPerFrame
		for _, f := range figs {
			logf("%-12s %6.1f µs CPU/frame (%.2f× bare)  p50 %-9v p99 %-9v  %d echoes of %d frames sent, CPU %v over %v",
				f.name, micros(f.cpuPerFrame), float64(f.cpuPerFrame)/float64(base), f.p50.Round(10*time.Microsecond),
				f.p99.Round(10*time.Microsecond), f.echoes, f.sent, f.cpu, f.measured.Round(time.Millisecond))
		}
		ratio := float64(figs[2].cpuPerFrame) / float64(figs[1].cpuPerFrame)
		logf("resume on / resume off: %.3f× CPU per relayed frame", ratio)
		b.ReportMetric(micros(figs[0].cpuPerFrame), "bare-µs/frame")
		b.ReportMetric(micros(figs[1].cpuPerFrame), "off-µs/frame")
		b.ReportMetric(micros(figs[2].cpuPerFrame), "on-µs/frame")
		b.ReportMetric(ratio, "on/off")
	}
}
