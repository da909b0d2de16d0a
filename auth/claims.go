package auth

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ClaimPath names a claim inside a token's payload: object keys separated by dots, such as
// "realm_access.roles". Real identity providers also use keys that contain dots themselves
// (Auth0's namespaced claims, "https://example.com/roles"; a Keycloak client named "my.app" in
// "resource_access.my.app.roles"), so a path is not simply split: at each level the longest run
// of the remaining segments that is a key of that object is tried first, then shorter runs,
// until the rest of the path resolves. "https://example.com/roles" therefore finds that one
// top-level key, and "resource_access.my.app.roles" finds the client "my.app".
type ClaimPath struct {
	raw  string
	segs []string
}

// Bounds on a path, which comes from configuration: they keep the longest-key search small.
const (
	maxClaimPathLen  = 256
	maxClaimPathSegs = 16
)

// ParseClaimPath parses one dotted path. It refuses empty paths and segments, spaces, commas
// (which separate paths in a list) and control characters.
func ParseClaimPath(s string) (ClaimPath, error) {
	switch {
	case s == "":
		return ClaimPath{}, errors.New("empty claim path")
	case len(s) > maxClaimPathLen:
		return ClaimPath{}, fmt.Errorf("claim path longer than %d bytes", maxClaimPathLen)
	case !printableASCII(s) || strings.Contains(s, ","):
		return ClaimPath{}, fmt.Errorf("claim path %q may contain neither spaces, commas nor control characters", s)
	}
	segs := strings.Split(s, ".")
	if len(segs) > maxClaimPathSegs {
		return ClaimPath{}, fmt.Errorf("claim path %q has more than %d segments", s, maxClaimPathSegs)
	}
	if slices.Contains(segs, "") {
		return ClaimPath{}, fmt.Errorf("claim path %q has an empty segment (a leading, trailing or double dot)", s)
	}
	return ClaimPath{raw: s, segs: segs}, nil
}

// ParseClaimPaths parses a comma-separated list of paths; blanks around commas are ignored.
func ParseClaimPaths(s string) ([]ClaimPath, error) {
	var out []ClaimPath
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		p, err := ParseClaimPath(part)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, errors.New("no claim path given")
	}
	return out, nil
}

// MustClaimPaths is ParseClaimPaths for constants; it panics on a bad path.
func MustClaimPaths(s string) []ClaimPath {
	ps, err := ParseClaimPaths(s)
	if err != nil {
		panic(err)
	}
	return ps
}

// String returns the path as written.
func (p ClaimPath) String() string { return p.raw }

// Segments returns the path's dot-separated parts (for building a token that carries the claim
// at this path).
func (p ClaimPath) Segments() []string { return slices.Clone(p.segs) }

// Lookup finds the path in a decoded payload.
func (p ClaimPath) Lookup(payload map[string]any) (any, bool) {
	if len(p.segs) == 0 {
		return nil, false
	}
	return find(payload, p.segs)
}

func find(v any, segs []string) (any, bool) {
	if len(segs) == 0 {
		return v, true
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, false
	}
	for n := len(segs); n >= 1; n-- {
		child, ok := obj[strings.Join(segs[:n], ".")]
		if !ok {
			continue
		}
		if got, ok := find(child, segs[n:]); ok {
			return got, true
		}
	}
	return nil, false
}

// Claims says where a Verifier finds the identity in a token. Each field is a list of paths; a
// nil field means its default.
type Claims struct {
	// UserID: the first path present (and not empty) wins; nil means user_id, then sub.
	UserID []ClaimPath
	// Username: the first path present wins; nil means username.
	Username []ClaimPath
	// TenantID: the first path present wins; nil means tenant_id.
	TenantID []ClaimPath
	// Roles: the roles of every path present are merged (Keycloak keeps realm and client roles
	// apart); nil means roles.
	Roles []ClaimPath
	// Scopes: direct permission grants, merged from every path present; nil means scopes, scope
	// and permissions.
	Scopes []ClaimPath
}

// Default claim paths.
const (
	DefaultUserClaim     = "user_id,sub"
	DefaultUsernameClaim = "username"
	DefaultTenantClaim   = "tenant_id"
	DefaultRolesClaim    = "roles"
	DefaultScopesClaim   = "scopes,scope,permissions"
)

// withDefaults fills the nil fields of c.
func (c Claims) withDefaults() Claims {
	def := func(ps *[]ClaimPath, s string) {
		if *ps == nil {
			*ps = MustClaimPaths(s)
		}
	}
	def(&c.UserID, DefaultUserClaim)
	def(&c.Username, DefaultUsernameClaim)
	def(&c.TenantID, DefaultTenantClaim)
	def(&c.Roles, DefaultRolesClaim)
	def(&c.Scopes, DefaultScopesClaim)
	return c
}

// first returns the first of paths present in payload as a string: a JSON string, or a number
// as written (some systems number their users). An empty string counts as absent; any other
// type refuses the token, since guessing would mis-identify the caller.
func first(payload map[string]any, paths []ClaimPath) (string, error) {
	for _, p := range paths {
		v, ok := p.Lookup(payload)
		if !ok || v == nil {
			continue
		}
		switch v := v.(type) {
		case string:
			if v != "" {
				return v, nil
			}
		case json.Number:
			return v.String(), nil
		default:
			return "", invalid("claim %s is not a string", p)
		}
	}
	return "", nil
}

// list merges the values of every path present in payload: arrays of strings, or a string of
// space-separated values (as OAuth's "scope" and Azure AD's "scp" are). Duplicates are dropped,
// first occurrence kept.
func list(payload map[string]any, paths []ClaimPath) ([]string, error) {
	var out []string
	add := func(s string) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, p := range paths {
		v, ok := p.Lookup(payload)
		if !ok || v == nil {
			continue
		}
		switch v := v.(type) {
		case string:
			for _, f := range strings.Fields(v) {
				add(f)
			}
		case []any:
			for _, e := range v {
				s, ok := e.(string)
				if !ok {
					return nil, invalid("claim %s is not a list of strings", p)
				}
				add(s)
			}
		default:
			return nil, invalid("claim %s is neither a list of strings nor a string", p)
		}
	}
	return out, nil
}
