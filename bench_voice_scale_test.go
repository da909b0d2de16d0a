package main

// The scale benchmark of voice: many live sessions through one gateway process, most of them
// idle, a hundred talking, with Redis, beside the bare ReverseProxy under the same sessions.

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// echoVoice is the algorithm service of the voice benchmarks: it sends every audio frame back as
// a binary frame (TTS audio), decoding audio_chunk messages and echoing raw frames; control
// messages get no answer. It reuses its buffers, so that its own cost stays small and flat.
func echoVoice(w http.ResponseWriter, r *http.Request) {
	audio, err := acceptAudio(w, r)
	if err != nil {
		return
	}
	defer audio.c.CloseNow()
	for {
		frame, err := audio.next()
		if err != nil {
			return
		}
		if err := audio.c.Write(context.Background(), websocket.MessageBinary, frame); err != nil {
			return
		}
	}
}

// audioReader reads what a benchmark's algorithm service is sent: the audio of each
// audio_chunk message, decoded, or a binary frame as it is; other messages (control) are
// skipped. Its buffers are reused: a frame is valid until the next call.
type audioReader struct {
	c       *websocket.Conn
	in, out []byte
}

// acceptAudio accepts the gateway's (or the bare proxy's) voice connection.
func acceptAudio(w http.ResponseWriter, r *http.Request) (*audioReader, error) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"voice-protocol-v2"},
		CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		return nil, err
	}
	c.SetReadLimit(1 << 20)
	return &audioReader{c: c, in: make([]byte, 64<<10), out: make([]byte, 64<<10)}, nil
}

const audioChunkKey = `"audio_chunk":"`

func (a *audioReader) next() ([]byte, error) {
	for {
		typ, rd, err := a.c.Reader(context.Background())
		if err != nil {
			return nil, err
		}
		n, err := io.ReadFull(rd, a.in)
		if err != io.ErrUnexpectedEOF && err != io.EOF {
			return nil, fmt.Errorf("a message of more than %d bytes, or %w", len(a.in), err)
		}
		msg := a.in[:n]
		if typ != websocket.MessageText {
			return msg, nil
		}
		i := bytes.Index(msg, []byte(audioChunkKey))
		if i < 0 {
			continue // a control message
		}
		b64 := msg[i+len(audioChunkKey):]
		end := bytes.IndexByte(b64, '"')
		if end < 0 {
			return nil, fmt.Errorf("an audio_chunk without its closing quote: %.80s", msg)
		}
		b64 = b64[:end]
		m, err := base64.StdEncoding.Decode(a.out, b64)
		if err != nil {
			return nil, err
		}
		return a.out[:m], nil
	}
}

// scaleFigures are one relay's figures in the scale benchmark.
type scaleFigures struct {
	name                string
	quiet, busy         []int64 // the active sessions' round trips (µs, sorted): alone, and with all open
	opened, failed      int64
	failures            map[string]int64
	openTook            float64 // seconds to open the idle sessions
	openLat             []int64 // µs to open each idle session
	rssActive, rssAll   int64   // the relay's RSS with the active sessions open, and with all
	restCPU             time.Duration
	restFor             time.Duration
	redisCmds, redisMem int64 // Redis commands in the rest window, and memory used with all open
	redisCPU            time.Duration
}

