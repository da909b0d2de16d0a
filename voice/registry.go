package voice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// Info describes a live session, as listed by GET /api/v2/voice/sessions.
type Info struct {
	SessionID      string    `json:"session_id"`
	UserID         string    `json:"user_id"`
	TenantID       string    `json:"tenant_id,omitempty"`
	ConversationID string    `json:"conversation_id,omitempty"`
	Language       string    `json:"language,omitempty"`
	Instance       string    `json:"instance"`
	StartedAt      time.Time `json:"started_at"`
	// The session's token, so that revoking it closes the session; never published.
	TokenID  string    `json:"-"`
	IssuedAt time.Time `json:"-"`
}

// Registry tracks this instance's live sessions (so shutdown can close them: the HTTP server
// does not wait for hijacked connections) and, with Redis, publishes them so that every
// instance can list every instance's sessions. A published entry expires unless renewed, so the
// sessions of an instance that dies disappear within TTL.
//
// Redis keys: {prefix}voice:session:{id} (JSON Live, the session's counters as last
// published; kept for three TTLs), {prefix}voice:sessions (sorted set: session ID → expiry in
// ms) and {prefix}usage (the stream of usage records, capped at UsageMaxLen entries).
//
// Expiries are Redis's clock, never an instance's: the scores are set, and compared, by
// scripts that read Redis's TIME (each touches the index alone, so they run on Redis Cluster
// too), so an instance whose clock is off neither lists live sessions as gone nor sweeps them.
//
// An entry whose expiry has been past for a whole TTL more belongs to a session whose instance
// died: the first instance to remove it from the set writes its usage record from its last
// counters (see Usage). An instance never takes its own sessions for lost: a renewal publishes
// its live sessions before it sweeps, and sweeps only once the entries of its ended sessions are
// deleted, so that after an outage its live sessions are published again, not written off.
//
// An ended session is never published again. Entries are created only by the session's start
// (add) and by renewals (Renew), and renewals and deletions are made by one caller in turn: a
// session that ends while a renewal publishes it is deleted by the next renewal, which its end
// asks for at once (OnChange); a deletion that fails is retried until Redis takes it.
type Registry struct {
	instance string
	id       string         // this process's identity: its handover channel (resume.go)
	redis    rueidis.Client // nil: this instance only
	keys     policy.Keys
	ttl      time.Duration
	log      *slog.Logger

	maxLen int64 // of the usage stream

	mu       sync.Mutex
	sessions map[string]*session
	tokens   map[string]*session // resumable sessions by their resume token's key (resume.go)
	gone     []string            // ended sessions whose published entries are still to delete
	usage    []Usage             // records still to write to the stream
	onChange func()              // something to tell Redis now
	now      func() time.Time
	renewed  time.Time // when the live sessions were last published

	publishScript, sweepScript, liveScript *rueidis.Lua
}

// RegistryOptions configures a Registry.
type RegistryOptions struct {
	Instance string // this instance's name in listings
	// ID is this process's identity among the instances (unique, unlike Instance): resumes
	// elsewhere ask it to hand its sessions over on a channel of that name. "" means Instance.
	ID     string
	Redis  rueidis.Client // nil: local only
	Prefix string         // Redis key prefix (REDIS_PREFIX), as given
	TTL    time.Duration  // how long a published entry outlives its last renewal; zero means 30 s
	// OnChange, if set, is called when a session ended: Renew has its entry to delete. The
	// gateway's renewer (which calls Renew) wakes on it.
	OnChange func()
	// Now is the clock that says when a renewal is due (expiries are Redis's); nil means
	// time.Now.
	Now func() time.Time
	// UsageMaxLen caps the usage stream (approximately, as XADD MAXLEN ~ does); zero means
	// 100000 records.
	UsageMaxLen int64
	Log         *slog.Logger
}

