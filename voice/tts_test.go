package voice_test

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
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

// paced are options with TTS pacing on and a lead of 250 ms.
func paced() voice.Options {
	o := fast()
	o.TTSPacing = true
	o.TTSLead = 250 * time.Millisecond
	return o
}

// ttsFrameBytes is one 20 ms TTS frame of 16 kHz mono PCM.
const ttsFrameBytes = 640

// speaker is a fake algorithm service that answers the client's first text message with
// frames 20 ms TTS frames as fast as the connection takes them (10 s in well under 100 ms of
// a real service's time), then tts_complete. Once it reads an interrupt it sends inFlight more
// frames (what was on its way when it heard), then tts_complete, as a service that supports
// barge-in does. It records the interrupt.
type speaker struct {
	frames, inFlight int
	interrupt        chan map[string]any
	sent             atomic.Int64
	stopped          atomic.Bool
}

func newSpeaker(frames, inFlight int) *speaker {
	return &speaker{frames: frames, inFlight: inFlight, interrupt: make(chan map[string]any, 4)}
}

func (sp *speaker) serve(fc *fakeConn) {
	ctx := context.Background()
	started := make(chan struct{})
	var once sync.Once
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-started:
		case <-fc.f.stop:
			return
		}
		frame := make([]byte, ttsFrameBytes)
		extra := 0
		for i := 0; i < sp.frames; i++ {
			if sp.stopped.Load() {
				if extra == sp.inFlight {
					break
				}
				extra++
			}
			if fc.conn.Write(ctx, websocket.MessageBinary, frame) != nil {
				return
			}
			sp.sent.Add(1)
		}
		_ = fc.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"tts_complete"}`))
	}()
	for {
		_, b, err := fc.conn.Read(ctx)
		if err != nil {
			fc.err = err
			break
		}
		var m map[string]any
		_ = json.Unmarshal(b, &m)
		switch m["type"] {
		case "text":
			once.Do(func() { close(started) })
		case "interrupt":
			sp.stopped.Store(true)
			sp.interrupt <- m
		}
	}
	fc.conn.CloseNow()
	<-done
}

// heard is a message the client read, and when.
type heard struct {
	at  time.Time
	msg wsMsg
}

// listen collects what cl reads, with the time it was read, until stop is closed.
func listen(cl *client, stop chan struct{}) (get func() []heard) {
	var mu sync.Mutex
	var got []heard
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case m := <-cl.msgs:
				mu.Lock()
				got = append(got, heard{time.Now(), m})
				mu.Unlock()
			case <-cl.done:
				return
			case <-stop:
				return
			}
		}
	}()
	return func() []heard {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return got
	}
}

// TestBargeIn: the service sends 10 s of TTS at once; the client starts playing with the first
// frame and interrupts after 1 s of playback. After its interrupt the client gets no more than
// one frame of TTS, then tts_flushed; the service learns played_ms within a frame of the 1 s
// heard; the session held at most VOICE_TTS_QUEUE of TTS while the service flooded, and stopped
// reading the service beyond it; the audio still on its way after the interrupt is dropped,
// and the answer's tts_complete reaches the client.
func TestBargeIn(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		sp := newSpeaker(500, 5)
		o := paced()
		o.TTSQueue = 64 << 10 // 2 s of audio: well under the 10 s the service sends
		e := newEnv(t, setup{opts: o, net: n, serve: sp.serve})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		e.fake.next(t)
		stop := make(chan struct{})
		get := listen(cl, stop)
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"text","text":"tell me a story"}`))
		synctest.Wait()
		start := time.Now() // the first frame's release: nothing takes fake time on the way
		// While the client plays, the service is held back: the gateway holds at most its
		// queue, and the service has sent no more than that, the lead and what TCP holds.
		time.Sleep(500 * time.Millisecond)
		synctest.Wait()
		if s := sp.sent.Load(); s > int64(o.TTSQueue/ttsFrameBytes+50) {
			t.Errorf("after 500 ms the service could send %d frames: the gateway kept reading it", s)
		}
		time.Sleep(500 * time.Millisecond) // 1 s of playback
		interruptAt := time.Now()
		write(t, cl.c, websocket.MessageText, []byte(`{"type":"interrupt"}`))
		got := <-sp.interrupt
		played, _ := got["played_ms"].(float64)
		if played < 980 || played > 1020 || got["session_id"] == nil {
			t.Errorf("the service got %v: played_ms %v, want 1000 within a frame", got, played)
		}
		// What the service had in flight is dropped; its tts_complete comes through.
		time.Sleep(time.Second)
		synctest.Wait()
		close(stop)
		msgs := get()

		var before, after time.Duration // TTS audio read before and after the interrupt
		flushed, completeAt := -1, -1
		var first time.Time
		for i, h := range msgs {
			switch {
			case h.msg.typ == websocket.MessageBinary:
				if first.IsZero() {
					first = h.at
				}
				if h.at.Before(interruptAt) {
					before += 20 * time.Millisecond
				} else {
					after += 20 * time.Millisecond
				}
			case strings.Contains(string(h.msg.data), `"tts_flushed"`):
				flushed = i
				var f map[string]any
				_ = json.Unmarshal(h.msg.data, &f)
				if f["played_ms"] != played || f["dropped_ms"].(float64) <= 0 {
					t.Errorf("tts_flushed %v, want the played_ms the service got (%v) and what was dropped", f, played)
				}
			case strings.Contains(string(h.msg.data), `"tts_complete"`):
				completeAt = i
			}
		}
		t.Logf("barge-in: %v of TTS read before the interrupt at 1 s, %v after it; the service got played_ms %v", before, after, played)
		if !first.Equal(start) {
			t.Errorf("first TTS frame read at %v, want at the start %v", first.Sub(start), time.Duration(0))
		}
		// Released at playback rate plus the lead: 1 s played, and between half the lead and
		// the lead ahead (a frame more at most: frames are whole).
		if before < 1125*time.Millisecond || before > 1270*time.Millisecond {
			t.Errorf("%v of TTS read before the interrupt at 1 s of playback, want 1.125 s to 1.25 s", before)
		}
		if after > 20*time.Millisecond {
			t.Errorf("%v of TTS read after the interrupt, want at most one frame", after)
		}
		if flushed < 0 || completeAt < flushed {
			t.Errorf("tts_flushed at %d, tts_complete at %d: want both, in that order", flushed, completeAt)
		}
		for _, h := range msgs[max(flushed, 0):] {
			if h.msg.typ == websocket.MessageBinary {
				t.Error("TTS audio after tts_flushed")
				break
			}
		}
		cl.c.Close(websocket.StatusNormalClosure, "")
		st := e.nextStats(t)
		if st.TTSFlushes != 1 || st.TTSQueuePeak > o.TTSQueue || st.TTSQueuePeak < o.TTSQueue-ttsFrameBytes {
			t.Errorf("flushes %d, queue peak %d bytes; want 1 and the %d bytes of the bound", st.TTSFlushes, st.TTSQueuePeak, o.TTSQueue)
		}
		// Charged and counted as released: what was heard and the lead, not what was dropped.
		if st.AudioOut != before+after {
			t.Errorf("audio out %v, want the %v released", st.AudioOut, before+after)
		}
	})
}

