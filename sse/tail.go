package sse

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"voicegate/proxy"
)

// errReaderStopped means the instance's reader of replay logs has stopped (the instance is
// shutting down): a resume waiting at a log's tail ends, and its client resumes elsewhere.
var errReaderStopped = errors.New("sse: the replay log reader stopped")

// Bounds of what the reader hands one follower and has not been taken yet: a client that does
// not keep up makes its follower read the log itself, rather than grow the reader's memory.
const (
	followerEntries = 256
	followerBytes   = 1 << 20
)

// tails is an instance's one reader of the Redis replay logs its resumers wait on. A resumer
// (a follower) reads what a log holds already by itself, with XRANGE on the client's shared
// connections; once it has caught up it arms at its position and waits. The reader reads every
// armed log in one blocking XREAD, on one connection of the client's blocking pool, and hands
// what it reads to the followers; when the set of positions to read changes, the XREAD in
// flight is cancelled (CLIENT UNBLOCK: the connection is kept) and a new one names the new set.
// So the number of Redis connections does not grow with waiting clients.
//
// On Redis Cluster one XREAD may name the keys of one hash slot only (a slot per tenant). With
// armed logs in more than one slot, the reader reads them without blocking instead, one XREAD
// per slot in one pipeline every replayPoll, on the client's shared connections.
//
// Every replayBeat a second goroutine renews the watcher keys of every log read here, catching
// up or armed, so a stream counts as watched from the moment a resume starts reading it, and
// asks whether the producers of the armed ones still beat; a follower whose producer stopped
// reads the log once more itself before it says so (the last events may have landed meanwhile).
//
// Locks: mu guards everything below it; nothing under it calls Redis or blocks.
type tails struct {
	client  rueidis.Client
	cluster bool
	log     *slog.Logger
	wake    chan struct{} // holds a token when the set of positions to read changed
	warned  atomic.Int64  // unix ms of the last warning

	mu      sync.Mutex
	logs    map[string]*tail   // by log key
	stop    context.CancelFunc // cancels the read in flight; nil when none
	stopped bool
}

// tail is one log read here.
type tail struct {
	key, beat, watcher string
	slot               uint16 // its hash slot on a cluster; 0 otherwise
	readers            int    // followers reading it here, caught up or not
	armed              map[*follower]struct{}
	cursor             int64 // the reader reads after this event id: the least armed position
}

// follower is one resume's place at a log. The reader writes its fields under tails.mu and
// wakes it; the follower takes them (take).
type follower struct {
	t    *tail
	wake chan struct{} // holds a token when something was handed over

	pos     int64 // the last event id handed over (or armed at)
	entries []rueidis.XRangeEntry
	size    int
	lost    bool // the reader stopped handing over (too much untaken): read the log yourself
	gone    bool // the log's producer no longer beats: read the log once more yourself
	stopped bool // the reader stopped
}

func newTails(client rueidis.Client, log *slog.Logger) *tails {
	return &tails{client: client, cluster: client.Mode() == rueidis.ClientModeCluster, log: log,
		logs: map[string]*tail{}, wake: make(chan struct{}, 1)}
}

// join adds a follower of the log named key, watched from now on (its watcher key is renewed
// by the reader while it reads).
func (ts *tails) join(key, beat, watcher string) *follower {
	var slot uint16
	if ts.cluster {
		cmd := ts.client.B().Exists().Key(key).Build()
		slot = cmd.Slot()
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	t := ts.logs[key]
	if t == nil {
		t = &tail{key: key, beat: beat, watcher: watcher, slot: slot, armed: map[*follower]struct{}{}}
		ts.logs[key] = t
	}
	t.readers++
	return &follower{t: t, wake: make(chan struct{}, 1)}
}

// leave removes f, at once: nothing is held for it afterwards.
func (ts *tails) leave(f *follower) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	delete(f.t.armed, f)
	if f.t.readers--; f.t.readers == 0 && ts.logs[f.t.key] == f.t {
		delete(ts.logs, f.t.key)
	}
}

// watching reports whether a follower here reads the log named key.
func (ts *tails) watching(key string) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.logs[key] != nil
}

