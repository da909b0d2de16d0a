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

// AudioUse is one voice session's audio, to charge to its user's and tenant's daily quotas: what
// it used, and what it asks to hold ahead of its use (a reservation). A session is charged its
// whole use and holding so far, not an increment: it is charged the difference from what it was
// charged before, so a charge retried after a timeout costs nothing twice.
type AudioUse struct {
	Tenant, User string
	// Session names the charge; "" asks for today's totals without charging anything.
	Session string
	// Used is the session's whole audio so far. It is charged whatever the quotas say: it was
	// relayed (while the meter could not answer, fair use fails open).
	Used time.Duration
	// Hold is the audio the session asks to be charged in all, ahead of what it used: Used and
	// a reservation beyond it. What Hold asks beyond Used is granted as far as Limits leave
	// room for it today, no further; zero asks for nothing more.
	Hold   time.Duration
	Limits VoiceLimits
	// Final settles the session as it ends: it is charged exactly Used, what it held beyond
	// is given back, and any later charge of it changes nothing.
	Final bool

	// Set by Charge: what the session is charged in all now (Used, and the reservation granted
	// beyond it; after a Final charge exactly Used, unless it was settled before), today's
	// totals (this charge included), or Err.
	Held                 time.Duration
	UserUsed, TenantUsed time.Duration
	Err                  error
}

// Remaining is what the session may still use today under limits: the smaller of what its
// user and its tenant have left (0 when either is used up); ok is false when neither has a
// quota.
func (u *AudioUse) Remaining(limits VoiceLimits) (left time.Duration, ok bool) {
	return room(limits, u.UserUsed, u.TenantUsed)
}

// room is what is left under limits of the totals used by a user and a tenant; ok is false when
// neither has a quota.
func room(limits VoiceLimits, user, tenant time.Duration) (left time.Duration, ok bool) {
	left = -1
	if q := limits.UserSecondsPerDay; q > 0 {
		left = max(time.Duration(q)*time.Second-user, 0)
	}
	if q := limits.TenantSecondsPerDay; q > 0 {
		t := max(time.Duration(q)*time.Second-tenant, 0)
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
	day   string // of its last charge beyond what it had
	final bool
	at    time.Time
}

// chargedKeep is how long a session's charge is remembered after its last one, as Redis keeps
// it: a retried charge may come after the session's last.
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
		u.Held = 0
		if u.Session != "" {
			sk := u.Tenant + "|" + u.Session
			c := m.charged[sk]
			if !c.final {
				after := settle(u, c.total, m.used[uk], m.used[tk])
				switch d := after - c.total; {
				case d > 0:
					m.used[uk] += d
					m.used[tk] += d
					c.day = m.day
				case d < 0 && c.day == m.day: // given back to the day it was charged to
					m.used[uk] = max(m.used[uk]+d, 0)
					m.used[tk] = max(m.used[tk]+d, 0)
				}
				c.total, c.final, c.at = after, u.Final, now
				m.charged[sk] = c
			}
			u.Held = c.total
		}
		u.UserUsed, u.TenantUsed, u.Err = m.used[uk], m.used[tk], nil
	}
	return nil
}

// settle is what a session charged before in all, with a user and a tenant that used user and
// tenant today (before included), is charged in all after u: its use whatever the quotas say,
// and what it holds beyond that as far as they leave room; exactly its use if u is final. The
// Redis meter's script decides the same.
func settle(u *AudioUse, before, user, tenant time.Duration) time.Duration {
	if u.Final {
		return u.Used
	}
	after := max(before, u.Used)
	if u.Hold > after {
		grow := after - before
		left, ok := room(u.Limits, user+grow, tenant+grow)
		if !ok {
			left = u.Hold - after
		}
		after += min(u.Hold-after, left)
	}
	return after
}

