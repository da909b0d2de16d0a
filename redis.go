package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// sharedRedis is Redis as the gateway uses it, both clients guarded (guardRedis). Without
// REDIS_URL both are nil, and in-memory stores serve one instance.
type sharedRedis struct {
	// client takes every short call: token checks, admissions, the session registry, the
	// stream directory, subscriptions.
	client rueidis.Client
	// bulk is the replay log's own connection (nil with resuming off): its appends are bulk
	// traffic, and there a pipeline of them never delays a token check or an admission queued
	// behind it. Its one blocking command is the resumers' reader's XREAD: one connection for it.
	bulk rueidis.Client
}

// connectShared connects to Redis when REDIS_URL names it, the replay log's connection too when
// resuming is on; calls are timed when metrics are on.
func connectShared(ctx context.Context, cfg *config, log *slog.Logger, tel *telemetry) (_ sharedRedis, err error) {
	var s sharedRedis
	if len(cfg.RedisAddrs) == 0 {
		return s, nil
	}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	timing := redisTiming{keys: policy.NewKeys(cfg.RedisPrefix)}
	if tel.metrics {
		timing.record = tel.redisCall
	}
	client, err := connectRedis(ctx, cfg, 0)
	if err != nil {
		return s, err
	}
	s.client = guardRedis(client, log, timing)
	if cfg.SSEResumeWindow > 0 {
		bulk, err := connectRedis(ctx, cfg, 1)
		if err != nil {
			return s, err
		}
		s.bulk = guardRedis(bulk, log, timing)
	}
	return s, nil
}

// close closes the clients it has.
func (s sharedRedis) close() {
	if s.bulk != nil {
		s.bulk.Close()
	}
	if s.client != nil {
		s.client.Close()
	}
}

