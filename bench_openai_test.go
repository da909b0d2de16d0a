package main

// Benchmarks of the OpenAI-compatible routes against voicegate's own, in one gateway process at
// the same offered load: CPU per streamed chunk of POST /v1/chat/completions against POST
// /api/v2/chat/stream, and CPU per relayed audio frame of GET /v1/realtime against GET
// /api/v2/voice/stream, with the bare ReverseProxy beside them.

import (
	"fmt"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"
)

// stampedUpstream is pacedUpstream with the send time in each chunk's text ("… sent_ns=<ns>"),
// which OpenAI's chunks carry as the v2 events do: lines-1 generation_chunks, then
// generation_done with usage.
func stampedUpstream(tb testing.TB, lines int, gap time.Duration) *httptest.Server {
	return pacedLines(tb, lines, gap, func(buf []byte, last bool) []byte {
		if last {
			return append(buf, `{"type":"generation_done","finish_reason":"stop","usage":{"prompt_tokens":3,"completion_tokens":99}}`+"\n"...)
		}
		buf = append(buf, `{"type":"generation_chunk","content":"some tokens of the answer sent_ns=`...)
		buf = strconv.AppendInt(buf, time.Now().UnixNano(), 10)
		return append(buf, "\"}\n"...)
	})
}

// BenchmarkChatCompletionsProcess runs the built gateway (its defaults, access log on) and a bare
// httputil.ReverseProxy, child processes in front of the same algorithm service, and has the
// load generator offer the same load to POST /v1/chat/completions (stream: true) and to POST
// /api/v2/chat/stream on the one gateway, and to the bare proxy: SSE_BENCH_STREAMS (default 100)
// concurrent streams of 100 lines 20 ms apart, their starts spread over a second,
// SSE_BENCH_ROUNDS (default 3) rounds, the three taking turns. It reports CPU per streamed
// chunk (user+sys from /proc over the round, divided by the chunks that reached the clients)
// and the OpenAI route's ratio to the v2 route's.
func BenchmarkChatCompletionsProcess(b *testing.B) {
	needProcfs(b)
	streams := envInt(b, "SSE_BENCH_STREAMS", 100)
	rounds := envInt(b, "SSE_BENCH_ROUNDS", 3)
	const lines = 100
	algo := stampedUpstream(b, lines, 20*time.Millisecond)
	bin := buildGateway(b)
	bare := startBare(b, algo.URL)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.URL})
	load := startLoad(b)
	type target struct {
		name, url, body string
		c               *child
		cpu             time.Duration
		chunks          int64
		lat             []int64
	}
	targets := []*target{
		{name: "bare ReverseProxy", url: "http://" + bare.addr + "/api/v2/chat/stream", body: `{"message":"benchmark question"}`, c: bare},
		{name: "/api/v2/chat/stream", url: "http://" + gw.addr + "/api/v2/chat/stream", body: `{"message":"benchmark question"}`, c: gw},
		{name: "/v1/chat/completions", url: "http://" + gw.addr + "/v1/chat/completions", c: gw,
			body: `{"model":"default","stream":true,"messages":[{"role":"user","content":"benchmark question"}]}`},
	}
	cmd := func(t *target) loadCmd {
		return loadCmd{Op: "sse", URL: t.url, N: streams, Secret: testSecret, Body: t.body, Seconds: 2}
	}
	b.ResetTimer()
	for range b.N {
		for _, t := range targets {
			load.do(b, cmd(t), nil) // the users' first questions, before the measured ones
		}
		for round := range rounds {
			for k := range targets {
				t := targets[(k+round)%len(targets)]
				rep, cpu, _ := load.measured(b, t.c, fmt.Sprint(t.name, " round ", round), cmd(t))
				if len(rep.Failures) > 0 {
					if t.c == gw {
						b.Errorf("%s: %v", t.name, rep.Failures)
					} else {
						b.Logf("%s: %v", t.name, rep.Failures)
					}
				}
				t.cpu += cpu
				t.chunks += rep.Got
				t.lat = append(t.lat, rep.Lat...)
			}
		}
		per := func(t *target) time.Duration { return t.cpu / time.Duration(max(t.chunks, 1)) }
		for _, t := range targets[1:] {
			if want := int64(rounds * streams * (lines - 1)); t.chunks != want {
				b.Fatalf("%s: %d chunks reached the clients, want %d", t.name, t.chunks, want)
			}
		}
		for _, t := range targets {
			slices.Sort(t.lat)
			fmt.Printf("    %-22s %5.1f µs CPU/chunk (%.2f× bare, %.2f× v2)  p50 %v p99 %v  (%d chunks, CPU %v)\n", t.name,
				micros(per(t)), float64(per(t))/float64(per(targets[0])), float64(per(t))/float64(per(targets[1])),
				quantile(t.lat, 0.5), quantile(t.lat, 0.99), t.chunks, t.cpu)
		}
		b.ReportMetric(micros(per(targets[0])), "bare-µs/chunk")
		b.ReportMetric(micros(per(targets[1])), "v2-µs/chunk")
		b.ReportMetric(micros(per(targets[2])), "openai-µs/chunk")
		b.ReportMetric(float64(per(targets[2]))/float64(per(targets[1])), "openai/v2")
	}
}

