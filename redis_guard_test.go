package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/redis/rueidis"
)

// fakeRedis stands in for rueidis in the guard's unit tests. Frozen, a call waits until thaw
// whatever its context says — as rueidis does while it waits for a reconnection; refusing, it
// fails at once with a connection error; otherwise it answers.
type fakeRedis struct {
	rueidis.Client // nil: only Do is called

	calls  atomic.Int64
	mu     sync.Mutex
	frozen chan struct{} // nil: not frozen
	refuse bool
}

func (f *fakeRedis) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	f.calls.Add(1)
	f.mu.Lock()
	frozen, refuse := f.frozen, f.refuse
	f.mu.Unlock()
	if frozen != nil {
		<-frozen
	}
	if refuse {
		return rueidis.NewErrorResult(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	}
	return rueidis.NewResult(rueidis.RedisMessage{}, nil)
}

// Mode: a single Redis, one breaker.
func (f *fakeRedis) Mode() rueidis.ClientMode { return rueidis.ClientModeStandalone }

func (f *fakeRedis) freeze() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frozen = make(chan struct{})
}

func (f *fakeRedis) thaw() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.frozen)
	f.frozen = nil
}

func (f *fakeRedis) setRefuse(v bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refuse = v
}

// timed is one guarded call with budget, and how long it took.
func timed(g *guardedRedis, budget time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	start := time.Now()
	err := g.Do(ctx, rueidis.Completed{}).Error()
	return time.Since(start), err
}

// TestGuardedRedisFrozen: against a Redis that does not answer (and a client library that
// does not look at contexts while it waits), every call returns by its deadline; after three
// such calls the breaker opens and calls fail at once without being sent; after the pause one
// probe goes out while the others still fail at once; and once Redis answers again (here the
// stuck calls finish late) calls go through at once. Time is synctest's: the durations are
// exact.
func TestGuardedRedisFrozen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeRedis{}
		g := guardRedis(f, slog.New(slog.NewTextHandler(io.Discard, nil)))
		const budget = 75 * time.Millisecond
		if took, err := timed(g, budget); err != nil || took != 0 {
			t.Fatalf("healthy: %v after %v", err, took)
		}

		f.freeze()
		for i := range breakerFailures {
			took, err := timed(g, budget)
			if !errors.Is(err, context.DeadlineExceeded) || took != budget {
				t.Fatalf("frozen call %d: %v after %v, want the deadline after exactly %v", i+1, err, took, budget)
			}
		}
		sent := f.calls.Load()
		took, err := timed(g, budget)
		if !errors.Is(err, errRedisPaused) || took != 0 {
			t.Fatalf("after %d timeouts: %v after %v, want errRedisPaused at once", breakerFailures, err, took)
		}
		if f.calls.Load() != sent {
			t.Fatal("a call was sent while the breaker is open")
		}

		time.Sleep(breakerOpen)
		probe := make(chan error, 1)
		go func() { _, err := timed(g, budget); probe <- err }()
		synctest.Wait() // the probe is out, stuck in the frozen Redis
		if f.calls.Load() != sent+1 {
			t.Fatalf("%d calls sent after the pause, want exactly one probe", f.calls.Load()-sent)
		}
		if took, err := timed(g, budget); !errors.Is(err, errRedisPaused) || took != 0 {
			t.Fatalf("during the probe: %v after %v, want errRedisPaused at once", err, took)
		}
		if err := <-probe; !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("probe: %v, want its deadline", err)
		}
		if _, err := timed(g, budget); !errors.Is(err, errRedisPaused) {
			t.Fatalf("after a failed probe: %v, want errRedisPaused", err)
		}

		f.thaw() // the stuck calls finish: Redis answers again
		synctest.Wait()
		if took, err := timed(g, budget); err != nil || took != 0 {
			t.Fatalf("after Redis answered again: %v after %v, want an answer at once", err, took)
		}
	})
}

// TestGuardedRedisRefused: a Redis that refuses connections opens the breaker too; a probe that
// gets an answer closes it, within the pause and one call of Redis coming back.
func TestGuardedRedisRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeRedis{}
		g := guardRedis(f, slog.New(slog.NewTextHandler(io.Discard, nil)))
		f.setRefuse(true)
		for range breakerFailures {
			if _, err := timed(g, time.Second); err == nil || errors.Is(err, errRedisPaused) {
				t.Fatalf("refused call: %v, want the connection error", err)
			}
		}
		if _, err := timed(g, time.Second); !errors.Is(err, errRedisPaused) {
			t.Fatalf("after %d refusals: %v, want errRedisPaused", breakerFailures, err)
		}
		f.setRefuse(false)
		back := time.Now()
		for {
			_, err := timed(g, time.Second)
			if err == nil {
				break
			}
			if !errors.Is(err, errRedisPaused) {
				t.Fatalf("while recovering: %v", err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if d := time.Since(back); d > breakerOpen {
			t.Errorf("calls resumed %v after Redis came back, want within %v", d, breakerOpen)
		}
	})
}

// TestGuardedRedisNeutral: a caller that gives up (its context canceled) says nothing about
// Redis, and error replies are answers.
func TestGuardedRedisNeutral(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want outcome
	}{
		{nil, answered},
		{&rueidis.RedisError{}, answered},
		{context.Canceled, neutral},
		{rueidis.ErrClosing, neutral},
		{context.DeadlineExceeded, unanswered},
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, unanswered},
		{io.EOF, unanswered},
	} {
		if got := outcomeOf(tc.err); got != tc.want {
			t.Errorf("outcomeOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