// NewRegistry returns a registry. With Redis, someone must call Renew every TTL/3 and whenever
// OnChange says so, and no one else: it publishes the live sessions and deletes ended ones.
func NewRegistry(o RegistryOptions) *Registry {
	if o.TTL <= 0 {
		o.TTL = 30 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.OnChange == nil {
		o.OnChange = func() {}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.UsageMaxLen <= 0 {
		o.UsageMaxLen = 100000
	}
	if o.ID == "" {
		o.ID = o.Instance
	}
	return &Registry{instance: o.Instance, id: o.ID, tokens: map[string]*session{}, redis: o.Redis, keys: policy.NewKeys(o.Prefix), ttl: o.TTL, log: o.Log,
		onChange: o.OnChange, now: o.Now, sessions: map[string]*session{}, renewed: o.Now(), maxLen: o.UsageMaxLen,
		publishScript: rueidis.NewLuaScript(publishScript), sweepScript: rueidis.NewLuaScript(sweepScript),
		liveScript: rueidis.NewLuaScript(liveScript)}
}

// The scripts of the index, each on the index key alone. Expiries are Redis's TIME in ms.
const (
	// publishScript sets the expiry of sessions ARGV[2...] to now + ARGV[1] ms.
	publishScript = `
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
return #ARGV - 1`
	// sweepScript claims, by removing them, at most ARGV[2] sessions whose expiry has been past
	// for ARGV[1] ms, and returns them: the instance whose call removed a session is the one
	// that writes its record.
	sweepScript = `
local t = redis.call('TIME')
local before = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
end
return ids`
	// liveScript returns the sessions whose expiry is not past: all of them without ARGV, or of
	// ARGV[1] alone.
	liveScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV == 0 then
  return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) >= now then return {ARGV[1]} end
return {}`
)

func (r *Registry) key(id string) string { return r.keys.Key(policy.KindSession, id) }
func (r *Registry) index() string        { return r.keys.Key(policy.KindSessions) }
func (r *Registry) stream() string       { return r.keys.Key(policy.KindUsage) }

// maxPendingUsage bounds the usage records waiting for Redis, and the ended sessions whose
// entries are still to delete; beyond it the oldest are dropped (the records are in the log all
// the same).
const maxPendingUsage = 10000

func (r *Registry) add(ctx context.Context, s *session) {
	r.mu.Lock()
	r.sessions[s.info.SessionID] = s
	r.mu.Unlock()
	if r.redis != nil {
		// Bounded: a session must not wait on Redis to start; the renewer retries.
		ctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		defer cancel()
		if err := r.publish(ctx, []*session{s}); err != nil {
			r.log.Warn("publishing a voice session failed; it will be retried", "err", proxy.Describe(err))
		}
	}
}

// remove forgets s at once, here, logs its usage record, and leaves the record and its
// published entry for Renew to take to Redis: an ended session needs no request's context, nor
// to wait for Redis.
func (r *Registry) remove(s *session, u Usage) {
	r.logUsage(u)
	r.mu.Lock()
	delete(r.sessions, s.info.SessionID)
	if r.redis != nil {
		r.gone = append(r.gone, s.info.SessionID)
		r.queueUsage(u)
	}
	r.mu.Unlock()
	if r.redis != nil {
		r.onChange()
	}
}

// handedOver forgets s, which goes on on another instance: no usage record, and its published
// entry stays (the new instance publishes it).
func (r *Registry) handedOver(s *session) {
	r.mu.Lock()
	delete(r.sessions, s.info.SessionID)
	r.mu.Unlock()
}

// queueUsage keeps u for the stream; r.mu is held.
func (r *Registry) queueUsage(u ...Usage) {
	r.usage = append(r.usage, u...)
	if over := len(r.usage) - maxPendingUsage; over > 0 {
		r.log.Warn("usage records could not reach Redis in time; the oldest are only in the log", "dropped", over)
		r.usage = append(r.usage[:0], r.usage[over:]...)
	}
}

func (r *Registry) logUsage(u Usage) {
	f := u.fields()
	args := make([]any, 0, len(f)/2)
	for i := 0; i+1 < len(f); i += 2 {
		args = append(args, slog.String(f[i], f[i+1]))
	}
	r.log.Info("voice usage", args...)
}

// unpublish writes the usage records of ended sessions and deletes their entries, in one round
// trip. Records and deletions that fail are kept for the next call: an entry left behind would
// be taken, once expired, for a session whose instance died.
func (r *Registry) unpublish(ctx context.Context) error {
	r.mu.Lock()
	gone, usage := r.gone, r.usage
	r.gone, r.usage = nil, nil
	r.mu.Unlock()
	if len(gone) == 0 && len(usage) == 0 {
		return nil
	}
	cmds := make(rueidis.Commands, 0, len(usage)+len(gone)+1)
	for _, u := range usage {
		cmds = append(cmds, r.xadd(&u))
	}
	for _, id := range gone {
		cmds = append(cmds, r.redis.B().Del().Key(r.key(id)).Build())
	}
	if len(gone) > 0 {
		cmds = append(cmds, r.redis.B().Zrem().Key(r.index()).Member(gone...).Build())
	}
	var failed []Usage
	var err error
	deleted := true
	for i, res := range r.redis.DoMulti(ctx, cmds...) {
		if e := res.Error(); e != nil {
			if i < len(usage) {
				failed = append(failed, usage[i])
			} else {
				deleted = false
			}
			if err == nil {
				err = fmt.Errorf("voice: write usage records and delete ended sessions: %w", e)
			}
		}
	}
	if len(failed) > 0 || !deleted {
		r.mu.Lock()
		// Before those queued meanwhile, in the order they ended.
		since := r.usage
		r.usage = nil
		r.queueUsage(append(failed, since...)...)
		if !deleted { // all again: deleting twice is harmless
			r.gone = append(gone, r.gone...)
			if over := len(r.gone) - maxPendingUsage; over > 0 {
				r.log.Warn("ended voice sessions' entries could not be deleted in time; the oldest may be written off as lost",
					"dropped", over)
				r.gone = append(r.gone[:0], r.gone[over:]...)
			}
		}
		r.mu.Unlock()
	}
	return err
}

func (r *Registry) xadd(u *Usage) rueidis.Completed {
	fv := r.redis.B().Xadd().Key(r.stream()).Maxlen().Almost().Threshold(strconv.FormatInt(r.maxLen, 10)).Id("*").FieldValue()
	f := u.fields()
	for i := 0; i+1 < len(f); i += 2 {
		fv = fv.FieldValue(f[i], f[i+1])
	}
	return fv.Build()
}

// publish writes the entries of ss, creating those that are missing: their counters, and their
// expiry, TTL from now on Redis's clock. Only a session's start and the renewals call it (see
// Registry).
func (r *Registry) publish(ctx context.Context, ss []*session) error {
	if len(ss) == 0 {
		return nil
	}
	cmds := make(rueidis.Commands, 0, len(ss))
	ids := make([]string, 0, len(ss)+1)
	ids = append(ids, strconv.FormatInt(r.ttl.Milliseconds(), 10))
	for _, s := range ss {
		b, _ := json.Marshal(s.live())
		cmds = append(cmds, r.redis.B().Set().Key(r.key(s.info.SessionID)).Value(string(b)).Px(orphanKeep*r.ttl).Build())
		ids = append(ids, s.info.SessionID)
	}
	cmds = append(cmds, r.refreshRecords(ss)...)
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			for _, s := range ss {
				if s.rs != nil {
					s.rs.recorded.Store(false) // the next publication writes the record again
				}
			}
			return err
		}
	}
	// The expiries after the counters: a listing never names a session it cannot read.
	return r.publishScript.Exec(ctx, r.redis, []string{r.index()}, ids).Error()
}

// orphanKeep is how many TTLs a published entry is kept: an instance that finds it expired for
// a TTL more has two TTLs to write the session's usage record from it.
const orphanKeep = 3

// maxSweep bounds the orphaned sessions one Renew writes records for.
const maxSweep = 64

// sweep writes the usage records of sessions whose instance died — their entries expired a TTL
// ago and more, by Redis's clock — and deletes them. Removing a session from the set is the
// claim: of all the instances sweeping, only the one whose script removed it writes its record.
// A session this instance knows (running, or ended with its entry still to delete) is never
// written off, whatever its entry says.
func (r *Registry) sweep(ctx context.Context) error {
	ids, err := r.sweepScript.Exec(ctx, r.redis, []string{r.index()},
		[]string{strconv.FormatInt(r.ttl.Milliseconds(), 10), strconv.Itoa(maxSweep)}).AsStrSlice()
	if err != nil || len(ids) == 0 {
		return err
	}
	ids = r.unknown(ids)
	if len(ids) == 0 {
		return nil
	}
	gets := make(rueidis.Commands, 0, len(ids))
	for _, id := range ids {
		gets = append(gets, r.redis.B().Get().Key(r.key(id)).Build())
	}
	var writes rueidis.Commands
	for i, res := range r.redis.DoMulti(ctx, gets...) {
		b, err := res.AsBytes()
		var l Live
		if err != nil || json.Unmarshal(b, &l) != nil {
			continue // nothing left to write a record from
		}
		u := usageOf(l, l.UpdatedAt, int(websocket.StatusAbnormalClosure), "instance lost")
		r.logUsage(u)
		writes = append(writes, r.xadd(&u), r.redis.B().Del().Key(r.key(ids[i])).Build())
	}
	for _, res := range r.redis.DoMulti(ctx, writes...) {
		if err := res.Error(); err != nil {
			return fmt.Errorf("voice: write the usage records of lost sessions: %w", err)
		}
	}
	return nil
}

// unknown returns the sessions of ids that this instance neither runs nor ended.
func (r *Registry) unknown(ids []string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := ids[:0]
	for _, id := range ids {
		if _, ok := r.sessions[id]; ok || slices.Contains(r.gone, id) {
			continue
		}
		out = append(out, id)
	}
	return out
}

// Renew deletes the published entries of ended sessions and, once a quarter of the TTL has gone
// by since it last did, publishes the live ones again and then looks for sessions whose
// instance died: each in one round trip. Called every TTL/3, it then publishes on every call
// however late the previous one ran, and a call in between (to delete) postpones the next
// publication by at most one period: an entry is always renewed well within its TTL.
//
// It sweeps only once this instance's own entries are right — the live ones published, the
// ended ones deleted — so that after an outage it never takes its own sessions for lost.
func (r *Registry) Renew(ctx context.Context) error {
	if r.redis == nil {
		return nil
	}
	// A failed deletion does not hold back the renewal: the entries to renew must not expire.
	uerr := r.unpublish(ctx)
	r.mu.Lock()
	now := r.now()
	due := now.Sub(r.renewed) >= renewDue(r.ttl)
	r.mu.Unlock()
	if !due {
		return uerr
	}
	if err := r.publish(ctx, r.local()); err != nil {
		return errors.Join(uerr, fmt.Errorf("voice: renew sessions: %w", err))
	}
	r.mu.Lock()
	r.renewed = now
	r.mu.Unlock()
	if uerr != nil {
		return uerr
	}
	if err := r.sweep(ctx); err != nil {
		return fmt.Errorf("voice: sweep lost sessions: %w", err)
	}
	return nil
}

// Get returns the live counters of session id, exactly if it runs here, else as its instance
// last published them (with Redis); ok is false when no live session has that ID.
func (r *Registry) Get(ctx context.Context, id string) (l Live, ok bool, err error) {
	r.mu.Lock()
	s := r.sessions[id]
	r.mu.Unlock()
	if s != nil {
		return s.live(), true, nil
	}
	if r.redis == nil {
		return Live{}, false, nil
	}
	live, err := r.liveScript.Exec(ctx, r.redis, []string{r.index()}, []string{id}).AsStrSlice()
	if err != nil {
		return Live{}, false, fmt.Errorf("voice: get session: %w", err)
	}
	if len(live) == 0 {
		return Live{}, false, nil // none, or its instance is gone
	}
	b, err := r.redis.Do(ctx, r.redis.B().Get().Key(r.key(id)).Build()).AsBytes()
	if rueidis.IsRedisNil(err) {
		return Live{}, false, nil
	}
	if err != nil {
		return Live{}, false, fmt.Errorf("voice: get session: %w", err)
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return Live{}, false, fmt.Errorf("voice: get session: %w", err)
	}
	return l, true, nil
}

func (r *Registry) local() []*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	ss := make([]*session, 0, len(r.sessions))
	for _, s := range r.sessions {
		ss = append(ss, s)
	}
	return ss
}

// Len reports this instance's live sessions.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

// List returns the live sessions of every instance (with Redis) or of this one, oldest first.
func (r *Registry) List(ctx context.Context) ([]Info, error) {
	var out []Info
	if r.redis == nil {
		for _, s := range r.local() {
			out = append(out, s.info)
		}
	} else {
		ids, err := r.liveScript.Exec(ctx, r.redis, []string{r.index()}, nil).AsStrSlice()
		if err != nil {
			return nil, fmt.Errorf("voice: list sessions: %w", err)
		}
		if len(ids) > 0 {
			cmds := make(rueidis.Commands, 0, len(ids))
			for _, id := range ids {
				cmds = append(cmds, r.redis.B().Get().Key(r.key(id)).Build())
			}
			for _, res := range r.redis.DoMulti(ctx, cmds...) {
				b, err := res.AsBytes()
				if err != nil {
					continue // expired between the two calls
				}
				var l Live
				if json.Unmarshal(b, &l) == nil {
					out = append(out, l.Info)
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].StartedAt.Before(out[j].StartedAt) })
	return out, nil
}

// CloseAll closes every local session with code, after an error message saying why, and waits
// until they are gone or ctx ends; then it drops what is left without handshakes and returns.
func (r *Registry) CloseAll(ctx context.Context, code websocket.StatusCode, errCode, reason string) {
	for _, s := range r.local() {
		s.end(ending{code: code, errCode: errCode, reason: reason, upCode: upCodeFor(code)})
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for r.Len() > 0 {
		select {
		case <-ctx.Done():
			for _, s := range r.local() {
				s.kill()
			}
			return
		case <-t.C:
		}
	}
}

// renewDue is how long after a publication the next is due; see Renew.
func renewDue(ttl time.Duration) time.Duration { return ttl / 4 }
