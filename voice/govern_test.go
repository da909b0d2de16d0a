package voice_test

// Governance: audio seconds, quotas, the maximum session length, latencies and barge-ins, on
// fake time (testing/synctest) so that every figure is asserted exactly.

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/voice"
)

// governed are options with a memory meter, reservations of 500 ms, and limits for every
// tenant.
func governed(meter policy.AudioMeter, lim policy.VoiceLimits) voice.Options {
	o := fast()
	o.RecheckInterval = 100 * time.Millisecond
	o.Reservation = 500 * time.Millisecond
	o.Meter = meter
	o.Limits = func(string) policy.VoiceLimits { return lim }
	o.Owner = func(*http.Request) (string, string) { return "alice", "acme" }
	return o
}

// nextStats waits for the next session's end.
func (e *env) nextStats(tb testing.TB) voice.Stats {
	tb.Helper()
	select {
	case st := <-e.ends:
		return st
	case <-time.After(wait):
		tb.Fatalf("no session ended within %v", wait)
	}
	return voice.Stats{}
}

// sendTTS answers every client message with a binary frame of n bytes (TTS audio).
func sendTTS(n int) behaviour {
	return func(fc *fakeConn) {
		for {
			_, _, err := fc.conn.Read(context.Background())
			if err != nil {
				fc.err = err
				return
			}
			if err := fc.conn.Write(context.Background(), websocket.MessageBinary, make([]byte, n)); err != nil {
				return
			}
		}
	}
}

func TestAudioSecondsPCMExact(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		e := newEnv(t, setup{opts: fast(), serve: sendTTS(3200), net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		sizes := []int{640, 1000, 4}
		for _, s := range sizes {
			write(t, cl.c, websocket.MessageBinary, make([]byte, s))
			if m := cl.next(t); m.typ != websocket.MessageBinary {
				t.Fatalf("got %v, want the TTS frame", m.typ)
			}
		}
		cl.c.Close(websocket.StatusNormalClosure, "")
		st := e.nextStats(t)
		// N bytes at 16 kHz mono (16-bit) are N/32000 s: 1644 bytes are 51.375 ms.
		if want := time.Duration(1644) * time.Second / 32000; st.AudioIn != want {
			t.Errorf("audio in = %v, want %v", st.AudioIn, want)
		}
		if want := 3 * 3200 * time.Second / 32000; st.AudioOut != want {
			t.Errorf("audio out = %v, want %v", st.AudioOut, want)
		}
	})
}

func TestMaxSessionLength(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		e := newEnv(t, setup{opts: governed(policy.NewMemoryAudioMeter(), policy.VoiceLimits{MaxSession: 2 * time.Second}), net: n})
		start := time.Now()
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		msgs, err := cl.end(t, 10*time.Second)
		took := time.Since(start)
		if code := websocket.CloseStatus(err); code != voice.CloseSessionTooLong {
			t.Errorf("closed %v (%v), want %d", code, err, voice.CloseSessionTooLong)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeSessionTooLong {
			t.Errorf("error messages %v, want [SESSION_TOO_LONG]", codes)
		}
		if took < 2*time.Second || took > 2*time.Second+100*time.Millisecond {
			t.Errorf("closed after %v, want within a recheck interval of 2s", took)
		}
		if st := e.nextStats(t); st.CloseCode != voice.CloseSessionTooLong {
			t.Errorf("stats close code %v", st.CloseCode)
		}
	})
}

