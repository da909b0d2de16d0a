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

// admitScript admits a request in one round trip: GCRA over several buckets, a daily quota, a
// concurrency slot and a claimed key, all or nothing. It takes the time from Redis, in
// microseconds, so instances with drifting clocks share one budget exactly.
//
// The quota's day is Redis's UTC day: the caller offers the keys of the days around its own
// (yesterday, today, tomorrow) and the script counts in the one that is today for Redis, so
// every instance counts in the same key whatever its clock says. A slot is a member of the
// user's and the tenant's sorted sets, scored with its expiry in ms on Redis's clock, after
// expired members are dropped.
//
// A slot or a claim is taken under a member (a nonce). If the caller gave up waiting and has
// released the member already (its release left a tombstone), the script takes nothing: an
// admission that Redis runs late never holds what nobody will give back.
//
// KEYS: the buckets; if quota > 0, three quota keys; with a slot, the user and tenant sets; with
// a claim, its key, then the key it needs absent if any; with a member, its tombstone, last.
// ARGV: n, quota, quota ttl ms, slot (0/1), member ("" without slot and claim), lease ttl ms,
// user cap, tenant cap, claim (0 none, 1 a claim, 2 a claim with a key it needs absent), claim
// value; then per bucket: interval µs, burst; then, with a quota, the day numbers (days since
// the epoch) of the three quota keys.
// Returns {status, quota exceeded, retry µs, then per bucket: remaining, reset µs}, where status
// is 1 admitted, 0 refused by a rate or the quota, 2 the user cap full, 3 the tenant cap full;
// {4} when the claim is held (or its absent key present), which is checked first and charges
// nothing (the request is answered from what holds it); {-1} when Redis's day is none of the
// three (an instance clock off by more than a day); {-2} when the member was released before
// the script ran.
const admitScript = `
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[#KEYS]) == 1 then return {-2} end
local n = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local slot = ARGV[4] == '1'
local ckey
if ARGV[9] ~= '0' then
  ckey = KEYS[n + (quota > 0 and 3 or 0) + (slot and 2 or 0) + 1]
  if redis.call('EXISTS', ckey) == 1 then return {4} end
  if ARGV[9] == '2' and redis.call('EXISTS', KEYS[n + (quota > 0 and 3 or 0) + (slot and 2 or 0) + 2]) == 1 then return {4} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nowms = math.floor(now / 1000)
local ttl = tonumber(ARGV[6])
local status, overQuota, retry = 1, 0, 0
local tats, out = {}, {}
for i = 1, n do
  local interval = tonumber(ARGV[9 + 2 * i])
  local burst = tonumber(ARGV[10 + 2 * i])
  local tau = interval * math.max(burst - 1, 0)
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  if tat - tau > now then
    status = 0
    retry = math.max(retry, tat - tau - now)
    out[#out + 1] = 0
    out[#out + 1] = tat - now
  else
    tats[i] = tat + interval
    out[#out + 1] = math.floor((now + tau - tat) / interval)
    out[#out + 1] = tat + interval - now
  end
end
local k = n
local qkey
if quota > 0 then
  local day = math.floor(tonumber(t[1]) / 86400)
  for j = 1, 3 do
    if tonumber(ARGV[10 + 2 * n + j]) == day then qkey = KEYS[k + j] end
  end
  k = k + 3
  if not qkey then return {-1} end
  if tonumber(redis.call('GET', qkey) or '0') >= quota then
    status, overQuota = 0, 1
    retry = math.max(retry, (day + 1) * 86400000000 - now)
  end
end
if slot then
  for i = 1, 2 do
    redis.call('ZREMRANGEBYSCORE', KEYS[k + i], '-inf', nowms)
    local cap = tonumber(ARGV[6 + i])
    if status == 1 and cap > 0 and redis.call('ZCARD', KEYS[k + i]) >= cap then status = 1 + i end
  end
end
if status == 1 then
  for i = 1, n do
    -- %.0f: a Lua number becomes a string with 14 digits otherwise, and these have 16
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.max(math.ceil((tats[i] - now) / 1000), 1))
  end
  if qkey then
    redis.call('INCR', qkey)
    redis.call('PEXPIRE', qkey, ARGV[3])
  end
  if slot then
    for i = 1, 2 do
      redis.call('ZADD', KEYS[k + i], nowms + ttl, ARGV[5])
      redis.call('PEXPIRE', KEYS[k + i], ttl)
    end
  end
  if ckey then redis.call('SET', ckey, ARGV[10], 'PX', ttl) end
end
local res = {status, overQuota, retry}
for i = 1, #out do res[#res + 1] = out[i] end
return res`

