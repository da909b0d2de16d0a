package policy_test

import (
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
