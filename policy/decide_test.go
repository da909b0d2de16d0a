package policy_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"voicegate/policy"
	"voicegate/proxy"
)

type subjectKey struct{}

// withSubject returns r carrying s as its authenticated caller; nil means none.
func withSubject(r *http.Request, s *policy.Subject) *http.Request {
	if s == nil {
		return r
	}
	return r.WithContext(context.WithValue(r.Context(), subjectKey{}, *s))
}

// subjectOf is the Subject function of the tests: the caller put there by withSubject.
func subjectOf(r *http.Request) (policy.Subject, bool) {
	s, ok := r.Context().Value(subjectKey{}).(policy.Subject)
	return s, ok
}

// decideMux registers routes on a real ServeMux, so that r.Pattern and r.PathValue are set as in
// the gateway, each answering p's decision: the JSON error, or 204.
func decideMux(p *policy.Policy, routes []string) *http.ServeMux {
	mux := http.NewServeMux()
	for _, route := range routes {
		mux.HandleFunc(route, func(w http.ResponseWriter, r *http.Request) {
			s, ok := subjectOf(r)
			if perr := p.Decide(r, &s, ok); perr != nil {
				proxy.WriteError(w, r, perr)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
	}
	return mux
}

type errorDoc struct {
	Error   string              `json:"error"`
	Code    string              `json:"code"`
	Details []map[string]string `json:"details"`
}

func decodeError(t *testing.T, rec *httptest.ResponseRecorder) errorDoc {
	t.Helper()
	var doc errorDoc
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatalf("error body %q: %v", rec.Body, err)
	}
	return doc
}

var (
	alice   = &policy.Subject{UserID: "alice", TenantID: "acme", Roles: []string{"user"}}
	eve     = &policy.Subject{UserID: "eve", TenantID: "globex", Roles: []string{"user"}}
	editor  = &policy.Subject{UserID: "ed", TenantID: "acme", Roles: []string{"editor"}}
	support = &policy.Subject{UserID: "sue", TenantID: "acme", Roles: []string{"support"}}
	auditor = &policy.Subject{UserID: "aud", TenantID: "acme", Roles: []string{"auditor"}}
	admin   = &policy.Subject{UserID: "adm", TenantID: "acme", Roles: []string{"admin"}}
	root    = &policy.Subject{UserID: "root", TenantID: "globex", Roles: []string{"user", "super_admin"}}
	noTen   = &policy.Subject{UserID: "nomad", Roles: []string{"user"}}
)

// grant returns alice with direct grants.
func grant(perms ...string) *policy.Subject {
	s := *alice
	s.Grants = perms
	return &s
}

type decideCase struct {
	name       string
	method     string
	target     string
	tenant     string // X-Tenant-ID
	sub        *policy.Subject
	status     int
	msg        string // substring of the error message
	permission string // details.permission of a 403
}

func runDecideCases(t *testing.T, mux *http.ServeMux, tests []decideCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, tc.target, nil)
			if tc.tenant != "" {
				r.Header.Set("X-Tenant-ID", tc.tenant)
			}
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, withSubject(r, tc.sub))
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d; body %s", rec.Code, tc.status, rec.Body)
			}
			switch tc.status {
			case http.StatusNoContent:
				return
			case http.StatusUnauthorized:
				doc := decodeError(t, rec)
				if doc.Code != proxy.CodeAuthRequired {
					t.Errorf("code %q, want %s", doc.Code, proxy.CodeAuthRequired)
				}
				if got := rec.Header().Get("WWW-Authenticate"); got != `Bearer error="invalid_token"` {
					t.Errorf("WWW-Authenticate %q", got)
				}
			case http.StatusForbidden:
				doc := decodeError(t, rec)
				if doc.Code != proxy.CodePermission {
					t.Errorf("code %q, want %s", doc.Code, proxy.CodePermission)
				}
				if !strings.Contains(doc.Error, tc.msg) {
					t.Errorf("message %q does not contain %q", doc.Error, tc.msg)
				}
				if tc.permission != "" {
					if !strings.Contains(doc.Error, tc.permission) {
						t.Errorf("message %q does not name %s", doc.Error, tc.permission)
					}
					if len(doc.Details) != 1 || doc.Details[0]["permission"] != tc.permission || doc.Details[0]["reason"] == "" {
						t.Errorf("details %v, want permission %s", doc.Details, tc.permission)
					}
				} else if doc.Details != nil {
					t.Errorf("details %v on a tenant or ownership refusal", doc.Details)
				}
			}
		})
	}
}