// TestServiceInterrupts: the service's own speech_started (its VAD) and tts_cancelled are
// interrupts too: the queue is flushed, the client told, and the service gets interrupt with
// played_ms and the reason. After tts_cancelled (the service stopped), the next answer's audio
// flows at once.
func TestServiceInterrupts(t *testing.T) {
	for _, typ := range []string{"speech_started", "tts_cancelled"} {
		t.Run(typ, func(t *testing.T) {
			bubble(t, func(t *testing.T, n *memNet) {
				got := make(chan map[string]any, 4)
				e := newEnv(t, setup{opts: paced(), net: n, serve: func(fc *fakeConn) {
					ctx := context.Background()
					for range 100 { // 2 s of TTS
						_ = fc.conn.Write(ctx, websocket.MessageBinary, make([]byte, ttsFrameBytes))
					}
					for {
						_, b, err := fc.conn.Read(ctx)
						if err != nil {
							return
						}
						var m map[string]any
						_ = json.Unmarshal(b, &m)
						if m["type"] == "interrupt" {
							got <- m
						}
						if m["cmd"] == "go" {
							_ = fc.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"`+typ+`"}`))
						}
						if m["cmd"] == "again" {
							_ = fc.conn.Write(ctx, websocket.MessageBinary, make([]byte, ttsFrameBytes))
						}
					}
				}})
				cl := e.connect(t, "", nil)
				cl.initMsg(t)
				time.Sleep(500 * time.Millisecond)
				synctest.Wait()
				write(t, cl.c, websocket.MessageText, []byte(`{"type":"text","cmd":"go"}`))
				m := <-got
				if m["reason"] != typ || m["played_ms"] != 500.0 {
					t.Errorf("the service got %v, want interrupt for %s with played_ms 500", m, typ)
				}
				synctest.Wait()
				var frames, flushed, relayed int
				for len(cl.msgs) > 0 {
					msg := <-cl.msgs
					switch {
					case msg.typ == websocket.MessageBinary:
						frames++
						if flushed > 0 {
							t.Error("TTS after tts_flushed")
						}
					case strings.Contains(string(msg.data), "tts_flushed"):
						flushed++
					case strings.Contains(string(msg.data), typ):
						relayed++
					}
				}
				// 500 ms played, and between half the lead and the lead ahead: 625 to 750 ms.
				if frames < 32 || frames > 38 || flushed != 1 || relayed != 1 {
					t.Errorf("%d frames, %d tts_flushed, %d %s; want 32 to 38, 1, 1", frames, flushed, relayed, typ)
				}
				// The next answer: after tts_cancelled it flows at once; after speech_started the
				// interrupted answer is still open (the service has not ended it), so it is dropped.
				write(t, cl.c, websocket.MessageText, []byte(`{"type":"text","cmd":"again"}`))
				synctest.Wait()
				next := 0
				for len(cl.msgs) > 0 {
					if (<-cl.msgs).typ == websocket.MessageBinary {
						next++
					}
				}
				if want := map[string]int{"tts_cancelled": 1, "speech_started": 0}[typ]; next != want {
					t.Errorf("%d frames of the next answer, want %d", next, want)
				}
				_ = cl.c.Close(websocket.StatusNormalClosure, "")
				st := e.nextStats(t)
				if st.TTSFlushes != 1 {
					t.Errorf("flushes %d", st.TTSFlushes)
				}
			})
		})
	}
}

// TestTTSPacedQuota: paced TTS is charged as it is released: with 1 s of quota, the session
// ends at 1 s of released TTS, and the audio still queued is never charged.
func TestTTSPacedQuota(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		o := governed(meter, policy.VoiceLimits{UserSecondsPerDay: 1})
		o.TTSPacing, o.TTSLead = true, 250*time.Millisecond
		e := newEnv(t, setup{opts: o, net: n, serve: func(fc *fakeConn) {
			for range 250 { // 5 s of TTS
				if fc.conn.Write(context.Background(), websocket.MessageBinary, make([]byte, ttsFrameBytes)) != nil {
					return
				}
			}
			<-fc.f.stop
		}})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		msgs, err := cl.end(t, 5*time.Second)
		if code := websocket.CloseStatus(err); code != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v, want %d", err, voice.CloseQuotaExceeded)
		}
		frames := 0
		for _, m := range msgs {
			if m.typ == websocket.MessageBinary {
				frames++
			}
		}
		st := e.nextStats(t)
		if frames != 50 || st.AudioOut != time.Second || st.Charged != time.Second {
			t.Errorf("%d frames, audio out %v, charged %v; want 50, 1s, 1s", frames, st.AudioOut, st.Charged)
		}
		e.idle(t, time.Second)
		allOver(t, e, nil)
	})
}

// answerer is a fake algorithm service that answers every text message with TTS as fast as the
// connection takes it (up to 10 s), until it reads an interrupt; it then ends the answer with
// tts_complete, as a service that supports barge-in does.
func answerer(fc *fakeConn) {
	ctx := context.Background()
	var stop atomic.Bool
	var wg sync.WaitGroup
	defer wg.Wait()
	defer fc.conn.CloseNow()
	for {
		_, b, err := fc.conn.Read(ctx)
		if err != nil {
			fc.err = err
			return
		}
		switch {
		case bytes.Contains(b, []byte(`"type":"text"`)):
			wg.Wait()
			stop.Store(false)
			wg.Go(func() {
				frame := make([]byte, ttsFrameBytes)
				for i := 0; i < 500 && !stop.Load(); i++ {
					if fc.conn.Write(ctx, websocket.MessageBinary, frame) != nil {
						return
					}
				}
				_ = fc.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"tts_complete"}`))
			})
		case bytes.Contains(b, []byte(`"type":"interrupt"`)):
			stop.Store(true)
		}
	}
}

// TestBargeInLatency: on real sockets and real time, four sessions at once each interrupt
// fifteen answers after 100 to 240 ms of playback. It reports the TTS audio each client read
// after sending its interrupt and before tts_flushed — of it, what the gateway released after
// the interrupt reached it (the audio tts_flushed says was released, played_ms + buffered_ms,
// less what the client had read by its interrupt, was in flight already) — and the time from
// the interrupt to tts_flushed (after which nothing of the answer plays), p50 and p99: the
// figures of docs/voice.md. Beyond what was in flight, at most the frame being written.
func TestBargeInLatency(t *testing.T) {
	e := newEnv(t, setup{opts: paced(), serve: answerer})
	const sessions, answers = 4, 15
	var mu sync.Mutex
	var after, beyond []time.Duration // audio read after each interrupt; of it, released after it
	var took []time.Duration          // interrupt → tts_flushed
	var wg sync.WaitGroup
	for k := range sessions {
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		wg.Go(func() {
			for i := range answers {
				write(t, cl.c, websocket.MessageText, []byte(`{"type":"text","text":"go on"}`))
				if m := cl.next(t); m.typ != websocket.MessageBinary {
					t.Errorf("got %s, want the answer's audio", m.data)
					return
				}
				read := 20 * time.Millisecond // of the answer, before the interrupt
				time.Sleep(time.Duration(100+10*((i+k)%15)) * time.Millisecond)
				for len(cl.msgs) > 0 {
					if (<-cl.msgs).typ == websocket.MessageBinary {
						read += 20 * time.Millisecond
					}
				}
				at := time.Now()
				write(t, cl.c, websocket.MessageText, []byte(`{"type":"interrupt"}`))
				var audio time.Duration
				var released time.Duration
				for {
					m := cl.next(t)
					if m.typ == websocket.MessageBinary {
						audio += 20 * time.Millisecond
						continue
					}
					if bytes.Contains(m.data, []byte(`"tts_flushed"`)) {
						var f struct{ PlayedMS, BufferedMS int64 }
						_ = json.Unmarshal(bytes.ReplaceAll(bytes.ReplaceAll(m.data, []byte("played_ms"), []byte("PlayedMS")),
							[]byte("buffered_ms"), []byte("BufferedMS")), &f)
						released = time.Duration(f.PlayedMS+f.BufferedMS) * time.Millisecond
						break
					}
				}
				d := time.Since(at)
				for m := cl.next(t); !bytes.Contains(m.data, []byte(`"tts_complete"`)); m = cl.next(t) {
					if m.typ == websocket.MessageBinary {
						t.Error("TTS audio after tts_flushed")
					}
				}
				// played_ms and buffered_ms are whole milliseconds: allow their rounding.
				inFlight := max(released-read+2*time.Millisecond, 0)
				mu.Lock()
				after = append(after, audio)
				beyond = append(beyond, max(audio-inFlight, 0))
				took = append(took, d)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(took) != sessions*answers {
		t.Fatalf("%d interrupts answered, want %d", len(took), sessions*answers)
	}
	for _, v := range [][]time.Duration{after, beyond, took} {
		slices.Sort(v)
	}
	q := func(v []time.Duration, f float64) time.Duration { return v[int(f*float64(len(v)-1))] }
	t.Logf("barge-in, %d interrupts: TTS read after the interrupt p50 %v, p99 %v, max %v (beyond what was in flight: max %v); interrupt to tts_flushed p50 %v, p99 %v",
		len(took), q(after, 0.5), q(after, 0.99), after[len(after)-1], beyond[len(beyond)-1],
		q(took, 0.5).Round(10*time.Microsecond), q(took, 0.99).Round(10*time.Microsecond))
	if m := beyond[len(beyond)-1]; m > 20*time.Millisecond {
		t.Errorf("%v of TTS released after an interrupt reached the gateway, want at most the frame being written", m)
	}
}

// TestInterruptFlood: a client that sends interrupts as fast as it can and reads nothing holds
// one tts_flushed in the session's queue, not one per interrupt; it is dropped as a slow
// consumer within the write timeout, and everything is released.
func TestInterruptFlood(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := paced()
		o.WriteTimeout = 300 * time.Millisecond
		leases := policy.NewMemoryLeases()
		var chunks atomic.Int64
		e := newEnv(t, setup{opts: o, net: n, serve: countChunks(&chunks), lease: leases})
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
		sent := 0
		for ; sent < 5000; sent++ {
			wctx, wcancel := context.WithTimeout(context.Background(), time.Second)
			err := c.Write(wctx, websocket.MessageText, []byte(`{"type":"interrupt"}`))
			wcancel()
			if err != nil {
				break
			}
		}
		e.idle(t, 2*time.Second)
		st := <-e.ends
		t.Logf("%d interrupts sent; session ended %v, %d flushes, queue peak %d bytes", sent, st.CloseCode, st.TTSFlushes, st.TTSQueuePeak)
		if st.TTSQueuePeak == 0 || st.TTSQueuePeak > 256 {
			t.Errorf("the queue held %d bytes of tts_flushed messages, want one", st.TTSQueuePeak)
		}
		if st.TTSFlushes == 0 {
			t.Error("no interrupt was carried out")
		}
		fc.ended(t, time.Second)
		allOver(t, e, leases)
	})
}

// TestPacedClientThatNeverReads: paced TTS to a client that stopped reading. The writer's
// first write the client does not take stalls past the write timeout: the session ends 1013,
// the service held back by the bounded queue meanwhile, and nothing is left behind.
func TestPacedClientThatNeverReads(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		o := paced()
		o.WriteTimeout = 300 * time.Millisecond
		o.TTSQueue = 32 << 10
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
		e.idle(t, o.WriteTimeout+time.Second)
		took := time.Since(start)
		st := <-e.ends
		t.Logf("session over %v after the client stopped reading; the service sent %d frames, the queue held at most %d bytes",
			took, fc.sent.Load(), st.TTSQueuePeak)
		if st.CloseCode != websocket.StatusTryAgainLater {
			t.Errorf("session ended with %v, want 1013 (a slow consumer)", st.CloseCode)
		}
		if st.TTSQueuePeak > o.TTSQueue {
			t.Errorf("the queue held %d bytes, over its %d", st.TTSQueuePeak, o.TTSQueue)
		}
		fc.ended(t, time.Second)
		allOver(t, e, leases)
	})
}
