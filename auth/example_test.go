package auth_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"voicegate/auth"
)

func ExampleVerifier() {
	// The HMAC secret and a token made by PyJWT (testdata/auth/tokens.json, "user2"):
	// {"user_id":"u-456","jti":"jti-user2","iat":1900000000,"exp":1900003600,"roles":["user"]}.
	secret := []byte("fixture-hmac-secret-0123456789abcdef0123")
	const token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" +
		".eyJ1c2VyX2lkIjoidS00NTYiLCJqdGkiOiJqdGktdXNlcjIiLCJpYXQiOjE5MDAwMDAwMDAsImV4cCI6MTkwMDAwMzYwMCwicm9sZXMiOlsidXNlciJdfQ" +
		".LtZTBGbNU81RjS_rzxLns85DkTJ8KaeJdbAHnBFkAE0"

	verifierAt := func(unix int64) *auth.Verifier {
		v, err := auth.NewVerifier(auth.VerifierOptions{
			HMACSecret: secret,
			Leeway:     30 * time.Second,
			Now:        func() time.Time { return time.Unix(unix, 0) }, // a fixed clock, for the example
		})
		if err != nil {
			panic(err)
		}
		return v
	}

	id, err := verifierAt(1900000100).Verify(context.Background(), token)
	if err != nil {
		fmt.Println("refused:", err)
		return
	}
	fmt.Println("user:", id.UserID, "roles:", id.Roles, "token:", id.TokenID)
	fmt.Println("expires:", id.ExpiresAt.UTC().Format(time.RFC3339))

	// Two hours later the same token is refused, with an error callers can branch on.
	_, err = verifierAt(1900000100+7200).Verify(context.Background(), token)
	fmt.Println("later:", err, "| expired:", errors.Is(err, auth.ErrTokenExpired))
	// Output:
	// user: u-456 roles: [user] token: jti-user2
	// expires: 2030-03-17T18:46:40Z
	// later: token expired: token expired | expired: true
}

func ExampleClaimPath() {
	// Claims shaped like a Keycloak token's: realm roles, and roles of a client whose name
	// contains a dot.
	payload := map[string]any{
		"realm_access":    map[string]any{"roles": []any{"user"}},
		"resource_access": map[string]any{"voicegate.web": map[string]any{"roles": []any{"admin"}}},
		// Auth0 style: one key that is a URL, dots and all.
		"https://example.com/tenant": "acme",
	}
	paths, err := auth.ParseClaimPaths("realm_access.roles, resource_access.voicegate.web.roles, https://example.com/tenant")
	if err != nil {
		panic(err)
	}
	for _, p := range paths {
		v, ok := p.Lookup(payload)
		fmt.Println(p, "→", v, ok)
	}
	// Output:
	// realm_access.roles → [user] true
	// resource_access.voicegate.web.roles → [admin] true
	// https://example.com/tenant → acme true
}