// BenchmarkRealtimeRelay runs the built gateway (its defaults) and a bare httputil.ReverseProxy,
// child processes in front of the same echoing algorithm service, and has the load generator
// hold VOICE_BENCH_SESSIONS (default 100) sessions × 50 frames/s × 640 B on GET /v1/realtime
// (each frame an input_audio_buffer.append event, each echo a response.output_audio.delta), on
// GET /api/v2/voice/stream (binary frames) of the same gateway, and on the bare proxy (binary
// frames relayed as bytes), VOICE_BENCH_ROUNDS (default 3) windows of VOICE_BENCH_SECONDS
// (default 5) each, taking turns. It reports CPU per relayed frame (frames up and echoes down)
// and the round trip's p50 and p99.
func BenchmarkRealtimeRelay(b *testing.B) {
	needProcfs(b)
	rl := relayLoadFromEnv(b)
	algo := startEcho(b, "echoing algorithm service")
	bin := buildGateway(b)
	load := startLoad(b)
	gw := startGatewayProcess(b, bin, "voicegate", map[string]string{"ALGO_URL": algo.url})
	bare, v2 := bareRelay(startBare(b, algo.url)), gatewayRelay(gw)
	bare.name, v2.name = "bare ReverseProxy", "/api/v2/voice/stream"
	relays := []relayUnderTest{bare, v2,
		{c: gw, url: "ws://" + gw.addr + "/v1/realtime", init: true, realtime: true, name: "/v1/realtime"}}
	b.ResetTimer()
	for range b.N {
		figs := rl.measure(b, load, relays)
		for i := range figs {
			if figs[i].echoes < figs[i].sent*99/100 {
				b.Errorf("%s: %d echoes of %d frames sent", figs[i].name, figs[i].echoes, figs[i].sent)
			}
		}
		for _, f := range figs {
			fmt.Printf("    %-22s %6.1f µs CPU/frame (%.2f× bare, %.2f× v2)  p50 %-9v p99 %-9v  %d echoes of %d frames, CPU %v\n",
				f.name, micros(f.cpuPerFrame), float64(f.cpuPerFrame)/float64(figs[0].cpuPerFrame),
				float64(f.cpuPerFrame)/float64(figs[1].cpuPerFrame), f.p50.Round(10*time.Microsecond),
				f.p99.Round(10*time.Microsecond), f.echoes, f.sent, f.cpu)
		}
		b.ReportMetric(micros(figs[0].cpuPerFrame), "bare-µs/frame")
		b.ReportMetric(micros(figs[1].cpuPerFrame), "v2-µs/frame")
		b.ReportMetric(micros(figs[2].cpuPerFrame), "realtime-µs/frame")
		b.ReportMetric(float64(figs[2].cpuPerFrame)/float64(figs[1].cpuPerFrame), "realtime/v2")
	}
}
