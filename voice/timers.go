package voice

import (
	"context"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// timers is the one clock of a Handler's sessions: every RecheckInterval one goroutine looks at
// each session for its maximum length, an idle timeout, a keepalive ping that is due, and its
// token recheck (quotas are charged as audio arrives, not here: govern.go). It
// runs only while there are sessions, so an idle gateway keeps no goroutine for it.
//
// Nothing on the tick blocks but the rechecks, and those share one deadline per tick: a
// revocation store that cannot answer delays them (they are the fallback; sessions go on), it
// never stalls the clock.
type timers struct {
	h *Handler

	mu       sync.Mutex
	sessions map[*session]struct{}
	stop     chan struct{} // closed to stop the running clock; nil when none runs
	done     chan struct{} // closed when the last clock started has returned

	// Used by the clock goroutine only. There is one at a time: a clock started while the
	// last one finishes its tick waits for it to return, so that no two tick at once.
	batch []*session // the tick's sessions
}

func newTimers(h *Handler) *timers {
	return &timers{h: h, sessions: map[*session]struct{}{}}
}

func (t *timers) add(s *session) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sessions[s] = struct{}{}
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
	delete(t.sessions, s)
	if len(t.sessions) == 0 && t.stop != nil {
		close(t.stop)
		t.stop = nil
	}
}

func (t *timers) run(stop, last <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	if last != nil {
		<-last // bounded: a tick's blocking calls share a deadline of one recheck interval
	}
	tk := time.NewTicker(t.h.o.RecheckInterval)
	defer tk.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-tk.C:
			t.tick(now)
		}
	}
}

func (t *timers) tick(now time.Time) {
	t.mu.Lock()
	batch := t.batch[:0]
	for s := range t.sessions {
		batch = append(batch, s)
	}
	t.mu.Unlock()
	o := &t.h.o
	for _, s := range batch {
		if s.ended.Load() {
			continue
		}
		s.govern(now)
		if s.ended.Load() {
			continue
		}
		if idle := now.Sub(time.Unix(0, s.lastIn.Load())); idle >= o.IdleTimeout {
			s.end(ending{code: websocket.StatusNormalClosure, errCode: CodeIdle,
				reason: "no message from the client for " + o.IdleTimeout.String()})
			continue
		}
		if now.Sub(s.lastPing) >= o.PingInterval {
			s.lastPing = now
			s.ping(0, s.client.ws, func() { s.clientGone("client stopped answering pings") })
			s.ping(1, s.up.ws, func() { s.upstreamGone("the algorithm service stopped answering") })
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.RecheckInterval)
	defer cancel()
	for _, s := range batch {
		if s.recheck == nil || s.ended.Load() {
			continue
		}
		if err := s.recheck(ctx); err != nil {
			s.end(ending{code: CloseTokenInvalid, errCode: CodeTokenInvalid,
				reason: "the token is no longer valid: " + err.Error()})
		}
	}
	clear(batch)
	t.batch = batch
}

// ping sends a ping on ws in a short-lived goroutine (the library's Ping waits for the pong);
// no pong within a ping interval means the peer is dead.
func (s *session) ping(i int, ws *websocket.Conn, dead func()) {
	if !s.pinging[i].CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.pinging[i].Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), s.h.o.PingInterval)
		defer cancel()
		if err := ws.Ping(ctx); err != nil && !s.ended.Load() {
			dead()
		}
	}()
}