func TestQuotaCrossedThenRefused(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		lim := policy.VoiceLimits{UserSecondsPerDay: 1}
		leases := policy.NewMemoryLeases()
		e := newEnv(t, setup{opts: governed(meter, lim), net: n, lease: leases})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		fc := e.fake.next(t)
		// Real-time audio: a 20 ms frame every 20 ms, until the session is closed.
		sent := 0
		for ; sent < 200; sent++ {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			err := cl.c.Write(ctx, websocket.MessageBinary, frame(byte(sent)))
			cancel()
			if err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
			select {
			case <-cl.done:
			default:
				continue
			}
			break
		}
		msgs, err := cl.end(t, wait)
		if code := websocket.CloseStatus(err); code != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v (%v), want %d", code, err, voice.CloseQuotaExceeded)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeQuotaExceeded {
			t.Errorf("error messages %v, want [QUOTA_EXCEEDED]", codes)
		}
		st := e.nextStats(t)
		// Charged as the audio arrived: the 50 frames of the quota relayed, and not one more.
		if st.AudioIn != time.Second {
			t.Errorf("audio in %v when closed, want the 1s of the quota", st.AudioIn)
		}
		if got := audioChunks(t, fc); got != 50 {
			t.Errorf("the algorithm service got %d audio chunks, want the quota's 50", got)
		}
		// Charged for what it used, and nothing more.
		u := &policy.AudioUse{Tenant: "acme", User: "alice"}
		if err := meter.Charge(context.Background(), []*policy.AudioUse{u}); err != nil {
			t.Fatal(err)
		}
		if u.UserUsed != st.AudioIn || st.Charged != st.AudioIn {
			t.Errorf("charged %v (stats %v) for %v of audio", u.UserUsed, st.Charged, st.AudioIn)
		}
		// A new session is refused before the upgrade.
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, res, err := e.dial(ctx, "", nil)
		if err == nil {
			c.CloseNow()
			t.Fatal("a session over quota opened")
		}
		doc, raw := errorBody(t, res)
		if res.StatusCode != http.StatusTooManyRequests || doc["code"] != voice.CodeQuotaExceeded || res.Header.Get("Retry-After") == "" {
			t.Errorf("refusal %d %s (Retry-After %q), want 429 QUOTA_EXCEEDED with Retry-After", res.StatusCode, raw, res.Header.Get("Retry-After"))
		}
		// Neither the session closed for its quota nor the one refused holds anything.
		allOver(t, e, leases)
	})
}

// audioChunks counts the audio_chunk messages the fake received (record, the default
// behaviour, keeps up to 256), once its connection has ended.
func audioChunks(tb testing.TB, fc *fakeConn) int {
	fc.ended(tb, wait)
	n := 0
	for {
		select {
		case m := <-fc.msgs:
			if m.typ == websocket.MessageText && strings.Contains(string(m.data), `"type":"audio_chunk"`) {
				n++
			}
		default:
			return n
		}
	}
}

// TestQuotaHeldAsFastAsAudioComes: a client with no pace bound sends as fast as the session
// takes it. Every frame is charged as it arrives, so the algorithm service gets exactly the
// quota, however fast the audio came; each reservation waited for (the client outruns them)
// costs the relay one call to the meter, none beyond.
func TestQuotaHeldAsFastAsAudioComes(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := &countingMeter{AudioMeter: policy.NewMemoryAudioMeter()}
		e := newEnv(t, setup{opts: governed(meter, policy.VoiceLimits{UserSecondsPerDay: 3}), net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		fc := e.fake.next(t)
		for i := range 1000 { // 20 s of audio, at once
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			err := cl.c.Write(ctx, websocket.MessageBinary, frame(byte(i)))
			cancel()
			if err != nil {
				break
			}
		}
		if _, err := cl.end(t, wait); websocket.CloseStatus(err) != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v, want %d", err, voice.CloseQuotaExceeded)
		}
		st := e.nextStats(t)
		if st.AudioIn != 3*time.Second || st.Charged != 3*time.Second {
			t.Errorf("relayed %v, charged %v, want the quota's 3s", st.AudioIn, st.Charged)
		}
		if got := audioChunks(t, fc); got != 150 {
			t.Errorf("the algorithm service got %d audio chunks, want the quota's 150", got)
		}
		// The admission, the settlement, and reservations of 500 ms: each asked for once less
		// than half of one is left, so each adds at least 250 ms; the last finds nothing left.
		// Calls per reservation, not per frame (150 of them).
		if c := meter.calls.Load(); c > 1+1+12+1 {
			t.Errorf("%d calls to the meter for 3 s of audio in reservations of 500 ms", c)
		}
	})
}

// TestQuotaCountsBothDirections: TTS audio to the client is charged as it goes, as the client's
// is: with 1 s of quota, 20 ms from the client answered by 100 ms of TTS each time, the session
// relays eight turns and the ninth frame, and not its answer.
func TestQuotaCountsBothDirections(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		e := newEnv(t, setup{opts: governed(policy.NewMemoryAudioMeter(), policy.VoiceLimits{UserSecondsPerDay: 1}),
			serve: sendTTS(3200), net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		for i := range 20 {
			if !sendFrame(cl, i) {
				break
			}
			synctest.Wait()
		}
		msgs, err := cl.end(t, wait)
		if websocket.CloseStatus(err) != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v, want %d", err, voice.CloseQuotaExceeded)
		}
		tts := 0
		for _, m := range msgs {
			if m.typ == websocket.MessageBinary {
				tts++
			}
		}
		st := e.nextStats(t)
		if st.AudioIn != 9*20*time.Millisecond || st.AudioOut != 8*100*time.Millisecond || tts != 8 {
			t.Errorf("relayed %v in and %v out (%d TTS frames), want 180ms and 800ms (8)", st.AudioIn, st.AudioOut, tts)
		}
	})
}

