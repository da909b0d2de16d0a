package sse

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// Timing of the Redis replay log.
const (
	replayBeat      = time.Second            // how often a producing instance says it is alive
	replayBeatTTL   = 3 * replayBeat         // how long a resumer waits for the next before it gives up
	replayBlock     = replayBeat             // how long the reader's XREAD waits for new events
	replayCallBound = 2 * time.Second        // every other call
	replayBatch     = 512                    // appends sent in one pipeline at most
	replayRange     = 256                    // entries read in one call at most
	replayAppear    = 500 * time.Millisecond // how long a resume waits for a log to appear
	replayPoll      = 50 * time.Millisecond  // how often that looks, and the reader polls on a cluster
)

// RedisReplay is a ReplayLog in Redis Streams, shared by every instance: a stream produced on
// one instance can be resumed on any other, and a resumer notices within replayBeatTTL that the
// producing instance died.
//
// Appends go through one goroutine (Run) that sends whatever has queued up in one pipeline:
// under load, many streams' events share a round trip, and a stream never waits for Redis.
// Resumers read what a log holds with XRANGE on the client's shared connections, and wait for
// its tail through the instance's one reader (tails, also run by Run): no resumer holds a
// connection of its own, however many wait.
//
// Keys (prefix is REDIS_PREFIX, as given; the tenant is the Redis Cluster hash tag):
//
//	{prefix}replay:{tenant}:{user}:{request_id}     the stream's batches (a Redis Stream, MAXLEN ~4096;
//	                                                entry ID "<last event id>-1", fields f, d, e)
//	{prefix}replayhb:{tenant}:{user}:{request_id}   set every second while an instance produces it
//	{prefix}replayw:{tenant}:{user}:{request_id}    set every second while someone resumes it
//
// with every part escaped by policy.Keys.
//
// The stream and its keys expire retention after the last append.
type RedisReplay struct {
	client    rueidis.Client
	keys      policy.Keys
	retention time.Duration
	log       *slog.Logger
	onSend    func(batches int)
	ops       chan replayOp
	tails     *tails

	mu       sync.Mutex
	live     map[StreamKey]int // streams produced here, for the heartbeats
	lastWarn atomic.Int64
}

type replayOp struct {
	k     StreamKey
	e     replayEntry
	beat  bool          // set the heartbeat now (production started)
	ended bool          // production ended: drop the heartbeat
	sent  chan struct{} // if set, closed once the op (and so every op before it) was sent
}

// RedisReplayOptions configures a RedisReplay.
type RedisReplayOptions struct {
	Prefix    string        // key prefix (REDIS_PREFIX), as given
	Retention time.Duration // how long a log is kept after its last event
	// OnSend, if set, is told of every pipeline sent (one round trip) and how many batches of
	// events it carried (for metrics).
	OnSend func(batches int)
	Log    *slog.Logger
}

// NewRedisReplay returns a log on client; Run must be running for appends to reach Redis.
func NewRedisReplay(client rueidis.Client, o RedisReplayOptions) *RedisReplay {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.OnSend == nil {
		o.OnSend = func(int) {}
	}
	return &RedisReplay{client: client, keys: policy.NewKeys(o.Prefix), retention: o.Retention, log: o.Log, onSend: o.OnSend,
		ops: make(chan replayOp, 16*replayBatch), live: map[StreamKey]int{}, tails: newTails(client, o.Log)}
}

func (r *RedisReplay) key(k StreamKey) string {
	return r.keys.Tenant(policy.KindReplay, k.Tenant, k.User, k.RequestID)
}

// beat names the key set while an instance produces the log named key.
func (r *RedisReplay) beat(k StreamKey) string {
	return r.keys.Tenant(policy.KindReplayBeat, k.Tenant, k.User, k.RequestID)
}

// watcher names the key set while someone resumes the log.
func (r *RedisReplay) watcher(k StreamKey) string {
	return r.keys.Tenant(policy.KindReplayWait, k.Tenant, k.User, k.RequestID)
}

// Append implements ReplayLog.
func (r *RedisReplay) Append(k StreamKey, first, last int64, data []byte, end bool) {
	r.enqueue(replayOp{k: k, e: replayEntry{first: first, last: last, end: end, data: bytes.Clone(data)}})
}

func (r *RedisReplay) enqueue(op replayOp) bool {
	select {
	case r.ops <- op:
		return true
	default:
		// Redis cannot keep up: the batch is lost, and a resume across it is told so.
		r.warn("replay log queue full; events dropped from the log", nil)
		return false
	}
}

// Produce implements ReplayLog. Its done returns once the stream's last events have been sent
// to Redis (or a send failed), within replayCallBound: what the stream holds (its claim) is
// released after that, so a repeat of its request finds the log complete.
func (r *RedisReplay) Produce(k StreamKey) func() {
	r.mu.Lock()
	r.live[k]++
	r.mu.Unlock()
	r.enqueue(replayOp{k: k, beat: true})
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			if r.live[k]--; r.live[k] <= 0 {
				delete(r.live, k)
			}
			r.mu.Unlock()
			sent := make(chan struct{})
			if !r.enqueue(replayOp{k: k, ended: true, sent: sent}) {
				return
			}
			t := time.NewTimer(replayCallBound)
			defer t.Stop()
			select {
			case <-sent:
			case <-t.C:
			}
		})
	}
}

