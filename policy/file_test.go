package policy_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"voicegate/policy"
)

// gatewayBindings are the protected routes of the gateway's route table, in its order, each with
// the binding the built-in policy gives it, as testdata/policy/good/default.json holds them: the
// gateway's own tests check that file against its route table. gatewayRoutes are their
// patterns.
var (
	gatewayBindings = defaultBindings()
	gatewayRoutes   = patterns(gatewayBindings)
)

// testRoutes are the extra routes of testdata/policy/good/decide.json, with {tenant_id} and
// {user_id} wildcards.
var testRoutes = []string{
	"GET /api/v2/tenants/{tenant_id}/reports",
	"/api/v2/tenants/{tenant_id}/files/",
	"GET /api/v2/users/{user_id}/history",
}

var (
	decideRoutes   = append(slices.Clip(gatewayRoutes), testRoutes...)
	decideBindings = append(slices.Clip(gatewayBindings), policy.Binding{Route: testRoutes[0]},
		policy.Binding{Route: testRoutes[1]}, policy.Binding{Route: testRoutes[2]})
)

func defaultBindings() []policy.Binding {
	data, err := os.ReadFile(filepath.Join(fixtures, "good", "default.json"))
	if err != nil {
		panic(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		panic(err)
	}
	return f.Routes
}

func patterns(bs []policy.Binding) []string {
	var ps []string
	for _, b := range bs {
		ps = append(ps, b.Route)
	}
	return ps
}

// handlerPerms are the permissions main's handlers check themselves.
var handlerPerms = []string{"token:revoke", "chat:admin", "voice:admin"}

const fixtures = "../testdata/policy"

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtures, name))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// compileFixture parses and compiles a fixture against routes.
func compileFixture(t testing.TB, name string, routes []string) *policy.Policy {
	t.Helper()
	f, err := policy.Parse(readFixture(t, name))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	p, err := policy.Compile(f, routes, handlerPerms)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

// badFixtures maps every file of testdata/policy/bad to what its error must say.
var badFixtures = map[string]struct {
	want string
}{
	"role-unknown-inherit.json":       {want: `role "admin" inherits "nobody": unknown role`},
	"role-cycle.json":                 {want: `role "a": inheritance cycle a → b → c → a`},
	"role-self-inherit.json":          {want: `user → user`},
	"role-name-upper.json":            {want: `role name "Admin"`},
	"role-name-star.json":             {want: `role name "*"`},
	"roles-empty.json":                {want: `policy: no roles`},
	"perm-upper.json":                 {want: `role "user": permission "Document:read" is not resource:action`},
	"perm-no-colon.json":              {want: `permission "documentread" is not resource:action`},
	"perm-two-colons.json":            {want: `permission "document:read:all" is not resource:action`},
	"perm-empty-resource.json":        {want: `permission ":read" is not resource:action`},
	"perm-empty-action.json":          {want: `permission "document:" is not resource:action`},
	"perm-empty.json":                 {want: `permission "" is not resource:action`},
	"perm-space.json":                 {want: `permission "document: read" is not resource:action`},
	"perm-star-prefix.json":           {want: `permission "*x:read" is not resource:action`},
	"perm-star-suffix.json":           {want: `permission "document:*x" is not resource:action`},
	"perm-too-long.json":              {want: `is not resource:action`},
	"route-perm-bad.json":             {want: `route "/api/v2/admin/": permission "Admin:Write" is not resource:action`},
	"route-method-perm-bad.json":      {want: `route "/api/v2/admin/": permission "admin read" is not resource:action`},
	"route-not-in-gateway.json":       {want: `binding for "GET /api/v2/users/{user_id}/history", which is not a route of the gateway`},
	"route-missing.json":              {want: `no binding for route(s) /api/v2/admin/, /api/v2/documents/`},
	"route-twice.json":                {want: `route "POST /api/v2/chat/cancel" is bound twice`},
	"route-method-unknown.json":       {want: `route "/api/v2/admin/": unknown method "FETCH"`},
	"route-method-lower.json":         {want: `unknown method "get"`},
	"route-lease-no-limit.json":       {want: `route "GET /api/v2/voice/stream": lease "voice" has no concurrency limit`},
	"route-class-upper.json":          {want: `class "Chat" is not a lower-case name`},
	"limit-requests-zero.json":        {want: `limits.per_user: want requests ≥ 1`},
	"limit-burst-negative.json":       {want: `limits.classes.chat: want requests ≥ 1, a positive per and burst ≥ 0`},
	"limit-per-missing.json":          {want: `limits.per_tenant: want requests ≥ 1, a positive per`},
	"limit-class-upper.json":          {want: `class "Chat" is not a lower-case name`},
	"limit-quota-negative.json":       {want: `daily_requests_per_user cannot be negative`},
	"limit-concurrency-unknown.json":  {want: `unknown lease "video" (want chat or voice)`},
	"limit-concurrency-negative.json": {want: `limits.concurrency.chat: caps cannot be negative`},
	"duration-word.json":              {want: `"fast" is not a positive duration`},
	"duration-negative.json":          {want: `"-1s" is not a positive duration`},
	"duration-zero.json":              {want: `"0s" is not a positive duration`},
	"duration-number.json":            {want: `durations are strings such as "1m"`},
	"json-unknown-field.json":         {want: `unknown field "rols"`},
	"json-unknown-field-role.json":    {want: `unknown field "perms"`},
	"json-unknown-field-route.json":   {want: `unknown field "perm"`},
	"json-unknown-field-rate.json":    {want: `unknown field "window"`},
	"json-wrong-type.json":            {want: `cannot unmarshal array`},
	"json-trailing-object.json":       {want: `trailing data after the JSON object`},
	"json-trailing-word.json":         {want: `policy: `},
	"json-trailing-brace.json":        {want: `trailing data after the JSON object`},
	"json-truncated.json":             {want: `unexpected EOF`},
	"json-not-json.json":              {want: `invalid character`},
}

// goodFixtures maps every file of testdata/policy/good, and the fixtures of the gateway's own
// tests, to the routes it binds.
var goodFixtures = map[string][]string{
	"good/default.json":     gatewayRoutes,
	"good/minimal.json":     gatewayRoutes,
	"good/wildcards.json":   gatewayRoutes,
	"good/inheritance.json": gatewayRoutes,
	"good/decide.json":      decideRoutes,
	"good/readme.json":      gatewayRoutes, // the worked example in README.md
	"e2e.json":              gatewayRoutes,
	"bench.json":            gatewayRoutes,
}

func TestBadPolicies(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(fixtures, "bad", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(badFixtures) {
		t.Errorf("%d files in bad/, %d in the table: every fixture needs an expected message", len(files), len(badFixtures))
	}
	for _, path := range files {
		name := filepath.Base(path)
		t.Run(strings.TrimSuffix(name, ".json"), func(t *testing.T) {
			tc, ok := badFixtures[name]
			if !ok {
				t.Fatalf("no expected message for bad/%s", name)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			f, err := policy.Parse(data)
			if err == nil {
				_, err = policy.Compile(f, gatewayRoutes, handlerPerms)
			}
			if err == nil {
				t.Fatalf("bad/%s was accepted", name)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("bad/%s: error %q does not contain %q", name, err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "policy: ") {
				t.Errorf("bad/%s: error %q does not say where it comes from (policy: ...)", name, err)
			}
		})
	}
}

func TestGoodPolicies(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(fixtures, "good", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range files {
		if _, ok := goodFixtures["good/"+filepath.Base(path)]; !ok {
			t.Errorf("good/%s is not in the table", filepath.Base(path))
		}
	}
	for name, routes := range goodFixtures {
		t.Run(name, func(t *testing.T) {
			p := compileFixture(t, name, routes)
			if p.Rules == nil {
				t.Fatal("compiled policy has no rules")
			}
			// A good policy is tied to its routes: one route fewer or more is refused.
			f, _ := policy.Parse(readFixture(t, name))
			if _, err := policy.Compile(f, routes[1:], handlerPerms); err == nil || !strings.Contains(err.Error(), "not a route of the gateway") {
				t.Errorf("compiled against one route fewer: error %v", err)
			}
			extra := append(slices.Clip(routes), "GET /api/v2/extra")
			if _, err := policy.Compile(f, extra, handlerPerms); err == nil || !strings.Contains(err.Error(), "no binding for route(s) GET /api/v2/extra") {
				t.Errorf("compiled against one route more: error %v", err)
			}
		})
	}
}

func TestDefaultPolicy(t *testing.T) {
	t.Run("compiles against the gateway's routes", func(t *testing.T) {
		if _, err := policy.Compile(policy.Default(gatewayBindings), gatewayRoutes, handlerPerms); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("and only those", func(t *testing.T) {
		for i := range gatewayRoutes {
			fewer := slices.Delete(slices.Clone(gatewayRoutes), i, i+1)
			if _, err := policy.Compile(policy.Default(gatewayBindings), fewer, handlerPerms); err == nil {
				t.Errorf("compiled without route %q", gatewayRoutes[i])
			}
		}
		more := append(slices.Clip(gatewayRoutes), "GET /api/v2/extra")
		_, err := policy.Compile(policy.Default(gatewayBindings), more, handlerPerms)
		if err == nil || !strings.Contains(err.Error(), "no binding for route(s) GET /api/v2/extra") {
			t.Errorf("compiled with an unbound route: %v", err)
		}
	})
	t.Run("matches good/default.json", func(t *testing.T) {
		f, err := policy.Parse(readFixture(t, "good/default.json"))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(policy.Default(gatewayBindings))
		got, _ := json.Marshal(f)
		if string(got) != string(want) {
			t.Fatalf("good/default.json and Default() differ:\nfile:    %s\ndefault: %s", got, want)
		}
	})
	t.Run("unbound routes listed in order", func(t *testing.T) {
		more := append(slices.Clip(gatewayRoutes), "GET /z", "GET /a")
		_, err := policy.Compile(policy.Default(gatewayBindings), more, handlerPerms)
		if err == nil || !strings.Contains(err.Error(), "no binding for route(s) GET /a, GET /z") {
			t.Errorf("error %v", err)
		}
	})
	t.Run("bad extra permission", func(t *testing.T) {
		_, err := policy.Compile(policy.Default(gatewayBindings), gatewayRoutes, []string{"chat:admin", "Chat:Admin"})
		if err == nil || !strings.Contains(err.Error(), `permission "Chat:Admin" is not resource:action`) {
			t.Fatalf("error %v", err)
		}
	})
	t.Run("decisions as in DESIGN.md", func(t *testing.T) {
		p, err := policy.Compile(policy.Default(gatewayBindings), gatewayRoutes, handlerPerms)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			role, perm string
			want       bool
		}{
			{"user", "chat:write", true}, {"user", "voice:write", true}, {"user", "document:read", true},
			{"user", "document:write", false}, {"editor", "document:write", true}, {"editor", "chat:write", true},
			{"editor", "document:delete", false}, {"admin", "admin:write", true}, {"admin", "document:delete", true},
			{"admin", "chat:admin", true}, {"admin", "voice:admin", true}, {"admin", "token:revoke", true},
			{"super_admin", "anything:else", true},
		} {
			if got := p.Rules.Allows([]string{c.role}, nil, c.perm); got != c.want {
				t.Errorf("%s %s: %v, want %v", c.role, c.perm, got, c.want)
			}
		}
	})
}

func TestDuration(t *testing.T) {
	tests := []struct {
		in   string
		want string // re-marshalled; "" means an error
	}{
		{`"1m"`, `"1m0s"`},
		{`"1h30m"`, `"1h30m0s"`},
		{`"250ms"`, `"250ms"`},
		{`"fast"`, ""},
		{`"-1s"`, ""},
		{`"0s"`, ""},
		{`""`, ""},
		{`5`, ""},
		{`null`, ""},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			var d policy.Duration
			err := json.Unmarshal([]byte(tc.in), &d)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("accepted %s as %v", tc.in, d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			out, _ := json.Marshal(d)
			if string(out) != tc.want {
				t.Fatalf("round trip %s → %s, want %s", tc.in, out, tc.want)
			}
		})
	}
}

// FuzzPolicyParse feeds arbitrary bytes to Parse and Compile: they never panic, and a policy that
// compiles answers Decide for a few fixed requests: 401 without a caller, always yes for a super
// admin.
func FuzzPolicyParse(f *testing.F) {
	for _, pattern := range []string{"*.json", "*/*.json"} {
		files, err := filepath.Glob(filepath.Join(fixtures, pattern))
		if err != nil {
			f.Fatal(err)
		}
		for _, path := range files {
			data, err := os.ReadFile(path)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := policy.Parse(data)
		if err != nil {
			return
		}
		for _, routes := range [][]string{gatewayRoutes, decideRoutes} {
			p, err := policy.Compile(file, routes, handlerPerms)
			if err != nil {
				continue
			}
			subjects := []policy.Subject{
				{UserID: "bob", TenantID: "acme", Roles: []string{"ghost"}, Grants: []string{"*:*"}},
				{UserID: "eve", TenantID: "globex", Grants: []string{"Not A Grant"}},
			}
			for name := range file.Roles {
				subjects = append(subjects, policy.Subject{UserID: "alice", TenantID: "acme", Roles: []string{name}})
			}
			super := policy.Subject{UserID: "root", Roles: []string{policy.SuperAdmin}}
			for _, route := range routes {
				for _, m := range []string{"GET", "HEAD", "POST", "DELETE"} {
					r := httptest.NewRequest(m, "/x", nil)
					r.Pattern = route
					r.SetPathValue("tenant_id", "acme")
					r.SetPathValue("user_id", "bob")
					r.Header.Set("X-Tenant-ID", "acme")
					for i := range subjects {
						if e := p.Decide(r, &subjects[i], true); e != nil && e.Status != http.StatusForbidden {
							t.Fatalf("%s %s: status %d for a caller, want 403 or nothing", m, route, e.Status)
						}
					}
					if e := p.Decide(r, &policy.Subject{}, false); e == nil || e.Status != http.StatusUnauthorized {
						t.Fatalf("%s %s without a caller: %v, want 401", m, route, e)
					}
					if e := p.Decide(r, &super, true); e != nil {
						t.Fatalf("%s %s: super admin refused: %v", m, route, e)
					}
				}
			}
		}
	})
}
