package policy

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// Bucket is one GCRA rate to charge a request to.
type Bucket struct {
	Key      string        // what is limited, such as "u:alice" or "t:acme"
	Interval time.Duration // emission interval: Per / Requests
	Burst    int           // requests allowed at once
	Limit    int           // Requests, for the RateLimit-Limit header
}

// Charge is one request's charge: its buckets and, optionally, a daily quota.
type Charge struct {
	Tenant  string
	User    string
	Buckets []Bucket
	Quota   int64 // requests per UTC day for User; 0 means none
}

// Verdict is a Limiter's answer.
type Verdict struct {
	Allowed       bool
	QuotaExceeded bool
	Limit         int           // of the tightest bucket
	Remaining     int           // requests left in the tightest bucket
	Reset         time.Duration // until the tightest bucket is full again
	RetryAfter    time.Duration // when refused
}

// Limiter charges requests against rates and quotas. A request is charged to every bucket or
// to none: a refusal by one bucket costs the others nothing.
type Limiter interface {
	Allow(ctx context.Context, c *Charge) (Verdict, error)
}

// intervalUS is a bucket's emission interval in whole microseconds, the limiters' resolution
// (Redis's TIME gives microseconds, and they stay exact in a Lua number): at least 1, since a
// zero interval would never limit. Policy files cannot ask for more than a million requests a
// second (Limits.check), so their rates are kept to within a microsecond per request.
func intervalUS(b Bucket) int64 { return max(b.Interval.Microseconds(), 1) }

// gcra is the shared arithmetic. tat is the bucket's theoretical arrival time.
func gcra(now, tat, interval, burst int64) (allowed bool, newTAT, retry, remaining, reset int64) {
	if tat < now {
		tat = now
	}
	tau := interval * max(burst-1, 0)
	if tat-tau > now {
		return false, tat, tat - tau - now, 0, tat - now
	}
	newTAT = tat + interval
	return true, newTAT, 0, (now + tau - tat) / interval, newTAT - now
}

// MemoryLimiter limits within one process.
type MemoryLimiter struct {
	mu     sync.Mutex
	tats   map[string]int64 // µs
	quotas map[string]int64
	day    string
	now    func() time.Time
	sweeps int
}

// NewMemoryLimiter returns an in-process limiter.
func NewMemoryLimiter() *MemoryLimiter {
	return &MemoryLimiter{tats: map[string]int64{}, quotas: map[string]int64{}, now: time.Now}
}

// Allow implements Limiter.
func (m *MemoryLimiter) Allow(_ context.Context, c *Charge) (Verdict, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := m.now()
	now := t.UnixMicro()
	if day := t.UTC().Format("20060102"); day != m.day {
		m.day, m.quotas = day, map[string]int64{}
	}
	v := Verdict{Allowed: true, Remaining: -1}
	newTATs := make([]int64, len(c.Buckets))
	for i, b := range c.Buckets {
		ok, tat, retry, remaining, reset := gcra(now, m.tats[c.Tenant+"|"+b.Key], intervalUS(b), int64(b.Burst))
		newTATs[i] = tat
		v.note(ok, b.Limit, retry, remaining, reset)
	}
	qkey := c.Tenant + "|" + c.User
	if c.Quota > 0 && m.quotas[qkey] >= c.Quota {
		v.Allowed, v.QuotaExceeded = false, true
		v.RetryAfter = max(v.RetryAfter, nextUTCDay(t).Sub(t))
	}
	if !v.Allowed {
		return v, nil
	}
	for i, b := range c.Buckets {
		m.tats[c.Tenant+"|"+b.Key] = newTATs[i]
	}
	if c.Quota > 0 {
		m.quotas[qkey]++
	}
	m.sweep(now)
	return v, nil
}

// sweep forgets buckets that are full again, now and then.
func (m *MemoryLimiter) sweep(now int64) {
	m.sweeps++
	if m.sweeps%1024 != 0 {
		return
	}
	for k, tat := range m.tats {
		if tat <= now {
			delete(m.tats, k)
		}
	}
}

// note folds one bucket's answer (times in µs) into the verdict, keeping the tightest bucket's
// figures.
func (v *Verdict) note(ok bool, limit int, retry, remaining, reset int64) {
	if !ok {
		v.Allowed = false
		v.RetryAfter = max(v.RetryAfter, time.Duration(retry)*time.Microsecond)
	}
	if v.Remaining < 0 || int(remaining) < v.Remaining {
		v.Limit, v.Remaining, v.Reset = limit, int(remaining), time.Duration(reset)*time.Microsecond
	}
}

func nextUTCDay(t time.Time) time.Time {
	y, mo, d := t.UTC().Date()
	return time.Date(y, mo, d+1, 0, 0, 0, 0, time.UTC)
}

