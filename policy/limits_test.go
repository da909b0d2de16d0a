package policy_test

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/policy"
)

func TestMemoryLimiter(t *testing.T) {
	ctx := context.Background()
	bucket := func(key string, n int) policy.Bucket {
		return policy.Bucket{Parts: []string{key}, Interval: time.Hour / time.Duration(n), Burst: n, Limit: n}
	}
	type call struct {
		c         policy.Charge
		allowed   bool
		quota     bool
		remaining int
	}
	tests := []struct {
		name  string
		calls []call
	}{
		{"burst then refusal", []call{
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("u:a", 2)}}, true, false, 1},
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("u:a", 2)}}, true, false, 0},
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("u:a", 2)}}, false, false, 0},
		}},
		{"same key in two tenants is two buckets", []call{
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("t", 1)}}, true, false, 0},
			{policy.Charge{Tenant: "globex", User: "a", Buckets: []policy.Bucket{bucket("t", 1)}}, true, false, 0},
			{policy.Charge{Tenant: "acme", User: "b", Buckets: []policy.Bucket{bucket("t", 1)}}, false, false, 0},
		}},
		{"tightest bucket reported", []call{
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("wide", 10), bucket("narrow", 3)}}, true, false, 2},
		}},
		{"all or nothing", []call{
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("x", 1)}}, true, false, 0},
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("y", 2), bucket("x", 1)}}, false, false, 0},
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("y", 2)}}, true, false, 1},
		}},
		{"quota", []call{
			{policy.Charge{Tenant: "acme", User: "a", Quota: 1}, true, false, -1},
			{policy.Charge{Tenant: "acme", User: "a", Quota: 1}, false, true, -1},
			{policy.Charge{Tenant: "acme", User: "b", Quota: 1}, true, false, -1},
			{policy.Charge{Tenant: "globex", User: "a", Quota: 1}, true, false, -1},
		}},
		{"quota refusal costs the buckets nothing", []call{
			{policy.Charge{Tenant: "acme", User: "a", Quota: 1}, true, false, -1},
			{policy.Charge{Tenant: "acme", User: "a", Quota: 1, Buckets: []policy.Bucket{bucket("z", 1)}}, false, true, 0},
			{policy.Charge{Tenant: "acme", User: "a", Buckets: []policy.Bucket{bucket("z", 1)}}, true, false, 0},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := policy.NewMemoryLimiter(nil)
			for i, c := range tc.calls {
				v, err := l.Allow(ctx, &c.c)
				if err != nil {
					t.Fatal(err)
				}
				if v.Allowed != c.allowed || v.QuotaExceeded != c.quota {
					t.Fatalf("call %d: %+v, want allowed=%v quota=%v", i+1, v, c.allowed, c.quota)
				}
				if c.remaining >= 0 && v.Remaining != c.remaining {
					t.Fatalf("call %d: remaining %d, want %d", i+1, v.Remaining, c.remaining)
				}
				if !v.Allowed && v.RetryAfter <= 0 {
					t.Fatalf("call %d: refused without RetryAfter", i+1)
				}
				if v.Allowed && len(c.c.Buckets) > 0 && (v.Reset <= 0 || v.Limit == 0) {
					t.Fatalf("call %d: Limit %d Reset %v", i+1, v.Limit, v.Reset)
				}
			}
		})
	}
}

// TestMemoryLimiterSubMillisecondInterval: Bucket is exported, and nothing says its Interval must
// be at least a millisecond.
func TestMemoryLimiterSubMillisecondInterval(t *testing.T) {
	l := policy.NewMemoryLimiter(nil)
	c := &policy.Charge{Tenant: "acme", User: "a",
		Buckets: []policy.Bucket{{Parts: []string{"u", "a"}, Interval: 100 * time.Microsecond, Burst: 1, Limit: 10000}}}
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("Allow panicked: %v", p)
		}
	}()
	v, err := l.Allow(context.Background(), c)
	if err != nil || !v.Allowed {
		t.Fatalf("first request: %+v, %v", v, err)
	}
}