// sendFrame writes the i-th 20 ms frame; false once the session no longer takes it.
func sendFrame(cl *client, i int) bool {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	select {
	case <-cl.done:
		return false
	default:
	}
	return cl.c.Write(ctx, websocket.MessageBinary, frame(byte(i))) == nil
}

// countingMeter counts the calls to a meter.
type countingMeter struct {
	policy.AudioMeter
	calls atomic.Int64
}

func (m *countingMeter) Charge(ctx context.Context, uses []*policy.AudioUse) error {
	m.calls.Add(1)
	return m.AudioMeter.Charge(ctx, uses)
}

// TestChargedAhead checks that the quota is charged while the session runs, ahead of its use
// by at most a reservation, and exactly its use once it ends.
func TestChargedAhead(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		o := governed(meter, policy.VoiceLimits{UserSecondsPerDay: 3600})
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		charged := func() time.Duration {
			u := &policy.AudioUse{Tenant: "acme", User: "alice"}
			_ = meter.Charge(context.Background(), []*policy.AudioUse{u})
			return u.UserUsed
		}
		for i := range 50 { // 1 s of audio in 1 s
			write(t, cl.c, websocket.MessageBinary, frame(byte(i)))
			time.Sleep(20 * time.Millisecond)
		}
		if got := charged(); got < time.Second || got > time.Second+o.Reservation {
			t.Errorf("charged %v while the session runs with 1s relayed, want 1s to 1s and a reservation (%v)", got, o.Reservation)
		}
		cl.c.Close(websocket.StatusNormalClosure, "")
		if st := e.nextStats(t); st.Charged != time.Second {
			t.Errorf("session charged %v, want 1s", st.Charged)
		}
		if got := charged(); got != time.Second {
			t.Errorf("charged %v after the end, want 1s", got)
		}
	})
}

// latencyAlgo answers like an algorithm service with known delays: the first audio of an
// utterance gets an asr_partial after asrDelay; the n-th stop gets TTS audio after
// respDelays[n], then tts_complete.
func latencyAlgo(asrDelay time.Duration, respDelays []time.Duration) behaviour {
	return func(fc *fakeConn) {
		send := func(typ websocket.MessageType, b []byte) {
			_ = fc.conn.Write(context.Background(), typ, b)
		}
		inUtterance, turn := false, 0
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			_, b, err := fc.conn.Read(context.Background())
			if err != nil {
				fc.err = err
				return
			}
			var m struct{ Type string }
			_ = json.Unmarshal(b, &m)
			switch m.Type {
			case "audio_chunk":
				if !inUtterance {
					inUtterance = true
					wg.Go(func() {
						time.Sleep(asrDelay)
						send(websocket.MessageText, []byte(`{"type":"asr_partial","text":"he"}`))
					})
				}
			case "stop":
				inUtterance = false
				wg.Wait()
				time.Sleep(respDelays[turn%len(respDelays)])
				turn++
				send(websocket.MessageBinary, make([]byte, 640))
				send(websocket.MessageText, []byte(`{"type":"tts_complete"}`))
			}
		}
	}
}

