package voice

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// timers is the one clock of a Handler's sessions. It looks at each session once every
// RecheckInterval for its maximum length, an idle timeout, its token's expiry, a keepalive ping
// that is due and a token recheck that is due (quotas are charged as audio arrives, not here:
// govern.go). It runs only while there are sessions, so an idle gateway keeps no goroutine for
// it.
//
// The work is spread over time, never done in one burst per interval: the clock ticks clockSlots
// times an interval and visits the next 1/clockSlots of the sessions, in turn, so that a tick
// costs the same whether the sessions started together or not, and the relays, which share the
// CPUs with it, never wait behind a whole interval's housekeeping at once.
//
// Token rechecks ask the stores (revocations, user status), which is why they are paced: since
// revocations reach sessions at once by pub/sub (Registry.Revoke), a recheck is only the
// fallback for a lost message, and a gateway rechecks at most RecheckRate tokens a second
// whatever its number of sessions. A session's token is rechecked every RecheckInterval, or
// every 1.25×sessions/RecheckRate seconds when there are more sessions than that. Expiry is
// not a store's answer: it is checked on every visit.
//
// Nothing on the clock blocks. A ping runs in a short-lived goroutine (the library's Ping waits
// for the pong); a tick's rechecks run in one goroutine of their own, bounded by one deadline,
// one batch at a time: a store that cannot answer delays the rechecks (they are the fallback;
// sessions go on), never the clock.
type timers struct {
	h *Handler

	mu       sync.Mutex
	ring     list.List // of *visit, in the order the clock visits them
	sessions map[*session]*list.Element
	stop     chan struct{} // closed to stop the running clock; nil when none runs
	done     chan struct{} // closed when the last clock started has returned

	// Used by the clock goroutine only. There is one at a time: a clock started while the
	// last one finishes its tick waits for it to return, so that no two tick at once.
	batch []*visit
	// rechecks is the batch handed to the rechecking goroutine; it is the clock's again once
	// rechecking is false.
	rechecks   []*session
	rechecking atomic.Bool
	credit     float64 // rechecks the pace allows now: RecheckRate a second, a tick's worth and one saved at most
}

// visit is the clock's state of one session, written by the clock goroutine only (and by add,
// before the session is on the ring).
type visit struct {
	s         *session
	lastPing  time.Time // when both sides were last pinged
	rechecked time.Time // when the token was last rechecked
}

// clockSlots is how many ticks an interval has: each visits a slot's share of the sessions.
const clockSlots = 16

func newTimers(h *Handler) *timers {
	return &timers{h: h, sessions: map[*session]*list.Element{}}
}

func (t *timers) add(s *session) {
	v := &visit{s: s, lastPing: s.start, rechecked: s.start}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sessions[s] = t.ring.PushBack(v)
	if t.stop == nil {
		t.stop = make(chan struct{})
		last, done := t.done, make(chan struct{})
		t.done = done
		go t.run(t.stop, last, done)
	}
}

func (t *timers) remove(s *session) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.sessions[s]; e != nil {
		t.ring.Remove(e)
		delete(t.sessions, s)
	}
	if len(t.sessions) == 0 && t.stop != nil {
		close(t.stop)
		t.stop = nil
	}
}

func (t *timers) run(stop, last <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	if last != nil {
		<-last // bounded: a tick never blocks
	}
	tk := time.NewTicker(t.step())
	defer tk.Stop()
	// Rechecks still waiting on a store when the clock stops (no session is left) stop too.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for {
		select {
		case <-stop:
			return
		case now := <-tk.C:
			t.tick(ctx, now)
		}
	}
}

// step is the time between two ticks.
func (t *timers) step() time.Duration { return max(t.h.o.RecheckInterval/clockSlots, time.Millisecond) }

// recheckEvery is how often each of n sessions has its token rechecked: every RecheckInterval,
// or, when that would exceed RecheckRate, every n/RecheckRate seconds and a quarter more, so
// that the pace has room to spare and no session waits for the others' turns.
func (t *timers) recheckEvery(n int) time.Duration {
	o := &t.h.o
	return max(o.RecheckInterval, time.Duration(1.25*float64(n)/o.RecheckRate*float64(time.Second)))
}

// tick visits the next share of the sessions, moving them to the back of the ring. ctx ends
// when the clock stops.
func (t *timers) tick(ctx context.Context, now time.Time) {
	t.mu.Lock()
	n := len(t.sessions)
	batch := t.batch[:0]
	for range (n + clockSlots - 1) / clockSlots {
		e := t.ring.Front()
		batch = append(batch, e.Value.(*visit))
		t.ring.MoveToBack(e)
	}
	t.mu.Unlock()

	o := &t.h.o
	every := t.recheckEvery(n)
	// What the pace allows this tick: with more due than that, the rest stay due for their
	// next visit.
	perTick := o.RecheckRate * t.step().Seconds()
	t.credit = min(t.credit+perTick, perTick+1)
	canRecheck := !t.rechecking.Load()
	rechecks := t.rechecks[:0]
	for _, v := range batch {
		s := v.s
		if s.ended.Load() {
			continue
		}
		s.govern(now)
		if s.ended.Load() || s.windowOver(now) {
			continue
		}
		away := s.isAway()
		if idle := now.Sub(time.Unix(0, s.lastIn.Load())); idle >= o.IdleTimeout && !away {
			s.end(ending{code: websocket.StatusNormalClosure, errCode: CodeIdle,
				reason: "no message from the client for " + o.IdleTimeout.String()})
			continue
		}
		if !s.expiry.IsZero() && now.After(s.expiry) {
			s.end(ending{code: CloseTokenInvalid, errCode: CodeTokenInvalid,
				reason: "the token is no longer valid: the token has expired"})
			continue
		}
		if now.Sub(v.lastPing) >= o.PingInterval {
			v.lastPing = now
			s.ping()
		}
		if s.recheck != nil && canRecheck && t.credit >= 1 && now.Sub(v.rechecked) >= every {
			t.credit--
			v.rechecked = now
			rechecks = append(rechecks, s)
		}
	}
	clear(batch)
	t.batch = batch
	t.rechecks = rechecks
	if len(rechecks) > 0 {
		t.rechecking.Store(true)
		go t.recheck(ctx, rechecks)
	}
}

// recheck rechecks the tokens of a tick's sessions, within one recheck interval in all, and
// ends those whose token no longer holds.
func (t *timers) recheck(ctx context.Context, batch []*session) {
	defer t.rechecking.Store(false)
	ctx, cancel := context.WithTimeout(ctx, t.h.o.RecheckInterval)
	defer cancel()
	for _, s := range batch {
		if ctx.Err() != nil {
			break // the store is not answering: the rest wait for their next turn
		}
		if s.ended.Load() {
			continue
		}
		if err := s.recheck(ctx); err != nil {
			s.end(ending{code: CloseTokenInvalid, errCode: CodeTokenInvalid,
				reason: "the token is no longer valid: " + err.Error()})
		}
	}
	clear(batch)
}

// ping pings both sides in turn from one short-lived goroutine (the library's Ping waits for
// the pong); a side that has not answered within a ping interval is dead.
func (s *session) ping() {
	if !s.pinging.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.pinging.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), s.h.o.PingInterval)
		defer cancel()
		if !s.isAway() {
			c := s.clientNow()
			if err := c.ws.Ping(ctx); err != nil {
				if !s.ended.Load() {
					s.clientGone(c, "client stopped answering pings")
				}
				return
			}
		}
		if err := s.up.ws.Ping(ctx); err != nil && !s.ended.Load() {
			s.upstreamGone("the algorithm service stopped answering")
		}
	}()
}
