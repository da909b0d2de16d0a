package main

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestRenewerRounds: the renewer runs its tasks every period, at once on a kick (however many
// kicks arrive together), once more at stop, and goes on after a task fails; a task that hangs
// is cut off at the period.
func TestRenewerRounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const period = 10 * time.Second
		r := newRenewer(period, slog.New(slog.DiscardHandler))
		var calls, hung atomic.Int64
		var fail atomic.Bool
		r.add("counted", func(context.Context) error {
			calls.Add(1)
			if fail.Load() {
				return errors.New("down")
			}
			return nil
		})
		r.add("hanging", func(ctx context.Context) error {
			if !fail.Load() || hung.Add(1) > 1 {
				return nil
			}
			<-ctx.Done()
			return ctx.Err()
		})
		r.start()
		synctest.Wait()
		if n := calls.Load(); n != 0 {
			t.Fatalf("%d rounds before any kick or period", n)
		}
		r.Kick()
		r.Kick()
		r.Kick()
		synctest.Wait()
		if n := calls.Load(); n < 1 || n > 2 {
			t.Fatalf("%d rounds after three kicks at once, want 1 or 2", n)
		}
		before := calls.Load()
		time.Sleep(period)
		synctest.Wait()
		if n := calls.Load(); n != before+1 {
			t.Fatalf("%d rounds after a period, want %d", n, before+1)
		}
		fail.Store(true)
		start := time.Now()
		r.Kick()
		synctest.Wait()
		time.Sleep(period) // the hanging task is cut off at the period
		synctest.Wait()
		if hung.Load() == 0 {
			t.Fatal("the hanging task never ran")
		}
		fail.Store(false)
		after := calls.Load()
		r.Kick()
		synctest.Wait()
		if calls.Load() <= after {
			t.Fatal("no round after a failed one")
		}
		if time.Since(start) > 3*period {
			t.Errorf("rounds took %v with a hanging task", time.Since(start))
		}
		last := calls.Load()
		r.stop()
		if calls.Load() != last+1 {
			t.Errorf("stop ran %d rounds, want 1", calls.Load()-last)
		}
	})
}