// arm has the reader hand f what its log gets after event id pos.
func (ts *tails) arm(f *follower, pos int64) error {
	ts.mu.Lock()
	if ts.stopped {
		ts.mu.Unlock()
		return errReaderStopped
	}
	t := f.t
	f.pos, f.entries, f.size, f.lost, f.gone = pos, nil, 0, false, false
	changed := len(t.armed) == 0 || pos < t.cursor
	if len(t.armed) == 0 || pos < t.cursor {
		t.cursor = pos
	}
	t.armed[f] = struct{}{}
	stop := ts.stop
	ts.mu.Unlock()
	if changed {
		select {
		case ts.wake <- struct{}{}:
		default:
		}
		if stop != nil {
			stop() // the read in flight does not name this position
		}
	}
	return nil
}

// take returns what the reader handed f since it last took.
func (ts *tails) take(f *follower) (entries []rueidis.XRangeEntry, lost, gone, stopped bool) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	entries, f.entries, f.size = f.entries, nil, 0
	return entries, f.lost, f.gone, f.stopped
}

// read is one XREAD's worth: the logs of one slot and where to read each from.
type read struct {
	keys, ids []string
	from      map[string]int64
}

// snapshot groups the armed logs by slot.
func (ts *tails) snapshot() (reads []read) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	bySlot := map[uint16]int{}
	for key, t := range ts.logs {
		if len(t.armed) == 0 {
			continue
		}
		i, ok := bySlot[t.slot]
		if !ok {
			i = len(reads)
			bySlot[t.slot] = i
			reads = append(reads, read{from: map[string]int64{}})
		}
		reads[i].keys = append(reads[i].keys, key)
		reads[i].ids = append(reads[i].ids, entryID(t.cursor))
		reads[i].from[key] = t.cursor
	}
	return reads
}

// entryID is the stream entry ID after which the entries past event id lie (entries are
// "<last event id>-1"; -1 is before the first).
func entryID(id int64) string {
	if id < 0 {
		return "0-0"
	}
	return strconv.FormatInt(id, 10) + "-1"
}

// lastOf is the last event id of a stream entry.
func lastOf(x rueidis.XRangeEntry) (int64, bool) {
	n, _, _ := strings.Cut(x.ID, "-")
	v, err := strconv.ParseInt(n, 10, 64)
	return v, err == nil
}

