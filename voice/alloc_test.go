package voice_test

import (
	"context"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
)

// quietEcho sends every message back as it came, reusing one buffer: it allocates nothing per
// message, so what the process allocates is the gateway's.
func quietEcho(fc *fakeConn) {
	buf := make([]byte, 64<<10)
	for {
		typ, r, err := fc.conn.Reader(context.Background())
		if err != nil {
			fc.err = err
			return
		}
		n, err := io.ReadFull(r, buf)
		if err != io.ErrUnexpectedEOF && err != io.EOF {
			fc.err = err
			return
		}
		if err := fc.conn.Write(context.Background(), typ, buf[:n]); err != nil {
			fc.err = err
			return
		}
	}
}

// TestRelayDoesNotAllocate relays audio frames through a session, up and echoed back down, in
// both audio modes and with governance on (each frame charged to a quota both ways, and paced),
// and counts the process's allocations per frame: the client and the fake reuse their buffers,
// so they are the gateway's.
func TestRelayDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	for _, tc := range []struct {
		name          string
		raw, governed bool
	}{{"audio_chunk", false, false}, {"raw", true, false}, {"governed", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			o := fast()
			o.RawAudio = tc.raw
			if tc.governed {
				// A quota, charged frame by frame against a reservation that lasts the whole
				// run (one every VOICE_RESERVATION of audio costs what a call to the meter
				// does, not the frames), and a pace bound the client keeps within.
				o = governed(policy.NewMemoryAudioMeter(), policy.VoiceLimits{UserSecondsPerDay: 86400})
				o.Reservation = time.Hour
				o.Pace, o.PaceBurst = 1000, time.Hour
			}
			e := newEnv(t, setup{opts: o, serve: quietEcho, quiet: true})
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			c, _, err := e.dial(ctx, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseNow()
			buf := make([]byte, 64<<10)
			roundTrip := func(f []byte) {
				if err := c.Write(context.Background(), websocket.MessageBinary, f); err != nil {
					t.Fatal(err)
				}
				_, r, err := c.Reader(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(r, buf); err != io.ErrUnexpectedEOF && err != io.EOF {
					t.Fatal(err)
				}
			}
			if _, r, err := c.Reader(ctx); err != nil { // session_initialized
				t.Fatal(err)
			} else {
				io.Copy(io.Discard, r)
			}
			f := frame(3)
			for range 200 { // warm the pools up
				roundTrip(f)
			}
			const frames = 2000
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			for range frames {
				roundTrip(f)
			}
			runtime.ReadMemStats(&after)
			perFrame := float64(after.Mallocs-before.Mallocs) / frames
			t.Logf("%.3f allocations per frame, up and back", perFrame)
			// A GC cycle now and then may refill a pool: well under one per frame.
			if perFrame > 0.05 {
				t.Errorf("%.3f allocations per relayed frame, want none", perFrame)
			}
		})
	}
}