func TestLatencies(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		var mu sync.Mutex
		got := map[voice.LatencyKind][]time.Duration{}
		o := fast()
		o.OnLatency = func(k voice.LatencyKind, tenant string, d time.Duration) {
			mu.Lock()
			got[k] = append(got[k], d)
			mu.Unlock()
		}
		resp := []time.Duration{300 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}
		asr := 120 * time.Millisecond
		e := newEnv(t, setup{opts: o, net: n, serve: latencyAlgo(asr, resp)})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		for turn := range resp {
			for k := range 10 {
				write(t, cl.c, websocket.MessageBinary, frame(byte(k)))
				time.Sleep(20 * time.Millisecond)
			}
			if m := cl.nextJSON(t); m["type"] != "asr_partial" {
				t.Fatalf("turn %d: got %v, want asr_partial", turn, m)
			}
			write(t, cl.c, websocket.MessageText, []byte(`{"type":"stop"}`))
			if m := cl.next(t); m.typ != websocket.MessageBinary {
				t.Fatalf("turn %d: got %s, want TTS audio", turn, m.data)
			}
			cl.nextJSON(t) // tts_complete
		}
		cl.c.Close(websocket.StatusNormalClosure, "")
		st := e.nextStats(t)
		mu.Lock()
		defer mu.Unlock()
		for i, d := range got[voice.LatencyASR] {
			if d != asr {
				t.Errorf("asr latency %d = %v, want %v", i, d, asr)
			}
		}
		if len(got[voice.LatencyASR]) != 3 || len(got[voice.LatencyResponse]) != 3 {
			t.Fatalf("latencies %v, want 3 of each", got)
		}
		for i, d := range got[voice.LatencyResponse] {
			if d != resp[i] {
				t.Errorf("response latency %d = %v, want %v", i, d, resp[i])
			}
		}
		if r := st.ResponseLatency; r.P50 != 200*time.Millisecond || r.Max != 300*time.Millisecond || r.Count != 3 {
			t.Errorf("session response latency %+v, want p50 200ms, max 300ms, count 3", r)
		}
		if st.ASRLatency.P50 != asr || st.ASRLatency.Max != asr {
			t.Errorf("session asr latency %+v", st.ASRLatency)
		}
	})
}

func TestBargeIns(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		var mu sync.Mutex
		var tenants []string
		o := fast()
		o.Owner = func(*http.Request) (string, string) { return "alice", "acme" }
		o.OnBargeIn = func(tenant string) {
			mu.Lock()
			tenants = append(tenants, tenant)
			mu.Unlock()
		}
		// The fake speaks on demand: "speak" → two TTS frames; "done" → tts_complete.
		e := newEnv(t, setup{opts: o, net: n, serve: func(fc *fakeConn) {
			for {
				_, b, err := fc.conn.Read(context.Background())
				if err != nil {
					return
				}
				switch {
				case strings.Contains(string(b), `"text"`):
					_ = fc.conn.Write(context.Background(), websocket.MessageBinary, make([]byte, 640))
				case strings.Contains(string(b), `"end"`):
					_ = fc.conn.Write(context.Background(), websocket.MessageText, []byte(`{"type":"tts_complete"}`))
				}
			}
		}})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		speak := func() {
			write(t, cl.c, websocket.MessageText, []byte(`{"type":"text"}`))
			if m := cl.next(t); m.typ != websocket.MessageBinary {
				t.Fatalf("got %s, want TTS audio", m.data)
			}
		}
		// No TTS flowing: an interrupt is no barge-in.
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"interrupt"}`))
		speak()
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"interrupt"}`)) // 1
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"interrupt"}`)) // same stretch
		speak()
		write(t, cl.c, websocket.MessageBinary, frame(1)) // a new utterance over TTS: 2
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"stop"}`))
		speak()
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"end"}`)) // tts_complete
		cl.nextJSON(t)
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"start"}`)) // TTS over: none
		synctest.Wait()
		cl.c.Close(websocket.StatusNormalClosure, "")
		st := e.nextStats(t)
		if st.BargeIns != 2 {
			t.Errorf("barge-ins = %d, want 2", st.BargeIns)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(tenants) != 2 || tenants[0] != "acme" {
			t.Errorf("barge-ins reported for %v, want acme twice", tenants)
		}
	})
}

