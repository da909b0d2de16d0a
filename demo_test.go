package main

// The demo: -demo with its banner, tokens and addresses, its speech, and voicegate demo-algo
// serving the demo's algorithm service alone.

import (
	"bytes"
	"context"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestDemo(t *testing.T) {
	t.Parallel()
	g := startRun(t, []string{"-demo"}, map[string]string{})

	want := "curl -N http://" + g.Addr + "/api/v2/chat/stream"
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(g.Stdout.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("stdout does not show %q:\n%s", want, g.Stdout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(g.Stderr.String(), "DEMO MODE") {
		t.Errorf("no DEMO MODE warning in the log:\n%s", g.Stderr)
	}

	evs := readEvents(t, wantStream(t, postChat(t, g, `{"message":"what is voicegate?"}`, nil)))
	n := len(evs)
	if n < 4 || evs[0].Event != "stream_start" || evs[n-2].Event != "generation_done" || evs[n-1].Event != "stream_end" {
		t.Fatalf("events = %v, want stream_start … generation_done stream_end", eventNames(evs))
	}
	var answer strings.Builder
	chunks := 0
	for _, e := range evs {
		if e.Event == "generation_chunk" {
			chunks++
			answer.WriteString(e.fields(t)["content"].(string))
		}
	}
	if chunks < 2 || !strings.Contains(answer.String(), "what is voicegate?") {
		t.Errorf("%d generation_chunk events with answer %q, want several quoting the question", chunks, answer.String())
	}
}

// TestDemoSpeech: the demo's TTS is audible speech-like sound at whatever rate the session
// has: the right length, loud enough, never clipped, voiced (energy at the pitch's harmonics,
// not at a frequency between them) and silent in the pauses between syllables.
func TestDemoSpeech(t *testing.T) {
	t.Parallel()
	words := strings.Fields("one two three four five six seven eight nine ten eleven twelve thirteen")
	for _, rate := range []int{8000, 16000, 24000, 48000} {
		pcm := demoSpeech(words, rate)
		per := int(float64(rate) * 0.23)
		if want := 12 * per * 2; len(pcm) != want {
			t.Errorf("%d Hz: %d bytes, want %d (12 syllables of 230 ms)", rate, len(pcm), want)
			continue
		}
		sample := func(i int) float64 { return float64(int16(uint16(pcm[2*i])|uint16(pcm[2*i+1])<<8)) / 32768 }
		var sum, peak float64
		for i := range len(pcm) / 2 {
			v := sample(i)
			sum += v * v
			peak = max(peak, math.Abs(v))
		}
		rms := math.Sqrt(sum / float64(len(pcm)/2))
		if rms < 0.02 || peak >= 0.999 {
			t.Errorf("%d Hz: rms %.3f, peak %.3f; want audible and unclipped", rate, rms, peak)
		}
		// The pause at the end of the first syllable (180–230 ms) is silent.
		for i := int(0.185 * float64(rate)); i < per; i++ {
			if sample(i) != 0 {
				t.Errorf("%d Hz: sample %d in the pause is %f", rate, i, sample(i))
				break
			}
		}
		// Voiced: the first syllable's middle (its pitch near 130 Hz) has far more energy at
		// the pitch than halfway between two harmonics.
		mid := pcm[2*int(0.06*float64(rate)) : 2*int(0.12*float64(rate))]
		if f0, between := toneLevel(mid, rate, 130), toneLevel(mid, rate, 195); f0 < 3*between {
			t.Errorf("%d Hz: level %.4f at the pitch, %.4f between harmonics; want a voiced sound", rate, f0, between)
		}
	}
}

// TestDemoBannerTokens: the -demo banner tells how to mint more tokens with go run . token;
// started with the user's own JWT_SECRET it says so, and tokens minted for that secret work
// against it.
func TestDemoBannerTokens(t *testing.T) {
	waitBanner := func(g *testGateway) string {
		eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(g.Stdout.String(), "Ctrl-C") })
		return g.Stdout.String()
	}
	made := startRun(t, []string{"-demo"}, map[string]string{"JWT_SECRET": ""})
	banner := waitBanner(made)
	for _, want := range []string{"go run . token", "JWT_SECRET", "made up for this run"} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner without JWT_SECRET does not mention %q:\n%s", want, banner)
		}
	}

	own := startRun(t, []string{"-demo"}, nil) // startRun sets JWT_SECRET=testSecret
	banner = waitBanner(own)
	if !strings.Contains(banner, "your JWT_SECRET") || !strings.Contains(banner, "go run . token -sub") {
		t.Errorf("banner with JWT_SECRET does not say it is used, with a token command:\n%s", banner)
	}
	stdout, _, err := runCommand(t, map[string]string{"JWT_SECRET": testSecret}, "token", "-sub", "bob", "-roles", "admin")
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, call(t, own, "GET", "/api/v2/voice/sessions", strings.TrimSpace(stdout), ""), http.StatusOK)
}

