package policy_test

import (
	"errors"
	"regexp"
	"slices"
	"strings"
	"testing"

	"voicegate/policy"
)

// permSyntax is an independent statement of the permission grammar: resource:action, each part
// "*" or 1–64 of [a-z0-9_.-].
var permSyntax = regexp.MustCompile(`^([a-z0-9_.-]{1,64}|\*):([a-z0-9_.-]{1,64}|\*)$`)

// permCases are permission strings and whether they are well-formed. They also seed
// FuzzPermission.
var permCases = []struct {
	perm string
	ok   bool
}{
	{"document:read", true},
	{"doc-archive.v2:re_index", true},
	{"document:*", true},
	{"*:read", true},
	{"*:*", true},
	{strings.Repeat("a", 64) + ":read", true},
	{"0:9", true},
	{"Document:read", false},
	{"document:Read", false},
	{"documentread", false},
	{"document:read:all", false},
	{":read", false},
	{"document:", false},
	{":", false},
	{"", false},
	{"document: read", false},
	{" document:read", false},
	{"document:read ", false},
	{"*x:read", false},
	{"document:*x", false},
	{"x*:read", false},
	{"**:read", false},
	{"*", false},
	{strings.Repeat("a", 65) + ":read", false},
	{"document:" + strings.Repeat("b", 65), false},
	{"dócument:read", false},
	{"document/x:read", false},
	{"document\x00:read", false},
}

func TestPermissionSyntax(t *testing.T) {
	for _, tc := range permCases {
		t.Run(tc.perm, func(t *testing.T) {
			if got := permSyntax.MatchString(tc.perm); got != tc.ok {
				t.Fatalf("test oracle disagrees with the table for %q", tc.perm)
			}
			_, err := policy.CompileRoles(map[string]policy.Role{"r": {Permissions: []string{tc.perm}}}, nil)
			if tc.ok && err != nil {
				t.Fatalf("CompileRoles refused %q: %v", tc.perm, err)
			}
			if !tc.ok {
				if err == nil {
					t.Fatalf("CompileRoles accepted %q", tc.perm)
				}
				if !strings.Contains(err.Error(), "is not resource:action") || !strings.Contains(err.Error(), `role "r"`) {
					t.Fatalf("error %q does not name the role and the syntax", err)
				}
			}
			// The same syntax rule applies to the permissions to precompute.
			_, err = policy.CompileRoles(map[string]policy.Role{"r": {}}, []string{tc.perm})
			if (err == nil) != tc.ok {
				t.Fatalf("CompileRoles(known=[%q]) error = %v, want ok=%v", tc.perm, err, tc.ok)
			}
		})
	}
}

// Role sets used by the matching tables.
var (
	defaultRoles = policy.DefaultRoles()
	chainRoles   = map[string]policy.Role{
		"l1":   {Inherits: []string{"l2"}, Permissions: []string{"one:read"}},
		"l2":   {Inherits: []string{"l3"}, Permissions: []string{"two:read"}},
		"l3":   {Inherits: []string{"l4"}, Permissions: []string{"three:read"}},
		"l4":   {Permissions: []string{"deep:write"}},
		"lone": {Permissions: []string{"lone:read"}},
	}
	diamondRoles = map[string]policy.Role{
		"top":   {Inherits: []string{"left", "right"}, Permissions: []string{"top:read"}},
		"left":  {Inherits: []string{"base"}, Permissions: []string{"left:read"}},
		"right": {Inherits: []string{"base"}, Permissions: []string{"right:admin"}},
		"base":  {Permissions: []string{"base:write"}},
	}
)

type check struct {
	perm string
	want bool
}