func TestMemoryLeases(t *testing.T) {
	ctx := context.Background()
	req := func(kind, tenant, user string, perUser, perTenant int) policy.LeaseRequest {
		return policy.LeaseRequest{Kind: kind, Tenant: tenant, User: user, PerUser: perUser, PerTenant: perTenant}
	}
	type step struct {
		req     policy.LeaseRequest
		level   string // "" means granted, else the CapError's Level
		release int    // release the lease of this earlier step (1-based) before, twice
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"per user", []step{
			{req: req("chat", "acme", "a", 2, 0)},
			{req: req("chat", "acme", "a", 2, 0)},
			{req: req("chat", "acme", "a", 2, 0), level: "user"},
			{req: req("chat", "acme", "b", 2, 0)},
		}},
		{"per tenant", []step{
			{req: req("voice", "acme", "a", 0, 2)},
			{req: req("voice", "acme", "b", 0, 2)},
			{req: req("voice", "acme", "c", 0, 2), level: "tenant"},
			{req: req("voice", "globex", "c", 0, 2)},
		}},
		{"kinds are separate", []step{
			{req: req("chat", "acme", "a", 1, 1)},
			{req: req("voice", "acme", "a", 1, 1)},
			{req: req("chat", "acme", "a", 1, 1), level: "user"},
		}},
		{"no cap", []step{
			{req: req("chat", "acme", "a", 0, 0)},
			{req: req("chat", "acme", "a", 0, 0)},
			{req: req("chat", "acme", "a", 0, 0)},
		}},
		{"release frees one slot, once", []step{
			{req: req("chat", "acme", "a", 2, 0)},
			{req: req("chat", "acme", "a", 2, 0)},
			{req: req("chat", "acme", "a", 2, 0), release: 1},
			{req: req("chat", "acme", "a", 2, 0), level: "user"},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := policy.NewMemoryLeases()
			releases := make([]func(), len(tc.steps))
			defer func() {
				for _, r := range releases {
					if r != nil {
						r()
					}
				}
			}()
			for i, s := range tc.steps {
				if s.release > 0 {
					releases[s.release-1]()
					releases[s.release-1]()
				}
				release, err := l.Acquire(ctx, s.req)
				if s.level == "" {
					if err != nil {
						t.Fatalf("step %d: %v", i+1, err)
					}
					releases[i] = release
					continue
				}
				var ce *policy.CapError
				if !errors.Is(err, policy.ErrCapReached) || !errors.As(err, &ce) || ce.Level != s.level || ce.Kind != s.req.Kind {
					t.Fatalf("step %d: %v, want a %s cap error", i+1, err, s.level)
				}
			}
		})
	}
}

// TestMemoryLimiterMicroseconds: the limiter works in microseconds, so 2,000 a second admits a
// request every 500 µs and 1,000 per 1.5 s one every 1.5 ms — neither is rounded to one a
// millisecond. Time is synctest's.
func TestMemoryLimiterMicroseconds(t *testing.T) {
	for _, interval := range []time.Duration{500 * time.Microsecond, 1500 * time.Microsecond} {
		t.Run(interval.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				l := policy.NewMemoryLimiter(nil)
				c := &policy.Charge{Tenant: "acme", User: "a",
					Buckets: []policy.Bucket{{Parts: []string{"u", "a"}, Interval: interval, Burst: 1, Limit: 1}}}
				allowed := func() bool {
					v, err := l.Allow(context.Background(), c)
					if err != nil {
						t.Fatal(err)
					}
					return v.Allowed
				}
				if !allowed() {
					t.Fatal("first request refused")
				}
				time.Sleep(interval - 100*time.Microsecond)
				if allowed() {
					t.Fatalf("admitted %v after the last, before the %v interval", interval-100*time.Microsecond, interval)
				}
				time.Sleep(100 * time.Microsecond)
				if !allowed() {
					t.Fatalf("refused one interval (%v) after the last", interval)
				}
			})
		})
	}
}

// TestCompileRefusesRatesBeyondResolution: a rate finer than a microsecond per request cannot
// be kept, so it is refused at load instead of silently becoming another.
func TestCompileRefusesRatesBeyondResolution(t *testing.T) {
	for _, tc := range []struct {
		rate policy.Rate
		ok   bool
	}{
		{policy.Rate{Requests: 1_000_000, Per: policy.Duration(time.Second), Burst: 1}, true},
		{policy.Rate{Requests: 1500, Per: policy.Duration(time.Second), Burst: 1}, true},
		{policy.Rate{Requests: 1_000_001, Per: policy.Duration(time.Second), Burst: 1}, false},
		{policy.Rate{Requests: 2_000_000_000, Per: policy.Duration(time.Minute), Burst: 1}, false},
	} {
		f := policy.Default(gatewayBindings)
		r := tc.rate
		f.Limits.PerUser = &r
		_, err := policy.Compile(f, gatewayRoutes, handlerPerms)
		if (err == nil) != tc.ok {
			t.Errorf("%d per %v: Compile = %v, want ok=%v", r.Requests, time.Duration(r.Per), err, tc.ok)
		}
	}
}