func TestDecide(t *testing.T) {
	mux := decideMux(compileFixture(t, "good/decide.json", decideRoutes), decideRoutes)
	const (
		reportsAcme   = "/api/v2/tenants/acme/reports"
		reportsGlobex = "/api/v2/tenants/globex/reports"
		notYours      = "this tenant is not yours"
		otherUser     = "belongs to another user"
	)
	runDecideCases(t, mux, []decideCase{
		// Authentication.
		{"no subject on chat", "POST", "/api/v2/chat/stream", "", nil, 401, "", ""},
		{"no subject on a tenant route", "GET", reportsAcme, "", nil, 401, "", ""},
		{"no subject on an open route", "POST", "/api/v2/chat/cancel", "", nil, 401, "", ""},
		{"any caller on an open route", "POST", "/api/v2/chat/cancel", "", auditor, 204, "", ""},

		// Tenant isolation.
		{"own tenant in path", "GET", reportsAcme, "", alice, 204, "", ""},
		{"other tenant in path", "GET", reportsGlobex, "", alice, 403, notYours, ""},
		{"other tenant in path, other way round", "GET", reportsAcme, "", eve, 403, notYours, ""},
		{"own tenant in path and header", "GET", reportsAcme, "acme", alice, 204, "", ""},
		{"header disagrees with path", "GET", reportsAcme, "globex", alice, 403, notYours, ""},
		{"path disagrees with own header", "GET", reportsGlobex, "acme", alice, 403, notYours, ""},
		{"other tenant in path and header", "GET", reportsGlobex, "globex", alice, 403, notYours, ""},
		{"other tenant header on chat", "POST", "/api/v2/chat/stream", "globex", alice, 403, notYours, ""},
		{"other tenant header on documents", "GET", "/api/v2/documents/a", "globex", alice, 403, notYours, ""},
		{"other tenant header on an open route", "POST", "/api/v2/auth/revoke", "globex", alice, 403, notYours, ""},
		{"other tenant header on ownership route", "GET", "/api/v2/users/alice/history", "globex", alice, 403, notYours, ""},
		{"own tenant header on chat", "POST", "/api/v2/chat/stream", "acme", alice, 204, "", ""},
		{"admin is not super admin", "GET", reportsGlobex, "", admin, 403, notYours, ""},
		{"caller without a tenant", "GET", reportsAcme, "", noTen, 403, notYours, ""},
		{"caller without a tenant, header", "POST", "/api/v2/chat/stream", "acme", noTen, 403, notYours, ""},
		{"super admin other tenant path", "GET", reportsAcme, "", root, 204, "", ""},
		{"super admin other tenant header", "POST", "/api/v2/chat/stream", "acme", root, 204, "", ""},
		{"super admin header and path disagree", "GET", reportsAcme, "initech", root, 204, "", ""},
		{"tenant route still needs its permission", "GET", reportsAcme, "", editor, 204, "", ""},
		{"tenant route without its permission", "PUT", "/api/v2/tenants/acme/files/a", "", auditor, 403, "", "file:admin"},

		// Ownership.
		{"own history", "GET", "/api/v2/users/alice/history", "", alice, 204, "", ""},
		{"another user's history", "GET", "/api/v2/users/bob/history", "", alice, 403, otherUser, ""},
		{"another user's history, HEAD", "HEAD", "/api/v2/users/bob/history", "", alice, 403, "", ""},
		{"own history, HEAD", "HEAD", "/api/v2/users/alice/history", "", alice, 204, "", ""},
		{"owner override by role", "GET", "/api/v2/users/bob/history", "", support, 204, "", ""},
		{"owner override by grant", "GET", "/api/v2/users/bob/history", "", grant("user:admin"), 204, "", ""},
		{"owner override by wildcard grant", "GET", "/api/v2/users/bob/history", "", grant("user:*"), 204, "", ""},
		{"read does not imply the override", "GET", "/api/v2/users/bob/history", "", grant("user:read", "user:write"), 403, otherUser, ""},
		{"admin role lacks the override", "GET", "/api/v2/users/bob/history", "", admin, 403, otherUser, ""},
		{"super admin any user", "GET", "/api/v2/users/bob/history", "", root, 204, "", ""},
		{"owner still needs the permission", "GET", "/api/v2/users/aud/history", "", auditor, 403, "", "history:read"},

		// Method-specific permissions.
		{"GET admin needs admin:read", "GET", "/api/v2/admin/users", "", alice, 403, "", "admin:read"},
		{"GET admin with admin:read", "GET", "/api/v2/admin/users", "", auditor, 204, "", ""},
		{"HEAD falls back to GET", "HEAD", "/api/v2/admin/users", "", auditor, 204, "", ""},
		{"HEAD refused names GET's permission", "HEAD", "/api/v2/admin/users", "", alice, 403, "", "admin:read"},
		{"POST admin needs admin:write", "POST", "/api/v2/admin/users", "", auditor, 403, "", "admin:write"},
		{"DELETE admin needs admin:write", "DELETE", "/api/v2/admin/users/1", "", auditor, 403, "", "admin:write"},
		{"POST admin as admin", "POST", "/api/v2/admin/users", "", admin, 204, "", ""},
		{"GET documents", "GET", "/api/v2/documents/a", "", alice, 204, "", ""},
		{"HEAD documents", "HEAD", "/api/v2/documents/a", "", alice, 204, "", ""},
		{"POST documents as user", "POST", "/api/v2/documents/", "", alice, 403, "", "document:write"},
		{"PUT documents as editor", "PUT", "/api/v2/documents/a", "", editor, 204, "", ""},
		{"DELETE documents as user", "DELETE", "/api/v2/documents/a", "", alice, 403, "", "document:delete"},
		{"DELETE documents as editor", "DELETE", "/api/v2/documents/a", "", editor, 403, "", "document:delete"},
		{"DELETE documents as admin", "DELETE", "/api/v2/documents/a", "", admin, 204, "", ""},
		{"DELETE documents by grant", "DELETE", "/api/v2/documents/a", "", grant("document:delete"), 204, "", ""},
		{"method star wins over permission", "PUT", "/api/v2/tenants/acme/files/a", "", grant("file:write"), 403, "", "file:admin"},
		{"method star granted", "PUT", "/api/v2/tenants/acme/files/a", "", grant("file:admin"), 204, "", ""},
		{"listed method beats star", "GET", "/api/v2/tenants/acme/files/a", "", grant("file:read"), 204, "", ""},
		{"chat needs chat:write", "POST", "/api/v2/chat/stream", "", auditor, 403, "", "chat:write"},
		{"unknown role", "POST", "/api/v2/chat/stream", "", &policy.Subject{UserID: "g", TenantID: "acme", Roles: []string{"ghost"}}, 403, "", "chat:write"},
	})
}