func TestAllows(t *testing.T) {
	one := func(perms ...string) map[string]policy.Role {
		return map[string]policy.Role{"r": {Permissions: perms}}
	}
	tests := []struct {
		name   string
		roles  map[string]policy.Role
		has    []string // the caller's roles
		grants []string // the caller's direct grants
		checks []check
	}{
		{"exact", one("document:read"), []string{"r"}, nil, []check{
			{"document:read", true}, {"document:write", false}, {"documents:read", false},
			{"document:reads", false}, {"chat:read", false}, {"document:*", false}, {"*:read", false}}},
		{"resource wildcard", one("document:*"), []string{"r"}, nil, []check{
			{"document:read", true}, {"document:write", true}, {"document:delete", true},
			{"document:publish", true}, {"document:*", true}, {"chat:read", false}, {"documents:read", false}}},
		{"action wildcard", one("*:read"), []string{"r"}, nil, []check{
			{"document:read", true}, {"chat:read", true}, {"x.y-z_1:read", true}, {"*:read", true},
			{"document:write", false}, {"chat:delete", false}}},
		{"everything", one("*:*"), []string{"r"}, nil, []check{
			{"document:read", true}, {"zzz:publish", true}, {"*:*", true}, {"admin:write", true}}},
		{"write implies read", one("document:write"), []string{"r"}, nil, []check{
			{"document:write", true}, {"document:read", true}, {"document:delete", false},
			{"document:admin", false}, {"chat:read", false}}},
		{"admin implies read write delete", one("document:admin"), []string{"r"}, nil, []check{
			{"document:admin", true}, {"document:read", true}, {"document:write", true},
			{"document:delete", true}, {"document:publish", false}, {"chat:read", false}}},
		{"read and delete imply nothing", one("document:read", "chat:delete"), []string{"r"}, nil, []check{
			{"document:write", false}, {"chat:read", false}, {"chat:write", false}, {"chat:delete", true}}},
		{"implication through action wildcard", one("*:write"), []string{"r"}, nil, []check{
			{"x:read", true}, {"y:write", true}, {"x:delete", false}, {"x:admin", false}}},
		{"admin through action wildcard", one("*:admin"), []string{"r"}, nil, []check{
			{"z:read", true}, {"z:write", true}, {"z:delete", true}, {"z:admin", true}, {"z:publish", false}}},
		{"inheritance four levels", chainRoles, []string{"l1"}, nil, []check{
			{"one:read", true}, {"two:read", true}, {"three:read", true},
			{"deep:write", true}, {"deep:read", true}, {"lone:read", false}}},
		{"inheritance middle", chainRoles, []string{"l3"}, nil, []check{
			{"three:read", true}, {"deep:read", true}, {"two:read", false}, {"one:read", false}}},
		{"inheritance is not upwards", chainRoles, []string{"l4"}, nil, []check{
			{"deep:write", true}, {"three:read", false}}},
		{"diamond top", diamondRoles, []string{"top"}, nil, []check{
			{"top:read", true}, {"left:read", true}, {"right:delete", true}, {"right:write", true},
			{"base:write", true}, {"base:read", true}, {"base:delete", false}}},
		{"diamond side", diamondRoles, []string{"left"}, nil, []check{
			{"left:read", true}, {"base:read", true}, {"right:read", false}, {"top:read", false}}},
		{"default user", defaultRoles, []string{"user"}, nil, []check{
			{"chat:write", true}, {"voice:write", true}, {"document:read", true},
			{"document:write", false}, {"admin:read", false}, {"chat:admin", false}}},
		{"default editor", defaultRoles, []string{"editor"}, nil, []check{
			{"document:write", true}, {"document:read", true}, {"chat:write", true},
			{"document:delete", false}, {"admin:read", false}}},
		{"default admin", defaultRoles, []string{"admin"}, nil, []check{
			{"admin:read", true}, {"admin:write", true}, {"admin:anything", true},
			{"document:delete", true}, {"chat:admin", true}, {"chat:read", true},
			{"voice:admin", true}, {"token:revoke", true}, {"token:read", false}, {"user:admin", false}}},
		{"super admin passes everything", defaultRoles, []string{"super_admin"}, nil, []check{
			{"chat:write", true}, {"never.heard:of", true}, {"*:*", true}}},
		{"super admin without a definition", one("x:read"), []string{"super_admin"}, nil, []check{
			{"chat:write", true}, {"y:delete", true}}},
		{"super admin after an unknown role", defaultRoles, []string{"ghost", "super_admin"}, nil, []check{
			{"admin:write", true}}},
		{"super admin is case-sensitive", defaultRoles, []string{"Super_Admin", "super-admin", "SUPER_ADMIN"}, nil, []check{
			{"chat:write", false}, {"admin:read", false}}},
		{"unknown role grants nothing", defaultRoles, []string{"ghost"}, nil, []check{
			{"chat:write", false}, {"document:read", false}}},
		{"unknown role next to a known one", defaultRoles, []string{"ghost", "user"}, nil, []check{
			{"chat:write", true}, {"admin:read", false}}},
		{"no roles no grants", defaultRoles, nil, nil, []check{{"chat:write", false}}},
		{"several roles", defaultRoles, []string{"user", "editor"}, nil, []check{
			{"document:write", true}, {"admin:read", false}}},
		{"grant exact", defaultRoles, nil, []string{"report:read"}, []check{
			{"report:read", true}, {"report:write", false}, {"chat:write", false}}},
		{"grant resource wildcard", defaultRoles, nil, []string{"document:*"}, []check{
			{"document:delete", true}, {"document:publish", true}, {"chat:read", false}}},
		{"grant action wildcard", defaultRoles, nil, []string{"*:read"}, []check{
			{"x:read", true}, {"admin:read", true}, {"x:write", false}}},
		{"grant everything", defaultRoles, nil, []string{"*:*"}, []check{
			{"x:publish", true}, {"admin:write", true}}},
		{"grant write implies read", defaultRoles, nil, []string{"document:write"}, []check{
			{"document:read", true}, {"document:write", true}, {"document:delete", false}}},
		{"grant admin implies", defaultRoles, nil, []string{"document:admin"}, []check{
			{"document:read", true}, {"document:write", true}, {"document:delete", true}, {"document:publish", false}}},
		{"grant admin through wildcard", defaultRoles, nil, []string{"*:admin"}, []check{
			{"x:write", true}, {"y:delete", true}, {"y:publish", false}}},
		{"malformed grants grant nothing", defaultRoles, nil, []string{"Document:Read", "document", "*", "", ":", "document:"}, []check{
			{"document:read", false}, {"document:write", false}}},
		{"grants add to roles", defaultRoles, []string{"user"}, []string{"admin:read"}, []check{
			{"admin:read", true}, {"chat:write", true}, {"admin:write", false}}},
		{"grants with an unknown role", defaultRoles, []string{"ghost"}, []string{"chat:write"}, []check{
			{"chat:write", true}, {"chat:read", true}, {"voice:write", false}}},
		{"role without permissions", map[string]policy.Role{"empty": {}}, []string{"empty"}, nil, []check{
			{"chat:write", false}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var asked []string
			for _, c := range tc.checks {
				asked = append(asked, c.perm)
			}
			// Once with every asked permission precomputed and once with none: both paths must
			// give the table's answer.
			for _, known := range [][]string{asked, nil} {
				rules, err := policy.CompileRoles(tc.roles, known)
				if err != nil {
					t.Fatalf("CompileRoles: %v", err)
				}
				for _, c := range tc.checks {
					if got := rules.Allows(tc.has, tc.grants, c.perm); got != c.want {
						t.Errorf("precomputed=%v: Allows(%q, %q, %q) = %v, want %v",
							known != nil, tc.has, tc.grants, c.perm, got, c.want)
					}
				}
			}
		})
	}
}

