package main

import (
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"voicegate/auth"
)

// tokenWarning goes to stderr on every run: a shared HMAC secret proves nothing about a person.
const tokenWarning = "voicegate token: WARNING: for development and tests only, not for production identity: " +
	"anyone with JWT_SECRET can mint any identity. In production, identities come from your identity provider (JWT_JWKS_URL)."

// runToken is "voicegate token": it prints an HS256 token signed with JWT_SECRET for the given
// subject, roles, tenant and lifetime, with its claims where the gateway's JWT_*_CLAIM settings
// look for them.
func runToken(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("voicegate token", flag.ContinueOnError)
	sub := fs.String("sub", "dev-user", "subject: the user ID")
	roles := fs.String("roles", "user", "comma-separated roles (user, editor, admin, super_admin in the built-in policy)")
	tenant := fs.String("tenant", "", "tenant ID (empty: none)")
	username := fs.String("username", "", "user name (empty: none)")
	scopes := fs.String("scopes", "", "comma-separated direct permission grants, such as chat:admin")
	lifetime := fs.Duration("lifetime", time.Hour, "how long the token is valid (at most JWT_MAX_LIFETIME)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: JWT_SECRET=... voicegate token [flags]\n\n%s\n\nFlags:\n", tokenWarning)
		fs.PrintDefaults()
	}
	// The gateway settings that shape a token, so that a gateway configured the same way
	// accepts it.
	list := settingsNamed("JWT_SECRET", "JWT_ISSUER", "JWT_AUDIENCE", "JWT_MAX_LIFETIME",
		"JWT_USER_CLAIM", "JWT_USERNAME_CLAIM", "JWT_TENANT_CLAIM", "JWT_ROLES_CLAIM", "JWT_SCOPES_CLAIM")
	values := bindSettings(fs, list)
	typed, err := parseFlags(fs, args, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("token: unexpected argument %q", fs.Arg(0))
	}
	c := &config{}
	if err := applySettings(c, list, values, typed, getenv, nil); err != nil {
		return fmt.Errorf("token: %w", err)
	}
	fmt.Fprintln(stderr, tokenWarning)
	if c.JWTSecret == nil {
		return errors.New("token: JWT_SECRET is required: the token is signed with the gateway's HMAC secret (at least 32 bytes)")
	}
	switch {
	case *sub == "":
		return errors.New("token: -sub must not be empty")
	case *lifetime <= 0 || *lifetime > c.JWTMaxLifetime:
		return fmt.Errorf("token: -lifetime %v: want more than 0 and at most JWT_MAX_LIFETIME (%v)", *lifetime, c.JWTMaxLifetime)
	}
	tok, err := mintToken(c, mintOptions{sub: *sub, username: *username, tenant: *tenant,
		roles: splitList(*roles), scopes: splitList(*scopes), lifetime: *lifetime})
	if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

type mintOptions struct {
	sub, username, tenant string
	roles, scopes         []string
	lifetime              time.Duration
}

// mintToken signs an HS256 token for c's secret, issuer and audience, with each identity claim
// at the first path of its JWT_*_CLAIM setting.
func mintToken(c *config, o mintOptions) (string, error) {
	claims := c.Claims
	if claims.UserID == nil {
		claims.UserID = auth.MustClaimPaths(auth.DefaultUserClaim)
	}
	now := time.Now()
	b := jwt.NewBuilder().Subject(o.sub).JwtID(rand.Text()).IssuedAt(now).Expiration(now.Add(o.lifetime))
	if c.JWTIssuer != "" {
		b = b.Issuer(c.JWTIssuer)
	}
	if c.JWTAudience != "" {
		b = b.Audience([]string{c.JWTAudience})
	}
	payload := map[string]any{}
	put := func(paths []auth.ClaimPath, def string, v any) {
		if paths == nil {
			paths = auth.MustClaimPaths(def)
		}
		setClaim(payload, paths[0], v)
	}
	if claims.UserID[0].String() != "sub" {
		setClaim(payload, claims.UserID[0], o.sub)
	}
	if o.username != "" {
		put(claims.Username, auth.DefaultUsernameClaim, o.username)
	}
	if o.tenant != "" {
		put(claims.TenantID, auth.DefaultTenantClaim, o.tenant)
	}
	if len(o.roles) > 0 {
		put(claims.Roles, auth.DefaultRolesClaim, o.roles)
	}
	if len(o.scopes) > 0 {
		put(claims.Scopes, auth.DefaultScopesClaim, o.scopes)
	}
	for k, v := range payload {
		b = b.Claim(k, v)
	}
	tok, err := b.Build()
	if err != nil {
		return "", fmt.Errorf("build token: %w", err)
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.HS256, c.JWTSecret))
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return string(signed), nil
}

// setClaim puts v at path p in payload. A namespaced claim (a URL, as Auth0 wants them) is one
// key; any other path is nested objects, the way Keycloak's realm_access.roles is. The
// verifier's longest-key-first lookup finds either.
func setClaim(payload map[string]any, p auth.ClaimPath, v any) {
	if strings.Contains(p.String(), "://") {
		payload[p.String()] = v
		return
	}
	segs := p.Segments()
	m := payload
	for _, s := range segs[:len(segs)-1] {
		next, ok := m[s].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[s] = next
		}
		m = next
	}
	m[segs[len(segs)-1]] = v
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
