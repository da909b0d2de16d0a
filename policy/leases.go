package policy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"voicegate/proxy"
)

// ErrCapReached means a concurrency cap is full; the error is a *CapError saying which.
var ErrCapReached = errors.New("policy: concurrency cap reached")

// CapError says which concurrency cap is full.
type CapError struct {
	Kind  string // "chat" or "voice"
	Level string // "user" or "tenant"
	Cap   int
}

func (e *CapError) Error() string {
	return fmt.Sprintf("at most %d open %s sessions per %s", e.Cap, e.Kind, e.Level)
}

// Is makes errors.Is(err, ErrCapReached) true.
func (e *CapError) Is(target error) bool { return target == ErrCapReached }

// LeaseRequest asks for one slot of kind ("chat", "voice") for a user of a tenant.
type LeaseRequest struct {
	Kind, Tenant, User string
	PerUser, PerTenant int // caps; 0 means no cap at that level
}

// Leases hands out concurrency slots. Release frees a slot; a slot whose holder died expires on
// its own.
type Leases interface {
	// Acquire takes a slot, or returns a *CapError (errors.Is ErrCapReached) when full.
	Acquire(ctx context.Context, req LeaseRequest) (release func(), err error)
}

// MemoryLeases counts slots in this process.
type MemoryLeases struct {
	mu     sync.Mutex
	counts map[string]int
}

// NewMemoryLeases returns in-process leases.
func NewMemoryLeases() *MemoryLeases { return &MemoryLeases{counts: map[string]int{}} }

// Acquire implements Leases.
func (m *MemoryLeases) Acquire(_ context.Context, req LeaseRequest) (func(), error) {
	uk := req.Kind + "|" + req.Tenant + "|u|" + req.User
	tk := req.Kind + "|" + req.Tenant + "|t"
	m.mu.Lock()
	defer m.mu.Unlock()
	if req.PerUser > 0 && m.counts[uk] >= req.PerUser {
		return nil, &CapError{req.Kind, "user", req.PerUser}
	}
	if req.PerTenant > 0 && m.counts[tk] >= req.PerTenant {
		return nil, &CapError{req.Kind, "tenant", req.PerTenant}
	}
	m.counts[uk]++
	m.counts[tk]++
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			for _, k := range []string{uk, tk} {
				if m.counts[k]--; m.counts[k] <= 0 {
					delete(m.counts, k)
				}
			}
		})
	}, nil
}

// acquireScript takes a slot in the user's and the tenant's sorted sets (member = lease ID,
// score = expiry in ms on Redis's clock, so instances with drifting clocks agree on what has
// expired), after dropping expired members, or neither.
//
// KEYS: user set, tenant set. ARGV: member, ttl ms, user cap, tenant cap.
// Returns 0 on success, 1 when the user cap is full, 2 when the tenant cap is.
const acquireScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local cap = tonumber(ARGV[2 + i])
  if cap > 0 and redis.call('ZCARD', KEYS[i]) >= cap then
    return i
  end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 0`

// renewScript moves a held slot's expiry to TTL from now on Redis's clock — and puts the slot
// back if it is gone: it expired while Redis could not be reached, or Redis lost its data. The
// session still runs, so it must count toward the cap again, even if that puts the count over
// the cap for a while (no running session is ended for it). GT never moves an expiry back.
//
// KEYS: user set, tenant set. ARGV: member, ttl ms.
const renewScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], 'GT', now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 0`

// RedisLeases holds concurrency slots in Redis sorted sets shared by every instance. Each slot
// expires TTL after its last renewal; one goroutine per gateway renews every held slot every
// TTL/3 in one pipeline, so an instance that dies frees its slots within TTL, and no stream
// needs a goroutine of its own for it. A renewal puts back a slot that expired meanwhile (Redis
// was unreachable for longer than TTL): its session is still running. Expiries are on Redis's
// clock.
//
// Keys: {prefix}lease:{tenant}:{kind}:u:{user} and {prefix}lease:{tenant}:{kind}:t (sorted sets;
// the tenant is the Redis Cluster hash tag).
type RedisLeases struct {
	client  rueidis.Client
	prefix  string
	ttl     time.Duration
	acquire *rueidis.Lua
	renewal *rueidis.Lua
	log     *slog.Logger

	mu   sync.Mutex
	held map[string]heldLease // by member
	stop context.CancelFunc
	done chan struct{}
}

type heldLease struct{ userKey, tenantKey string }

// NewRedisLeases returns leases on client and starts their renewal; Close stops it.
func NewRedisLeases(client rueidis.Client, prefix string, ttl time.Duration, log *slog.Logger) *RedisLeases {
	if prefix == "" {
		prefix = "voicegate:"
	}
	if ttl <= 0 {
		ttl = 30 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, stop := context.WithCancel(context.Background())
	l := &RedisLeases{client: client, prefix: prefix, ttl: ttl, acquire: rueidis.NewLuaScript(acquireScript),
		renewal: rueidis.NewLuaScript(renewScript), log: log, held: map[string]heldLease{}, stop: stop,
		done: make(chan struct{})}
	go l.renew(ctx)
	return l
}

// Close stops renewing. Held slots then expire within TTL.
func (l *RedisLeases) Close() {
	l.stop()
	<-l.done
}

// Acquire implements Leases.
func (l *RedisLeases) Acquire(ctx context.Context, req LeaseRequest) (func(), error) {
	tag := "{" + req.Tenant + "}:" + req.Kind
	h := heldLease{userKey: l.prefix + "lease:" + tag + ":u:" + req.User, tenantKey: l.prefix + "lease:" + tag + ":t"}
	member := rand.Text()
	res, err := l.acquire.Exec(ctx, l.client, []string{h.userKey, h.tenantKey}, []string{member,
		strconv.FormatInt(l.ttl.Milliseconds(), 10), strconv.Itoa(req.PerUser), strconv.Itoa(req.PerTenant)}).AsInt64()
	if err != nil {
		return nil, fmt.Errorf("policy: lease: %w", err)
	}
	switch res {
	case 1:
		return nil, &CapError{req.Kind, "user", req.PerUser}
	case 2:
		return nil, &CapError{req.Kind, "tenant", req.PerTenant}
	}
	l.mu.Lock()
	l.held[member] = h
	l.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			delete(l.held, member)
			l.mu.Unlock()
			// A release that fails is repaired by expiry.
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			l.client.DoMulti(ctx,
				l.client.B().Zrem().Key(h.userKey).Member(member).Build(),
				l.client.B().Zrem().Key(h.tenantKey).Member(member).Build())
		})
	}, nil
}

func (l *RedisLeases) renew(ctx context.Context) {
	defer close(l.done)
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		l.mu.Lock()
		ttl := strconv.FormatInt(l.ttl.Milliseconds(), 10)
		execs := make([]rueidis.LuaExec, 0, len(l.held))
		for member, h := range l.held {
			execs = append(execs, rueidis.LuaExec{Keys: []string{h.userKey, h.tenantKey}, Args: []string{member, ttl}})
		}
		l.mu.Unlock()
		if len(execs) == 0 {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, l.ttl/3)
		for _, r := range l.renewal.ExecMulti(rctx, l.client, execs...) {
			if err := r.Error(); err != nil {
				l.log.Warn("renewing concurrency leases failed; they expire unless renewed in time", "err", proxy.Describe(err))
				break
			}
		}
		cancel()
	}
}
