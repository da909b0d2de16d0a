package auth_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
)

// TestRevokeHandler drives POST /api/v2/auth/revoke behind the middleware, then checks which
// tokens still pass. Can grants token:revoke to callers whose token lists it, and every
// permission to a super admin, as the policy does. The fixtures are of two tenants: "u-123 A"
// is of t-1, every other token of no tenant (""), so u-123 and jti-hs256 exist in both. The
// handler runs in a synctest bubble, so its wait for a user revocation's cutoff costs no real
// time and is measured exactly.
func TestRevokeHandler(t *testing.T) {
	sec := secret(t)
	admin := signHS256(t, sec, nil, claims(map[string]any{
		"user_id": "admin-1", "jti": "jti-admin", "permissions": []string{auth.PermRevoke}}))
	super := signHS256(t, sec, nil, claims(map[string]any{
		"user_id": "root-1", "jti": "jti-root", "tenant_id": "t-2", "roles": []string{policy.SuperAdmin}}))
	tokens := map[string]string{
		"u-123 A": fixture(t, "hs256_valid"), // jti-hs256, tenant t-1
		"u-123 B": fixture(t, "hs384_valid"),
		"u-456 A": fixture(t, "user2"), // jti-user2
		"u-456 B": fixture(t, "user2_second"),
		// jti-hs256 again, in no tenant: another token than u-123 A's.
		"u-789 jti-hs256": signHS256(t, sec, nil, claims(map[string]any{"user_id": "u-789", "jti": "jti-hs256"})),
		"admin":           admin,
		"super":           super,
	}
	type after map[string]int // token name → status of a later request
	allPass := after{}
	for name := range tokens {
		allPass[name] = 200
	}
	with := func(changes after) after {
		m := after{}
		for k, v := range allPass {
			m[k] = v
		}
		for k, v := range changes {
			m[k] = v
		}
		return m
	}
	cutoff := float64(fixtureNow + 1) // the second after the store's clock (fixtureNow)

	tests := []struct {
		name   string
		caller string
		body   string
		status int
		code   string
		result map[string]any
		after  after
	}{
		{"logout, empty body", "u-123 A", "", 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256", "tenant_id": "t-1"},
			with(after{"u-123 A": 401})},
		{"logout, {}", "u-123 A", "{}", 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256", "tenant_id": "t-1"},
			with(after{"u-123 A": 401})},
		{"own jti", "u-123 A", `{"jti":"jti-hs256"}`, 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256", "tenant_id": "t-1"},
			with(after{"u-123 A": 401})},
		{"all own tokens: the tenant's u-123 only", "u-123 A", `{"user_id":"u-123"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "tenant_id": "t-1", "before": cutoff},
			with(after{"u-123 A": 401})},
		{"all own tokens, no tenant", "u-123 B", `{"user_id":"u-123"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "tenant_id": "", "before": cutoff},
			with(after{"u-123 B": 401})},
		{"another user without permission", "u-123 A", `{"user_id":"u-456"}`, 403, proxy.CodePermission, nil, allPass},
		{"another jti without permission", "u-123 A", `{"jti":"jti-user2"}`, 403, proxy.CodePermission, nil, allPass},
		{"another user with permission", "admin", `{"user_id":"u-456"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-456", "tenant_id": "", "before": cutoff},
			with(after{"u-456 A": 401, "u-456 B": 401})},
		{"another jti with permission", "admin", `{"jti":"jti-user2"}`, 200, "",
			map[string]any{"revoked": "token", "jti": "jti-user2", "tenant_id": ""}, with(after{"u-456 A": 401})},
		{"a user ID of two tenants: the caller's tenant's", "admin", `{"user_id":"u-123"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "tenant_id": "", "before": cutoff},
			with(after{"u-123 B": 401})},
		{"a jti of two tenants: the caller's tenant's", "admin", `{"jti":"jti-hs256"}`, 200, "",
			map[string]any{"revoked": "token", "jti": "jti-hs256", "tenant_id": ""},
			with(after{"u-789 jti-hs256": 401})},
		{"another tenant's user without super_admin", "admin", `{"user_id":"u-123","tenant_id":"t-1"}`, 403, proxy.CodePermission, nil, allPass},
		{"another tenant's jti without super_admin", "admin", `{"jti":"jti-hs256","tenant_id":"t-1"}`, 403, proxy.CodePermission, nil, allPass},
		{"own tenant named", "admin", `{"user_id":"u-456","tenant_id":""}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-456", "tenant_id": "", "before": cutoff},
			with(after{"u-456 A": 401, "u-456 B": 401})},
		{"super admin, another tenant's user", "super", `{"user_id":"u-123","tenant_id":"t-1"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "tenant_id": "t-1", "before": cutoff},
			with(after{"u-123 A": 401})},
		{"super admin, another tenant's jti", "super", `{"jti":"jti-hs256","tenant_id":"t-1"}`, 200, "",
			map[string]any{"revoked": "token", "jti": "jti-hs256", "tenant_id": "t-1"}, with(after{"u-123 A": 401})},
		{"super admin, own tenant by default", "super", `{"user_id":"u-123"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "tenant_id": "t-2", "before": cutoff}, allPass},
		{"tenant_id alone", "super", `{"tenant_id":"t-1"}`, 400, proxy.CodeValidation, nil, allPass},
		{"tenant_id not printable", "super", `{"user_id":"u-123","tenant_id":"t-1\n"}`, 400, proxy.CodeValidation, nil, allPass},
		{"invalid JSON", "u-123 A", `{"jti":`, 400, proxy.CodeInvalidJSON, nil, allPass},
		{"JSON of the wrong shape", "u-123 A", `["jti-user2"]`, 400, proxy.CodeInvalidJSON, nil, allPass},
		{"jti and user_id", "admin", `{"jti":"jti-user2","user_id":"u-456"}`, 400, proxy.CodeValidation, nil, allPass},
		{"body over 4 KiB", "u-123 A", `{"jti":"` + strings.Repeat("x", 5000) + `"}`, 413, proxy.CodePayloadTooLarge, nil, allPass},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rev := auth.NewMemoryRevocations(24*time.Hour, fixedClock(0))
			a, _ := newAuth(t, func(o *auth.Options) { o.Revocations = rev })
			var asked []string
			var told []policy.Revocation
			var res *httptest.ResponseRecorder
			var took time.Duration
			synctest.Test(t, func(t *testing.T) {
				revoke := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{
					Revocations: rev,
					Now:         fixedClock(0),
					Can: func(r *http.Request, perm string) bool {
						asked = append(asked, perm)
						id := auth.FromContext(r.Context())
						return slices.Contains(id.Permissions, perm) || policy.IsSuper(id.Roles)
					},
					OnRevoked: func(_ context.Context, v policy.Revocation) { told = append(told, v) },
				}))
				req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", strings.NewReader(tt.body))
				req.Header.Set("Authorization", "Bearer "+tokens[tt.caller])
				req.Header.Set("Content-Type", "application/json")
				start := time.Now()
				res = serve(revoke, req)
				took = time.Since(start)
			})
			if tt.status != http.StatusOK {
				wantError(t, res, tt.status, tt.code)
				if len(told) > 0 {
					t.Errorf("refused, yet OnRevoked was told %v", told)
				}
			} else {
				if res.Code != http.StatusOK {
					t.Fatalf("status %d %s", res.Code, res.Body)
				}
				var got map[string]any
				if err := json.Unmarshal(res.Body.Bytes(), &got); err != nil {
					t.Fatalf("answer is not JSON: %s", res.Body)
				}
				if !reflect.DeepEqual(got, tt.result) {
					t.Errorf("answer %v, want %v", got, tt.result)
				}
				want := policy.Revocation{TenantID: got["tenant_id"].(string)}
				if got["revoked"] == "user" {
					want.UserID, want.Before = got["user_id"].(string), int64(cutoff)
				} else {
					want.TokenID = got["jti"].(string)
				}
				if len(told) != 1 || told[0] != want {
					t.Errorf("OnRevoked told %v, want %v", told, want)
				}
				// A user revocation is answered once its cutoff has begun on the store's clock,
				// a second after it (the store's clock stands at a whole second); a token's at once.
				wantTook := time.Duration(0)
				if got["revoked"] == "user" {
					wantTook = time.Second
				}
				if took != wantTook {
					t.Errorf("answered after %v, want %v", took, wantTook)
				}
			}
			for _, p := range asked {
				if p != auth.PermRevoke {
					t.Errorf("Can asked for %q, want %q", p, auth.PermRevoke)
				}
			}
			check := a.Require(false)(okHandler())
			for name, want := range tt.after {
				res := serve(check, bearer(tokens[name]))
				if res.Code != want {
					t.Errorf("afterwards %s: status %d, want %d", name, res.Code, want)
				}
				if want == http.StatusUnauthorized {
					wantError(t, res, want, proxy.CodeTokenRevoked)
				}
			}
		})
	}

	t.Run("revoked caller", func(t *testing.T) {
		rev := auth.NewMemoryRevocations(24*time.Hour, nil)
		a, _ := newAuth(t, func(o *auth.Options) { o.Revocations = rev })
		if err := rev.RevokeToken(context.Background(), "", "jti-user2", time.Unix(fixtureExp, 0)); err != nil {
			t.Fatal(err)
		}
		h := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{Revocations: rev, Now: fixedClock(0)}))
		req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", nil)
		req.Header.Set("Authorization", "Bearer "+tokens["u-456 A"])
		wantError(t, serve(h, req), http.StatusUnauthorized, proxy.CodeTokenRevoked)
	})

	t.Run("without the middleware", func(t *testing.T) {
		h := auth.NewRevokeHandler(auth.RevokeOptions{Revocations: auth.NewMemoryRevocations(time.Hour, nil)})
		res := serve(h, httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", nil))
		if res.Code != http.StatusUnauthorized || !strings.Contains(res.Body.String(), proxy.CodeAuthRequired) {
			t.Errorf("status %d %s, want 401 %s", res.Code, res.Body, proxy.CodeAuthRequired)
		}
	})
}

// TestSetHeaders: whatever identity headers the client sent, in any spelling, upstreams see only
// the verified ones.
func TestSetHeaders(t *testing.T) {
	v, _, _ := newVerifier(t, nil)
	verify := func(name string) *auth.Identity {
		id, err := v.Verify(context.Background(), fixture(t, name))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	full, subOnly := verify("hs256_valid"), verify("rs256_valid")
	forged := func() http.Header {
		return http.Header{
			"X-User-Id":       {"admin"},
			"X_User_Id":       {"admin"},
			"x-user-id":       {"admin"},
			"x-tenant-id":     {"t-evil"},
			"X_TENANT_ID":     {"t-evil"},
			"X-Username":      {"root"},
			"X_username":      {"root"},
			"X-User-Roles":    {"super_admin"},
			"x_user_roles":    {"super_admin"},
			"X-Session-Id":    {"s-evil"},
			"X-SESSION_ID":    {"s-evil"},
			"X-Request-Id":    {"keep-me"},
			"X-User-Agent-Id": {"keep-me"},
			"Accept":          {"keep-me"},
		}
	}
	kept := http.Header{"X-Request-Id": {"keep-me"}, "X-User-Agent-Id": {"keep-me"}, "Accept": {"keep-me"}}
	withKept := func(h http.Header) http.Header {
		for k, v := range kept {
			h[k] = v
		}
		return h
	}
	tests := []struct {
		name string
		id   *auth.Identity
		want http.Header
	}{
		{"every claim", full, withKept(http.Header{
			proxy.HeaderUserID: {"u-123"}, proxy.HeaderUsername: {"alice"}, proxy.HeaderTenantID: {"t-1"},
			proxy.HeaderUserRoles: {"user,editor"}, proxy.HeaderSessionID: {"s-1"},
		})},
		{"user ID only", subOnly, withKept(http.Header{proxy.HeaderUserID: {"rs-user"}})},
		{"no identity", nil, withKept(http.Header{})},
		{"identity built by hand", &auth.Identity{UserID: "u-9", Roles: []string{"admin", "user"}},
			withKept(http.Header{proxy.HeaderUserID: {"u-9"}, proxy.HeaderUserRoles: {"admin,user"}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := forged()
			auth.SetHeaders(h, tt.id)
			if !reflect.DeepEqual(h, tt.want) {
				t.Errorf("headers\n got %v\nwant %v", h, tt.want)
			}
		})
	}

	t.Run("UpstreamHeaders", func(t *testing.T) {
		in := httptest.NewRequest(http.MethodGet, "/", nil)
		in = in.WithContext(auth.WithIdentity(in.Context(), full))
		out := forged()
		auth.UpstreamHeaders(in, out)
		if got := out.Get(proxy.HeaderUserID); got != "u-123" || len(out.Values("X-User-Id")) != 1 {
			t.Errorf("X-User-Id = %q (%d values)", got, len(out.Values("X-User-Id")))
		}
		if _, ok := out["X_User_Id"]; ok {
			t.Error("underscore spelling kept")
		}
	})
}

// TestLogoutEverywhereWholeSecond: iat has whole seconds, a revocation does not. "Log out
// everywhere" at S+100ms refuses every token issued before it — in S too, where its iat equals
// that of a token issued after it — and answers once S+1 has begun, so that the token of the
// next login, issued right after the answer, is accepted. A token issued while the revocation
// was being answered (S+600ms) is refused: it carries S, like those issued before. Every clock
// (the verifier's, the middleware's, the store's, the handler's wait) is synctest's.
func TestLogoutEverywhereWholeSecond(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sec := secret(t)
		mint := func(jti string) string {
			now := time.Now()
			return signHS256(t, sec, nil, map[string]any{"user_id": "u-1", "tenant_id": "t-1", "jti": jti,
				"iat": now.Unix(), "exp": now.Add(time.Hour).Unix()})
		}
		v, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: sec, Leeway: leeway})
		if err != nil {
			t.Fatal(err)
		}
		rev := auth.NewMemoryRevocations(24*time.Hour, nil)
		a := auth.New(auth.Options{Verifier: v, Revocations: rev})
		check := a.Require(false)(okHandler())
		revoke := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{Revocations: rev}))

		if start := time.Now(); start.Nanosecond() != 0 {
			t.Fatalf("the bubble's clock starts at %v, not on a whole second", start)
		}
		earlier := mint("jti-earlier") // iat S-1
		time.Sleep(time.Second)
		s := time.Now() // S
		time.Sleep(50 * time.Millisecond)
		sameSecondBefore := mint("jti-same-second-before") // S+50ms, iat S
		time.Sleep(50 * time.Millisecond)                  // S+100ms: log out everywhere

		req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", strings.NewReader(`{"user_id":"u-1"}`))
		req.Header.Set("Authorization", "Bearer "+sameSecondBefore)
		answered := make(chan *httptest.ResponseRecorder, 1)
		go func() { answered <- serve(revoke, req) }()
		synctest.Wait() // stored; the answer waits for S+1
		time.Sleep(500 * time.Millisecond)
		during := mint("jti-during") // S+600ms, while the revocation is being answered
		res := <-answered
		if at := time.Since(s); at != time.Second {
			t.Errorf("answered at S+%v, want S+1s: the first instant a new token carries another iat than the revoked ones", at)
		}
		if res.Code != http.StatusOK {
			t.Fatalf("log out everywhere: %d %s", res.Code, res.Body)
		}
		var got struct{ Before int64 }
		if err := json.Unmarshal(res.Body.Bytes(), &got); err != nil || got.Before != s.Unix()+1 {
			t.Errorf("before = %d (%v), want S+1 = %d", got.Before, err, s.Unix()+1)
		}
		time.Sleep(time.Millisecond)
		after := mint("jti-after") // right after the answer, iat S+1: the next login

		for _, c := range []struct {
			name, token string
			status      int
		}{
			{"a token issued a second before", earlier, 401},
			{"a token issued in the same second, before", sameSecondBefore, 401},
			{"a token issued while the revocation was answered", during, 401},
			{"a token issued right after the answer", after, 200},
		} {
			res := serve(check, bearer(c.token))
			if res.Code != c.status {
				t.Errorf("%s: status %d, want %d", c.name, res.Code, c.status)
			}
		}
	})
}
