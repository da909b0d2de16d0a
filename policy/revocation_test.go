package policy_test

import (
	"testing"
	"time"

	"voicegate/policy"
)

// TestRevocationCovers: a revocation reaches its own tenant only, a token by its ID or a user's
// tokens issued (in whole seconds) before its cutoff; empty fields reach nothing.
func TestRevocationCovers(t *testing.T) {
	const s = 1_900_000_000
	sec := func(ms int64) time.Time { return time.UnixMilli(s*1000 + ms) }
	user := policy.Revocation{TenantID: "t-a", UserID: "1001", Before: policy.RevocationCutoff(sec(100))}
	jti := policy.Revocation{TenantID: "t-a", TokenID: "j-1"}
	tests := []struct {
		name                  string
		v                     policy.Revocation
		tenant, user, tokenID string
		iat                   time.Time
		want                  bool
	}{
		{"user: a second before", user, "t-a", "1001", "x", sec(-1000), true},
		{"user: same second, before the revocation", user, "t-a", "1001", "x", sec(50), true},
		{"user: same second, after the revocation", user, "t-a", "1001", "x", sec(600), true},
		{"user: the next second", user, "t-a", "1001", "x", sec(1000), false},
		{"user: a fractional iat of the next second", user, "t-a", "1001", "x", sec(1001), false},
		{"user: no iat", user, "t-a", "1001", "x", time.Time{}, true},
		{"user: another tenant's 1001", user, "t-b", "1001", "x", sec(-1000), false},
		{"user: no tenant's 1001", user, "", "1001", "x", sec(-1000), false},
		{"user: another user", user, "t-a", "1002", "x", sec(-1000), false},
		{"jti", jti, "t-a", "anyone", "j-1", sec(0), true},
		{"jti: another tenant's", jti, "t-b", "anyone", "j-1", sec(0), false},
		{"jti: another", jti, "t-a", "anyone", "j-2", sec(0), false},
		{"empty: no token ID matches", policy.Revocation{TenantID: "t-a"}, "t-a", "", "", time.Time{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.v.Covers(tt.tenant, tt.user, tt.tokenID, tt.iat); got != tt.want {
				t.Errorf("Covers(%q, %q, %q, %v) = %v, want %v", tt.tenant, tt.user, tt.tokenID, tt.iat, got, tt.want)
			}
		})
	}
	if c := policy.RevocationCutoff(sec(0)); c != s+1 {
		t.Errorf("cutoff of a revocation on a whole second = %d, want the next (%d)", c, s+1)
	}
	if c := policy.RevocationCutoff(sec(999)); c != s+1 {
		t.Errorf("cutoff of a revocation at .999 = %d, want the next second (%d)", c, s+1)
	}
}
