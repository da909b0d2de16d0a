package policy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/rueidis"
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
// expires TTL after its last renewal. Renew, called by the gateway's one renewer every TTL/3 and
// whenever OnChange says so, deletes released slots and renews every held one, each in one
// pipeline: an instance that dies frees its slots within TTL, and no stream or session needs
// a goroutine of its own for it. A renewal puts back a slot that expired meanwhile (Redis was
// unreachable for longer than TTL): its session is still running. Expiries are on Redis's
// clock.
//
// Keys: {prefix}lease:{tenant}:{kind}:u:{user} and {prefix}lease:{tenant}:{kind}:t (sorted sets;
// the tenant is the Redis Cluster hash tag).
type RedisLeases struct {
	client   rueidis.Client
	prefix   string
	ttl      time.Duration
	acquire  *rueidis.Lua
	renewal  *rueidis.Lua
	onChange func()
	now      func() time.Time

	mu       sync.Mutex
	held     map[string]heldLease // by member
	released []releasedLease      // to delete from Redis
	renewed  time.Time            // when held slots were last renewed
}

type heldLease struct{ userKey, tenantKey string }

type releasedLease struct {
	member string
	heldLease
}

// RedisLeasesOptions configures RedisLeases.
type RedisLeasesOptions struct {
	Prefix string        // key prefix (REDIS_PREFIX), as given
	TTL    time.Duration // how long a slot outlives its last renewal; zero means 30 s
	// OnChange, if set, is called when a slot is released: Renew has it to delete.
	OnChange func()
	// Now is the clock that decides when renewals are due; nil means time.Now.
	Now func() time.Time
}

// NewRedisLeases returns leases on client.
func NewRedisLeases(client rueidis.Client, o RedisLeasesOptions) *RedisLeases {
	if o.TTL <= 0 {
		o.TTL = 30 * time.Second
	}
	if o.OnChange == nil {
		o.OnChange = func() {}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &RedisLeases{client: client, prefix: o.Prefix, ttl: o.TTL, acquire: rueidis.NewLuaScript(acquireScript),
		renewal: rueidis.NewLuaScript(renewScript), onChange: o.OnChange, now: o.Now,
		held: map[string]heldLease{}, renewed: o.Now()}
}

// Acquire implements Leases.
func (l *RedisLeases) Acquire(ctx context.Context, req LeaseRequest) (func(), error) {
	tag := Tag(req.Tenant) + ":" + req.Kind
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
			l.released = append(l.released, releasedLease{member, h})
			l.mu.Unlock()
			l.onChange()
		})
	}, nil
}

// Renew deletes released slots and, once a quarter of the TTL has gone by since it last did,
// renews the held ones. Called every TTL/3, it renews on every call however late the previous
// one ran, and a call in between (to delete) postpones the next renewal by at most one period.
// A deletion that fails is repaired by expiry.
func (l *RedisLeases) Renew(ctx context.Context) error {
	l.mu.Lock()
	released := l.released
	l.released = nil
	var execs []rueidis.LuaExec
	if now := l.now(); now.Sub(l.renewed) >= l.ttl/4 {
		l.renewed = now
		ttl := strconv.FormatInt(l.ttl.Milliseconds(), 10)
		execs = make([]rueidis.LuaExec, 0, len(l.held))
		for member, h := range l.held {
			execs = append(execs, rueidis.LuaExec{Keys: []string{h.userKey, h.tenantKey}, Args: []string{member, ttl}})
		}
	}
	l.mu.Unlock()
	var rerr error
	if len(released) > 0 {
		cmds := make(rueidis.Commands, 0, 2*len(released))
		for _, r := range released {
			cmds = append(cmds, l.client.B().Zrem().Key(r.userKey).Member(r.member).Build(),
				l.client.B().Zrem().Key(r.tenantKey).Member(r.member).Build())
		}
		for _, res := range l.client.DoMulti(ctx, cmds...) {
			if err := res.Error(); err != nil {
				// Not returned yet: the held slots must be renewed all the same.
				rerr = fmt.Errorf("policy: release leases: %w", err)
				break
			}
		}
	}
	for _, r := range l.renewal.ExecMulti(ctx, l.client, execs...) {
		if err := r.Error(); err != nil {
			return errors.Join(rerr, fmt.Errorf("policy: renew leases (they expire unless renewed in time): %w", err))
		}
	}
	return rerr
}
