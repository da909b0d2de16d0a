package voice_test

// The tests of the sessions' one clock (timers.go) at scale: its work spread over the interval,
// its token rechecks paced, a token's expiry kept without them, and a store that cannot answer
// costing one batch of rechecks at a time. On fake time, so that the counts are exact.

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
)

// recheckLog records each session's token rechecks, by the fake time they ran at.
type recheckLog struct {
	mu      sync.Mutex
	at      map[time.Time]int      // rechecks that ran at each instant
	session map[string][]time.Time // each session's rechecks, by the user its request named
}

func newRecheckLog() *recheckLog {
	return &recheckLog{at: map[time.Time]int{}, session: map[string][]time.Time{}}
}

// recheck is a Recheck that records every call and lets the token through.
func (l *recheckLog) recheck(r *http.Request) func(context.Context) error {
	user := r.Header.Get("X-Test-User")
	return func(context.Context) error {
		now := time.Now()
		l.mu.Lock()
		l.at[now]++
		l.session[user] = append(l.session[user], now)
		l.mu.Unlock()
		return nil
	}
}

// openUsers opens n sessions at once, each naming its own user.
func openUsers(t *testing.T, e *env, n int) []*client {
	t.Helper()
	cls := make([]*client, n)
	for i := range cls {
		cls[i] = e.connect(t, "", &websocket.DialOptions{HTTPHeader: http.Header{"X-Test-User": {"u-" + strconv.Itoa(i)}}})
		cls[i].initMsg(t)
	}
	return cls
}

func TestClockSpreadsItsWork(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		const sessions = 160
		log := newRecheckLog()
		o := fast()
		o.RecheckInterval, o.IdleTimeout = 160*time.Millisecond, time.Hour
		o.Recheck = log.recheck
		e := newEnv(t, setup{opts: o, net: n})
		openUsers(t, e, sessions) // all at the same instant of fake time
		time.Sleep(10 * o.RecheckInterval)
		synctest.Wait()

		log.mu.Lock()
		defer log.mu.Unlock()
		most := 0
		for _, k := range log.at {
			most = max(most, k)
		}
		// A sixteenth of the sessions a tick, however they started: never the whole lot at once.
		if want := sessions / 16; most > want {
			t.Errorf("%d rechecks at one instant for %d sessions, want at most %d", most, sessions, want)
		}
		for i := range sessions {
			got := log.session["u-"+strconv.Itoa(i)]
			// Each is rechecked every interval: 9 or 10 times in 10 (the first one interval in).
			if len(got) < 9 || len(got) > 10 {
				t.Errorf("session %d: %d rechecks in 10 intervals, want 9 or 10", i, len(got))
				continue
			}
			for k := 1; k < len(got); k++ {
				if gap := got[k].Sub(got[k-1]); gap < o.RecheckInterval || gap > o.RecheckInterval+o.RecheckInterval/16 {
					t.Errorf("session %d: rechecks %v apart, want one interval (%v)", i, gap, o.RecheckInterval)
					break
				}
			}
		}
	})
}

func TestRechecksArePaced(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		const sessions = 100
		log := newRecheckLog()
		o := fast()
		o.RecheckInterval, o.IdleTimeout = 100*time.Millisecond, time.Hour
		o.RecheckRate = 200 // so 100 sessions are rechecked every 625 ms, not every 100
		o.Recheck = log.recheck
		e := newEnv(t, setup{opts: o, net: n})
		openUsers(t, e, sessions)
		const span = 5 * time.Second
		time.Sleep(span)
		synctest.Wait()

		log.mu.Lock()
		defer log.mu.Unlock()
		total := 0
		for _, k := range log.at {
			total += k
		}
		if limit := int(o.RecheckRate * span.Seconds()); total > limit {
			t.Errorf("%d rechecks in %v, above the pace of %v a second (%d)", total, span, o.RecheckRate, limit)
		}
		every := time.Duration(1.25 * float64(sessions) / o.RecheckRate * float64(time.Second))
		for i := range sessions {
			got := log.session["u-"+strconv.Itoa(i)]
			// Each in turn, every 1.25×sessions/RecheckRate (625 ms): 7 or 8 times in 5 s.
			if len(got) < 7 {
				t.Errorf("session %d: %d rechecks in %v, want one every %v", i, len(got), span, every)
				continue
			}
			for k := 1; k < len(got); k++ {
				if gap := got[k].Sub(got[k-1]); gap > every+o.RecheckInterval {
					t.Errorf("session %d: rechecks %v apart, want at most %v", i, gap, every+o.RecheckInterval)
					break
				}
			}
		}
	})
}

func TestExpiredTokenClosesBetweenRechecks(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		var checks atomic.Int64
		o := fast()
		o.RecheckInterval, o.IdleTimeout = 100*time.Millisecond, time.Hour
		o.RecheckRate = 0.01 // a recheck would come only after 100 s
		o.Recheck = func(*http.Request) func(context.Context) error {
			return func(context.Context) error { checks.Add(1); return nil }
		}
		var expiry time.Time
		o.Expiry = func(*http.Request) time.Time {
			expiry = time.Now().Add(2 * time.Second)
			return expiry
		}
		e := newEnv(t, setup{opts: o, net: n})
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		msgs, err := cl.end(t, 3*time.Second)
		late := time.Since(expiry)
		t.Logf("closed %v after the token's expiry; %d rechecks meanwhile", late, checks.Load())
		if late < 0 || late > o.RecheckInterval {
			t.Errorf("closed %v after the token's expiry, want within one interval (%v)", late, o.RecheckInterval)
		}
		if code := websocket.CloseStatus(err); code != voice.CloseTokenInvalid {
			t.Errorf("client saw %v (%v), want close 4401", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeTokenInvalid {
			t.Errorf("error messages %v, want [TOKEN_INVALID]", codes)
		}
	})
}

func TestFrozenStoreHoldsOneBatchOfRechecks(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		const sessions = 64
		var inFlight, most, calls atomic.Int64
		o := fast()
		o.RecheckInterval, o.IdleTimeout = 100*time.Millisecond, time.Hour
		o.PingInterval = 300 * time.Millisecond
		o.Recheck = func(*http.Request) func(context.Context) error {
			return func(ctx context.Context) error { // a store that never answers
				calls.Add(1)
				k := inFlight.Add(1)
				defer inFlight.Add(-1)
				for m := most.Load(); k > m && !most.CompareAndSwap(m, k); m = most.Load() {
				}
				<-ctx.Done()
				return nil // a store that cannot answer does not end the session
			}
		}
		e := newEnv(t, setup{opts: o, net: n})
		cls := openUsers(t, e, sessions)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if m := most.Load(); m != 1 {
			t.Errorf("%d rechecks waited on the store at once, want 1 (one batch at a time, each in turn)", m)
		}
		// Each batch waits one interval for the store: about 30 batches in 3 s, no more.
		if c := calls.Load(); c > 31 {
			t.Errorf("%d rechecks sent to a store that does not answer in 3 s, want at most one batch an interval", c)
		}
		// The clock goes on meanwhile: pings are answered, and no session ends.
		for i, cl := range cls {
			select {
			case <-cl.done:
				t.Errorf("session %d ended: %v", i, cl.err)
			default:
			}
		}
		if got := e.reg.Len(); got != sessions {
			t.Errorf("%d sessions live, want %d", got, sessions)
		}
	})
}
