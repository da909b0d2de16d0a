package policy

import (
	"context"
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

// intervalMS is a bucket's emission interval in whole milliseconds, the limiters' resolution:
// at least 1, since a zero interval would never limit.
func intervalMS(b Bucket) int64 { return max(b.Interval.Milliseconds(), 1) }

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
	tats   map[string]int64 // ms
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
	now := t.UnixMilli()
	if day := t.UTC().Format("20060102"); day != m.day {
		m.day, m.quotas = day, map[string]int64{}
	}
	v := Verdict{Allowed: true, Remaining: -1}
	newTATs := make([]int64, len(c.Buckets))
	for i, b := range c.Buckets {
		ok, tat, retry, remaining, reset := gcra(now, m.tats[c.Tenant+"|"+b.Key], intervalMS(b), int64(b.Burst))
		newTATs[i] = tat
		v.note(ok, b.Limit, retry, remaining, reset)
	}
	qkey := c.Tenant + "|" + c.User
	if c.Quota > 0 && m.quotas[qkey] >= c.Quota {
		v.Allowed, v.QuotaExceeded = false, true
		v.RetryAfter = max(v.RetryAfter, time.Until(nextUTCDay(t)))
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

// note folds one bucket's answer into the verdict, keeping the tightest bucket's figures.
func (v *Verdict) note(ok bool, limit int, retry, remaining, reset int64) {
	if !ok {
		v.Allowed = false
		v.RetryAfter = max(v.RetryAfter, time.Duration(retry)*time.Millisecond)
	}
	if v.Remaining < 0 || int(remaining) < v.Remaining {
		v.Limit, v.Remaining, v.Reset = limit, int(remaining), time.Duration(reset)*time.Millisecond
	}
}

func nextUTCDay(t time.Time) time.Time {
	y, mo, d := t.UTC().Date()
	return time.Date(y, mo, d+1, 0, 0, 0, 0, time.UTC)
}

// limitScript is GCRA over several buckets plus a daily quota, atomically and in one round trip.
// It takes the time from Redis, so instances with drifting clocks share one budget exactly.
//
// KEYS: the buckets, then the quota key if ARGV[2] > 0.
// ARGV: n, quota, quota ttl ms, then per bucket: interval ms, burst.
// Returns {allowed, quota exceeded, retry ms, then per bucket: remaining, reset ms}.
const limitScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
if quota > 0 then
  local used = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
  if used >= quota then
    allowed, overQuota = 0, 1
  end
end
if allowed == 1 then
  for i = 1, n do
    redis.call('SET', KEYS[i], tats[i], 'PX', math.max(tats[i] - now, 1))
  end
  if quota > 0 then
    redis.call('INCR', KEYS[n + 1])
    redis.call('PEXPIRE', KEYS[n + 1], ARGV[3])
  end
end
local res = {allowed, overQuota, retry}
for i = 1, #out do res[#res + 1] = out[i] end
return res`

// RedisLimiter limits across instances through one Lua script per check: one round trip.
//
// Keys (Prefix defaults to "voicegate:"), with the tenant as the Redis Cluster hash tag so one
// request's keys share a slot:
//
//	{prefix}rl:{tenant}:{bucket key}           GCRA theoretical arrival time, ms
//	{prefix}quota:{tenant}:{user}:{yyyymmdd}   requests today
type RedisLimiter struct {
	client rueidis.Client
	prefix string
	script *rueidis.Lua
	now    func() time.Time
}

// NewRedisLimiter returns a limiter on client.
func NewRedisLimiter(client rueidis.Client, prefix string) *RedisLimiter {
	if prefix == "" {
		prefix = "voicegate:"
	}
	return &RedisLimiter{client: client, prefix: prefix, script: rueidis.NewLuaScript(limitScript), now: time.Now}
}

// Allow implements Limiter.
func (l *RedisLimiter) Allow(ctx context.Context, c *Charge) (Verdict, error) {
	tag := "{" + c.Tenant + "}:"
	keys := make([]string, 0, len(c.Buckets)+1)
	args := make([]string, 0, 3+2*len(c.Buckets))
	args = append(args, strconv.Itoa(len(c.Buckets)), strconv.FormatInt(c.Quota, 10), "90000000") // 25h
	for _, b := range c.Buckets {
		keys = append(keys, l.prefix+"rl:"+tag+b.Key)
		args = append(args, strconv.FormatInt(intervalMS(b), 10), strconv.Itoa(b.Burst))
	}
	t := l.now()
	if c.Quota > 0 {
		keys = append(keys, l.prefix+"quota:"+tag+c.User+":"+t.UTC().Format("20060102"))
	}
	res, err := l.script.Exec(ctx, l.client, keys, args).AsIntSlice()
	if err != nil {
		return Verdict{}, fmt.Errorf("policy: rate limit: %w", err)
	}
	if len(res) != 3+2*len(c.Buckets) {
		return Verdict{}, fmt.Errorf("policy: rate limit: unexpected answer of %d values", len(res))
	}
	v := Verdict{Allowed: res[0] == 1, QuotaExceeded: res[1] == 1, Remaining: -1}
	for i, b := range c.Buckets {
		v.note(true, b.Limit, 0, res[3+2*i], res[4+2*i])
	}
	v.RetryAfter = time.Duration(res[2]) * time.Millisecond
	if v.QuotaExceeded {
		v.RetryAfter = max(v.RetryAfter, time.Until(nextUTCDay(t)))
	}
	return v, nil
}
