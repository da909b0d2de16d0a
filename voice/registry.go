package voice

import (
	"context"
	"encoding/json"
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
	gone     []string      // ended sessions whose published entries are still to delete
	kick     chan struct{} // wakes the renewer to delete them
	stop     context.CancelFunc
	done     chan struct{}
}

// RegistryOptions configures a Registry.
type RegistryOptions struct {
	Instance string         // this instance's name in listings
	Redis    rueidis.Client // nil: local only
	Prefix   string         // Redis key prefix; empty means "voicegate:"
	TTL      time.Duration  // how long a published entry outlives its last renewal; zero means 30 s
	Log      *slog.Logger
}

// NewRegistry returns a registry; with Redis it renews its entries until Close.
func NewRegistry(o RegistryOptions) *Registry {
	if o.Prefix == "" {
		o.Prefix = "voicegate:"
	}
	if o.TTL <= 0 {
		o.TTL = 30 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	r := &Registry{instance: o.Instance, redis: o.Redis, prefix: o.Prefix, ttl: o.TTL, log: o.Log,
		sessions: map[string]*session{}, kick: make(chan struct{}, 1), done: make(chan struct{})}
	ctx, stop := context.WithCancel(context.Background())
	r.stop = stop
	if r.redis == nil {
		close(r.done)
		return r
	}
	go r.renew(ctx)
	return r
}

// Close stops renewing the published entries.
func (r *Registry) Close() {
	r.stop()
	<-r.done
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

// remove forgets s at once, here, and has its published entry deleted by the renewer: an ended
// session needs no request's context, nor to wait for Redis.
func (r *Registry) remove(s *session) {
	r.mu.Lock()
	delete(r.sessions, s.info.SessionID)
	if r.redis != nil {
		r.gone = append(r.gone, s.info.SessionID)
	}
	r.mu.Unlock()
	if r.redis != nil {
		select {
		case r.kick <- struct{}{}:
		default:
		}
	}
}

// unpublish deletes the entries of ended sessions, in one round trip.
func (r *Registry) unpublish(ctx context.Context) {
	r.mu.Lock()
	gone := r.gone
	r.gone = nil
	r.mu.Unlock()
	if len(gone) == 0 {
		return
	}
	cmds := make(rueidis.Commands, 0, len(gone)+1)
	for _, id := range gone {
		cmds = append(cmds, r.redis.B().Del().Key(r.key(id)).Build())
	}
	cmds = append(cmds, r.redis.B().Zrem().Key(r.index()).Member(gone...).Build())
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			// The entries expire within TTL anyway, and listings skip them once their
			// score is past.
			r.log.Warn("deleting ended voice sessions from Redis failed", "err", proxy.Describe(err))
			return
		}
	}
}

func (r *Registry) publish(ctx context.Context, ss []*session) error {
	expiry := float64(time.Now().Add(r.ttl).UnixMilli())
	cmds := make(rueidis.Commands, 0, 2*len(ss)+1)
	for _, s := range ss {
		b, _ := json.Marshal(s.info)
		cmds = append(cmds,
			r.redis.B().Set().Key(r.key(s.info.SessionID)).Value(string(b)).Px(r.ttl).Build(),
			r.redis.B().Zadd().Key(r.index()).ScoreMember().ScoreMember(expiry, s.info.SessionID).Build())
	}
	cmds = append(cmds, r.redis.B().Zremrangebyscore().Key(r.index()).Min("-inf").Max(fmt.Sprint(time.Now().UnixMilli())).Build())
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return err
		}
	}
	return nil
}

// renew republishes the live sessions every TTL/3 and deletes ended ones as they end, until
// Close; then it deletes what is left to delete.
func (r *Registry) renew(ctx context.Context) {
	defer close(r.done)
	defer r.unpublish(context.WithoutCancel(ctx))
	t := time.NewTicker(r.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
			r.unpublish(ctx)
			continue
		case <-t.C:
		}
		ss := r.local()
		if len(ss) == 0 {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, r.ttl/3)
		if err := r.publish(rctx, ss); err != nil {
			r.log.Warn("renewing voice sessions in Redis failed", "err", proxy.Describe(err))
		}
		cancel()
	}
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
		now := fmt.Sprint(time.Now().UnixMilli())
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
