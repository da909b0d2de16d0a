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

// AudioQuota is voice_audio_seconds_per_day: the audio seconds (both directions together) a
// user and a tenant may use per UTC day; 0 means no quota at that level.
type AudioQuota struct {
	PerUser   int64 `json:"per_user,omitempty"`
	PerTenant int64 `json:"per_tenant,omitempty"`
}

// TenantLimits are a tenant's own limits. Naming a tenant in the policy also gives it series
// of its own in the per-tenant voice metrics; every other tenant is counted as "other".
type TenantLimits struct {
	// VoiceAudioSecondsPerDay replaces voice_audio_seconds_per_day.per_tenant for this
	// tenant; 0 keeps it.
	VoiceAudioSecondsPerDay int64 `json:"voice_audio_seconds_per_day,omitempty"`
}

// VoiceLimits are what the voice sessions of one tenant are held to.
type VoiceLimits struct {
	UserSecondsPerDay   int64         // 0: none
	TenantSecondsPerDay int64         // 0: none
	MaxSession          time.Duration // 0: none
}

// Metered reports whether there is a quota to charge.
func (v VoiceLimits) Metered() bool { return v.UserSecondsPerDay > 0 || v.TenantSecondsPerDay > 0 }

// VoiceLimits returns the voice limits of tenant under p.
func (p *Policy) VoiceLimits(tenant string) VoiceLimits {
	l := p.Limits
	v := VoiceLimits{MaxSession: time.Duration(l.VoiceMaxSession)}
	if q := l.VoiceAudioSecondsPerDay; q != nil {
		v.UserSecondsPerDay, v.TenantSecondsPerDay = q.PerUser, q.PerTenant
	}
	if t, ok := l.Tenants[tenant]; ok && t.VoiceAudioSecondsPerDay > 0 {
		v.TenantSecondsPerDay = t.VoiceAudioSecondsPerDay
	}
	return v
}

// NamesTenant reports whether the policy names tenant under limits.tenants.
func (p *Policy) NamesTenant(tenant string) bool {
	_, ok := p.Limits.Tenants[tenant]
	return ok
}

// maxNamedTenants bounds limits.tenants, and with it the per-tenant series of the metrics.
const maxNamedTenants = 1000

func (l Limits) checkVoice() error {
	if q := l.VoiceAudioSecondsPerDay; q != nil && (q.PerUser < 0 || q.PerTenant < 0) {
		return errors.New("policy: limits.voice_audio_seconds_per_day: quotas cannot be negative")
	}
	if len(l.Tenants) > maxNamedTenants {
		return fmt.Errorf("policy: limits.tenants: at most %d tenants may be named", maxNamedTenants)
	}
	for name, t := range l.Tenants {
		if name == "" || name == "other" {
			return fmt.Errorf("policy: limits.tenants: %q cannot name a tenant", name)
		}
		if t.VoiceAudioSecondsPerDay < 0 {
			return fmt.Errorf("policy: limits.tenants.%s: voice_audio_seconds_per_day cannot be negative", name)
		}
	}
	return nil
}

// AudioUse is one voice session's audio, to charge to its user's and tenant's daily quotas.
type AudioUse struct {
	Tenant, User string
	// Session names the charge; "" asks for today's totals without charging anything.
	Session string
	// Used is the session's whole audio so far. Charging is idempotent: a session is charged
	// the difference between Used and what was charged to it before, so a charge retried after
	// a timeout costs nothing twice, and the last charge of a session makes it exact.
	Used time.Duration

	// Set by Charge: today's totals (this charge included), or Err.
	UserUsed, TenantUsed time.Duration
	Err                  error
}

// Remaining is what the session may still use today under limits: the smaller of what its
// user and its tenant have left (0 when either is used up); ok is false when neither has a
// quota.
func (u *AudioUse) Remaining(limits VoiceLimits) (left time.Duration, ok bool) {
	left = -1
	if q := limits.UserSecondsPerDay; q > 0 {
		left = max(time.Duration(q)*time.Second-u.UserUsed, 0)
	}
	if q := limits.TenantSecondsPerDay; q > 0 {
		t := max(time.Duration(q)*time.Second-u.TenantUsed, 0)
		if left < 0 || t < left {
			left = t
		}
	}
	if left < 0 {
		return 0, false
	}
	return left, true
}

// AudioMeter charges voice sessions' audio to daily quotas (UTC days).
type AudioMeter interface {
	// Charge charges every use, setting its totals or its Err; the error is for the whole batch
	// (every use then has it too).
	Charge(ctx context.Context, uses []*AudioUse) error
}

// RetryTomorrow is how long a session refused for its daily quota should wait.
func RetryTomorrow(now time.Time) time.Duration { return nextUTCDay(now).Sub(now) }

// MemoryAudioMeter meters within one process.
type MemoryAudioMeter struct {
	mu      sync.Mutex
	day     string
	used    map[string]time.Duration // by "u|tenant|user" and "t|tenant", today
	charged map[string]charged       // by session: what it was charged so far
	now     func() time.Time
	sweeps  int
}

type charged struct {
	total time.Duration
	at    time.Time
}

// chargedKeep is how long a session's charge is remembered after its last one, as Redis keeps
// it: a session's last charge may come after its clock's (see AudioUse.Used).
const chargedKeep = 48 * time.Hour

// NewMemoryAudioMeter returns an in-process meter.
func NewMemoryAudioMeter() *MemoryAudioMeter {
	return &MemoryAudioMeter{used: map[string]time.Duration{}, charged: map[string]charged{}, now: time.Now}
}