// limitScript is GCRA over several buckets plus a daily quota, atomically and in one round trip.
// It takes the time from Redis, in microseconds, so instances with drifting clocks share one
// budget exactly, and the quota's day is Redis's UTC day: the caller offers the keys of the
// days around its own (yesterday, today, tomorrow) and the script counts in the one that is
// today for Redis, so every instance counts in the same key whatever its clock says.
//
// KEYS: the buckets, then, if ARGV[2] > 0, three quota keys.
// ARGV: n, quota, quota ttl ms, then per bucket: interval µs, burst; then, with a quota, the
// day numbers (days since the epoch) of the three quota keys.
// Returns {allowed, quota exceeded, retry µs, then per bucket: remaining, reset µs}, or
// {-1} when Redis's day is none of the three (an instance clock off by more than a day).
const limitScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local allowed, overQuota, retry = 1, 0, 0
local tats, out = {}, {}
for i = 1, n do
  local interval = tonumber(ARGV[2 + 2 * i])
  local burst = tonumber(ARGV[3 + 2 * i])
  local tau = interval * math.max(burst - 1, 0)
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  if tat - tau > now then
    allowed = 0
    retry = math.max(retry, tat - tau - now)
    tats[i] = false
    out[#out + 1] = 0
    out[#out + 1] = tat - now
  else
    tats[i] = tat + interval
    out[#out + 1] = math.floor((now + tau - tat) / interval)
    out[#out + 1] = tat + interval - now
  end
end
local qkey
if quota > 0 then
  local day = math.floor(tonumber(t[1]) / 86400)
  for j = 1, 3 do
    if tonumber(ARGV[3 + 2 * n + j]) == day then qkey = KEYS[n + j] end
  end
  if not qkey then return {-1} end
  local used = tonumber(redis.call('GET', qkey) or '0')
  if used >= quota then
    allowed, overQuota = 0, 1
    retry = math.max(retry, (day + 1) * 86400000000 - now)
  end
end
if allowed == 1 then
  for i = 1, n do
    -- %.0f: a Lua number becomes a string with 14 digits otherwise, and these have 16
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.max(math.ceil((tats[i] - now) / 1000), 1))
  end
  if qkey then
    redis.call('INCR', qkey)
    redis.call('PEXPIRE', qkey, ARGV[3])
  end
end
local res = {allowed, overQuota, retry}
for i = 1, #out do res[#res + 1] = out[i] end
return res`

// RedisLimiter limits across instances through one Lua script per check: one round trip.
//
// Keys (Prefix is REDIS_PREFIX, as given), with the tenant as the Redis Cluster hash tag so one
// request's keys share a slot:
//
//	{prefix}rl:{tenant}:{bucket key}           GCRA theoretical arrival time, µs (Redis's clock)
//	{prefix}quota:{tenant}:{user}:{yyyymmdd}   requests that UTC day (Redis's day)
type RedisLimiter struct {
	client rueidis.Client
	prefix string
	script *rueidis.Lua
	now    func() time.Time
}

// RedisLimiterOptions configures a RedisLimiter.
type RedisLimiterOptions struct {
	// Prefix of every key (REDIS_PREFIX), as given.
	Prefix string
	// Now is this instance's clock, used only to name the quota keys around today; Redis's
	// clock decides. Nil means time.Now.
	Now func() time.Time
}

// NewRedisLimiter returns a limiter on client.
func NewRedisLimiter(client rueidis.Client, o RedisLimiterOptions) *RedisLimiter {
	if o.Now == nil {
		o.Now = time.Now
	}
	return &RedisLimiter{client: client, prefix: o.Prefix, script: rueidis.NewLuaScript(limitScript), now: o.Now}
}

// errClockSkew means this instance's clock is more than a day away from Redis's.
var errClockSkew = errors.New("policy: rate limit: this instance's clock is more than a day from Redis's")

// Allow implements Limiter.
func (l *RedisLimiter) Allow(ctx context.Context, c *Charge) (Verdict, error) {
	tag := Tag(c.Tenant) + ":"
	keys := make([]string, 0, len(c.Buckets)+3)
	args := make([]string, 0, 6+2*len(c.Buckets))
	args = append(args, strconv.Itoa(len(c.Buckets)), strconv.FormatInt(c.Quota, 10), "90000000") // 25h
	for _, b := range c.Buckets {
		keys = append(keys, l.prefix+"rl:"+tag+b.Key)
		args = append(args, strconv.FormatInt(intervalUS(b), 10), strconv.Itoa(b.Burst))
	}
	if c.Quota > 0 {
		today := l.now().UTC().Truncate(24 * time.Hour)
		for _, d := range []time.Time{today.AddDate(0, 0, -1), today, today.AddDate(0, 0, 1)} {
			keys = append(keys, l.prefix+"quota:"+tag+c.User+":"+d.Format("20060102"))
			args = append(args, strconv.FormatInt(d.Unix()/86400, 10))
		}
	}
	res, err := l.script.Exec(ctx, l.client, keys, args).AsIntSlice()
	if err != nil {
		return Verdict{}, fmt.Errorf("policy: rate limit: %w", err)
	}
	if len(res) == 1 && res[0] == -1 {
		return Verdict{}, errClockSkew
	}
	if len(res) != 3+2*len(c.Buckets) {
		return Verdict{}, fmt.Errorf("policy: rate limit: unexpected answer of %d values", len(res))
	}
	v := Verdict{Allowed: res[0] == 1, QuotaExceeded: res[1] == 1, Remaining: -1}
	for i, b := range c.Buckets {
		v.note(true, b.Limit, 0, res[3+2*i], res[4+2*i])
	}
	v.RetryAfter = time.Duration(res[2]) * time.Microsecond
	return v, nil
}
