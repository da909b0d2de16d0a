package voice_test

// The tests of what takes time — write timeouts, keepalive, idle timeouts, rechecks, dial
// timeouts — run in testing/synctest bubbles on the in-memory network, so that their bounds
// are asserted exactly, on fake time, however busy the machine is.

import (
	"context"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// bubble runs f on fake time with a fresh in-memory network.
func bubble(t *testing.T, f func(t *testing.T, n *memNet)) {
	t.Helper()
	synctest.Test(t, func(t *testing.T) { f(t, newMemNet()) })
}

// leaseFree reports whether testUser's one slot is free again.
func leaseFree(t *testing.T, leases *policy.MemoryLeases) bool {
	release, err := leases.Acquire(context.Background(), policy.LeaseRequest{Kind: "voice", User: testUser, PerUser: 1})
	if err != nil {
		return false
	}
	release()
	return true
}

// allOver checks what must hold once sessions are over: no handler, registry entry, lease or
// goroutine of the package left.
func allOver(t *testing.T, e *env, leases *policy.MemoryLeases) {
	t.Helper()
	if n := e.handlers(); n != 0 {
		t.Errorf("%d gateway handlers still running", n)
	}
	if n := e.reg.Len(); n != 0 {
		t.Errorf("the registry holds %d sessions", n)
	}
	if leases != nil && !leaseFree(t, leases) {
		t.Error("the session's lease is still held")
	}
	synctest.Wait()
	if n := voiceGoroutines(); n != 0 {
		t.Errorf("%d goroutines of the voice package left", n)
	}
}

func TestClientThatNeverReads(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.WriteTimeout = 300 * time.Millisecond
		leases := policy.NewMemoryLeases()
		e := newEnv(t, setup{opts: o, serve: flood(640), net: n, lease: leases})
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, _, err := e.dial(ctx, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		if _, _, err := c.Read(ctx); err != nil { // session_initialized; then it reads nothing
			t.Fatal(err)
		}
		fc := e.fake.next(t)
		start := time.Now()

		// The algorithm service streams TTS audio that the client never takes.
		e.idle(t, o.WriteTimeout+time.Second)
		took := time.Since(start)
		t.Logf("session over %v after the client stopped reading (write timeout %v); the fake sent %d frames",
			took, o.WriteTimeout, fc.sent.Load())
		if took < o.WriteTimeout*7/8 {
			t.Errorf("dropped after %v, before the write timeout", took)
		}
		if code := websocket.CloseStatus(fc.ended(t, time.Second)); code != websocket.StatusNormalClosure {
			t.Errorf("the algorithm service saw %v, want close 1000", code)
		}
		if st := <-e.ends; st.CloseCode != websocket.StatusTryAgainLater {
			t.Errorf("session ended with %v, want 1013 (a slow consumer)", st.CloseCode)
		}
		allOver(t, e, leases)
	})
}

func TestAlgoServiceThatNeverReads(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.WriteTimeout = 300 * time.Millisecond
		leases := policy.NewMemoryLeases()
		e := newEnv(t, setup{opts: o, serve: neverRead, net: n, lease: leases})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		e.fake.next(t)

		var wg sync.WaitGroup
		wg.Go(func() { // the client talks; the algorithm service never listens
			for cl.c.Write(context.Background(), websocket.MessageBinary, frame(1)) == nil {
			}
		})
		start := time.Now()
		msgs, err := cl.end(t, o.WriteTimeout+time.Second)
		wg.Wait()
		if code := websocket.CloseStatus(err); code != websocket.StatusTryAgainLater {
			t.Errorf("client saw %v (%v), want close 1013", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeSlowConsumer {
			t.Errorf("error messages %v, want [SLOW_CONSUMER]", codes)
		}
		e.idle(t, o.WriteTimeout+time.Second-time.Since(start))
		t.Logf("session over %v after the first frame (write timeout %v)", time.Since(start), o.WriteTimeout)
		allOver(t, e, leases)
	})
}