// Exists implements ReplayLog.
func (r *RedisReplay) Exists(ctx context.Context, k StreamKey) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	n, err := r.client.Do(ctx, r.client.B().Exists().Key(r.key(k), r.beat(k)).Build()).AsInt64()
	if err != nil {
		return false, fmt.Errorf("sse: replay: %w", err)
	}
	return n > 0, nil
}

// Run sends queued appends and the heartbeats of the streams produced here until ctx ends,
// then sends what is still queued. A send under way when ctx ends is finished, not cut short:
// ctx ends once the last stream has ended, and the batch in flight may be its last events.
// It also runs the instance's reader for resumers (tails) until ctx ends.
func (r *RedisReplay) Run(ctx context.Context) {
	reading := make(chan struct{})
	go func() {
		defer close(reading)
		r.tails.run(ctx)
	}()
	defer func() { <-reading }()
	tick := time.NewTicker(replayBeat)
	defer tick.Stop()
	batch := make([]replayOp, 0, replayBatch)
	for {
		beat := false
		select {
		case <-ctx.Done():
			// The streams have ended by now (the gateway waits for them): send what is left.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), replayCallBound)
			for len(r.ops) > 0 {
				batch = r.drain(batch[:0])
				r.send(fctx, batch, false)
				acknowledge(batch)
			}
			cancel()
			return
		case op := <-r.ops:
			batch = append(batch[:0], op)
		case <-tick.C:
			batch, beat = batch[:0], true
		}
		batch = r.drain(batch)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), replayCallBound)
		r.send(sctx, batch, beat)
		cancel()
		acknowledge(batch)
	}
}

// acknowledge tells whoever waits for an op of batch that it was sent.
func acknowledge(batch []replayOp) {
	for _, op := range batch {
		if op.sent != nil {
			close(op.sent)
		}
	}
}

// drain adds to batch what is queued, up to replayBatch.
func (r *RedisReplay) drain(batch []replayOp) []replayOp {
	for len(batch) < replayBatch {
		select {
		case op := <-r.ops:
			batch = append(batch, op)
		default:
			return batch
		}
	}
	return batch
}

// send writes one batch, and the heartbeats when beat, in one pipeline.
func (r *RedisReplay) send(ctx context.Context, batch []replayOp, beat bool) {
	b := r.client.B()
	cmds := make(rueidis.Commands, 0, 2*len(batch)+8)
	// A log's expiry is set when it starts and ends, and with every heartbeat while it runs:
	// one command per batch of events, not two.
	ttl := r.retention.Milliseconds()
	touched := map[string]bool{}
	batches := 0
	for _, op := range batch {
		key := r.key(op.k)
		switch {
		case op.beat:
			cmds = append(cmds, b.Set().Key(r.beat(op.k)).Value("1").Px(replayBeatTTL).Build())
		case op.ended:
			cmds = append(cmds, b.Del().Key(r.beat(op.k)).Build())
		default:
			fields := b.Xadd().Key(key).Maxlen().Almost().Threshold(strconv.Itoa(maxReplayEntries)).
				Id(strconv.FormatInt(op.e.last, 10)+"-1").FieldValue().
				FieldValue("f", strconv.FormatInt(op.e.first, 10)).FieldValue("d", string(op.e.data))
			if op.e.end {
				fields = fields.FieldValue("e", "1")
			}
			cmds = append(cmds, fields.Build())
			batches++
			if op.e.first == 0 || op.e.end {
				touched[key] = true
			}
		}
	}
	for key := range touched {
		cmds = append(cmds, b.Pexpire().Key(key).Milliseconds(ttl).Build())
	}
	if beat {
		r.mu.Lock()
		for k := range r.live {
			key := r.key(k)
			cmds = append(cmds, b.Set().Key(r.beat(k)).Value("1").Px(replayBeatTTL).Build())
			if !touched[key] {
				cmds = append(cmds, b.Pexpire().Key(key).Milliseconds(ttl).Build())
			}
		}
		r.mu.Unlock()
	}
	if len(cmds) == 0 {
		return
	}
	r.onSend(batches)
	for _, res := range r.client.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			r.warn("replay log: Redis write failed; resumes across the lost events will be told", err)
			return
		}
	}
}

// warn logs at most every 10 seconds.
func (r *RedisReplay) warn(msg string, err error) {
	now := time.Now().UnixMilli()
	if last := r.lastWarn.Load(); now-last > 10_000 && r.lastWarn.CompareAndSwap(last, now) {
		if err != nil {
			r.log.Warn(msg, "err", proxy.Describe(err))
		} else {
			r.log.Warn(msg)
		}
	}
}