// Charge implements AudioMeter.
func (m *MemoryAudioMeter) Charge(_ context.Context, uses []*AudioUse) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if day := now.UTC().Format("20060102"); day != m.day {
		m.day, m.used = day, map[string]time.Duration{}
	}
	if m.sweeps++; m.sweeps%1024 == 0 {
		for k, c := range m.charged {
			if now.Sub(c.at) > chargedKeep {
				delete(m.charged, k)
			}
		}
	}
	for _, u := range uses {
		uk, tk := "u|"+u.Tenant+"|"+u.User, "t|"+u.Tenant
		if u.Session != "" {
			sk := u.Tenant + "|" + u.Session
			if d := u.Used - m.charged[sk].total; d > 0 {
				m.charged[sk] = charged{u.Used, now}
				m.used[uk] += d
				m.used[tk] += d
			}
		}
		u.UserUsed, u.TenantUsed, u.Err = m.used[uk], m.used[tk], nil
	}
	return nil
}

// audioScript charges one session's audio, in milliseconds, to its user's and tenant's counters
// of Redis's UTC day, and answers today's totals. The session's key holds what it was charged
// so far, so the charge is the difference: a retried charge costs nothing twice. The day is
// chosen as limitScript chooses it: the caller offers the keys of yesterday, today and
// tomorrow by its own clock.
//
// KEYS: user counters of the three days, tenant counters of the three days, the session's key.
// ARGV: charge (1) or only read (0), the session's whole use in ms, the three day numbers,
// the counters' ttl ms, the session key's ttl ms.
// Returns {user ms, tenant ms}, or {-1} when Redis's day is none of the three.
const audioScript = `
local t = redis.call('TIME')
local day = math.floor(tonumber(t[1]) / 86400)
local j
for i = 1, 3 do
  if tonumber(ARGV[2 + i]) == day then j = i end
end
if not j then return {-1} end
local ukey, tkey = KEYS[j], KEYS[3 + j]
if ARGV[1] == '1' then
  local total = tonumber(ARGV[2])
  local before = tonumber(redis.call('GET', KEYS[7]) or '0')
  if total > before then
    redis.call('SET', KEYS[7], ARGV[2], 'PX', ARGV[7])
    for _, k in ipairs({ukey, tkey}) do
      redis.call('INCRBY', k, total - before)
      redis.call('PEXPIRE', k, ARGV[6])
    end
  end
end
return {tonumber(redis.call('GET', ukey) or '0'), tonumber(redis.call('GET', tkey) or '0')}`

// RedisAudioMeter meters across instances, every use one script call and a whole batch one
// round trip.
//
// Keys (the tenant is the Redis Cluster hash tag, so one call's keys share a slot):
//
//	{prefix}vq:{tenant}:u:{user}:{yyyymmdd}  a user's audio ms that UTC day (Redis's day)
//	{prefix}vq:{tenant}:t:{yyyymmdd}         the tenant's
//	{prefix}vq:{tenant}:s:{session}          what a session was charged so far, ms (48 h)
type RedisAudioMeter struct {
	client rueidis.Client
	keys   Keys
	script *rueidis.Lua
	now    func() time.Time
}

// NewRedisAudioMeter returns a meter on client; prefix is REDIS_PREFIX, as given.
func NewRedisAudioMeter(client rueidis.Client, prefix string) *RedisAudioMeter {
	return &RedisAudioMeter{client: client, keys: NewKeys(prefix), script: rueidis.NewLuaScript(audioScript), now: time.Now}
}

// Charge implements AudioMeter.
func (m *RedisAudioMeter) Charge(ctx context.Context, uses []*AudioUse) error {
	if len(uses) == 0 {
		return nil
	}
	today := m.now().UTC().Truncate(24 * time.Hour)
	days := []time.Time{today.AddDate(0, 0, -1), today, today.AddDate(0, 0, 1)}
	execs := make([]rueidis.LuaExec, len(uses))
	for i, u := range uses {
		keys := make([]string, 0, 7)
		for _, d := range days {
			keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "u", u.User, d.Format("20060102")))
		}
		for _, d := range days {
			keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "t", d.Format("20060102")))
		}
		mode := "1"
		if u.Session == "" {
			mode = "0"
		}
		keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "s", u.Session))
		args := []string{mode, strconv.FormatInt(u.Used.Milliseconds(), 10)}
		for _, d := range days {
			args = append(args, strconv.FormatInt(d.Unix()/86400, 10))
		}
		args = append(args, "90000000", "172800000") // 25 h, 48 h
		execs[i] = rueidis.LuaExec{Keys: keys, Args: args}
	}
	var first error
	for i, res := range m.script.ExecMulti(ctx, m.client, execs...) {
		u := uses[i]
		v, err := res.AsIntSlice()
		switch {
		case err != nil:
			u.Err = fmt.Errorf("policy: audio quota: %w", err)
		case len(v) == 1 && v[0] == -1:
			u.Err = errClockSkew
		case len(v) != 2:
			u.Err = fmt.Errorf("policy: audio quota: unexpected answer of %d values", len(v))
		default:
			u.UserUsed, u.TenantUsed, u.Err = time.Duration(v[0])*time.Millisecond, time.Duration(v[1])*time.Millisecond, nil
		}
		if first == nil {
			first = u.Err
		}
	}
	return first
}