// deaf is an algorithm service that completes the WebSocket handshake, then reads and drops
// everything: it never answers a ping, or a close.
func deaf(t *testing.T, n network) *server {
	var wg sync.WaitGroup
	done := make(chan struct{})
	srv := serve(t, n, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		h := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(h[:]) + "\r\n" +
			"Sec-WebSocket-Protocol: " + voice.Subprotocol + "\r\n\r\n")
		brw.Flush()
		wg.Go(func() {
			defer conn.Close()
			go func() {
				<-done
				conn.Close()
			}()
			io.Copy(io.Discard, conn)
		})
	}))
	t.Cleanup(func() {
		close(done)
		wg.Wait()
	})
	return srv
}

// drain reads and drops everything conn receives, answering nothing, until clean-up.
func drain(t *testing.T, conn io.ReadCloser) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(io.Discard, conn)
	}()
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
}

func TestDeadClientDropped(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.PingInterval, o.RecheckInterval = time.Second, 100*time.Millisecond
		e := newEnv(t, setup{opts: o, net: n})
		conn := rawUpgrade(t, e) // completes the handshake, reads what it gets, never answers a ping
		drain(t, conn)
		start := time.Now()
		fc := e.fake.next(t)
		if code := websocket.CloseStatus(fc.ended(t, 2*o.PingInterval+o.RecheckInterval)); code != websocket.StatusNormalClosure {
			t.Errorf("the algorithm service saw %v, want close 1000", code)
		}
		took := time.Since(start)
		t.Logf("dead client dropped after %v (ping interval %v)", took, o.PingInterval)
		if took < 2*o.PingInterval-o.RecheckInterval {
			t.Errorf("dropped after %v, before a ping could have gone unanswered for an interval", took)
		}
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

func TestDeadAlgoServiceDetected(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.PingInterval, o.RecheckInterval = time.Second, 100*time.Millisecond
		o.AlgoURL = mustURL(t, deaf(t, n).URL)
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		start := time.Now()
		msgs, err := cl.end(t, 2*o.PingInterval+o.RecheckInterval+time.Second)
		t.Logf("client told after %v (ping interval %v)", time.Since(start), o.PingInterval)
		if code := websocket.CloseStatus(err); code != websocket.StatusInternalError {
			t.Errorf("client saw %v (%v), want close 1011", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeAlgoService {
			t.Errorf("error messages %v, want [ALGO_SERVICE_ERROR]", codes)
		}
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

func TestIdleTimeout(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.IdleTimeout, o.PingInterval, o.RecheckInterval = 2*time.Second, 500*time.Millisecond, 100*time.Millisecond
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		fc := e.fake.next(t)

		// Messages keep it alive well past IdleTimeout.
		var last time.Time
		for range 10 {
			write(t, cl.c, websocket.MessageText, []byte(`{"type":"ping"}`))
			fc.recv(t)
			last = time.Now()
			time.Sleep(o.IdleTimeout / 4)
		}
		select {
		case <-cl.done:
			t.Fatalf("session closed while the client was talking: %v", cl.err)
		default:
		}

		// Silence ends it, pongs notwithstanding.
		msgs, err := cl.end(t, o.IdleTimeout)
		if took := time.Since(last); took < o.IdleTimeout || took > o.IdleTimeout+o.RecheckInterval {
			t.Errorf("closed %v after the last message, want within a tick of IdleTimeout %v", took, o.IdleTimeout)
		}
		if code := websocket.CloseStatus(err); code != websocket.StatusNormalClosure {
			t.Errorf("client saw %v (%v), want close 1000", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeIdle {
			t.Errorf("error messages %v, want [IDLE_TIMEOUT]", codes)
		}
		fc.ended(t, time.Second)
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

func TestRecheckFailureCloses4401(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		var revoked atomic.Bool
		var checks atomic.Int64
		o := fast()
		o.RecheckInterval = 100 * time.Millisecond
		o.Recheck = func(r *http.Request) func(context.Context) error {
			user := r.Header.Get("X-Test-User") // what a real recheck takes from the request: who
			return func(ctx context.Context) error {
				checks.Add(1)
				if user != "u-9" {
					return errors.New("wrong user")
				}
				if revoked.Load() {
					return errors.New("token revoked")
				}
				return nil
			}
		}
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", &websocket.DialOptions{HTTPHeader: http.Header{"X-Test-User": {"u-9"}}})
		cl.initMsg(t)
		fc := e.fake.next(t)
		time.Sleep(10 * o.RecheckInterval)
		if c := checks.Load(); c < 9 || c > 11 {
			t.Errorf("%d rechecks in 10 intervals", c)
		}

		revoked.Store(true)
		start := time.Now()
		msgs, err := cl.end(t, o.RecheckInterval+time.Millisecond)
		t.Logf("closed %v after the revocation", time.Since(start))
		if code := websocket.CloseStatus(err); code != voice.CloseTokenInvalid {
			t.Errorf("client saw %v (%v), want close 4401", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeTokenInvalid {
			t.Errorf("error messages %v, want [TOKEN_INVALID]", codes)
		}
		fc.ended(t, time.Second)
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

func TestSessionsShareOneClock(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		const sessions = 20
		o := fast()
		o.RecheckInterval = 100 * time.Millisecond
		e := newEnv(t, setup{opts: o, net: n})
		for range sessions {
			e.connect(t, "", nil).initMsg(t)
		}
		synctest.Wait()
		stacks := goroutineStacks()
		count := func(frame string) int {
			k := 0
			for _, g := range stacks {
				if strings.Contains(g, frame) {
					k++
				}
			}
			return k
		}
		// Idle sessions: their two readers each, and one clock for them all.
		if c := count("voice.(*timers).run"); c != 1 {
			t.Errorf("%d clock goroutines for %d sessions, want 1", c, sessions)
		}
		if c, want := voiceGoroutines(), 2*sessions+1; c != want {
			t.Errorf("%d goroutines of the voice package for %d idle sessions, want %d", c, sessions, want)
		}
	})
}

func TestRegistryCloseAllDeadline(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		e := newEnv(t, setup{opts: fast(), net: n})
		rawUpgrade(t, e) // never reads, so never takes the close
		fc := e.fake.next(t)
		synctest.Wait()
		if e.reg.Len() != 1 {
			t.Fatalf("registry holds %d sessions, want 1", e.reg.Len())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		e.reg.CloseAll(ctx, websocket.StatusServiceRestart, voice.CodeShutdown, "restarting")
		if took := time.Since(start); took > 310*time.Millisecond {
			t.Errorf("CloseAll took %v with a 300ms deadline", took)
		}
		fc.ended(t, time.Second)
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

func TestAlgoServiceDown(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		refusing := serve(t, n, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "busy", http.StatusServiceUnavailable)
		}))
		tests := []struct {
			name, addr string
			within     time.Duration
		}{
			{"nothing listens", "down.mem:80", 0},
			{"black hole", hole(t, n), 300 * time.Millisecond},
			{"upgrade refused", mustURL(t, refusing.URL).Host, 0},
		}
		for _, tt := range tests {
			o := fast()
			o.AlgoURL = mustURL(t, "http://"+tt.addr)
			o.DialTimeout = 300 * time.Millisecond
			e := newEnv(t, setup{opts: o, net: n})
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			start := time.Now()
			c, res, err := e.dial(ctx, "", nil)
			cancel()
			if err == nil {
				c.CloseNow()
				t.Fatalf("%s: dial succeeded with the algorithm service down", tt.name)
			}
			if took := time.Since(start); took != tt.within {
				t.Errorf("%s: the 502 took %v, want %v", tt.name, took, tt.within)
			}
			if res == nil || res.StatusCode != http.StatusBadGateway {
				t.Fatalf("%s: response %v, want 502 before any upgrade", tt.name, status(res))
			}
			body, raw := errorBody(t, res)
			if body["code"] != proxy.CodeAlgoService || body["request_id"] != res.Header.Get("X-Request-ID") {
				t.Errorf("%s: body %v, want code ALGO_SERVICE_ERROR and the request ID", tt.name, body)
			}
			if strings.Contains(raw, tt.addr) || strings.Contains(raw, ".mem") {
				t.Errorf("%s: the error names the upstream: %s", tt.name, raw)
			}
			if e.reg.Len() != 0 {
				t.Errorf("%s: registry holds %d sessions", tt.name, e.reg.Len())
			}
		}
	})
}

// goroutineStacks returns the stack of every goroutine.
func goroutineStacks() []string {
	buf := make([]byte, 8<<20)
	return strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n")
}

// arrivals is an algorithm service that notes when each audio_chunk arrives.
func arrivals(at *[]time.Time, mu *sync.Mutex) behaviour {
	return func(fc *fakeConn) {
		for {
			_, b, err := fc.conn.Read(context.Background())
			if err != nil {
				fc.err = err
				return
			}
			if strings.Contains(string(b), `"type":"audio_chunk"`) {
				mu.Lock()
				*at = append(*at, time.Now())
				mu.Unlock()
			}
		}
	}
}

// TestPaceBound: a client may send audio at most Pace times real time beyond a burst. With a
// pace of 1 and a burst of 1 s, a client that sends 5 s of audio at once has its first second
// relayed at once, and the rest at real time: the session stops reading it, nothing is dropped.
// After a pause as long as the burst, it may burst again.
func TestPaceBound(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		var mu sync.Mutex
		var at []time.Time
		o := fast()
		o.Pace, o.PaceBurst = 1, time.Second
		e := newEnv(t, setup{opts: o, serve: arrivals(&at, &mu), net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		start := time.Now()
		send := func(frames int) {
			for i := range frames {
				write(t, cl.c, websocket.MessageBinary, frame(byte(i)))
			}
		}
		send(250) // 5 s of audio, as fast as the session reads it
		synctest.Wait()
		mu.Lock()
		if len(at) != 250 {
			t.Fatalf("%d frames relayed, want all 250", len(at))
		}
		for k, a := range at {
			// Frame k+1 is read once the k frames before it are due at real time, less the
			// burst: at max(0, 20 ms × k − 1 s).
			if want := max(time.Duration(k)*20*time.Millisecond-time.Second, 0); a.Sub(start) != want {
				t.Fatalf("frame %d relayed at %v, want %v", k+1, a.Sub(start), want)
			}
		}
		last := at[len(at)-1]
		mu.Unlock()

		// Due at 5 s; a pause until 6 s gives the whole burst back.
		time.Sleep(start.Add(6 * time.Second).Sub(last))
		again := time.Now()
		send(100)
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(at) != 350 {
			t.Fatalf("%d frames relayed, want 350", len(at))
		}
		if got := at[299].Sub(again); got != 0 {
			t.Errorf("the 50th frame after the pause was relayed %v after it was sent, want at once (the burst)", got)
		}
		if got, want := at[349].Sub(again), 99*20*time.Millisecond-time.Second; got != want {
			t.Errorf("the 100th frame after the pause was relayed at %v, want %v", got, want)
		}
	})
}

// TestPaceWaitEndsWithSession: a session that has stopped reading its client for the pace
// (a 10 s frame, with a pace of 1 and a burst of 100 ms) still ends at once when it is closed:
// the wait ends with it.
func TestPaceWaitEndsWithSession(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		o.Pace, o.PaceBurst = 1, 100*time.Millisecond
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		write(t, cl.c, websocket.MessageBinary, make([]byte, 320000)) // 10 s of audio
		e.fake.next(t).recv(t)
		synctest.Wait() // the session waits now, for 9.9 s
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		e.reg.CloseAll(ctx, websocket.StatusGoingAway, "", "shutting down")
		if took := time.Since(start); took > 10*time.Millisecond {
			t.Errorf("the session took %v to close, want at once", took)
		}
		if _, err := cl.end(t, wait); websocket.CloseStatus(err) != websocket.StatusGoingAway {
			t.Errorf("client saw %v, want 1001", err)
		}
		e.gone(t)
	})
}
