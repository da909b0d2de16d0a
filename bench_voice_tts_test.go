package main

// The cost of TTS pacing: CPU per relayed frame with VOICE_TTS_PACING on and off, in one run,
// against the bare ReverseProxy, with an algorithm service that answers in bursts as a TTS
// engine does.

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// ttsBurst is how many frames the bursting service holds and then sends back at once: 500 ms
// of audio, twice the default lead, so that the paced gateway holds some of every burst and
// releases it on its timer.
const ttsBurst = 25

// burstVoice is an algorithm service that answers audio with TTS faster than real time: it
// keeps each frame of audio it receives (an audio_chunk's payload, or a binary frame) and, every
// ttsBurst frames, sends them all back as binary frames at once.
func burstVoice(w http.ResponseWriter, r *http.Request) {
	audio, err := acceptAudio(w, r)
	if err != nil {
		return
	}
	defer audio.c.CloseNow()
	held := make([][]byte, 0, ttsBurst)
	for {
		frame, err := audio.next()
		if err != nil {
			return
		}
		held = append(held, bytes.Clone(frame))
		if len(held) < ttsBurst {
			continue
		}
		for _, f := range held {
			if err := audio.c.Write(context.Background(), websocket.MessageBinary, f); err != nil {
				return
			}
		}
		held = held[:0]
	}
}

// BenchmarkVoiceTTSPacing runs the built gateway with TTS pacing on (its default) and off, and a
// bare httputil.ReverseProxy, each a child process in front of the same bursting algorithm
// service (burstVoice, a process of its own), at the same fixed load offered by the load
// generator (a process of its own): VOICE_BENCH_SESSIONS (100) sessions × 50 frames/s × 640 B
// up, the same frames back as TTS in bursts of 500 ms. They take turns, VOICE_BENCH_ROUNDS (3)
// windows of VOICE_BENCH_SECONDS (5). It reports CPU per relayed frame (up and down) and what
// pacing adds per TTS frame. The round trips it would time are the bursts' and the pacing's,
// not the relays': they are not reported.
func BenchmarkVoiceTTSPacing(b *testing.B) {
	needProcfs(b)
	logf := func(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }
	rl := relayLoadFromEnv(b)
	algo := startChild(b, childOptions{name: "bursting algorithm service", role: "voice-burst"})
	bin := buildGateway(b)
	load := startLoad(b)
	relays := []relayUnderTest{
		bareRelay(startBare(b, algo.url)),
		gatewayRelay(startGatewayProcess(b, bin, "pacing off", map[string]string{"ALGO_URL": algo.url, "VOICE_TTS_PACING": "false"})),
		gatewayRelay(startGatewayProcess(b, bin, "pacing on", map[string]string{"ALGO_URL": algo.url})),
	}
	b.ResetTimer()
	for range b.N {
		figs := rl.measure(b, load, relays)
		base := figs[0].cpuPerFrame
		for _, f := range figs {
			logf("%-12s %6.1f µs CPU/frame (%.2f× bare)  %d TTS frames back of %d sent (%.1f%%), CPU %v over %v",
				f.name, micros(f.cpuPerFrame), float64(f.cpuPerFrame)/float64(base), f.echoes, f.sent,
				100*float64(f.echoes)/float64(max(f.sent, 1)), f.cpu, f.measured.Round(time.Millisecond))
		}
		off, on := figs[1], figs[2]
		perTTS := func(f relayFigures) float64 { return micros(f.cpu / time.Duration(max(f.echoes, 1))) }
		added := perTTS(on) - perTTS(off)
		logf("pacing adds %.1f µs of CPU per TTS frame (%.1f on, %.1f off, per echoed frame and its upstream frame)",
			added, perTTS(on), perTTS(off))
		b.ReportMetric(micros(figs[0].cpuPerFrame), "bare-µs/frame")
		b.ReportMetric(micros(off.cpuPerFrame), "off-µs/frame")
		b.ReportMetric(micros(on.cpuPerFrame), "on-µs/frame")
		b.ReportMetric(added, "pacing-µs/tts-frame")
	}
}