// audioScript charges one session's audio, in milliseconds, to its user's and tenant's counters
// of Redis's UTC day, and answers what the session is charged in all and today's totals. The
// session's hash holds what it was charged so far (ms), the day of its last charge beyond that
// (day), and final once it is settled: a charge is the difference, so a retried charge costs
// nothing twice, and once settled a session is charged nothing more. The day is chosen as
// limitScript chooses it: the caller offers the keys of yesterday, today and tomorrow by its
// own clock. What a settled session gives back is taken off the day of its last charge, if that
// is one of the three (a session that ends after midnight gives back to the day it reserved on).
//
// KEYS: user counters of the three days, tenant counters of the three days, the session's hash.
// ARGV: charge (1), settle (2) or only read (0); the session's use in ms; what it asks to hold
// in all in ms; the three day numbers; the counters' ttl ms; the session hash's ttl ms; the
// user's and the tenant's quota in ms (0: none).
// Returns {user ms, tenant ms, held ms}, or {-1} when Redis's day is none of the three.
const audioScript = `
local t = redis.call('TIME')
local day = math.floor(tonumber(t[1]) / 86400)
local j
for i = 1, 3 do
  if tonumber(ARGV[3 + i]) == day then j = i end
end
if not j then return {-1} end
local ukey, tkey = KEYS[j], KEYS[3 + j]
local uused = tonumber(redis.call('GET', ukey) or '0')
local tused = tonumber(redis.call('GET', tkey) or '0')
local held = 0
if ARGV[1] ~= '0' then
  local s = redis.call('HMGET', KEYS[7], 'ms', 'day', 'final')
  local before = tonumber(s[1] or '0')
  held = before
  if not s[3] then
    local used, hold = tonumber(ARGV[2]), tonumber(ARGV[3])
    if ARGV[1] == '2' then
      held = used
    else
      held = math.max(before, used)
      if hold > held then
        local grow = held - before
        local room = hold - held
        local uq, tq = tonumber(ARGV[9]), tonumber(ARGV[10])
        if uq > 0 then room = math.min(room, uq - uused - grow) end
        if tq > 0 then room = math.min(room, tq - tused - grow) end
        if room > 0 then held = held + room end
      end
    end
    local d = held - before
    local charged = s[2]
    if d > 0 then
      for _, k in ipairs({ukey, tkey}) do
        redis.call('INCRBY', k, d)
        redis.call('PEXPIRE', k, ARGV[7])
      end
      uused, tused, charged = uused + d, tused + d, tostring(day)
    elseif d < 0 then
      for i = 1, 3 do
        if ARGV[3 + i] == s[2] then
          for _, k in ipairs({KEYS[i], KEYS[3 + i]}) do
            if redis.call('EXISTS', k) == 1 and redis.call('DECRBY', k, -d) < 0 then
              redis.call('SET', k, 0, 'KEEPTTL')
            end
          end
          if i == j then
            uused, tused = math.max(uused + d, 0), math.max(tused + d, 0)
          end
        end
      end
    end
    redis.call('HSET', KEYS[7], 'ms', held, 'day', charged or tostring(day))
    if ARGV[1] == '2' then redis.call('HSET', KEYS[7], 'final', 1) end
    redis.call('PEXPIRE', KEYS[7], ARGV[8])
  end
end
return {uused, tused, held}`

// RedisAudioMeter meters across instances, every use one script call and a whole batch one
// round trip.
//
// Keys (the tenant is the Redis Cluster hash tag, so one call's keys share a slot):
//
//	{prefix}vq:{tenant}:u:{user}:{yyyymmdd}  a user's audio ms that UTC day (Redis's day)
//	{prefix}vq:{tenant}:t:{yyyymmdd}         the tenant's
//	{prefix}vq:{tenant}:s:{session}          hash: what a session was charged so far (ms), the
//	                                         day of its last charge (day), final once settled (48 h)
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
	ms := func(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }
	for i, u := range uses {
		keys := make([]string, 0, 7)
		for _, d := range days {
			keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "u", u.User, d.Format("20060102")))
		}
		for _, d := range days {
			keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "t", d.Format("20060102")))
		}
		mode := "1"
		switch {
		case u.Session == "":
			mode = "0"
		case u.Final:
			mode = "2"
		}
		keys = append(keys, m.keys.Tenant(KindAudioQuota, u.Tenant, "s", u.Session))
		args := []string{mode, ms(u.Used), ms(u.Hold)}
		for _, d := range days {
			args = append(args, strconv.FormatInt(d.Unix()/86400, 10))
		}
		args = append(args, "90000000", "172800000", // 25 h, 48 h
			strconv.FormatInt(u.Limits.UserSecondsPerDay*1000, 10), strconv.FormatInt(u.Limits.TenantSecondsPerDay*1000, 10))
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
		case len(v) != 3:
			u.Err = fmt.Errorf("policy: audio quota: unexpected answer of %d values", len(v))
		default:
			u.UserUsed, u.TenantUsed, u.Held = time.Duration(v[0])*time.Millisecond, time.Duration(v[1])*time.Millisecond,
				time.Duration(v[2])*time.Millisecond
			u.Err = nil
		}
		if first == nil {
			first = u.Err
		}
	}
	return first
}