// renewScript moves a held slot's and claim's expiry to the TTL from now on Redis's clock, and
// puts them back if they are gone: they expired while Redis could not be reached, or Redis lost
// its data. The request still runs, so its slot must count toward the cap again, even if that
// puts the count over the cap for a while (no running session is ended for it). GT never moves
// an expiry back. A claim taken meanwhile by someone else is left to them.
//
// KEYS: with a slot, the user and tenant sets; with a claim, its key. ARGV: member, ttl ms,
// slot (0/1), claim value.
const renewScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local k = 0
if ARGV[3] == '1' then
  for i = 1, 2 do
    redis.call('ZADD', KEYS[i], 'GT', now + ttl, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  k = 2
end
if KEYS[k + 1] then
  local v = redis.call('GET', KEYS[k + 1])
  if v == ARGV[4] then
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
  elseif not v then
    redis.call('SET', KEYS[k + 1], ARGV[4], 'PX', ttl)
  end
end
return 0`

// releaseScript gives a slot back and deletes a claim that is still this admission's. For an
// admission whose answer never came (it may not have run yet), it also leaves a tombstone for
// the lease TTL, so that the admission, should Redis run it after this, takes nothing.
//
// KEYS: as renewScript's, then the tombstone if any. ARGV: member, slot (0/1), claim value,
// tombstone ttl ms (0: none).
const releaseScript = `
local k = 0
if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  k = 2
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[k + 1]) == ARGV[3] then
  redis.call('DEL', KEYS[k + 1])