// TestLocalDetailAndBroadcast: without Redis, a session's live counters come from the registry,
// and a broadcast reaches the matching sessions of this instance, counted.
func TestLocalDetailAndBroadcast(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := fast()
		owners := map[string][2]string{"alice": {"alice", "acme"}, "bob": {"bob", "acme"}, "carol": {"carol", "globex"}}
		o.Owner = func(r *http.Request) (string, string) {
			ow := owners[r.URL.Query().Get("conversation_id")]
			return ow[0], ow[1]
		}
		e := newEnv(t, setup{opts: o, net: n})
		clients := map[string]*client{}
		ids := map[string]string{}
		for _, who := range []string{"alice", "bob", "carol"} {
			cl := e.connect(t, "conversation_id="+who, nil)
			ids[who] = cl.initMsg(t)["session_id"].(string)
			clients[who] = cl
		}
		write(t, clients["alice"].c, websocket.MessageBinary, make([]byte, 3200))
		synctest.Wait()
		l, ok, err := e.reg.Get(context.Background(), ids["alice"])
		if err != nil || !ok || l.AudioSecondsIn != 0.1 || l.PacketsIn != 1 || l.UserID != "alice" || l.TenantID != "acme" {
			t.Errorf("alice's detail = %+v, %v, %v", l, ok, err)
		}
		if _, ok, _ := e.reg.Get(context.Background(), "nobody"); ok {
			t.Error("an unknown session has a detail")
		}
		for _, tc := range []struct {
			b    voice.Broadcast
			want []string
		}{
			{voice.Broadcast{Message: json.RawMessage(`"to acme"`), TenantID: "acme"}, []string{"alice", "bob"}},
			{voice.Broadcast{Message: json.RawMessage(`"to bob"`), TenantID: "acme", UserID: "bob"}, []string{"bob"}},
			{voice.Broadcast{Message: json.RawMessage(`"to all"`), AllTenants: true}, []string{"alice", "bob", "carol"}},
			{voice.Broadcast{Message: json.RawMessage(`"to none"`), TenantID: ""}, nil},
		} {
			got, err := e.reg.Broadcast(context.Background(), tc.b)
			if err != nil || got != len(tc.want) {
				t.Errorf("broadcast %s reached %d (%v), want %d", tc.b.Message, got, err, len(tc.want))
			}
			for _, who := range tc.want {
				m := clients[who].nextJSON(t)
				if m["type"] != voice.TypeNotice || m["session_id"] != ids[who] {
					t.Errorf("%s got %v, want the notice %s", who, m, tc.b.Message)
				}
				if b, _ := json.Marshal(m["message"]); string(b) != string(tc.b.Message) {
					t.Errorf("%s got message %s, want %s", who, b, tc.b.Message)
				}
			}
		}
		for _, cl := range clients {
			select {
			case m := <-cl.msgs:
				t.Errorf("an unexpected message %s", m.data)
			default:
			}
		}
	})
}

// downMeter is a quota store that cannot answer, as a Redis that is down.
type downMeter struct{ calls atomic.Int64 }

func (m *downMeter) Charge(_ context.Context, uses []*policy.AudioUse) error {
	m.calls.Add(1)
	err := errors.New("policy: audio quota: connection refused")
	for _, u := range uses {
		u.Err = err
	}
	return err
}

// TestQuotaFailsOpen: when the quota store cannot answer, a session starts and runs on (fair
// use fails open), reservations keep being asked for, a second apart, and the session ends
// normally.
func TestQuotaFailsOpen(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := &downMeter{}
		e := newEnv(t, setup{opts: governed(meter, policy.VoiceLimits{UserSecondsPerDay: 1}), net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		for i := range 100 { // 2 s of audio, over the quota the store cannot count
			write(t, cl.c, websocket.MessageBinary, frame(byte(i)))
			time.Sleep(20 * time.Millisecond)
		}
		cl.c.Close(websocket.StatusNormalClosure, "")
		st := e.nextStats(t)
		if st.CloseCode != websocket.StatusNormalClosure || st.Charged != 0 || st.AudioIn != 2*time.Second {
			t.Errorf("session ended %v having relayed %v and been charged %v, want a normal end, 2s relayed, nothing charged",
				st.CloseCode, st.AudioIn, st.Charged)
		}
		// The admission, a reservation at the start and every second of the 2 s, and the
		// settlement.
		if c := meter.calls.Load(); c < 4 || c > 5 {
			t.Errorf("%d calls to the store, want the admission, 2 or 3 reservations and the settlement", c)
		}
		e.gone(t)
	})
}

// TestReservationWithinQuota: a session is granted no more than its user has left, even from
// its first reservation: another session used 600 ms of the 1 s, this one relays the 400 ms
// left and no more.
func TestReservationWithinQuota(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		earlier := &policy.AudioUse{Tenant: "acme", User: "alice", Session: "earlier", Used: 600 * time.Millisecond, Final: true}
		if err := meter.Charge(context.Background(), []*policy.AudioUse{earlier}); err != nil {
			t.Fatal(err)
		}
		o := governed(meter, policy.VoiceLimits{UserSecondsPerDay: 1})
		o.Reservation = time.Hour
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		for i := range 50 {
			if !sendFrame(cl, i) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		_, err := cl.end(t, wait)
		if code := websocket.CloseStatus(err); code != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v (%v), want %d", code, err, voice.CloseQuotaExceeded)
		}
		if st := e.nextStats(t); st.AudioIn != 400*time.Millisecond {
			t.Errorf("closed after %v of audio, want the 400 ms left", st.AudioIn)
		}
	})
}