// connectRedis connects to Redis or Redis Cluster, retrying until REDIS_CONNECT_TIMEOUT:
// instances often start before their Redis is ready. Later outages are ridden out by the client,
// which reconnects on its own. blocking bounds the connections for blocking commands, per node
// (0: the client library's default).
func connectRedis(ctx context.Context, cfg *config, blocking int) (rueidis.Client, error) {
	opt := rueidis.ClientOption{
		InitAddress: cfg.RedisAddrs,
		SelectDB:    cfg.RedisDB,
		Username:    cfg.RedisUser,
		Password:    cfg.RedisPassword,
		// Keep per-connection memory modest; the gateway's values are tiny.
		CacheSizeEachConn:   16 << 20,
		ReadBufferEachConn:  64 << 10,
		WriteBufferEachConn: 64 << 10,
		Dialer:              net.Dialer{Timeout: time.Second, KeepAlive: time.Second},
		ClusterOption:       clusterOption(),
		RetryDelay:          retryDelay,
		BlockingPoolSize:    blocking,
	}
	opt.ConnWriteTimeout = 2 * time.Second // notice a dead Redis connection within seconds
	deadline := time.Now().Add(cfg.RedisConnectWithin)
	for {
		// A client is made only once an address accepts a connection: a client made against
		// nothing leaves a goroutine of its own behind for a while (a cluster-topology refresh
		// scheduled before it failed).
		err := reachable(ctx, cfg.RedisAddrs)
		if err == nil {
			var client rueidis.Client
			if client, err = rueidis.NewClient(opt); err == nil {
				return client, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("REDIS_URL: cannot reach Redis: %v", proxy.Describe(err))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// reachable reports whether one of addrs accepts a TCP connection within a second.
func reachable(ctx context.Context, addrs []string) error {
	var first error
	for _, a := range addrs {
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", a)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// The gateway's Redis client is rueidis wrapped in guardedRedis, which every package gets
// (auth, policy, sse, voice): each call returns by its context's deadline, whatever rueidis
// does meanwhile, and a breaker stops sending calls to a Redis that keeps failing.
//
// Why: rueidis makes a caller wait for a reconnection already in progress without looking at
// the caller's context (it waits on the dial and handshake, bounded only by their own
// timeouts). With Redis frozen rather than down (SIGSTOP, CLIENT PAUSE, DEBUG SLEEP, a stalled
// network) the kernel still accepts connections, so the handshake is what hangs, and a
// request's 75 ms budget became a second. Here the caller stops waiting at its deadline; the
// call goes on by itself on its own goroutine until rueidis gives up on it.

// Breaker settings. They are not configurable: they only decide how much work a frozen Redis
// is spared and how soon the gateway notices it is back, and these values suit any budget.
const (
	// breakerFailures consecutive failed calls (timeouts, connection errors) open the breaker,
	// once Redis has answered nothing for breakerSilence.
	breakerFailures = 3
	// breakerSilence is how long Redis must have answered nothing before failures open the
	// breaker. A Redis that answered a moment ago is busy, not gone: under a load spike (a
	// burst of new sessions, each with calls of its own) some calls miss their budgets while
	// others are answered, and pausing every call then would refuse everyone, cached tokens
	// included, for the whole pause: the spike would become an outage. Calls that miss their
	// budget fail on their own; the rest are served. A frozen Redis is noticed this much later,
	// each call meanwhile bounded by its own budget.
	breakerSilence = time.Second
	// breakerOpen is how long calls fail at once before one call is let through as a probe.
	// Recovery after Redis answers again takes at most this plus one call.
	breakerOpen = 500 * time.Millisecond
)

// errRedisPaused is what a call gets while the breaker is open: Redis did not answer the last
// calls, so this one is not sent. Callers treat it as any other Redis failure (auth fails
// closed unless AUTH_FAIL_OPEN, fair use fails open, readiness fails).
var errRedisPaused = errors.New("redis: not answering; calls paused for a moment")

// guardedRedis bounds every call by its context and runs it through a breaker. Do, DoMulti,
// DoCache and DoMultiCache are guarded — every call the gateway makes; Receive (a subscription
// that lives as long as its context) passes through, watched on a cluster (see
// rediscluster.go); the rest pass straight through.
type guardedRedis struct {
	rueidis.Client
	log    *slog.Logger
	timing redisTiming

	// One breaker for a single Redis. On a cluster, one per hash slot, made on first use: a
	// failed master pauses the calls of its own slots, not those of the healthy shards.
	br       *breaker
	mu       sync.Mutex // guards slots
	slots    map[uint16]*breaker
	openNow  atomic.Int64 // slot breakers open, for the log: its first opening and last closing
	newBreak func() *breaker
	routes   *clusterRoutes // cluster: where to send what the client could not deliver
}

// guardRedis wraps c; timing times its calls.
func guardRedis(c rueidis.Client, log *slog.Logger, timing redisTiming) *guardedRedis {
	g := &guardedRedis{Client: c, log: log, timing: timing,
		newBreak: func() *breaker { return newBreaker(breakerFailures, breakerSilence, breakerOpen, time.Now) }}
	if c.Mode() == rueidis.ClientModeCluster {
		g.slots = map[uint16]*breaker{}
		g.routes = &clusterRoutes{client: c}
	} else {
		g.br = g.newBreak()
	}
	return g
}

// breakerOf is the breaker of calls to slot.
func (g *guardedRedis) breakerOf(slot uint16) *breaker {
	if g.slots == nil {
		return g.br
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.slots[slot]
	if b == nil {
		b = g.newBreak()
		g.slots[slot] = b
	}
	return b
}

func (g *guardedRedis) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	if g.timing.record == nil || cmd.IsBlock() {
		return g.do(ctx, cmd)
	}
	class, start := g.timing.class(cmd.Commands()), time.Now() // before the call: rueidis recycles an answered command
	res := g.do(ctx, cmd)
	g.timing.done(class, start, res.Error(), false)
	return res
}

func (g *guardedRedis) do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	if g.routes != nil && isPublish(cmd) {
		if n := g.routes.liveMaster(ctx); n != nil {
			return bounded(ctx, func() rueidis.RedisResult { return n.Do(ctx, cmd) })
		}
	}
	res := guarded(g, g.gate(!cmd.IsBlock(), cmd.Slot()), ctx, func() rueidis.RedisResult { return g.Client.Do(ctx, cmd) },
		rueidis.NewErrorResult, resultError)
	if !cmd.IsBlock() && g.undelivered(res.Error()) {
		if n := g.routes.ownerOf(ctx, cmd.Slot()); n != nil {
			return g.resent(ctx, cmd.Slot(), func() rueidis.RedisResult { return n.Do(ctx, cmd) })
		}
	}
	return res
}

// Receive runs a subscription; on a cluster, one without a key goes to a master that answers
// and ends when it stops answering (clusterRoutes.receive).
func (g *guardedRedis) Receive(ctx context.Context, subscribe rueidis.Completed, fn func(rueidis.PubSubMessage)) error {
	if g.routes != nil && subscribe.Slot() == keylessSlot {
		if n := g.routes.liveMaster(ctx); n != nil {
			return g.routes.receive(ctx, n, subscribe, fn)
		}
	}
	return g.Client.Receive(ctx, subscribe, fn)
}

func (g *guardedRedis) DoCache(ctx context.Context, cmd rueidis.Cacheable, ttl time.Duration) rueidis.RedisResult {
	if g.timing.record == nil {
		return g.doCache(ctx, cmd, ttl)
	}
	class, start := g.timing.class(cmd.Commands()), time.Now()
	res := g.doCache(ctx, cmd, ttl)
	g.timing.done(class, start, res.Error(), res.IsCacheHit())
	return res
}

func (g *guardedRedis) doCache(ctx context.Context, cmd rueidis.Cacheable, ttl time.Duration) rueidis.RedisResult {
	first, stop := g.firstTry(ctx)
	defer stop()
	if g.routes != nil {
		cmd = cmd.Pin() // it may be sent again while rueidis still holds it
	}
	res := guarded(g, g.gate(true, cmd.Slot()), first, func() rueidis.RedisResult { return g.Client.DoCache(first, cmd, ttl) },
		rueidis.NewErrorResult, resultError)
	if g.unread(ctx, res.Error()) {
		if n := g.routes.ownerOf(ctx, cmd.Slot()); n != nil {
			return g.resent(ctx, cmd.Slot(), func() rueidis.RedisResult { return n.DoCache(ctx, cmd, ttl) })
		}
	}
	return res
}

func (g *guardedRedis) DoMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	blocking := false
	for _, c := range multi {
		blocking = blocking || c.IsBlock()
	}
	if g.timing.record == nil || len(multi) == 0 || blocking {
		return g.doMulti(ctx, multi...)
	}
	class, start := g.timing.class(multi[0].Commands()), time.Now()
	res := g.doMulti(ctx, multi...)
	g.timing.done(class, start, firstError(res), false)
	return res
}

func (g *guardedRedis) doMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	gated := true
	for _, c := range multi {
		gated = gated && !c.IsBlock()
	}
	var slot uint16
	if len(multi) > 0 {
		slot = multi[0].Slot()
	}
	res := guarded(g, g.gate(gated, slot), ctx, func() []rueidis.RedisResult { return g.Client.DoMulti(ctx, multi...) },
		func(err error) []rueidis.RedisResult { return errorResults(len(multi), err) }, firstError)
	if gated { // a pipeline with a blocking command (a write and its WAIT) must stay whole
		for i, r := range res {
			if g.undelivered(r.Error()) {
				if n := g.routes.ownerOf(ctx, multi[i].Slot()); n != nil {
					res[i] = g.resent(ctx, multi[i].Slot(), func() rueidis.RedisResult { return n.Do(ctx, multi[i]) })
				}
			}
		}
	}
	return res
}

func (g *guardedRedis) DoMultiCache(ctx context.Context, multi ...rueidis.CacheableTTL) []rueidis.RedisResult {
	if g.timing.record == nil || len(multi) == 0 {
		return g.doMultiCache(ctx, multi...)
	}
	class, start := g.timing.class(multi[0].Cmd.Commands()), time.Now()
	res := g.doMultiCache(ctx, multi...)
	g.timing.done(class, start, firstError(res), !slices.ContainsFunc(res, func(r rueidis.RedisResult) bool { return !r.IsCacheHit() }))
	return res
}

func (g *guardedRedis) doMultiCache(ctx context.Context, multi ...rueidis.CacheableTTL) []rueidis.RedisResult {
	var slot uint16
	if len(multi) > 0 {
		slot = multi[0].Cmd.Slot()
	}
	first, stop := g.firstTry(ctx)
	defer stop()
	if g.routes != nil {
		for i := range multi {
			multi[i].Cmd = multi[i].Cmd.Pin() // they may be sent again while rueidis still holds them
		}
	}
	res := guarded(g, g.gate(true, slot), first, func() []rueidis.RedisResult { return g.Client.DoMultiCache(first, multi...) },
		func(err error) []rueidis.RedisResult { return errorResults(len(multi), err) }, firstError)
	for i, r := range res {
		if g.unread(ctx, r.Error()) {
			c := multi[i]
			if n := g.routes.ownerOf(ctx, c.Cmd.Slot()); n != nil {
				res[i] = g.resent(ctx, c.Cmd.Slot(), func() rueidis.RedisResult { return n.DoCache(ctx, c.Cmd, c.TTL) })
			}
		}
	}
	return res
}

// redisTiming times the gateway's Redis calls for redis_command_duration_seconds, by class
// (redisClass). The zero value times nothing.
//
// A call is timed from the caller's side: from the call to its answer, or to the caller's
// deadline when Redis is slow to answer, since that is what the request waited. Calls that
// never reach Redis are not timed: answers from the client-side cache, and calls the breaker
// held back. Nor are blocking commands (a BLPOP, an XREAD that waits for new entries, a WAIT
// for replicas), which wait by design.
type redisTiming struct {
	keys   policy.Keys                            // the deployment's names, to read a key's kind
	record func(class string, took time.Duration) // nil: no timing
}

// class returns the class of a command (its words, as rueidis built them).
func (rt redisTiming) class(cmd []string) string {
	return redisClass(rt.keys.KindOf(commandKey(cmd)))
}

// done records a call that started at start, unless it never reached Redis.
func (rt redisTiming) done(class string, start time.Time, err error, cached bool) {
	if cached || errors.Is(err, errRedisPaused) {
		return
	}
	rt.record(class, time.Since(start))
}

// commandKey returns the first key of a command, or "" when it has none (PING, INFO,
// CLUSTER ...): the word after the command's name, or for a script (EVAL, EVALSHA, FCALL) the
// first of its keys. A PUBLISH names its channel there, which Keys names too.
func commandKey(cmd []string) string {
	if len(cmd) < 2 {
		return ""
	}
	switch cmd[0] {
	case "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO":
		if len(cmd) < 4 || cmd[2] == "0" {
			return ""
		}
		return cmd[3]
	case "XREAD": // options first: the keys follow STREAMS
		for i, w := range cmd[:len(cmd)-1] {
			if w == "STREAMS" {
				return cmd[i+1]
			}
		}
		return ""
	}
	return cmd[1]
}

// redisClass is the command_class label of a call: what its key is for, one of a small fixed
// set. Never the key itself, which names a tenant, a user or a request.
func redisClass(kind string) string {
	switch kind {
	case policy.KindRevoked, policy.KindUserStatus:
		return "auth"
	case policy.KindRateLimit, policy.KindQuota, policy.KindAudioQuota:
		return "limits"
	case policy.KindLease, policy.KindReleased:
		return "leases"
	case policy.KindReplay, policy.KindReplayBeat, policy.KindReplayWait, policy.KindVoiceResume, policy.KindVoiceLog:
		return "replay" // chat's replay logs, and resumable voice sessions' tokens and downlink logs
	case policy.KindStream, policy.KindSession, policy.KindSessions, policy.KindUsage:
		return "registry" // live streams and voice sessions, and the usage of finished ones
	case policy.KindBroadcast, policy.KindControl, policy.KindVoiceHandover:
		return "control" // cancels, revocations and broadcasts between instances
	}
	return "other" // no key (PING, INFO, CLUSTER ...), or one that is not the gateway's
}

// firstTry is the context of a cached read's first attempt. On a cluster it has half of
// what is left of ctx: a read stuck on a node that froze (its connection still looks alive,
// and the client library's slot map may still name it for a while after its replica took
// over) then leaves time to read from the master the cluster names now. Reads can be sent
// twice.
func (g *guardedRedis) firstTry(ctx context.Context) (context.Context, context.CancelFunc) {
	dl, ok := ctx.Deadline()
	if g.routes == nil || !ok {
		return ctx, func() {}
	}
	return context.WithDeadline(ctx, time.Now().Add(time.Until(dl)/2))
}

// unread reports whether a cached read should be sent again to the slot's master: it was not
// delivered, or its first try ran out while the whole budget has time left.
func (g *guardedRedis) unread(ctx context.Context, err error) bool {
	return g.undelivered(err) || (g.routes != nil && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil)
}

func resultError(r rueidis.RedisResult) error { return r.Error() }

// undelivered reports whether, on a cluster, a call failed without reaching Redis and there is
// time left to send it to the slot's master as the cluster names it. rueidis keeps a command
// that failed so (it recycles only those that were answered), so it can be sent again.
func (g *guardedRedis) undelivered(err error) bool {
	return g.routes != nil && err != nil && unsent(err)
}

// resent sends a command again, to the node clusterRoutes named, within ctx; an answer closes
// the slot's breaker, since the slot is served again.
func (g *guardedRedis) resent(ctx context.Context, slot uint16, do func() rueidis.RedisResult) rueidis.RedisResult {
	res := bounded(ctx, do)
	if outcomeOf(res.Error()) == answered {
		g.record(g.breakerOf(slot), false, answered)
	}
	return res
}

// gate is the breaker a call goes through, nil when it is not gated. A multi-command call
// goes through the breaker of its first command's slot.
func (g *guardedRedis) gate(gated bool, slot uint16) *breaker {
	if !gated {
		return nil
	}
	return g.breakerOf(slot)
}

func errorResults(n int, err error) []rueidis.RedisResult {
	out := make([]rueidis.RedisResult, n)
	for i := range out {
		out[i] = rueidis.NewErrorResult(err)
	}
	return out
}

// firstError is the first error of results that says Redis did not answer, else the first.
func firstError(results []rueidis.RedisResult) error {
	var first error
	for _, r := range results {
		if err := r.Error(); err != nil {
			if failed(err) {
				return err
			}
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// guarded runs do, a call into rueidis, and returns its result, or failure(ctx.Err()) as soon as
// ctx ends, leaving do to finish on its goroutine (it does, by rueidis's own timeouts; Close
// waits for it). With a breaker br, the call goes through it: refused at once while it is
// open, and its outcome recorded. Blocking commands are not gated: they wait by design.
func guarded[T any](g *guardedRedis, br *breaker, ctx context.Context, do func() T, failure func(error) T, errOf func(T) error) T {
	probe := false
	if br != nil {
		var err error
		if probe, err = br.enter(); err != nil {
			return failure(err)
		}
	}
	var claimed atomic.Bool // whoever claims first, the call or the deadline, records the outcome
	done := make(chan T, 1)
	go func() {
		res := do()
		err := errOf(res)
		if claimed.CompareAndSwap(false, true) {
			if br != nil {
				g.record(br, probe, outcomeOf(err))
			}
		} else if br != nil && outcomeOf(err) == answered {
			g.record(br, false, answered) // late, but Redis answers: no need to wait for a probe
		}
		done <- res
	}()
	select {
	case res := <-done:
		return res
	case <-ctx.Done():
		if !claimed.CompareAndSwap(false, true) {
			return <-done // finished at the same moment: its answer is here
		}
		if br != nil {
			o := outcomeOf(context.Cause(ctx))
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				o = unanswered
			}
			g.record(br, probe, o)
		}
		return failure(ctx.Err())
	}
}

// record feeds an outcome to a breaker and logs changes of state, outside its lock: on a
// cluster only the first slot's pause and the last one's end, so a failed master with
// thousands of slots is two lines.
func (g *guardedRedis) record(br *breaker, probe bool, o outcome) {
	switch br.record(probe, o) {
	case opened:
		if g.slots == nil || g.openNow.Add(1) == 1 {
			g.log.Warn("Redis is not answering; calls paused", "pause", breakerOpen, "after_failures", breakerFailures)
		}
	case closed:
		if g.slots == nil || g.openNow.Add(-1) == 0 {
			g.log.Info("Redis answers again; calls resumed")
		}
	}
}

// outcome is what a call says about Redis.
type outcome int

const (
	answered   outcome = iota // Redis answered (a value, nil, or an error reply)
	unanswered                // a timeout, or the connection failed
	neutral                   // says nothing: the caller gave up, or the client is closing
)

func outcomeOf(err error) outcome {
	var re *rueidis.RedisError
	switch {
	case err == nil, errors.As(err, &re):
		return answered
	case errors.Is(err, context.Canceled), errors.Is(err, rueidis.ErrClosing):
		return neutral
	}
	return unanswered
}

func failed(err error) bool { return outcomeOf(err) == unanswered }

// breaker is a circuit breaker: closed, it lets calls through and counts consecutive failures;
// after threshold of them, once nothing has been answered for silence, it opens, and calls fail
// at once for openFor; then one call goes through as a probe (the others still fail at once)
// and its outcome closes the breaker or opens it again. Any answer from Redis, a late one
// included, closes it.
type breaker struct {
	threshold int
	silence   time.Duration
	openFor   time.Duration
	now       func() time.Time

	mu         sync.Mutex // held only to read and change the state below, never around a call
	failures   int        // consecutive, while closed
	lastAnswer time.Time  // of the last call answered; zero: none yet
	openUntil  time.Time  // zero: closed
	probing    bool       // a probe is out
}

func newBreaker(threshold int, silence, openFor time.Duration, now func() time.Time) *breaker {
	return &breaker{threshold: threshold, silence: silence, openFor: openFor, now: now}
}

// enter lets a call through (probe reports whether it is the probe) or refuses it.
func (b *breaker) enter() (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.openUntil.IsZero():
		return false, nil
	case b.probing || b.now().Before(b.openUntil):
		return false, errRedisPaused
	}
	b.probing = true
	return true, nil
}

// transition is a change of the breaker's state, for the log.
type transition int

const (
	unchanged transition = iota
	opened
	closed
)

// record takes a call's outcome.
func (b *breaker) record(probe bool, o outcome) transition {
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	wasOpen := !b.openUntil.IsZero()
	switch o {
	case answered:
		b.failures, b.openUntil, b.lastAnswer = 0, time.Time{}, b.now()
		if wasOpen {
			return closed
		}
	case unanswered:
		if wasOpen {
			if probe {
				b.openUntil = b.now().Add(b.openFor)
			}
			return unchanged
		}
		b.failures++
		if b.failures >= b.threshold && (b.lastAnswer.IsZero() || b.now().Sub(b.lastAnswer) >= b.silence) {
			b.failures, b.openUntil = 0, b.now().Add(b.openFor)
			return opened
		}
	}
	return unchanged
}