end
if ARGV[4] ~= '0' then redis.call('SET', KEYS[#KEYS], '1', 'PX', ARGV[4]) end
return 0`

// RedisAdmitter admits requests against rates, quotas and concurrency caps shared by every
// instance, and takes their claims, in one Lua script per admission: one round trip. Releasing
// is one more. Slots and claims expire TTL after their last renewal; Renew, called by the
// gateway's one renewer every TTL/3 and whenever OnChange says so, renews every held one in one
// pipeline, so an instance that dies frees its slots within TTL and no request needs a
// goroutine of its own for it.
//
// An admission whose answer does not come in time may still have run, or may run later: it is
// held as if it had been admitted (renewed while the request runs) and released when the
// request ends, with a tombstone that keeps a late run from taking anything.
//
// Keys (Prefix is REDIS_PREFIX, as given), with the tenant as the Redis Cluster hash tag so one
// admission's keys share a slot:
//
//	{prefix}rl:{tenant}:{bucket key}           GCRA theoretical arrival time, µs (Redis's clock)
//	{prefix}quota:{tenant}:{user}:{yyyymmdd}   requests that UTC day (Redis's day)
//	{prefix}lease:{tenant}:{kind}:u:{user}     the user's slots (sorted set, expiry in ms)
//	{prefix}lease:{tenant}:{kind}:t            the tenant's
//	{prefix}released:{tenant}:{member}         an admission released before its answer came (TTL)
type RedisAdmitter struct {
	client   rueidis.Client
	keys     Keys
	ttl      time.Duration
	admit    *rueidis.Lua
	renewal  *rueidis.Lua
	release  *rueidis.Lua
	onChange func()
	now      func() time.Time

	mu       sync.Mutex
	held     map[string]holding // by member
	released []holding          // whose release failed or raced a renewal: Renew retries
	renewed  time.Time          // when held slots were last renewed
}

// holding is what one admission holds in Redis.
type holding struct {
	member               string
	userKey, tenantKey   string // empty: no slot
	claimKey, claimValue string // empty: no claim
	tomb                 string // the member's tombstone key
	// uncertain: the admission's answer never came, so it may run after its release; the
	// release leaves the tombstone, and is retried until until (then the TTL has done it).
	uncertain bool
	until     time.Time
}

func (h *holding) keys() []string {
	keys := make([]string, 0, 4)
	if h.userKey != "" {
		keys = append(keys, h.userKey, h.tenantKey)
	}
	if h.claimKey != "" {
		keys = append(keys, h.claimKey)
	}
	return keys
}

func (h *holding) slot() string {
	if h.userKey != "" {
		return "1"
	}
	return "0"
}

// releaseExec is the release script's call for h.
func (l *RedisAdmitter) releaseExec(h *holding) rueidis.LuaExec {
	keys, tomb := h.keys(), "0"
	if h.uncertain {
		keys, tomb = append(keys, h.tomb), strconv.FormatInt(l.ttl.Milliseconds(), 10)
	}
	return rueidis.LuaExec{Keys: keys, Args: []string{h.member, h.slot(), h.claimValue, tomb}}
}

// RedisAdmitterOptions configures a RedisAdmitter.
type RedisAdmitterOptions struct {
	Prefix string        // key prefix (REDIS_PREFIX), as given
	TTL    time.Duration // how long a slot or claim outlives its last renewal; zero means 30 s
	// OnChange, if set, is called when a release has to be retried: Renew has it to do.
	OnChange func()
	// Now is this instance's clock. It decides when renewals are due and names the quota keys
	// around today; Redis's clock decides the rest. Nil means time.Now.
	Now func() time.Time
}

// NewRedisAdmitter returns an admitter on client.
func NewRedisAdmitter(client rueidis.Client, o RedisAdmitterOptions) *RedisAdmitter {
	if o.TTL <= 0 {
		o.TTL = 30 * time.Second
	}
	if o.OnChange == nil {
		o.OnChange = func() {}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &RedisAdmitter{client: client, keys: NewKeys(o.Prefix), ttl: o.TTL, admit: rueidis.NewLuaScript(admitScript),
		renewal: rueidis.NewLuaScript(renewScript), release: rueidis.NewLuaScript(releaseScript),
		onChange: o.OnChange, now: o.Now, held: map[string]holding{}, renewed: o.Now()}
}

// errClockSkew means this instance's clock is more than a day away from Redis's.
var errClockSkew = errors.New("policy: admission: this instance's clock is more than a day from Redis's")

// Admit implements Admitter.
func (l *RedisAdmitter) Admit(ctx context.Context, a *Ask) (Verdict, Release, error) {
	n := len(a.Buckets)
	keys := make([]string, 0, n+8)
	args := make([]string, 10, 13+2*n)
	args[0], args[1], args[2] = strconv.Itoa(n), strconv.FormatInt(a.Quota, 10), "90000000" // 25h
	args[3], args[5], args[8] = "0", strconv.FormatInt(l.ttl.Milliseconds(), 10), "0"
	for _, b := range a.Buckets {
		keys = append(keys, l.keys.Tenant(KindRateLimit, a.Tenant, b.Parts...))
		args = append(args, strconv.FormatInt(intervalUS(b), 10), strconv.Itoa(b.Burst))
	}
	if a.Quota > 0 {
		today := l.now().UTC().Truncate(24 * time.Hour)
		for _, d := range []time.Time{today.AddDate(0, 0, -1), today, today.AddDate(0, 0, 1)} {
			keys = append(keys, l.keys.Tenant(KindQuota, a.Tenant, a.User, d.Format("20060102")))
			args = append(args, strconv.FormatInt(d.Unix()/86400, 10))
		}
	}
	var h *holding
	if a.Slot != nil || a.Claim != nil {
		member := rand.Text()
		h = &holding{member: member, tomb: l.keys.Tenant(KindReleased, a.Tenant, member)}
		args[4] = h.member
	}
	if s := a.Slot; s != nil {
		h.userKey = l.keys.Tenant(KindLease, a.Tenant, s.Kind, "u", a.User)
		h.tenantKey = l.keys.Tenant(KindLease, a.Tenant, s.Kind, "t")
		keys = append(keys, h.userKey, h.tenantKey)
		args[3], args[6], args[7] = "1", strconv.Itoa(s.PerUser), strconv.Itoa(s.PerTenant)
	} else {
		args[6], args[7] = "0", "0"
	}
	if c := a.Claim; c != nil {
		h.claimKey, h.claimValue = c.Key, c.Value
		keys = append(keys, c.Key)
		args[8], args[9] = "1", c.Value
		if c.Absent != "" {
			keys = append(keys, c.Absent)
			args[8] = "2"
		}
	}
	if h != nil {
		keys = append(keys, h.tomb)
	}

	res, err := l.admit.Exec(ctx, l.client, keys, args).AsIntSlice()
	if err != nil {
		var re *rueidis.RedisError
		if h != nil && !errors.As(err, &re) {
			// No answer: the script may have run, or may still run. What it may have taken is
			// held as if it had, and released when the request (let through) ends.
			h.uncertain = true
			return Verdict{}, l.hold(h), fmt.Errorf("policy: admission: %w", err)
		}
		return Verdict{}, nil, fmt.Errorf("policy: admission: %w", err)
	}
	if len(res) == 1 && res[0] == 4 {
		return Verdict{}, nil, ErrClaimed
	}
	if len(res) == 1 && res[0] == -1 {
		return Verdict{}, nil, errClockSkew
	}
	if len(res) != 3+2*n {
		return Verdict{}, nil, fmt.Errorf("policy: admission: unexpected answer of %d values", len(res))
	}
	switch res[0] {
	case 2:
		return Verdict{}, nil, &CapError{a.Slot.Kind, "user", a.Slot.PerUser}
	case 3:
		return Verdict{}, nil, &CapError{a.Slot.Kind, "tenant", a.Slot.PerTenant}
	}
	v := Verdict{Allowed: res[0] == 1, QuotaExceeded: res[1] == 1, Remaining: -1,
		RetryAfter: time.Duration(res[2]) * time.Microsecond}
	for i, b := range a.Buckets {
		v.note(true, b.Limit, 0, res[3+2*i], res[4+2*i])
	}
	if !v.Allowed {
		return v, nil, nil
	}
	if h == nil {
		return v, func(context.Context) {}, nil
	}
	v.Claimed = a.Claim != nil
	return v, l.hold(h), nil
}

// hold records h as held, renewed until its release, which it returns.
func (l *RedisAdmitter) hold(h *holding) Release {
	l.mu.Lock()
	l.held[h.member] = *h
	l.mu.Unlock()
	var once sync.Once
	return func(ctx context.Context) { once.Do(func() { l.give(ctx, h) }) }
}

// Allow implements Limiter: an admission with a charge only.
func (l *RedisAdmitter) Allow(ctx context.Context, c *Charge) (Verdict, error) {
	v, _, err := l.Admit(ctx, &Ask{Charge: *c})
	return v, err
}

// give releases h at once, in one round trip; if that fails, Renew does it again.
func (l *RedisAdmitter) give(ctx context.Context, h *holding) {
	l.mu.Lock()
	delete(l.held, h.member)
	l.mu.Unlock()
	if h.uncertain {
		h.until = l.now().Add(l.ttl)
	}
	x := l.releaseExec(h)
	if err := l.release.Exec(ctx, l.client, x.Keys, x.Args).Error(); err != nil {
		l.mu.Lock()
		l.released = append(l.released, *h)
		l.mu.Unlock()
		l.onChange()
	}
}

// Renew retries the releases that failed and, once a quarter of the TTL has gone by since it
// last did, renews the held slots and claims. Called every TTL/3, it renews on every call
// however late the previous one ran, and a call in between (to release) postpones the next
// renewal by at most one period. A release that fails again is repaired by expiry, except one
// of an admission whose answer never came, retried until the TTL would have done it. Calls
// must not overlap (the gateway's renewer makes them one at a time).
func (l *RedisAdmitter) Renew(ctx context.Context) error {
	now := l.now()
	l.mu.Lock()
	released := l.released
	l.released = nil
	var renew []rueidis.LuaExec
	var renewing map[string]holding // what the renewal may put back, by member
	if now.Sub(l.renewed) >= l.ttl/4 {
		l.renewed = now
		ttl := strconv.FormatInt(l.ttl.Milliseconds(), 10)
		renew = make([]rueidis.LuaExec, 0, len(l.held))
		renewing = make(map[string]holding, len(l.held))
		for member, h := range l.held {
			renew = append(renew, rueidis.LuaExec{Keys: h.keys(), Args: []string{member, ttl, h.slot(), h.claimValue}})
			renewing[member] = h
		}
	}
	l.mu.Unlock()

	var rerr error
	if len(released) > 0 {
		execs := make([]rueidis.LuaExec, len(released))
		for i := range released {
			execs[i] = l.releaseExec(&released[i])
		}
		var again []holding
		for i, res := range l.release.ExecMulti(ctx, l.client, execs...) {
			if err := res.Error(); err != nil {
				// Not returned yet: the held slots must be renewed all the same.
				rerr = fmt.Errorf("policy: release leases: %w", err)
				if h := released[i]; h.uncertain && now.Before(h.until) {
					again = append(again, h)
				}
			}
		}
		if len(again) > 0 {
			l.mu.Lock()
			l.released = append(l.released, again...)
			l.mu.Unlock()
		}
	}
	var err error
	if len(renew) > 0 {
		for _, res := range l.renewal.ExecMulti(ctx, l.client, renew...) {
			if err = res.Error(); err != nil {
				err = fmt.Errorf("policy: renew leases (they expire unless renewed in time): %w", err)
				break
			}
		}
		// What was released while the renewal ran may have been put back by it: release it again.
		l.mu.Lock()
		raced := 0
		for member, h := range renewing {
			if _, ok := l.held[member]; !ok {
				if h.uncertain {
					h.until = now.Add(l.ttl)
				}
				l.released = append(l.released, h)
				raced++
			}
		}
		l.mu.Unlock()
		if raced > 0 {
			l.onChange()
		}
	}
	return errors.Join(rerr, err)
}