// TestDecideDefault runs the built-in policy on the gateway's own routes.
func TestDecideDefault(t *testing.T) {
	p, err := policy.Compile(policy.Default(gatewayBindings), gatewayRoutes, handlerPerms)
	if err != nil {
		t.Fatal(err)
	}
	mux := decideMux(p, gatewayRoutes)
	runDecideCases(t, mux, []decideCase{
		{"user chat", "POST", "/api/v2/chat/stream", "", alice, 204, "", ""},
		{"user admin GET", "GET", "/api/v2/admin/x", "", alice, 403, "", "admin:read"},
		{"user admin HEAD", "HEAD", "/api/v2/admin/x", "", alice, 403, "", "admin:read"},
		{"user admin PATCH", "PATCH", "/api/v2/admin/x", "", alice, 403, "", "admin:write"},
		{"admin admin PATCH", "PATCH", "/api/v2/admin/x", "", admin, 204, "", ""},
		{"user documents DELETE", "DELETE", "/api/v2/documents/x", "", alice, 403, "", "document:delete"},
		{"editor documents PUT", "PUT", "/api/v2/documents/x", "", editor, 204, "", ""},
		{"admin documents DELETE", "DELETE", "/api/v2/documents/x", "", admin, 204, "", ""},
		{"revoke for anyone", "POST", "/api/v2/auth/revoke", "", alice, 204, "", ""},
		{"other tenant header", "GET", "/api/v2/documents/x", "globex", alice, 403, "this tenant is not yours", ""},
		{"super admin", "DELETE", "/api/v2/admin/x", "acme", root, 204, "", ""},
		{"no caller", "GET", "/api/v2/documents/x", "", nil, 401, "", ""},
	})
}