// BenchmarkVoiceScale holds VOICE_SCALE_SESSIONS (default 300) voice sessions open through one
// gateway process (the built binary, its defaults, on a real redis-server: the session
// registry, the concurrency leases and their renewals on) in front of two replicas of the
// echoing algorithm service, and through a bare httputil.ReverseProxy, one after the other,
// each a child process, the clients another (the load generator), connecting from four
// loopback addresses. VOICE_SCALE_ACTIVE (default 100) of the sessions talk (50 frames of
// 640 B a second, echoed), the rest are idle, kept alive by the gateway's pings. It reports,
// for each relay:
//
//   - the active sessions' round trip, p50 and p99, alone and with all the others open
//     (VOICE_SCALE_SECONDS, default 5, of talk each);
//   - how the idle sessions opened, at VOICE_SCALE_RATE (default 500) a second: refusals by
//     status and code, and each opening's time;
//   - RSS per idle session;
//   - CPU per second at rest (all open, none talking: pings, lease and registry renewals,
//     rechecks), over VOICE_SCALE_REST (default 10) seconds, and Redis's commands a second, CPU
//     and memory;
//
// and for the gateway: how long a revocation of one user takes to close that user's session,
// how long a broadcast takes to reach every session, and how long SIGTERM takes to close them
// all (most of it the shutdown grace, SHUTDOWN_GRACE, which sessions get before 1012).
func BenchmarkVoiceScale(b *testing.B) {
	needProcfs(b)
	// The figures go to stdout: a benchmark's log keeps its first ten lines only.
	logf := func(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }
	total := envInt(b, "VOICE_SCALE_SESSIONS", 300)
	active := min(envInt(b, "VOICE_SCALE_ACTIVE", 100), total)
	window := float64(envInt(b, "VOICE_SCALE_SECONDS", 5))
	rest := time.Duration(envInt(b, "VOICE_SCALE_REST", 10)) * time.Second
	rate := float64(envInt(b, "VOICE_SCALE_RATE", 500))
	sources := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
	// 50 sessions a tenant: the built-in policy allows 100.
	tenants := max(total/50, 1)

	redis := startRedis(b)
	replicas := []*child{startEcho(b, "algo replica 1"), startEcho(b, "algo replica 2")}
	bin := buildGateway(b)
	load := startLoad(b)
	admin := tokenFor(b, "u-admin", []string{"super_admin"}, map[string]any{"tenant_id": "t-admin"})

	b.ResetTimer()
	for range b.N {
		bare := startBare(b, "http://"+replicas[0].addr)
		bf := scaleRun(b, load, bare, "ws://"+bare.addr+"/voice/stream", false, redis, scaleLoad{total, active, tenants, rate, window, rest, sources})
		bare.stdin.Close()
		gw := startGatewayProcess(b, bin, "voicegate", map[string]string{
			"ALGO_URL":  "http://" + replicas[0].addr + ",http://" + replicas[1].addr,
			"REDIS_URL": redis.URL(),
		})
		gf := scaleRun(b, load, gw, "ws://"+gw.addr+"/api/v2/voice/stream", true, redis, scaleLoad{total, active, tenants, rate, window, rest, sources})

		// One user's session among them all, revoked.
		victim := total - 1
		revokeAt := time.Now()
		res := adminCall(b, gw, admin, "/api/v2/auth/revoke",
			fmt.Sprintf(`{"user_id":"u-%d","tenant_id":"t-%d"}`, victim, victim%tenants))
		closed := load.do(b, loadCmd{Op: "voice-closed", Index: victim, Timeout: 30}, nil)
		revokeTook := time.Unix(0, closed.At).Sub(revokeAt)
		logf("revocation of u-%d: %s; its session closed %v later (%v)", victim, res, revokeTook.Round(time.Microsecond), closed.Codes)

		// A notice to every session.
		castAt := time.Now()
		res = adminCall(b, gw, admin, "/api/v2/voice/broadcast", `{"message":{"text":"maintenance at noon"}}`)
		notices := load.do(b, loadCmd{Op: "voice-notices", Timeout: 60}, nil)
		castTook := time.Unix(0, notices.At).Sub(castAt)
		castP50 := time.Duration(0)
		if len(notices.Lat) > 0 {
			castP50 = time.Unix(0, notices.Lat[len(notices.Lat)/2]).Sub(castAt)
		}
		logf("broadcast: %s; %d of %d sessions had it, half within %v, all within %v", res, notices.Got, notices.OK,
			castP50.Round(time.Microsecond), castTook.Round(time.Microsecond))

		// SIGTERM: every session closed, and the process gone.
		termAt := time.Now()
		if err := gw.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			b.Fatal(err)
		}
		drained := load.do(b, loadCmd{Op: "voice-drained", Timeout: 90}, nil)
		drainTook := time.Unix(0, drained.At).Sub(termAt)
		<-gw.done
		exitTook := time.Since(termAt)
		logf("SIGTERM: %d sessions closed within %v (close codes %v; the first %v after the signal), the process gone after %v",
			drained.OK, drainTook.Round(time.Millisecond), drained.Codes,
			time.Unix(0, drained.First).Sub(termAt).Round(time.Millisecond), exitTook.Round(time.Millisecond))
		load.do(b, loadCmd{Op: "voice-close"}, nil)

		for _, f := range []scaleFigures{bf, gf} {
			idle := total - active
			logf("%-18s round trip of %d active: alone p50 %v p99 %v; with %d idle open p50 %v p99 %v (%.2f× alone)",
				f.name, active, quantile(f.quiet, 0.5), quantile(f.quiet, 0.99), idle, quantile(f.busy, 0.5),
				quantile(f.busy, 0.99), float64(quantile(f.busy, 0.99))/float64(max(quantile(f.quiet, 0.99), 1)))
			logf("%-18s opened %d idle sessions in %.1f s (%.0f/s offered %.0f/s), %d refused %v; opening p50 %v p99 %v",
				f.name, f.opened, f.openTook, float64(f.opened)/f.openTook, rate, f.failed, f.failures,
				quantile(f.openLat, 0.5), quantile(f.openLat, 0.99))
			logf("%-18s RSS %d MiB with the active sessions, %d MiB with all: %.1f KiB per idle session",
				f.name, f.rssActive>>20, f.rssAll>>20, float64(f.rssAll-f.rssActive)/float64(max(idle, 1))/1024)
			logf("%-18s at rest with %d open: CPU %.1f ms a second; Redis %.0f commands a second, CPU %.1f ms a second, %.1f MiB used",
				f.name, total, float64(f.restCPU)/float64(time.Millisecond)/f.restFor.Seconds(),
				float64(f.redisCmds)/f.restFor.Seconds(), float64(f.redisCPU)/float64(time.Millisecond)/f.restFor.Seconds(),
				float64(f.redisMem)/(1<<20))
		}
		b.ReportMetric(float64(gf.rssAll-gf.rssActive)/float64(max(total-active, 1))/1024, "gateway-KiB/session")
		b.ReportMetric(float64(bf.rssAll-bf.rssActive)/float64(max(total-active, 1))/1024, "bare-KiB/session")
		b.ReportMetric(micros(quantile(gf.quiet, 0.99)), "gateway-quiet-p99-µs")
		b.ReportMetric(micros(quantile(gf.busy, 0.99)), "gateway-busy-p99-µs")
		b.ReportMetric(micros(quantile(bf.quiet, 0.99)), "bare-quiet-p99-µs")
		b.ReportMetric(micros(quantile(bf.busy, 0.99)), "bare-busy-p99-µs")
		b.ReportMetric(float64(gf.restCPU)/float64(time.Millisecond)/gf.restFor.Seconds(), "gateway-rest-ms/s")
		b.ReportMetric(float64(gf.redisCmds)/gf.restFor.Seconds(), "redis-cmds/s")
		b.ReportMetric(float64(gf.failed), "gateway-refused")
		b.ReportMetric(float64(revokeTook)/float64(time.Millisecond), "revoke-ms")
		b.ReportMetric(float64(castTook)/float64(time.Millisecond), "broadcast-ms")
		b.ReportMetric(drainTook.Seconds(), "drain-s")
	}
}

