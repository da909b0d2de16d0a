package auth

import (
	"context"
	"sync"
	"time"

	"voicegate/policy"
)

// Revocations is where revoked tokens are recorded: in memory for one instance, in Redis for
// several. A revocation belongs to a tenant (policy.Revocation): the same user ID or jti in
// another tenant is another user's, untouched. Every method takes a context whose deadline
// bounds the call.
type Revocations interface {
	// Revoked reports whether id's token is revoked: its jti, or all of its user's tokens issued
	// before some second, in id's tenant.
	Revoked(ctx context.Context, id *Identity) (bool, error)
	// RevokeToken revokes the jti of tenant until the given time (the token's expiry).
	RevokeToken(ctx context.Context, tenant, jti string, until time.Time) error
	// RevokeUser revokes every token of userID in tenant issued up to now, on the store's clock
	// (policy.RevocationCutoff), and returns the cutoff.
	RevokeUser(ctx context.Context, tenant, userID string) (Cutoff, error)
}

// Cutoff is what a user revocation reaches: the user's tokens whose iat is before Before, a
// whole second. Left is how long after the revocation the store's clock reaches Before: until
// then a token issued now would still have an iat before it.
type Cutoff struct {
	Before time.Time
	Left   time.Duration
}

// cutoffAt is the cutoff of a user revocation made at now.
func cutoffAt(now time.Time) Cutoff {
	before := time.Unix(policy.RevocationCutoff(now), 0)
	return Cutoff{Before: before, Left: before.Sub(now)}
}

// MemoryRevocations keeps revocations in this process only: right for a single instance, or
// tests. Entries are dropped once they can no longer matter.
type MemoryRevocations struct {
	mu       sync.RWMutex
	tokens   map[scoped]time.Time // (tenant, jti) → revoked until
	users    map[scoped]int64     // (tenant, user) → tokens issued before this unix second are revoked
	lifetime time.Duration
	now      func() time.Time
	puts     int
}

// scoped is an ID within its tenant.
type scoped struct{ tenant, id string }

// NewMemoryRevocations returns an in-memory store on the clock now (nil means time.Now).
// maxLifetime is the longest a token lives: a user revocation is kept that long.
func NewMemoryRevocations(maxLifetime time.Duration, now func() time.Time) *MemoryRevocations {
	if now == nil {
		now = time.Now
	}
	return &MemoryRevocations{tokens: map[scoped]time.Time{}, users: map[scoped]int64{},
		lifetime: maxLifetime, now: now}
}

// NeverBlocks tells the middleware that lookups need no time budget.
func (m *MemoryRevocations) NeverBlocks() bool { return true }

// Revoked implements Revocations.
func (m *MemoryRevocations) Revoked(_ context.Context, id *Identity) (bool, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if until, ok := m.tokens[scoped{id.TenantID, id.TokenID}]; ok && m.now().Before(until) {
		return true, nil
	}
	if before, ok := m.users[scoped{id.TenantID, id.UserID}]; ok && policy.IssuedBefore(id.IssuedAt, before) {
		return true, nil
	}
	return false, nil
}

// RevokeToken implements Revocations.
func (m *MemoryRevocations) RevokeToken(_ context.Context, tenant, jti string, until time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tokens[scoped{tenant, jti}] = until
	m.sweepLocked()
	return nil
}

// RevokeUser implements Revocations.
func (m *MemoryRevocations) RevokeUser(_ context.Context, tenant, userID string) (Cutoff, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := cutoffAt(m.now())
	k := scoped{tenant, userID}
	if before := c.Before.Unix(); before > m.users[k] {
		m.users[k] = before
	}
	m.sweepLocked()
	return c, nil
}

// sweepLocked drops expired entries now and then, so the maps stay bounded by live tokens.
func (m *MemoryRevocations) sweepLocked() {
	m.puts++
	if m.puts%256 != 0 {
		return
	}
	now := m.now()
	for k, until := range m.tokens {
		if !now.Before(until) {
			delete(m.tokens, k)
		}
	}
	for k, before := range m.users {
		if now.Sub(time.Unix(before, 0)) > m.lifetime {
			delete(m.users, k)
		}
	}
}