func TestDecideUnboundRoute(t *testing.T) {
	p, err := policy.Compile(policy.Default(gatewayBindings), gatewayRoutes, handlerPerms)
	if err != nil {
		t.Fatal(err)
	}
	for _, pattern := range []string{"", "GET /healthz", "/api/v2/admin"} {
		t.Run(pattern, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/api/v2/admin/x", nil)
			r.Pattern = pattern
			e := p.Decide(r, root, true)
			if e == nil || e.Status != http.StatusForbidden || e.Code != proxy.CodePermission {
				t.Fatalf("Decide on unbound pattern %q = %v, want 403 %s", pattern, e, proxy.CodePermission)
			}
		})
	}
}

// TestDecideAllocations holds the budget: an allowed decision allocates nothing.
func TestDecideAllocations(t *testing.T) {
	p := compileFixture(t, "good/decide.json", decideRoutes)
	tests := []struct {
		name, method, pattern string
		values                map[string]string
		tenant                string
		sub                   *policy.Subject
	}{
		{"method map", "GET", "/api/v2/admin/", nil, "", &policy.Subject{UserID: "a", TenantID: "acme", Roles: []string{"editor", "admin"}}},
		{"tenant path and header", "GET", "GET /api/v2/tenants/{tenant_id}/reports", map[string]string{"tenant_id": "acme"}, "acme", alice},
		{"owner override", "GET", "GET /api/v2/users/{user_id}/history", map[string]string{"user_id": "bob"}, "", support},
		{"grants", "DELETE", "/api/v2/documents/", nil, "", grant("chat:read", "document:*")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, "/x", nil)
			r.Pattern = tc.pattern
			for k, v := range tc.values {
				r.SetPathValue(k, v)
			}
			if tc.tenant != "" {
				r.Header.Set("X-Tenant-ID", tc.tenant)
			}
			if e := p.Decide(r, tc.sub, true); e != nil {
				t.Fatalf("refused: %v", e)
			}
			if n := testing.AllocsPerRun(100, func() { p.Decide(r, tc.sub, true) }); n != 0 {
				t.Fatalf("%v allocations per decision, want 0", n)
			}
		})
	}
}

// TestDecideRefusesBadNames: a tenant or user named by the request that no token could hold is
// refused with 400 naming where it came from, whoever asks, a super admin included.
func TestDecideRefusesBadNames(t *testing.T) {
	p := compileFixture(t, "good/decide.json", decideRoutes)
	for _, tc := range []struct {
		name, pattern, param, header, field string
	}{
		{"X-Tenant-ID", "/api/v2/admin/", "", "acme\u2028", "X-Tenant-ID"},
		{"tenant in the path", "GET /api/v2/tenants/{tenant_id}/reports", "tenant_id", "", "tenant_id"},
		{"user in the path", "GET /api/v2/users/{user_id}/history", "user_id", "", "user_id"},
	} {
		for _, sub := range []*policy.Subject{alice, root} {
			t.Run(tc.name+"/"+sub.UserID, func(t *testing.T) {
				r := httptest.NewRequest("GET", "/x", nil)
				r.Pattern = tc.pattern
				if tc.param != "" {
					r.SetPathValue(tc.param, "acme\u202e")
				}
				if tc.header != "" {
					r.Header.Set("X-Tenant-ID", tc.header)
				}
				e := p.Decide(r, sub, true)
				if e == nil || e.Status != http.StatusBadRequest || e.Code != proxy.CodeValidation {
					t.Fatalf("Decide = %v, want 400 %s", e, proxy.CodeValidation)
				}
				if d, ok := e.Details.([]proxy.FieldError); !ok || len(d) != 1 || d[0].Field != tc.field {
					t.Errorf("details %v, want the field %s", e.Details, tc.field)
				}
			})
		}
	}
}
