package policy

import "strings"

// Tag returns the Redis Cluster hash tag, braces included, of the keys of a tenant: every key
// a script touches for one tenant carries it, so that they all hash to one slot. Redis hashes
// the bytes between a key's first "{" and the first "}" after it, and the whole key when
// there are none, so the tenant is escaped: "%", "{" and "}" become %25, %7B and %7D, and no
// tenant (an empty one) becomes "%", which no escaped tenant can be. The tag is then never
// empty, never cut short, and tells tenants apart.
func Tag(tenant string) string {
	if tenant == "" {
		return "{%}"
	}
	if !strings.ContainsAny(tenant, "%{}") {
		return "{" + tenant + "}"
	}
	return "{" + tagEscaper.Replace(tenant) + "}"
}

var tagEscaper = strings.NewReplacer("%", "%25", "{", "%7B", "}", "%7D")