// TestAllowsPathsAgree checks, exhaustively over roles × permissions, that a precomputed answer,
// the fallback for a permission nobody declared, and an independent reference all agree.
func TestAllowsPathsAgree(t *testing.T) {
	roles := map[string]policy.Role{}
	for _, set := range []map[string]policy.Role{defaultRoles, chainRoles, diamondRoles} {
		for k, v := range set {
			roles[k] = v
		}
	}
	for name, perms := range map[string][]string{
		"reader": {"*:read"}, "writer": {"*:write"}, "boss": {"*:admin"}, "root": {"*:*"},
		"docs": {"document:*"}, "deleter": {"document:delete", "chat:delete"}, "empty": nil,
		"mixed": {"chat:admin", "x:write", "admin:read"},
	} {
		roles[name] = policy.Role{Permissions: perms}
	}
	roles["heir"] = policy.Role{Inherits: []string{"writer", "docs", "top"}}

	var perms []string
	for _, res := range []string{"document", "chat", "admin", "x", "deep", "base", "right", "top", "voice", "token", "*"} {
		for _, act := range []string{"read", "write", "delete", "admin", "publish", "revoke", "*"} {
			perms = append(perms, res+":"+act)
		}
	}
	var names []string
	for n := range roles {
		names = append(names, n)
	}
	slices.Sort(names)
	callers := [][]string{nil, {"ghost"}, {"super_admin"}}
	for _, a := range names {
		callers = append(callers, []string{a}, []string{"ghost", a})
		for _, b := range names {
			if a < b {
				callers = append(callers, []string{a, b})
			}
		}
	}

	known, err := policy.CompileRoles(roles, perms)
	if err != nil {
		t.Fatal(err)
	}
	fallback, err := policy.CompileRoles(roles, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, has := range callers {
		for _, p := range perms {
			want := refAllows(roles, has, nil, p)
			if got := known.Allows(has, nil, p); got != want {
				t.Errorf("precomputed Allows(%q, %q) = %v, reference says %v", has, p, got, want)
			}
			if got := fallback.Allows(has, nil, p); got != want {
				t.Errorf("fallback Allows(%q, %q) = %v, reference says %v", has, p, got, want)
			}
		}
	}
	// Direct grants follow the same rules as role permissions.
	for _, g := range perms {
		for _, p := range perms {
			want := refAllows(roles, nil, []string{g}, p)
			if got := known.Allows(nil, []string{g}, p); got != want {
				t.Errorf("Allows(grants=[%q], %q) = %v, reference says %v", g, p, got, want)
			}
		}
	}
}

// refAllows is a reference implementation of the matching rules, written from DESIGN.md rather
// than from the package.
func refAllows(roles map[string]policy.Role, has, grants []string, p string) bool {
	if slices.Contains(has, policy.SuperAdmin) {
		return true
	}
	var all []string
	seen := map[string]bool{}
	var walk func(string)
	walk = func(n string) {
		if seen[n] {
			return
		}
		seen[n] = true
		role, ok := roles[n]
		if !ok {
			return
		}
		all = append(all, role.Permissions...)
		for _, parent := range role.Inherits {
			walk(parent)
		}
	}
	for _, r := range has {
		walk(r)
	}
	all = append(all, grants...)
	pr, pa, _ := strings.Cut(p, ":")
	for _, g := range all {
		gr, ga, _ := strings.Cut(g, ":")
		if gr != "*" && gr != pr {
			continue
		}
		switch {
		case ga == "*", ga == pa,
			ga == "write" && pa == "read",
			ga == "admin" && (pa == "read" || pa == "write" || pa == "delete"):
			return true
		}
	}
	return false
}

func TestCompileRolesErrors(t *testing.T) {
	tests := []struct {
		name    string
		roles   map[string]policy.Role
		known   []string
		want    string
		unknown bool // errors.Is ErrUnknownRole
	}{
		{"unknown parent", map[string]policy.Role{"a": {Inherits: []string{"b"}}}, nil,
			`role "a" inherits "b": unknown role`, true},
		{"self cycle", map[string]policy.Role{"a": {Inherits: []string{"a"}}}, nil,
			`inheritance cycle a → a`, false},
		{"long cycle", map[string]policy.Role{
			"a": {Inherits: []string{"b"}}, "b": {Inherits: []string{"c"}}, "c": {Inherits: []string{"a"}}}, nil,
			`role "a": inheritance cycle a → b → c → a`, false},
		{"cycle below a diamond", map[string]policy.Role{
			"top": {Inherits: []string{"l", "r"}}, "l": {Inherits: []string{"base"}}, "r": {Inherits: []string{"base"}},
			"base": {Inherits: []string{"r"}}}, nil, `inheritance cycle`, false},
		{"bad role name", map[string]policy.Role{"Admin": {}}, nil, `role name "Admin"`, false},
		{"star role name", map[string]policy.Role{"*": {}}, nil, `role name "*"`, false},
		{"empty role name", map[string]policy.Role{"": {}}, nil, `role name ""`, false},
		{"bad permission", map[string]policy.Role{"a": {Permissions: []string{"chat:write", "Chat:Write"}}}, nil,
			`role "a": permission "Chat:Write" is not resource:action`, false},
		{"bad known permission", map[string]policy.Role{"a": {}}, []string{"chat"},
			`permission "chat" is not resource:action`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rules, err := policy.CompileRoles(tc.roles, tc.known)
			if err == nil {
				t.Fatalf("CompileRoles succeeded (%v), want an error containing %q", rules, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if got := errors.Is(err, policy.ErrUnknownRole); got != tc.unknown {
				t.Fatalf("errors.Is(err, ErrUnknownRole) = %v, want %v", got, tc.unknown)
			}
		})
	}
}

func TestIsSuper(t *testing.T) {
	tests := []struct {
		roles []string
		want  bool
	}{
		{nil, false},
		{[]string{"admin"}, false},
		{[]string{"admin", "super_admin"}, true},
		{[]string{"Super_Admin"}, false},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.roles, ","), func(t *testing.T) {
			if got := policy.IsSuper(tc.roles); got != tc.want {
				t.Fatalf("IsSuper(%q) = %v, want %v", tc.roles, got, tc.want)
			}
		})
	}
}

