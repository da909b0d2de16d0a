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
	"time"

	"voicegate/auth"
	"voicegate/proxy"
)

// TestRevokeHandler drives POST /api/v2/auth/revoke behind the middleware, then checks which
// tokens still pass. Can grants token:revoke to callers whose token lists it.
func TestRevokeHandler(t *testing.T) {
	sec := secret(t)
	admin := signHS256(t, sec, nil, claims(map[string]any{
		"user_id": "admin-1", "jti": "jti-admin", "permissions": []string{auth.PermRevoke}}))
	tokens := map[string]string{
		"u-123 A": fixture(t, "hs256_valid"), // jti-hs256
		"u-123 B": fixture(t, "hs384_valid"),
		"u-456 A": fixture(t, "user2"), // jti-user2
		"u-456 B": fixture(t, "user2_second"),
		"admin":   admin,
	}
	type after map[string]int // token name → status of a later request
	allPass := after{"u-123 A": 200, "u-123 B": 200, "u-456 A": 200, "u-456 B": 200, "admin": 200}
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

	tests := []struct {
		name   string
		caller string
		body   string
		status int
		code   string
		result map[string]any
		after  after
	}{
		{"logout, empty body", "u-123 A", "", 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256"},
			with(after{"u-123 A": 401})},
		{"logout, {}", "u-123 A", "{}", 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256"},
			with(after{"u-123 A": 401})},
		{"own jti", "u-123 A", `{"jti":"jti-hs256"}`, 200, "", map[string]any{"revoked": "token", "jti": "jti-hs256"},
			with(after{"u-123 A": 401})},
		{"all own tokens", "u-123 A", `{"user_id":"u-123"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-123", "before": float64(fixtureNow)},
			with(after{"u-123 A": 401, "u-123 B": 401})},
		{"another user without permission", "u-123 A", `{"user_id":"u-456"}`, 403, proxy.CodePermission, nil, allPass},
		{"another jti without permission", "u-123 A", `{"jti":"jti-user2"}`, 403, proxy.CodePermission, nil, allPass},
		{"another user with permission", "admin", `{"user_id":"u-456"}`, 200, "",
			map[string]any{"revoked": "user", "user_id": "u-456", "before": float64(fixtureNow)},
			with(after{"u-456 A": 401, "u-456 B": 401})},
		{"another jti with permission", "admin", `{"jti":"jti-user2"}`, 200, "",
			map[string]any{"revoked": "token", "jti": "jti-user2"}, with(after{"u-456 A": 401})},
		{"invalid JSON", "u-123 A", `{"jti":`, 400, proxy.CodeInvalidJSON, nil, allPass},
		{"JSON of the wrong shape", "u-123 A", `["jti-user2"]`, 400, proxy.CodeInvalidJSON, nil, allPass},
		{"jti and user_id", "admin", `{"jti":"jti-user2","user_id":"u-456"}`, 400, proxy.CodeValidation, nil, allPass},
		{"body over 4 KiB", "u-123 A", `{"jti":"` + strings.Repeat("x", 5000) + `"}`, 413, proxy.CodePayloadTooLarge, nil, allPass},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rev := auth.NewMemoryRevocations(24*time.Hour, nil)
			a, _ := newAuth(t, func(o *auth.Options) { o.Revocations = rev })
			var asked []string
			revoke := a.Require(false)(auth.NewRevokeHandler(auth.RevokeOptions{
				Revocations: rev,
				Now:         fixedClock(0),
				Can: func(r *http.Request, perm string) bool {
					asked = append(asked, perm)
					return slices.Contains(auth.FromContext(r.Context()).Permissions, perm)
				},
			}))
			req := httptest.NewRequest(http.MethodPost, "/api/v2/auth/revoke", strings.NewReader(tt.body))
			req.Header.Set("Authorization", "Bearer "+tokens[tt.caller])
			req.Header.Set("Content-Type", "application/json")
			res := serve(revoke, req)
			if tt.status != http.StatusOK {
				wantError(t, res, tt.status, tt.code)
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
		if err := rev.RevokeToken(context.Background(), "jti-user2", time.Unix(fixtureExp, 0)); err != nil {
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
