package policy

import "time"

// Revocation names the tokens a revocation reaches, always inside one tenant: a token by its
// ID (jti), or every token of a user issued before a whole second. It is the one rule that
// the revocation stores, the running chat streams and the live voice sessions all apply, on
// every instance: a tenant's user "1001" and another tenant's user "1001" are two users, and
// one jti in two tenants names two tokens.
type Revocation struct {
	TenantID string `json:"tenant_id"`
	TokenID  string `json:"token_id,omitempty"`
	UserID   string `json:"user_id,omitempty"`
	// Before is a unix second: the user's tokens issued (iat) before it are revoked. See
	// RevocationCutoff.
	Before int64 `json:"before,omitempty"`
}

// Covers reports whether the token tokenID of user in tenant, issued at iat, is revoked by v.
// Empty fields of v match nothing.
func (v *Revocation) Covers(tenant, user, tokenID string, iat time.Time) bool {
	if tenant != v.TenantID {
		return false
	}
	return v.TokenID != "" && tokenID == v.TokenID ||
		v.UserID != "" && user == v.UserID && IssuedBefore(iat, v.Before)
}

// RevocationCutoff is the cutoff of a user revocation made at now: the whole second after
// now's. A token's iat has whole seconds, so a token issued in now's second, before the
// revocation, has the same iat as one issued in that second after it; the cutoff refuses both,
// so that no token issued before a revocation survives it. The revoke endpoint answers only
// once the cutoff has begun (RevocationCutoff(now) - now later, at most a second), so a token
// issued after its answer — the login that follows a "log out everywhere" — is accepted. What
// gives is a token issued in the fraction of a second while the revocation is being made: it is
// refused, as one made with the revocation rather than after it. This holds when the issuer's
// clock agrees with the revocation store's (Redis's TIME with Redis); an issuer whose clock is
// behind by d has its tokens of the d after the answer refused too.
func RevocationCutoff(now time.Time) int64 { return now.Unix() + 1 }

// IssuedBefore reports whether a token issued at iat falls under a user revocation whose
// cutoff is before (a unix second): its iat, in whole seconds, is earlier. A token without
// iat cannot prove it came later, so it falls under every user revocation.
func IssuedBefore(iat time.Time, before int64) bool {
	return iat.IsZero() || iat.Unix() < before
}