// scaleLoad is what the scale benchmark offers each relay.
type scaleLoad struct {
	total, active, tenants int
	rate, window           float64
	rest                   time.Duration
	sources                []string
}

// scaleRun opens the active sessions and times their round trip alone, opens the idle ones,
// measures the relay at rest, and times the active sessions' round trip again.
func scaleRun(b *testing.B, load *loadGen, c *child, url string, init bool, redis *testRedis, sl scaleLoad) scaleFigures {
	b.Helper()
	f := scaleFigures{name: c.name}
	open := func(from, n int) loadReply {
		return load.do(b, loadCmd{Op: "voice-open", URL: url, From: from, N: n, Rate: sl.rate, Width: 64,
			Sources: sl.sources, Init: init, Secret: testSecret, Tenants: sl.tenants}, nil)
	}
	talk := func(label string) []int64 {
		rep, _, _ := load.measured(b, c, label, loadCmd{Op: "voice-talk", From: 0, N: sl.active, Warm: 2, Seconds: sl.window})
		if rep.Got < rep.Sent*9/10 {
			b.Errorf("%s: %d echoes of %d frames", c.name, rep.Got, rep.Sent)
		}
		return rep.Lat
	}
	if rep := open(0, sl.active); rep.OK != int64(sl.active) {
		b.Fatalf("%s: %d of %d active sessions opened: %v", c.name, rep.OK, sl.active, rep.Failures)
	}
	f.quiet = talk("alone")
	settle(context.Background(), time.Second)
	f.rssActive = c.rss(b)

	stopProfile := c.profileAs(b, "opening", time.Duration(float64(sl.total-sl.active)/sl.rate*float64(time.Second)))
	rep := open(sl.active, sl.total-sl.active)
	stopProfile()
	f.opened, f.failed, f.failures, f.openTook, f.openLat = rep.OK, int64(sl.total-sl.active)-rep.OK, rep.Failures, rep.Took, rep.Lat
	settle(context.Background(), 3*time.Second)
	f.rssAll = c.rss(b)

	rp := &child{name: "redis-server", cmd: redis.cmd}
	cpu0, rcpu0, cmds0, start := c.cpu(b), rp.cpu(b), redisCalls(b, redis), time.Now()
	stopProfile = c.profileAs(b, "at rest", sl.rest)
	settle(context.Background(), sl.rest)
	stopProfile()
	f.restCPU, f.redisCPU, f.redisCmds, f.restFor = c.cpu(b)-cpu0, rp.cpu(b)-rcpu0, redisCalls(b, redis)-cmds0, time.Since(start)
	f.redisMem = redisUsedMemory(b, redis)

	f.busy = talk("with all open")
	if c.name != "voicegate" {
		load.do(b, loadCmd{Op: "voice-close"}, nil)
	}
	return f
}

// adminCall posts body to path on the gateway with token, and says what came back.
func adminCall(tb testing.TB, c *child, token, path, body string) string {
	tb.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+c.addr+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer res.Body.Close()
	got, _ := io.ReadAll(res.Body)
	if res.StatusCode/100 != 2 {
		tb.Fatalf("%s: %d %s", path, res.StatusCode, got)
	}
	return strconv.Itoa(res.StatusCode) + " " + strings.TrimSpace(string(got))
}

// redisUsedMemory is Redis's used_memory (INFO memory).
func redisUsedMemory(tb testing.TB, r *testRedis) int64 {
	tb.Helper()
	info, _ := r.Do(tb, "INFO", "memory").(string)
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}