// deliver hands the entries read from key after event id from to its armed followers that had
// nothing to read before from (others would get a hole; the reader reads for them next).
func (ts *tails) deliver(key string, from int64, entries []rueidis.XRangeEntry) {
	if len(entries) == 0 {
		return
	}
	last, ok := lastOf(entries[len(entries)-1])
	if !ok {
		return
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	t := ts.logs[key]
	if t == nil {
		return
	}
	least := last
	for f := range t.armed {
		if f.pos < from {
			least = min(least, f.pos)
			continue
		}
		handed := false
		for _, x := range entries {
			if n, ok := lastOf(x); !ok || n <= f.pos {
				continue
			}
			f.entries = append(f.entries, x)
			f.size += len(x.FieldValues["d"])
			handed = true
		}
		if f.pos < last {
			f.pos = last
		}
		if len(f.entries) > followerEntries || f.size > followerBytes {
			// The client does not keep up: its follower reads the log itself, from where it is.
			f.entries, f.size, f.lost = nil, 0, true
			delete(t.armed, f)
		}
		if handed || f.lost {
			signal(f.wake)
		}
		if !f.lost {
			least = min(least, f.pos)
		}
	}
	t.cursor = least
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// run reads for the followers until ctx ends, then tells the armed ones it stopped. The watcher
// keys are renewed, and the producers' heartbeats asked, on a goroutine of its own: a read that
// Redis answers slowly never lets a watched stream look unwatched.
func (ts *tails) run(ctx context.Context) {
	keeping := make(chan struct{})
	go func() {
		defer close(keeping)
		tick := time.NewTicker(replayBeat)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				ts.maintain(ctx)
			}
		}
	}()
	defer func() {
		<-keeping
		ts.shut()
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for ctx.Err() == nil {
		select { // the snapshot below sees every change made before it
		case <-ts.wake:
		default:
		}
		reads := ts.snapshot()
		var wait time.Duration
		switch {
		case len(reads) == 1:
			if err := ts.block(ctx, reads[0], replayBlock); err != nil {
				wait = ts.trouble(err)
			}
		case len(reads) > 1:
			got, err := ts.poll(ctx, reads)
			if err != nil {
				wait = ts.trouble(err)
			} else if !got {
				wait = replayPoll
			}
		default:
			wait = -1 // nothing to read until a follower arms
		}
		if wait == 0 {
			continue
		}
		var tick <-chan time.Time
		if wait > 0 {
			timer.Reset(wait)
			tick = timer.C
		}
		select {
		case <-ctx.Done():
		case <-ts.wake:
		case <-tick:
		}
		timer.Stop()
	}
}

// block reads one slot's armed logs with a blocking XREAD of at most wait, which a change of
// positions (arm) cancels.
func (ts *tails) block(ctx context.Context, rd read, wait time.Duration) error {
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ts.mu.Lock()
	ts.stop = cancel
	ts.mu.Unlock()
	defer func() {
		ts.mu.Lock()
		ts.stop = nil
		ts.mu.Unlock()
	}()
	select {
	case <-ts.wake: // changed since the snapshot
		return nil
	default:
	}
	ms := max(wait.Milliseconds(), 1)
	cmd := ts.client.B().Xread().Count(replayRange).Block(ms).Streams().Key(rd.keys...).Id(rd.ids...).Build().UnblockOnCancel()
	rctx, bound := context.WithTimeout(rctx, time.Duration(ms)*time.Millisecond+replayCallBound)
	defer bound()
	res, err := ts.client.Do(rctx, cmd).AsXRead()
	switch {
	case rueidis.IsRedisNil(err):
		return nil
	case err != nil:
		if errors.Is(err, context.Canceled) {
			return nil // woken (or stopping)
		}
		return err
	}
	for key, entries := range res {
		ts.deliver(key, rd.from[key], entries)
	}
	return nil
}

// poll reads every slot's armed logs without blocking, one XREAD per slot in one pipeline, and
// reports whether anything was read.
func (ts *tails) poll(ctx context.Context, reads []read) (bool, error) {
	cmds := make(rueidis.Commands, len(reads))
	for i, rd := range reads {
		cmds[i] = ts.client.B().Xread().Count(replayRange).Streams().Key(rd.keys...).Id(rd.ids...).Build()
	}
	pctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	got := false
	var first error
	for i, r := range ts.client.DoMulti(pctx, cmds...) {
		res, err := r.AsXRead()
		if rueidis.IsRedisNil(err) {
			continue
		}
		if err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		for key, entries := range res {
			got = got || len(entries) > 0
			ts.deliver(key, reads[i].from[key], entries)
		}
	}
	return got, first
}

// maintain renews the watcher keys of the logs read here and tells the followers of an armed
// log whose producer no longer beats, in one pipeline.
func (ts *tails) maintain(ctx context.Context) {
	type check struct {
		t  *tail
		at int // the index of the EXISTS of its producer's heartbeat
	}
	ts.mu.Lock()
	var cmds rueidis.Commands
	var checks []check
	for _, t := range ts.logs {
		cmds = append(cmds, ts.client.B().Set().Key(t.watcher).Value("1").Px(replayBeatTTL).Build())
		if len(t.armed) > 0 {
			checks = append(checks, check{t, len(cmds)})
			cmds = append(cmds, ts.client.B().Exists().Key(t.beat).Build())
		}
	}
	ts.mu.Unlock()
	if len(cmds) == 0 {
		return
	}
	mctx, cancel := context.WithTimeout(ctx, replayCallBound)
	defer cancel()
	res := ts.client.DoMulti(mctx, cmds...)
	for _, r := range res {
		if err := r.Error(); err != nil {
			if ctx.Err() == nil {
				ts.warn("replay log reader: renewing watcher keys failed", err)
			}
			break
		}
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for _, c := range checks {
		if n, err := res[c.at].AsInt64(); err == nil && n == 0 {
			for f := range c.t.armed {
				f.gone = true
				signal(f.wake)
			}
			clear(c.t.armed)
		}
	}
}

// shut tells every armed follower that the reader stopped, and every later one at once.
func (ts *tails) shut() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.stopped = true
	for _, t := range ts.logs {
		for f := range t.armed {
			f.stopped = true
			signal(f.wake)
		}
		clear(t.armed)
	}
}

// trouble logs a failed read (at most every 10 s) and says how long to wait before the next.
func (ts *tails) trouble(err error) time.Duration {
	ts.warn("replay log reader: reading from Redis failed; retrying", err)
	return replayBeat / 4
}

func (ts *tails) warn(msg string, err error) {
	now := time.Now().UnixMilli()
	if last := ts.warned.Load(); now-last > 10_000 && ts.warned.CompareAndSwap(last, now) {
		ts.log.Warn(msg, "err", proxy.Describe(err))
	}
}