// Watched implements ReplayLog: someone reads the log here (asked without Redis), or its
// watcher key says someone does elsewhere.
func (r *RedisReplay) Watched(ctx context.Context, k StreamKey) bool {
	if r.tails.watching(r.key(k)) {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	n, err := r.client.Do(ctx, r.client.B().Exists().Key(r.watcher(k)).Build()).AsInt64()
	return err == nil && n > 0
}

// Replay implements ReplayLog. From its first look at the log the stream counts as watched
// (its watcher key is set then, and renewed by the reader while this runs), however long
// catching up takes. It reads what the log holds itself; at the tail, it waits for the
// instance's reader to hand it what comes.
func (r *RedisReplay) Replay(ctx context.Context, k StreamKey, after int64, emit func([]byte) error) error {
	key, beat, watcher := r.key(k), r.beat(k), r.watcher(k)
	b := r.client.B()
	// Is there a log? A client can see an event a moment before the producer's pipeline has
	// taken it to Redis, so a log that is not there yet gets that moment to appear.
	for waited := time.Duration(0); ; waited += replayPoll {
		cctx, cancel := context.WithTimeout(ctx, replayCallBound)
		n, err := r.client.Do(cctx, b.Exists().Key(key, beat).Build()).AsInt64()
		cancel()
		if err != nil {
			return fmt.Errorf("sse: replay: %w", err)
		}
		if n > 0 {
			break
		}
		if waited >= replayAppear {
			return ErrNoReplay
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(replayPoll):
		}
	}
	f := r.tails.join(key, beat, watcher)
	defer r.tails.leave(f)
	id := after
	first, gone := true, false
	for {
		// What the log holds: read here, batch after batch.
		for {
			start := "(" + entryID(id)
			if id < 0 {
				start = "-"
			}
			cmds := rueidis.Commands{b.Xrange().Key(key).Start(start).End("+").Count(replayRange).Build()}
			if first {
				// Watched from now on: the reader renews it while this runs.
				cmds = append(cmds, b.Set().Key(watcher).Value("1").Px(replayBeatTTL).Build())
			}
			cctx, cancel := context.WithTimeout(ctx, replayCallBound)
			res := r.client.DoMulti(cctx, cmds...)
			cancel()
			entries, err := res[0].AsXRange()
			if err != nil {
				return fmt.Errorf("sse: replay: %w", err)
			}
			if first {
				first = false
				if err := emit(nil); err != nil {
					return err
				}
				if len(entries) == 0 && id >= 0 {
					if done, err := r.endedBy(ctx, key, id); err != nil || done {
						return err
					}
				}
			}
			var ended bool
			if id, ended, err = r.emitEntries(entries, id, emit); err != nil || ended {
				return err
			}
			if len(entries) < replayRange {
				break
			}
		}
		if gone {
			// Its producer stopped beating, and the log, read again, does not end.
			return &GoneError{After: max(id, 0)}
		}
		// The tail: the reader hands over what comes.
		if err := r.tails.arm(f, id); err != nil {
			return err
		}
	tail:
		for {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-f.wake:
			}
			entries, lost, g, stopped := r.tails.take(f)
			var ended bool
			var err error
			if id, ended, err = r.emitEntries(entries, id, emit); err != nil || ended {
				return err
			}
			switch {
			case stopped:
				return errReaderStopped
			case g:
				// Read the log once more before saying so: the last events and the heartbeat's
				// end travel in one pipeline, and may have landed after the reader's last read.
				gone = true
				break tail
			case lost:
				break tail // this client is slow: it reads the log itself until it catches up
			}
		}
	}
}

// endedBy reports whether the log's last entry ends the stream at or before event id: a resume
// after the end has nothing to wait for. (An end appended since is read with the rest.)
func (r *RedisReplay) endedBy(ctx context.Context, key string, id int64) (bool, error) {
	cctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	last, err := r.client.Do(cctx, r.client.B().Xrevrange().Key(key).End("+").Start("-").Count(1).Build()).AsXRange()
	if err != nil {
		return false, fmt.Errorf("sse: replay: %w", err)
	}
	if len(last) == 1 && last[0].FieldValues["e"] == "1" {
		if l, ok := lastOf(last[0]); ok && l <= id {
			return true, nil
		}
	}
	return false, nil
}

// emitEntries decodes stream entries and emits their events after id.
func (r *RedisReplay) emitEntries(entries []rueidis.XRangeEntry, id int64, emit func([]byte) error) (int64, bool, error) {
	if len(entries) == 0 {
		return id, false, nil
	}
	batch := make([]replayEntry, 0, len(entries))
	for _, x := range entries {
		last, _, _ := strings.Cut(x.ID, "-")
		e := replayEntry{data: []byte(x.FieldValues["d"]), end: x.FieldValues["e"] == "1"}
		var err1, err2 error
		e.last, err1 = strconv.ParseInt(last, 10, 64)
		e.first, err2 = strconv.ParseInt(x.FieldValues["f"], 10, 64)
		if err1 != nil || err2 != nil {
			return id, false, fmt.Errorf("sse: replay: malformed entry %q", x.ID)
		}
		batch = append(batch, e)
	}
	return replayFrom(batch, id, emit)
}
