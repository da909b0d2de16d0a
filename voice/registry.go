package voice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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
// An entry whose expiry has been past for a whole TTL more belongs to a session whose instance
// died: the first instance to remove it from the set writes its usage record from its last
// counters (see Usage).
type Registry struct {
	instance string
	redis    rueidis.Client // nil: this instance only
	keys     policy.Keys
	ttl      time.Duration
	log      *slog.Logger

	maxLen int64 // of the usage stream

	mu       sync.Mutex
	sessions map[string]*session
	gone     []string // ended sessions whose published entries are still to delete
	usage    []Usage  // records still to write to the stream
	onChange func()   // something to tell Redis now
	now      func() time.Time
	renewed  time.Time // when the live sessions were last published
}

// RegistryOptions configures a Registry.
type RegistryOptions struct {
	Instance string         // this instance's name in listings
	Redis    rueidis.Client // nil: local only
	Prefix   string         // Redis key prefix (REDIS_PREFIX), as given
	TTL      time.Duration  // how long a published entry outlives its last renewal; zero means 30 s
	// OnChange, if set, is called when a session ended: Renew has its entry to delete. The
	// gateway's renewer (which calls Renew) wakes on it.
	OnChange func()
	// Now is the clock of expiries and of when renewals are due; nil means time.Now.
	Now func() time.Time
	// UsageMaxLen caps the usage stream (approximately, as XADD MAXLEN ~ does); zero means
	// 100000 records.
	UsageMaxLen int64
	Log         *slog.Logger
}

// NewRegistry returns a registry. With Redis, someone must call Renew every TTL/3 and whenever
// OnChange says so: it publishes the live sessions and deletes ended ones.
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
	return &Registry{instance: o.Instance, redis: o.Redis, keys: policy.NewKeys(o.Prefix), ttl: o.TTL, log: o.Log,
		onChange: o.OnChange, now: o.Now, sessions: map[string]*session{}, renewed: o.Now(), maxLen: o.UsageMaxLen}
}

func (r *Registry) key(id string) string { return r.keys.Key(policy.KindSession, id) }
func (r *Registry) index() string        { return r.keys.Key(policy.KindSessions) }
func (r *Registry) stream() string       { return r.keys.Key(policy.KindUsage) }

// maxPendingUsage bounds the usage records waiting for Redis; beyond it the oldest are dropped
// (they are in the log all the same).
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
// trip. Entries it fails to delete expire anyway, and listings skip them once their score is
// past; records it fails to write are kept for the next call.
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
	for i, res := range r.redis.DoMulti(ctx, cmds...) {
		if e := res.Error(); e != nil {
			if i < len(usage) {
				failed = append(failed, usage[i])
			}
			if err == nil {
				err = fmt.Errorf("voice: write usage records and delete ended sessions: %w", e)
			}
		}
	}
	if len(failed) > 0 {
		r.mu.Lock()
		r.queueUsage(append(failed, r.usage...)...)
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

// publishLive publishes the counters of ss now (after a charge), if there is Redis; a failure
// is left to the next renewal.
func (r *Registry) publishLive(ctx context.Context, ss []*session) {
	if r.redis == nil || len(ss) == 0 {
		return
	}
	if err := r.publish(ctx, ss); err != nil {
		r.log.Warn("publishing voice sessions' counters failed; the next renewal retries", "err", proxy.Describe(err))
	}
}

func (r *Registry) publish(ctx context.Context, ss []*session) error {
	expiry := float64(r.now().Add(r.ttl).UnixMilli())
	cmds := make(rueidis.Commands, 0, 2*len(ss))
	for _, s := range ss {
		b, _ := json.Marshal(s.live())
		cmds = append(cmds,
			r.redis.B().Set().Key(r.key(s.info.SessionID)).Value(string(b)).Px(orphanKeep*r.ttl).Build(),
			r.redis.B().Zadd().Key(r.index()).ScoreMember().ScoreMember(expiry, s.info.SessionID).Build())
	}
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return err
		}
	}
	return nil
}

