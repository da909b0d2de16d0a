package policy

import (
	"context"
	"sync"
	"time"
)

// Bucket is one GCRA rate to charge a request to.
type Bucket struct {
	Parts    []string      // what is limited, such as ["u", "alice"] or ["t"], named by Keys
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
	// Claimed reports that an admission's Claim was checked and taken (with its Absent key):
	// false when the Admitter ignores claims (in memory).
	Claimed bool
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
	mu sync.Mutex
	// Entries are named as Redis keys are (Keys, with no prefix): two tenants or users never share one.
	tats   map[string]int64 // µs
	quotas map[string]int64
	day    string
	now    func() time.Time
	sweeps int
}

// NewMemoryLimiter returns an in-process limiter on the clock now; nil means time.Now.
func NewMemoryLimiter(now func() time.Time) *MemoryLimiter {
	if now == nil {
		now = time.Now
	}
	return &MemoryLimiter{tats: map[string]int64{}, quotas: map[string]int64{}, now: now}
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
		ok, tat, retry, remaining, reset := gcra(now, m.tats[Keys{}.Tenant(KindRateLimit, c.Tenant, b.Parts...)], intervalUS(b), int64(b.Burst))
		newTATs[i] = tat
		v.note(ok, b.Limit, retry, remaining, reset)
	}
	qkey := Keys{}.Tenant(KindQuota, c.Tenant, c.User)
	if c.Quota > 0 && m.quotas[qkey] >= c.Quota {
		v.Allowed, v.QuotaExceeded = false, true
		v.RetryAfter = max(v.RetryAfter, nextUTCDay(t).Sub(t))
	}
	if !v.Allowed {
		return v, nil
	}
	for i, b := range c.Buckets {
		m.tats[Keys{}.Tenant(KindRateLimit, c.Tenant, b.Parts...)] = newTATs[i]
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
