package voice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

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
}

// Registry tracks this instance's live sessions (so shutdown can close them: the HTTP server
// does not wait for hijacked connections) and, with Redis, publishes them so that every
// instance can list every instance's sessions. A published entry expires unless renewed, so the
// sessions of an instance that dies disappear within TTL.
//
// Redis keys: {prefix}voice:session:{id} (JSON Info, expiring) and {prefix}voice:sessions
// (sorted set: session ID → expiry in ms).
type Registry struct {
	instance string
	redis    rueidis.Client // nil: this instance only
	prefix   string
	ttl      time.Duration
	log      *slog.Logger

	mu       sync.Mutex
	sessions map[string]*session
	gone     []string // ended sessions whose published entries are still to delete
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
	Log *slog.Logger
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
	return &Registry{instance: o.Instance, redis: o.Redis, prefix: o.Prefix, ttl: o.TTL, log: o.Log,
		onChange: o.OnChange, now: o.Now, sessions: map[string]*session{}, renewed: o.Now()}
}

func (r *Registry) key(id string) string { return r.prefix + "voice:session:" + id }
func (r *Registry) index() string        { return r.prefix + "voice:sessions" }

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

// remove forgets s at once, here, and leaves its published entry for Renew to delete: an ended
// session needs no request's context, nor to wait for Redis.
func (r *Registry) remove(s *session) {
	r.mu.Lock()
	delete(r.sessions, s.info.SessionID)
	if r.redis != nil {
		r.gone = append(r.gone, s.info.SessionID)
	}
	r.mu.Unlock()
	if r.redis != nil {
		r.onChange()
	}
}

// unpublish deletes the entries of ended sessions, in one round trip. Those it fails to delete
// expire within TTL anyway, and listings skip them once their score is past.
func (r *Registry) unpublish(ctx context.Context) error {
	r.mu.Lock()
	gone := r.gone
	r.gone = nil
	r.mu.Unlock()
	if len(gone) == 0 {
		return nil
	}
	cmds := make(rueidis.Commands, 0, len(gone)+1)
	for _, id := range gone {
		cmds = append(cmds, r.redis.B().Del().Key(r.key(id)).Build())
	}
	cmds = append(cmds, r.redis.B().Zrem().Key(r.index()).Member(gone...).Build())
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return fmt.Errorf("voice: delete ended sessions: %w", err)
		}
	}
	return nil
}

func (r *Registry) publish(ctx context.Context, ss []*session) error {
	expiry := float64(r.now().Add(r.ttl).UnixMilli())
	cmds := make(rueidis.Commands, 0, 2*len(ss)+1)
	for _, s := range ss {
		b, _ := json.Marshal(s.info)
		cmds = append(cmds,
			r.redis.B().Set().Key(r.key(s.info.SessionID)).Value(string(b)).Px(r.ttl).Build(),
			r.redis.B().Zadd().Key(r.index()).ScoreMember().ScoreMember(expiry, s.info.SessionID).Build())
	}
	cmds = append(cmds, r.redis.B().Zremrangebyscore().Key(r.index()).Min("-inf").Max(fmt.Sprint(r.now().UnixMilli())).Build())
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return err
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
	ss := r.local()
	if !due || len(ss) == 0 {
		return uerr
	}
	if err := r.publish(ctx, ss); err != nil {
		return errors.Join(uerr, fmt.Errorf("voice: renew sessions: %w", err))
	}
	return uerr
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
				var info Info
				if json.Unmarshal(b, &info) == nil {
					out = append(out, info)
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