// orphanKeep is how many TTLs a published entry is kept: an instance that finds it expired for
// a TTL more has two TTLs to write the session's usage record from it.
const orphanKeep = 3

// maxSweep bounds the orphaned sessions one Renew writes records for.
const maxSweep = 64

// sweep writes the usage records of sessions whose instance died — their entries expired a TTL
// ago and more — and deletes them. Removing a session from the set is the claim: of all the
// instances sweeping, only the one whose ZREM removed it writes its record.
func (r *Registry) sweep(ctx context.Context) error {
	before := strconv.FormatInt(r.now().Add(-r.ttl).UnixMilli(), 10)
	ids, err := r.redis.Do(ctx, r.redis.B().Zrangebyscore().Key(r.index()).Min("-inf").Max(before).
		Limit(0, maxSweep).Build()).AsStrSlice()
	if err != nil || len(ids) == 0 {
		return err
	}
	claims := make(rueidis.Commands, 0, 2*len(ids))
	for _, id := range ids {
		claims = append(claims, r.redis.B().Zrem().Key(r.index()).Member(id).Build(),
			r.redis.B().Get().Key(r.key(id)).Build())
	}
	res := r.redis.DoMulti(ctx, claims...)
	var writes rueidis.Commands
	for i, id := range ids {
		if n, err := res[2*i].AsInt64(); err != nil || n != 1 {
			continue // another instance claimed it
		}
		b, err := res[2*i+1].AsBytes()
		var l Live
		if err != nil || json.Unmarshal(b, &l) != nil {
			continue // nothing left to write a record from
		}
		u := usageOf(l, l.UpdatedAt, int(websocket.StatusAbnormalClosure), "instance lost")
		r.logUsage(u)
		writes = append(writes, r.xadd(&u), r.redis.B().Del().Key(r.key(id)).Build())
	}
	for _, res := range r.redis.DoMulti(ctx, writes...) {
		if err := res.Error(); err != nil {
			return fmt.Errorf("voice: write the usage records of lost sessions: %w", err)
		}
	}
	return nil
}

// Renew deletes the published entries of ended sessions and, once a quarter of the TTL has gone
// by since it last did, publishes the live ones again: each in one round trip. Called every
// TTL/3, it then publishes on every call however late the previous one ran, and a call in
// between (to delete) postpones the next publication by at most one period: an entry is
// always renewed well within its TTL.
func (r *Registry) Renew(ctx context.Context) error {
	if r.redis == nil {
		return nil
	}
	// A failed deletion does not hold back the renewal: the entries to renew must not expire.
	uerr := r.unpublish(ctx)
	r.mu.Lock()
	now := r.now()
	due := now.Sub(r.renewed) >= renewDue(r.ttl)
	if due {
		r.renewed = now
	}
	r.mu.Unlock()
	// Lost sessions are looked for on the renewal's rounds only, not on every ended session's.
	if due {
		if err := r.sweep(ctx); err != nil {
			uerr = errors.Join(uerr, fmt.Errorf("voice: sweep lost sessions: %w", err))
		}
	}
	ss := r.local()
	if !due || len(ss) == 0 {
		return uerr
	}
	if err := r.publish(ctx, ss); err != nil {
		return errors.Join(uerr, fmt.Errorf("voice: renew sessions: %w", err))
	}
	return uerr
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
	res := r.redis.DoMulti(ctx, r.redis.B().Zscore().Key(r.index()).Member(id).Build(),
		r.redis.B().Get().Key(r.key(id)).Build())
	score, err := res[0].AsFloat64()
	if rueidis.IsRedisNil(err) {
		return Live{}, false, nil
	}
	if err != nil {
		return Live{}, false, fmt.Errorf("voice: get session: %w", err)
	}
	if int64(score) < r.now().UnixMilli() {
		return Live{}, false, nil // its instance is gone
	}
	b, err := res[1].AsBytes()
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
		now := fmt.Sprint(r.now().UnixMilli())
		ids, err := r.redis.Do(ctx, r.redis.B().Zrangebyscore().Key(r.index()).Min(now).Max("+inf").Build()).AsStrSlice()
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
