package main

import (
	"context"
	"log/slog"
	"time"

	"voicegate/proxy"
)

// renewer is the one goroutine that keeps this instance's state in Redis alive: the
// concurrency leases it holds and the voice sessions it publishes. Each task is called every
// period (LEASE_TTL/3) to renew, and at once when kicked, so that a released slot or an ended
// session leaves Redis without its request waiting for Redis or spawning a goroutine of its own.
// A call is bounded by the period, so a frozen Redis delays the next round, never more.
type renewer struct {
	period time.Duration
	kick   chan struct{}
	tasks  []renewTask
	log    *slog.Logger

	cancel context.CancelFunc // of run; nil until start
	done   chan struct{}      // closed when run returns
}

type renewTask struct {
	name string // for logs
	run  func(context.Context) error
}

func newRenewer(period time.Duration, log *slog.Logger) *renewer {
	return &renewer{period: period, kick: make(chan struct{}, 1), log: log}
}

// add registers a task; all must be added before run.
func (r *renewer) add(name string, run func(context.Context) error) {
	r.tasks = append(r.tasks, renewTask{name, run})
}

// start runs the tasks in a goroutine of their own until stop. Without tasks (no Redis) there
// is nothing to keep alive, and it starts nothing. Their context is the renewer's own, ended
// only by stop: not the run's, which ends when a shutdown begins, while the leases and
// sessions of the streams still draining must be kept alive until the gateway closes.
func (r *renewer) start() {
	if len(r.tasks) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan struct{})
	go func() {
		defer close(r.done)
		r.run(ctx)
	}()
}

// stop ends run after its last round; it does nothing if start was not called.
func (r *renewer) stop() {
	if r.cancel != nil {
		r.cancel()
		<-r.done
	}
}

// Kick asks for a round now. It never blocks: kicks that arrive during a round make one more.
func (r *renewer) Kick() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// run calls the tasks every period and on every kick until ctx is done, then once more, so that
// what was released by then leaves Redis before the client is closed.
func (r *renewer) run(ctx context.Context) {
	t := time.NewTicker(r.period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// Shutdown waits for this round: bounded tighter than the others.
			r.round(context.WithoutCancel(ctx), min(r.period, finalRoundBound))
			return
		case <-r.kick:
		case <-t.C:
		}
		r.round(ctx, r.period)
	}
}

// finalRoundBound bounds each task of the round at shutdown.
const finalRoundBound = time.Second

func (r *renewer) round(ctx context.Context, bound time.Duration) {
	for _, task := range r.tasks {
		tctx, cancel := context.WithTimeout(ctx, bound)
		err := task.run(tctx)
		cancel()
		if err != nil {
			r.log.Warn("renewing shared state in Redis failed; it expires unless a later round succeeds",
				"what", task.name, "err", proxy.Describe(err))
		}
	}
}
