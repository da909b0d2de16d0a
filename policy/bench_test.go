package policy_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"voicegate/policy"
)

// BenchmarkDecide is a full authorization decision for an allowed request: the budget
// is 200 ns and no allocation. The baseline is what the standard library alone does for such a
// request: a header read and a map look-up.
func BenchmarkDecide(b *testing.B) {
	p := compileFixture(b, "good/decide.json", decideRoutes)
	s := &policy.Subject{UserID: "alice", TenantID: "acme", Roles: []string{"editor", "admin"}}

	b.Run("method map", func(b *testing.B) {
		r := httptest.NewRequest("GET", "/api/v2/admin/users", nil)
		r.Pattern = "/api/v2/admin/"
		b.ReportAllocs()
		for b.Loop() {
			if e := p.Decide(r, s, true); e != nil {
				b.Fatal(e)
			}
		}
	})
	b.Run("tenant path and header", func(b *testing.B) {
		r := httptest.NewRequest("GET", "/api/v2/tenants/acme/reports", nil)
		r.Pattern = "GET /api/v2/tenants/{tenant_id}/reports"
		r.SetPathValue("tenant_id", "acme")
		r.Header.Set("X-Tenant-ID", "acme")
		b.ReportAllocs()
		for b.Loop() {
			if e := p.Decide(r, s, true); e != nil {
				b.Fatal(e)
			}
		}
	})
	b.Run("baseline header and map", func(b *testing.B) {
		r := httptest.NewRequest("GET", "/api/v2/admin/users", nil)
		allowed := map[string]bool{"/api/v2/admin/": true}
		b.ReportAllocs()
		for b.Loop() {
			if r.Header.Get("X-Tenant-Id") != "" || !allowed["/api/v2/admin/"] {
				b.Fatal("refused")
			}
		}
	})
}

// BenchmarkAllows is the permission check alone, precomputed and not.
func BenchmarkAllows(b *testing.B) {
	roles := []string{"editor", "admin"}
	for _, bc := range []struct {
		name  string
		known []string
		perm  string
	}{
		{"precomputed", []string{"admin:read"}, "admin:read"},
		{"fallback", nil, "admin:read"},
		{"denied", []string{"billing:read"}, "billing:read"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			rules, err := policy.CompileRoles(policy.DefaultRoles(), bc.known)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				rules.Allows(roles, nil, bc.perm)
			}
		})
	}
	b.Run("baseline map", func(b *testing.B) {
		m := map[string]bool{"admin:read": true}
		b.ReportAllocs()
		for b.Loop() {
			_ = m["admin:read"]
		}
	})
}

// BenchmarkMemoryLimiter is one Allow with the three buckets the Enforcer charges (user, tenant,
// class) and a daily quota, each roomy enough never to refuse.
func BenchmarkMemoryLimiter(b *testing.B) {
	l := policy.NewMemoryLimiter(nil)
	roomy := policy.Bucket{Interval: time.Millisecond, Burst: 1 << 40, Limit: 1 << 30}
	c := &policy.Charge{Tenant: "acme", User: "alice", Quota: 1 << 60}
	for _, parts := range [][]string{{"u", "alice"}, {"t"}, {"c", "chat", "u", "alice"}} {
		bk := roomy
		bk.Parts = parts
		c.Buckets = append(c.Buckets, bk)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		v, err := l.Allow(ctx, c)
		if err != nil || !v.Allowed {
			b.Fatal(v, err)
		}
	}
}

// BenchmarkWrap is the whole middleware for an allowed request with in-memory limits and a lease,
// against the handler alone.
func BenchmarkWrap(b *testing.B) {
	f := policy.Default(gatewayBindings)
	roomy := &policy.Rate{Requests: 1_000_000, Per: policy.Duration(time.Second), Burst: 1 << 30} // the finest rate there is
	f.Limits = policy.Limits{PerUser: roomy, PerTenant: roomy, Classes: map[string]policy.Rate{"chat": *roomy},
		Concurrency: map[string]policy.Concurrency{"chat": {PerUser: 10, PerTenant: 10}, "voice": {}}}
	p, err := policy.Compile(f, gatewayRoutes, handlerPerms)
	if err != nil {
		b.Fatal(err)
	}
	s := policy.Subject{UserID: "alice", TenantID: "acme", Roles: []string{"user"}}
	e := policy.NewEnforcer(policy.EnforcerOptions{
		Policy:   func() *policy.Policy { return p },
		Subject:  func(*http.Request) (policy.Subject, bool) { return s, true },
		Admitter: policy.Compose(policy.NewMemoryLimiter(nil), policy.NewMemoryLeases()),
	})
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	r := httptest.NewRequest("POST", "/api/v2/chat/stream", nil)
	r.Pattern = "POST /api/v2/chat/stream"
	for _, bc := range []struct {
		name string
		h    http.Handler
	}{{"enforcer", e.Wrap(ok)}, {"baseline handler", ok}} {
		b.Run(bc.name, func(b *testing.B) {
			w := &statusWriter{header: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				clear(w.header)
				w.code = 0
				bc.h.ServeHTTP(w, r)
				if w.code != http.StatusOK {
					b.Fatal(w.code)
				}
			}
		})
	}
}

// statusWriter is a reusable ResponseWriter that keeps only the status.
type statusWriter struct {
	header http.Header
	code   int
}

func (w *statusWriter) Header() http.Header         { return w.header }
func (w *statusWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *statusWriter) WriteHeader(code int)        { w.code = code }
