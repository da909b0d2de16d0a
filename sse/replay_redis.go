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
	replayBlock     = replayBeat             // how long a resumer's XREAD waits for new events
	replayCallBound = 2 * time.Second        // every other call
	replayBatch     = 512                    // appends sent in one pipeline at most
	replayAppear    = 500 * time.Millisecond // how long a resume waits for a log to appear
	replayPoll      = 50 * time.Millisecond
)

// RedisReplay is a ReplayLog in Redis Streams, shared by every instance: a stream produced on
// one instance can be resumed on any other, and a resumer notices within replayBeatTTL that the
// producing instance died.
//
// Appends go through one goroutine (Run) that sends whatever has queued up in one pipeline:
// under load, many streams' events share a round trip, and a stream never waits for Redis.
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

	mu       sync.Mutex
	live     map[ReplayKey]int // streams produced here, for the heartbeats
	lastWarn atomic.Int64
}

type replayOp struct {
	k     ReplayKey
	e     replayEntry
	beat  bool // set the heartbeat now (production started)
	ended bool // production ended: drop the heartbeat
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
		ops: make(chan replayOp, 16*replayBatch), live: map[ReplayKey]int{}}
}

func (r *RedisReplay) key(k ReplayKey) string {
	return r.keys.Tenant(policy.KindReplay, k.Tenant, k.User, k.RequestID)
}

// beat names the key set while an instance produces the log named key.
func (r *RedisReplay) beat(k ReplayKey) string {
	return r.keys.Tenant(policy.KindReplayBeat, k.Tenant, k.User, k.RequestID)
}

// watcher names the key set while someone resumes the log.
func (r *RedisReplay) watcher(k ReplayKey) string {
	return r.keys.Tenant(policy.KindReplayWait, k.Tenant, k.User, k.RequestID)
}

// Append implements ReplayLog.
func (r *RedisReplay) Append(k ReplayKey, first, last int64, data []byte, end bool) {
	r.enqueue(replayOp{k: k, e: replayEntry{first: first, last: last, end: end, data: bytes.Clone(data)}})
}

func (r *RedisReplay) enqueue(op replayOp) {
	select {
	case r.ops <- op:
	default:
		// Redis cannot keep up: the batch is lost, and a resume across it is told so.
		r.warn("replay log queue full; events dropped from the log", nil)
	}
}

// Produce implements ReplayLog.
func (r *RedisReplay) Produce(k ReplayKey) func() {
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
			r.enqueue(replayOp{k: k, ended: true})
		})
	}
}

// Run sends queued appends and the heartbeats of the streams produced here until ctx ends,
// then sends what is still queued. A send under way when ctx ends is finished, not cut short:
// ctx ends once the last stream has ended, and the batch in flight may be its last events.
func (r *RedisReplay) Run(ctx context.Context) {
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

// Watched implements ReplayLog.
func (r *RedisReplay) Watched(ctx context.Context, k ReplayKey) bool {
	ctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	n, err := r.client.Do(ctx, r.client.B().Exists().Key(r.watcher(k)).Build()).AsInt64()
	return err == nil && n > 0
}

// Replay implements ReplayLog.
func (r *RedisReplay) Replay(ctx context.Context, k ReplayKey, after int64, emit func([]byte) error) error {
	key, beat := r.key(k), r.beat(k)
	b := r.client.B()
	id := after
	from := "0-0" // the last stream entry ID read
	if id >= 0 {
		from = strconv.FormatInt(id, 10) + "-1"
	}
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
	// What the log holds already.
	for first := true; ; first = false {
		start := "(" + from
		if id < 0 {
			start = "-"
		}
		cctx, cancel := context.WithTimeout(ctx, replayCallBound)
		entries, err := r.client.Do(cctx, b.Xrange().Key(key).Start(start).End("+").Count(256).Build()).AsXRange()
		cancel()
		if err != nil {
			return fmt.Errorf("sse: replay: %w", err)
		}
		if first {
			if err := emit(nil); err != nil {
				return err
			}
			if len(entries) == 0 && id >= 0 {
				// Nothing after id: if the last entry ends the stream, the client has seen it all.
				cctx, cancel := context.WithTimeout(ctx, replayCallBound)
				last, err := r.client.Do(cctx, b.Xrevrange().Key(key).End("+").Start("-").Count(1).Build()).AsXRange()
				cancel()
				if err != nil {
					return fmt.Errorf("sse: replay: %w", err)
				}
				// (Only an end at or before id: one appended since the XRANGE is read below.)
				if len(last) == 1 && last[0].FieldValues["e"] == "1" {
					n, _, _ := strings.Cut(last[0].ID, "-")
					if l, err := strconv.ParseInt(n, 10, 64); err == nil && l <= id {
						return nil
					}
				}
			}
		}
		var ended bool
		if id, from, ended, err = r.emitEntries(entries, id, from, emit); err != nil || ended {
			return err
		}
		if len(entries) < 256 {
			break
		}
	}
	// The live tail. While it runs the stream is watched: its producer keeps it going for us.
	for {
		cctx, cancel := context.WithTimeout(ctx, replayCallBound)
		err := r.client.Do(cctx, b.Set().Key(r.watcher(k)).Value("1").Px(replayBeatTTL).Build()).Error()
		cancel()
		if err != nil {
			return fmt.Errorf("sse: replay: %w", err)
		}
		cctx, cancel = context.WithTimeout(ctx, replayBlock+replayCallBound)
		res, err := r.client.Do(cctx, b.Xread().Count(256).Block(replayBlock.Milliseconds()).Streams().Key(key).Id(from).Build()).AsXRead()
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if rueidis.IsRedisNil(err) {
			// Nothing new for a while: is anyone still producing it?
			cctx, cancel := context.WithTimeout(ctx, replayCallBound)
			n, err := r.client.Do(cctx, b.Exists().Key(beat).Build()).AsInt64()
			cancel()
			if err != nil {
				return fmt.Errorf("sse: replay: %w", err)
			}
			if n == 0 {
				return &GoneError{After: max(id, 0)}
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("sse: replay: %w", err)
		}
		var ended bool
		if id, from, ended, err = r.emitEntries(res[key], id, from, emit); err != nil || ended {
			return err
		}
	}
}

// emitEntries decodes stream entries and emits their events after id.
func (r *RedisReplay) emitEntries(entries []rueidis.XRangeEntry, id int64, from string, emit func([]byte) error) (int64, string, bool, error) {
	if len(entries) == 0 {
		return id, from, false, nil
	}
	batch := make([]replayEntry, 0, len(entries))
	for _, x := range entries {
		last, _, _ := strings.Cut(x.ID, "-")
		e := replayEntry{data: []byte(x.FieldValues["d"]), end: x.FieldValues["e"] == "1"}
		var err1, err2 error
		e.last, err1 = strconv.ParseInt(last, 10, 64)
		e.first, err2 = strconv.ParseInt(x.FieldValues["f"], 10, 64)
		if err1 != nil || err2 != nil {
			return id, from, false, fmt.Errorf("sse: replay: malformed entry %q", x.ID)
		}
		batch = append(batch, e)
	}
	id, ended, err := replayFrom(batch, id, emit)
	return id, entries[len(entries)-1].ID, ended, err
}