// TestDemoAlgoSubcommand: voicegate demo-algo serves the demo's algorithm service alone on its
// LISTEN_ADDR; a gateway pointed at it streams a chat answer and runs a voice session; it ends
// cleanly with its context.
func TestDemoAlgoSubcommand(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newLogBuffer()
	done := make(chan error, 1)
	env := map[string]string{"LISTEN_ADDR": "127.0.0.1:0", "LOG_FORMAT": "json"}
	go func() {
		done <- run(ctx, []string{"voicegate", "demo-algo"}, func(k string) string { return env[k] }, &bytes.Buffer{}, logs)
	}()
	var addr string
	select {
	case addr = <-logs.addr:
	case err := <-done:
		t.Fatalf("demo-algo returned before listening: %v\n%s", err, logs)
	case <-time.After(5 * time.Second):
		t.Fatalf("demo-algo did not listen within 5s:\n%s", logs)
	}
	if err := healthCheck(t.Context(), addr, ""); err != nil {
		t.Errorf("-healthcheck against demo-algo: %v", err)
	}

	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + addr})
	evs := readEvents(t, wantStream(t, postChat(t, g, `{"message":"hello there"}`, nil)))
	if n := len(evs); n < 4 || evs[n-2].Event != "generation_done" || evs[n-1].Event != "stream_end" {
		t.Errorf("chat through demo-algo: events %v", eventNames(evs))
	}
	v := dialVoice(t, g, nil)
	vctx, vcancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer vcancel()
	if err := v.conn.Write(vctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	for {
		typ, msg, err := v.conn.Read(vctx)
		if err != nil {
			t.Fatalf("voice through demo-algo: %v", err)
		}
		if typ == websocket.MessageText && strings.Contains(string(msg), `"tts_complete"`) {
			break
		}
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	waitNoVoice(t, g)
	g.stop()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("demo-algo returned %v, want nil", err)
		}
	case <-time.After(6 * time.Second):
		t.Fatal("demo-algo did not return after its context ended")
	}
}

// TestDemoBannerAddressReachable: with LISTEN_ADDR=:port the demo's ready-to-paste commands name
// 127.0.0.1, not [::].
func TestDemoBannerAddressReachable(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{":8080", "127.0.0.1:8080"}, {"[::]:8080", "127.0.0.1:8080"}, {"0.0.0.0:8080", "127.0.0.1:8080"},
		{"127.0.0.1:8080", "127.0.0.1:8080"}, {"[::1]:8080", "[::1]:8080"}, {"gw.internal:80", "gw.internal:80"},
	} {
		if got := dialAddr(tt.in); got != tt.want {
			t.Errorf("dialAddr(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": ":0"})
	_, port, _ := strings.Cut(g.Addr, "]:")
	want := "curl -N http://127.0.0.1:" + port + "/api/v2/chat/stream"
	eventually(t, 2*time.Second, "the demo banner", func() bool { return strings.Contains(g.Stdout.String(), "Ctrl-C") })
	if out := g.Stdout.String(); !strings.Contains(out, want) || strings.Contains(out, "[::]") {
		t.Errorf("banner does not show %q (or shows [::]):\n%s", want, out)
	}
}
