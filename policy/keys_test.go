package policy_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"strings"
	"testing"

	"voicegate/policy"
)

// TestTag: a tenant's hash tag is never empty, holds no brace inside, and tells tenants apart
// (so two tenants never share a key), whatever the tenant string.
func TestTag(t *testing.T) {
	tenants := []string{"", "acme", "%", "{", "}", "{}", "}{", "a}b", "%7D", "%25", "租户", "a b", "%7B%7D"}
	seen := map[string]string{}
	for _, tenant := range tenants {
		tag := policy.Tag(tenant)
		inner, ok := strings.CutPrefix(tag, "{")
		if inner, ok = strings.CutSuffix(inner, "}"); !ok || inner == "" || strings.ContainsAny(inner, "{}") {
			t.Errorf("Tag(%q) = %q: want {non-empty, brace-free}", tenant, tag)
		}
		if other, dup := seen[tag]; dup {
			t.Errorf("Tag(%q) = Tag(%q) = %q", tenant, other, tag)
		}
		seen[tag] = tenant
	}
	if got := policy.Tag("acme"); got != "{acme}" {
		t.Errorf("Tag(acme) = %q: a plain tenant is kept as it is, so its keys read plainly", got)
	}
}

func FuzzTag(f *testing.F) {
	for _, s := range []string{"", "acme", "}", "%7D"} {
		f.Add(s, s+"x")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		ta, tb := policy.Tag(a), policy.Tag(b)
		if inner := ta[1 : len(ta)-1]; inner == "" || strings.ContainsAny(inner, "{}") {
			t.Fatalf("Tag(%q) = %q", a, ta)
		}
		if a != b && ta == tb {
			t.Fatalf("Tag(%q) = Tag(%q) = %q", a, b, ta)
		}
	})
}

// decodeName splits a name made by Keys back into its tenant (when tagged) and parts, undoing
// the escaping: the proof that a name determines its tuple.
func decodeName(t *testing.T, name, prefix, kind string, tagged bool) (tenant string, parts []string) {
	t.Helper()
	rest, ok := strings.CutPrefix(name, prefix+kind)
	if !ok {
		t.Fatalf("%q does not begin with %q", name, prefix+kind)
	}
	if tagged {
		rest, ok = strings.CutPrefix(rest, ":{")
		end := strings.IndexByte(rest, '}')
		if !ok || end < 0 {
			t.Fatalf("%q has no tag after its kind", name)
		}
		if raw := rest[:end]; raw != "%" { // "%" alone is the empty tenant
			tenant = unescape(t, raw)
		}
		rest = rest[end+1:]
	}
	if rest == "" {
		return tenant, nil
	}
	if rest[0] != ':' {
		t.Fatalf("%q: parts must follow a separator", name)
	}
	for _, p := range strings.Split(rest[1:], ":") {
		if strings.ContainsAny(p, "{}") {
			t.Fatalf("%q: a part holds a brace, which would move the hash tag", name)
		}
		parts = append(parts, unescape(t, p))
	}
	return tenant, parts
}

func unescape(t *testing.T, s string) string {
	t.Helper()
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			if s[i] <= ' ' || s[i] >= 0x7f {
				t.Fatalf("unescaped byte %#x in %q", s[i], s)
			}
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			t.Fatalf("truncated escape in %q", s)
		}
		var v byte
		for _, h := range s[i+1 : i+3] {
			v <<= 4
			switch {
			case h >= '0' && h <= '9':
				v |= byte(h - '0')
			case h >= 'A' && h <= 'F':
				v |= byte(h-'A') + 10
			default:
				t.Fatalf("bad escape in %q", s)
			}
		}
		b.WriteByte(v)
		i += 2
	}
	return b.String()
}

// TestKeysAttack: the IDs an attacker would pick to make two owners' names meet.
func TestKeysAttack(t *testing.T) {
	k := policy.NewKeys("voicegate:")
	pairs := [][2][]string{
		{{"acme", "a:b", "c"}, {"acme", "a", "b:c"}},
		{{"acme", "a", "b:c"}, {"acme", "a:b:c", ""}},
		{{"a}b", "u", "r"}, {"a", "}b:u", "r"}},
		{{"", "u", "r"}, {"%", "u", "r"}},
		{{"acme", "u%3Ar", "x"}, {"acme", "u:r", "x"}},
		{{"acme", "u\n", "r"}, {"acme", "u%0A", "r"}},
	}
	for _, p := range pairs {
		a := k.Tenant(policy.KindReplay, p[0][0], p[0][1:]...)
		b := k.Tenant(policy.KindReplay, p[1][0], p[1][1:]...)
		if a == b {
			t.Errorf("%q and %q both name %q", p[0], p[1], a)
		}
	}
	if got := k.Tenant(policy.KindReplay, "acme", "u1", "req-1"); got != "voicegate:replay:{acme}:u1:req-1" {
		t.Errorf("plain parts are kept as they are, so names read plainly: %q", got)
	}
	if got := k.Key(policy.KindControl, "gw-1"); got != "voicegate:{control}:gw-1" {
		t.Errorf("a literal tag kind: %q", got)
	}
}

