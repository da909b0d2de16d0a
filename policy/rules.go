// Package policy owns what a caller may do: role-based permissions of the form
// "resource:action" (with wildcards, action implication, role inheritance and super admins),
// tenant and ownership rules, the binding of every route to the permission it needs, and fair
// use — rate limits, daily quotas and concurrency caps, shared by instances through Redis.
package policy

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// SuperAdmin is the role that passes every check.
const SuperAdmin = "super_admin"

// Role is one role of a policy file.
type Role struct {
	// Inherits names roles whose permissions this role has too.
	Inherits []string `json:"inherits,omitempty"`
	// Permissions are "resource:action" grants; "*" matches any resource or action.
	Permissions []string `json:"permissions,omitempty"`
}

// implied lists what an action grants besides itself: write implies read; admin implies read,
// write and delete.
var implied = map[string][]string{
	"write": {"read"},
	"admin": {"read", "write", "delete"},
}

// perm is a parsed permission.
type perm struct{ resource, action string }

// parsePerm checks the syntax resource:action, each a lower-case name of letters, digits, '_',
// '-' or '.', or "*".
func parsePerm(s string) (perm, error) {
	res, act, ok := strings.Cut(s, ":")
	if !ok || !validPart(res) || !validPart(act) {
		return perm{}, fmt.Errorf("permission %q is not resource:action (lower-case names or *)", s)
	}
	return perm{res, act}, nil
}

func validPart(s string) bool {
	if s == "*" {
		return true
	}
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// grantSet is what a role holds after inheritance and implication, in a form that answers with
// map look-ups and no allocation.
type grantSet struct {
	exact    map[string]struct{} // "resource:action"
	resource map[string]struct{} // resource:* (every action on it)
	action   map[string]struct{} // *:action (the action on every resource)
	all      bool                // *:*
	// decided caches the answer for every permission a route or handler is known to ask for,
	// computed once at compile time.
	decided map[string]bool
}

func newGrantSet() *grantSet {
	return &grantSet{exact: map[string]struct{}{}, resource: map[string]struct{}{}, action: map[string]struct{}{}}
}

func (g *grantSet) add(p perm) {
	switch {
	case p.resource == "*" && p.action == "*":
		g.all = true
	case p.action == "*":
		g.resource[p.resource] = struct{}{}
	case p.resource == "*":
		g.action[p.action] = struct{}{}
		for _, a := range implied[p.action] {
			g.action[a] = struct{}{}
		}
	default:
		g.exact[p.resource+":"+p.action] = struct{}{}
		for _, a := range implied[p.action] {
			g.exact[p.resource+":"+a] = struct{}{}
		}
	}
}

func (g *grantSet) match(resource, action string, full string) bool {
	if g.all {
		return true
	}
	if _, ok := g.exact[full]; ok {
		return true
	}
	if _, ok := g.resource[resource]; ok {
		return true
	}
	_, ok := g.action[action]
	return ok
}

// Rules is a compiled policy. A decision is a few map look-ups; nothing is cached at run time,
// so nothing can go stale: a new policy is a new Rules.
type Rules struct {
	roles map[string]*grantSet
}

// ErrUnknownRole is returned (wrapped) when a policy refers to a role it does not define.
var ErrUnknownRole = errors.New("unknown role")

// CompileRoles compiles roles. known lists the permissions that will be asked about (route
// bindings, handler checks) so their answers can be precomputed.
func CompileRoles(roles map[string]Role, known []string) (*Rules, error) {
	r := &Rules{roles: make(map[string]*grantSet, len(roles))}
	names := make([]string, 0, len(roles))
	for name := range roles {
		names = append(names, name)
	}
	sort.Strings(names) // deterministic error messages
	for _, name := range names {
		if !validPart(name) || name == "*" {
			return nil, fmt.Errorf("role name %q: want lower-case letters, digits, _ - .", name)
		}
		for _, p := range roles[name].Permissions {
			if _, err := parsePerm(p); err != nil {
				return nil, fmt.Errorf("role %q: %w", name, err)
			}
		}
		for _, parent := range roles[name].Inherits {
			if _, ok := roles[parent]; !ok {
				return nil, fmt.Errorf("role %q inherits %q: %w", name, parent, ErrUnknownRole)
			}
		}
	}
	for _, name := range names {
		g := newGrantSet()
		seen := map[string]bool{}
		var walk func(string, []string) error
		walk = func(n string, path []string) error {
			if slices.Contains(path, n) {
				return fmt.Errorf("role %q: inheritance cycle %s", name, strings.Join(append(path, n), " → "))
			}
			if seen[n] {
				return nil
			}
			seen[n] = true
			for _, p := range roles[n].Permissions {
				pp, _ := parsePerm(p)
				g.add(pp)
			}
			for _, parent := range roles[n].Inherits {
				if err := walk(parent, append(path, n)); err != nil {
					return err
				}
			}
			return nil
		}
		if err := walk(name, nil); err != nil {
			return nil, err
		}
		g.decided = make(map[string]bool, len(known))
		for _, k := range known {
			p, err := parsePerm(k)
			if err != nil {
				return nil, err
			}
			g.decided[k] = g.match(p.resource, p.action, k)
		}
		r.roles[name] = g
	}
	return r, nil
}

// Allows reports whether a caller with roles and direct grants (a token's scopes or
// permissions) holds permission p.
func (r *Rules) Allows(roles, grants []string, p string) bool {
	for _, role := range roles {
		if role == SuperAdmin {
			return true
		}
		g := r.roles[role]
		if g == nil {
			continue // a role the policy does not know grants nothing
		}
		if d, ok := g.decided[p]; ok {
			if d {
				return true
			}
			continue
		}
		res, act, ok := strings.Cut(p, ":")
		if ok && g.match(res, act, p) {
			return true
		}
	}
	if len(grants) == 0 {
		return false
	}
	res, act, ok := strings.Cut(p, ":")
	if !ok {
		return false // not a permission at all
	}
	for _, gr := range grants {
		if grantMatches(gr, res, act) {
			return true
		}
	}
	return false
}

// grantMatches applies one direct grant, with wildcards and implication, without allocating.
func grantMatches(grant, resource, action string) bool {
	gr, ga, ok := strings.Cut(grant, ":")
	if !ok || (gr != "*" && gr != resource) {
		return false
	}
	if ga == "*" || ga == action {
		return true
	}
	for _, a := range implied[ga] {
		if a == action {
			return true
		}
	}
	return false
}

// IsSuper reports whether roles include the super admin role.
func IsSuper(roles []string) bool { return slices.Contains(roles, SuperAdmin) }

// DefaultRoles is the built-in policy of DESIGN.md.
func DefaultRoles() map[string]Role {
	return map[string]Role{
		"user":   {Permissions: []string{"chat:write", "voice:write", "document:read"}},
		"editor": {Inherits: []string{"user"}, Permissions: []string{"document:write"}},
		"admin": {Inherits: []string{"editor"}, Permissions: []string{
			"admin:*", "document:*", "chat:admin", "voice:admin", "token:revoke"}},
		SuperAdmin: {},
	}
}
