package policy_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"voicegate/policy"
)

// readmePolicy is the README's worked policy file, parsed.
func readmePolicy(t *testing.T) *policy.File {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtures, "good", "readme.json"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestVoiceLimitsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*policy.Limits)
		want string
	}{
		{"negative user quota", func(l *policy.Limits) { l.VoiceAudioSecondsPerDay.PerUser = -1 },
			"policy: limits.voice_audio_seconds_per_day: quotas cannot be negative"},
		{"negative tenant quota", func(l *policy.Limits) { l.VoiceAudioSecondsPerDay.PerTenant = -1 },
			"policy: limits.voice_audio_seconds_per_day: quotas cannot be negative"},
		{"tenant named other", func(l *policy.Limits) { l.Tenants["other"] = policy.TenantLimits{} },
			`policy: limits.tenants: "other" cannot name a tenant`},
		{"tenant without a name", func(l *policy.Limits) { l.Tenants[""] = policy.TenantLimits{} },
			`policy: limits.tenants: "" cannot name a tenant`},
		{"negative tenant override", func(l *policy.Limits) { l.Tenants["acme"] = policy.TenantLimits{VoiceAudioSecondsPerDay: -1} },
			"policy: limits.tenants.acme: voice_audio_seconds_per_day cannot be negative"},
		{"too many tenants", func(l *policy.Limits) {
			for i := range 1001 {
				l.Tenants[fmt.Sprint("t-", i)] = policy.TenantLimits{}
			}
		}, "policy: limits.tenants: at most 1000 tenants may be named"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := readmePolicy(t)
			tc.edit(&f.Limits)
			_, err := policy.Compile(f, gatewayRoutes, nil)
			if err == nil || err.Error() != tc.want {
				t.Errorf("Compile = %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := policy.Parse([]byte(`{"limits": {"voice_max_session": "0s"}}`)); err == nil {
		t.Error("a zero voice_max_session was accepted")
	}
}

func TestVoiceLimitsFromPolicy(t *testing.T) {
	f := readmePolicy(t)
	p, err := policy.Compile(f, gatewayRoutes, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		tenant string
		want   policy.VoiceLimits
		named  bool
	}{
		{"acme", policy.VoiceLimits{UserSecondsPerDay: 3600, TenantSecondsPerDay: 720000, MaxSession: 30 * time.Minute}, true},
		{"globex", policy.VoiceLimits{UserSecondsPerDay: 3600, TenantSecondsPerDay: 360000, MaxSession: 30 * time.Minute}, true},
		{"initech", policy.VoiceLimits{UserSecondsPerDay: 3600, TenantSecondsPerDay: 360000, MaxSession: 30 * time.Minute}, false},
	} {
		if got := p.VoiceLimits(tc.tenant); got != tc.want {
			t.Errorf("VoiceLimits(%s) = %+v, want %+v", tc.tenant, got, tc.want)
		}
		if got := p.NamesTenant(tc.tenant); got != tc.named {
			t.Errorf("NamesTenant(%s) = %v", tc.tenant, got)
		}
	}
}

// TestMemoryAudioMeter: a charge carries the session's whole use, so repeating it costs
// nothing twice; users and tenants add up; a read charges nothing.
func TestMemoryAudioMeter(t *testing.T) {
	m := policy.NewMemoryAudioMeter()
	ctx := context.Background()
	use := func(tenant, user, session string, used time.Duration) *policy.AudioUse {
		u := &policy.AudioUse{Tenant: tenant, User: user, Session: session, Used: used}
		if err := m.Charge(ctx, []*policy.AudioUse{u}); err != nil {
			t.Fatal(err)
		}
		return u
	}
	use("acme", "alice", "s1", 2*time.Second)
	use("acme", "alice", "s1", 2*time.Second) // retried: no more
	use("acme", "alice", "s1", 3*time.Second) // one more second
	use("acme", "bob", "s2", time.Second)
	use("globex", "alice", "s3", 5*time.Second)
	u := use("acme", "alice", "", 0)
	if u.UserUsed != 3*time.Second || u.TenantUsed != 4*time.Second {
		t.Errorf("alice of acme: user %v, tenant %v; want 3s and 4s", u.UserUsed, u.TenantUsed)
	}
	lim := policy.VoiceLimits{UserSecondsPerDay: 5, TenantSecondsPerDay: 4}
	if left, ok := u.Remaining(lim); !ok || left != 0 {
		t.Errorf("remaining %v %v, want 0 (the tenant's is used up)", left, ok)
	}
	if _, ok := u.Remaining(policy.VoiceLimits{}); ok {
		t.Error("remaining without quotas is bounded")
	}
}