// FuzzKeys: a name decodes to exactly the tenant and parts it was made of, so two different
// tuples never make one name, and no part can move the Redis Cluster hash tag.
func FuzzKeys(f *testing.F) {
	f.Add("acme", "a:b", "c", "a", "b:c")
	f.Add("", "u", "r", "%", "u")
	f.Add("}", "{x}", "%3A", ":", "")
	f.Add("t", "\x00", "\u2028", "é", "%")
	f.Fuzz(func(t *testing.T, tenant, p1, p2, q1, q2 string) {
		k := policy.NewKeys("vg:")
		for _, tuple := range [][]string{{tenant, p1, p2}, {q1, q2, p1}} {
			name := k.Tenant(policy.KindReplay, tuple[0], tuple[1:]...)
			gotTenant, gotParts := decodeName(t, name, "vg:", policy.KindReplay, true)
			if gotTenant != tuple[0] || len(gotParts) != 2 || gotParts[0] != tuple[1] || gotParts[1] != tuple[2] {
				t.Fatalf("%q decodes to %q %q, made from %q", name, gotTenant, gotParts, tuple)
			}
			if open := strings.IndexByte(name, '{'); name[open+1:open+1+strings.IndexByte(name[open:], '}')-1] != policy.Tag(tuple[0])[1:len(policy.Tag(tuple[0]))-1] {
				t.Fatalf("%q: the hash tag is not the tenant's", name)
			}
		}
		a := k.Tenant(policy.KindReplay, tenant, p1, p2)
		b := k.Tenant(policy.KindReplay, q1, q2, p1)
		if a == b && (tenant != q1 || p1 != q2 || p2 != p1) {
			t.Fatalf("(%q %q %q) and (%q %q %q) both name %q", tenant, p1, p2, q1, q2, p1, a)
		}
		name := k.Key(policy.KindSession, p1)
		if _, parts := decodeName(t, name, "vg:", policy.KindSession, false); len(parts) != 1 || parts[0] != p1 {
			t.Fatalf("%q decodes to %q, made from %q", name, parts, p1)
		}
	})
}

// kindConstants returns the values of the Kind constants declared in keys.go, read from the
// source, so that a kind added there and forgotten by KindOf fails TestKindOf.
func kindConstants(t *testing.T) map[string]string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "keys.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, spec := range g.Specs {
			v := spec.(*ast.ValueSpec)
			for i, n := range v.Names {
				if lit, ok := v.Values[i].(*ast.BasicLit); ok && strings.HasPrefix(n.Name, "Kind") {
					out[n.Name] = strings.Trim(lit.Value, `"`)
				}
			}
		}
	}
	if len(out) < 10 {
		t.Fatalf("found only %v in keys.go", out)
	}
	return out
}

// TestKindOf: every name Keys makes decodes to its kind, whatever its parts hold (parts that
// look like kinds, separators, braces) and whether it is under a tenant; names of other
// prefixes and unknown kinds decode to none.
func TestKindOf(t *testing.T) {
	k := policy.NewKeys("vg:")
	parts := [][]string{nil, {"session"}, {"sessions", "x"}, {"a:b", "{c}"}, {"status:", "%", ""}}
	for name, kind := range kindConstants(t) {
		for _, p := range parts {
			for _, key := range []string{k.Key(kind, p...), k.Tenant(kind, "voice:session", p...), k.Tenant(kind, "", p...)} {
				if got := k.KindOf(key); got != kind {
					t.Errorf("KindOf(%q) = %q, want %s (%q)", key, got, name, kind)
				}
			}
		}
	}
	for _, name := range []string{"", "vg:", "vg:nope:x", "other:rl:{a}:b", "rl:{a}:b", "vg:voice", "vg:user:x", "vg:replayx:{a}"} {
		if got := k.KindOf(name); got != "" {
			t.Errorf("KindOf(%q) = %q, want none", name, got)
		}
	}
	if got := policy.NewKeys("").KindOf("lease:{t}:u"); got != policy.KindLease {
		t.Errorf("without a prefix: KindOf = %q", got)
	}
}