// FuzzPermission checks the permission parser through CompileRoles: it never panics, it accepts
// exactly the grammar, and a permission it accepts is granted by a role holding exactly it,
// whether precomputed or not, and by a direct grant of it.
func FuzzPermission(f *testing.F) {
	for _, tc := range permCases {
		f.Add(tc.perm)
	}
	probes := []string{"document:read", "document:write", "document:delete", "x:admin", "*:read", "*:*", "chat:publish"}
	f.Fuzz(func(t *testing.T, s string) {
		roles := map[string]policy.Role{"r": {Permissions: []string{s}}}
		fallback, err := policy.CompileRoles(roles, nil)
		want := permSyntax.MatchString(s)
		if (err == nil) != want {
			t.Fatalf("CompileRoles(%q) error = %v, grammar says valid=%v", s, err, want)
		}
		known, err := policy.CompileRoles(roles, append([]string{s}, probes...))
		if (err == nil) != want {
			t.Fatalf("CompileRoles(known=%q) error = %v, grammar says valid=%v", s, err, want)
		}
		if !want {
			return
		}
		if !fallback.Allows([]string{"r"}, nil, s) || !known.Allows([]string{"r"}, nil, s) {
			t.Fatalf("a role granted exactly %q is refused it", s)
		}
		if !fallback.Allows(nil, []string{s}, s) {
			t.Fatalf("a direct grant of %q is refused it", s)
		}
		for _, p := range probes {
			a, b := fallback.Allows([]string{"r"}, nil, p), known.Allows([]string{"r"}, nil, p)
			if a != b {
				t.Fatalf("granted %q, asked %q: fallback %v, precomputed %v", s, p, a, b)
			}
			if ref := refAllows(roles, []string{"r"}, nil, p); a != ref {
				t.Fatalf("granted %q, asked %q: %v, reference says %v", s, p, a, ref)
			}
		}
	})
}
