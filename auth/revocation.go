package auth

import (
	"context"
	"sync"
	"time"
)

// Revocations is where revoked tokens are recorded: in memory for one instance, in Redis for
// several. Every method takes a context whose deadline bounds the call.
type Revocations interface {
	// Revoked reports whether id's token is revoked: its jti, or all of its user's tokens issued
	// before some time.
	Revoked(ctx context.Context, id *Identity) (bool, error)
	// RevokeToken revokes a jti until the given time (the token's expiry).
	RevokeToken(ctx context.Context, jti string, until time.Time) error
	// RevokeUser revokes every token of userID issued before the given time.
	RevokeUser(ctx context.Context, userID string, before time.Time) error
}

// revokedBefore reports whether a token issued at iat falls under a user revocation at before.
// A token without iat cannot prove it came later, so it is revoked too.
func revokedBefore(iat, before time.Time) bool {
	return iat.IsZero() || iat.Before(before)
}

// MemoryRevocations keeps revocations in this process only: right for a single instance, or
// tests. Entries are dropped once they can no longer matter.
type MemoryRevocations struct {
	mu       sync.RWMutex
	tokens   map[string]time.Time // jti → revoked until
	users    map[string]time.Time // user → tokens issued before this are revoked
	lifetime time.Duration
	now      func() time.Time
	puts     int
}

// NewMemoryRevocations returns an in-memory store on the clock now (nil means time.Now).
// maxLifetime is the longest a token lives: a user revocation is kept that long.
func NewMemoryRevocations(maxLifetime time.Duration, now func() time.Time) *MemoryRevocations {
	if now == nil {
		now = time.Now
	}
	return &MemoryRevocations{tokens: map[string]time.Time{}, users: map[string]time.Time{},
		lifetime: maxLifetime, now: now}
}

// NeverBlocks tells the middleware that lookups need no time budget.
func (m *MemoryRevocations) NeverBlocks() bool { return true }

// Revoked implements Revocations.
func (m *MemoryRevocations) Revoked(_ context.Context, id *Identity) (bool, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if until, ok := m.tokens[id.TokenID]; ok && m.now().Before(until) {
		return true, nil
	}
	if before, ok := m.users[id.UserID]; ok && revokedBefore(id.IssuedAt, before) {
		return true, nil
	}
	return false, nil
}

// RevokeToken implements Revocations.
func (m *MemoryRevocations) RevokeToken(_ context.Context, jti string, until time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tokens[jti] = until
	m.sweepLocked()
	return nil
}

// RevokeUser implements Revocations.
func (m *MemoryRevocations) RevokeUser(_ context.Context, userID string, before time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if before.After(m.users[userID]) {
		m.users[userID] = before
	}
	m.sweepLocked()
	return nil
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
		if now.Sub(before) > m.lifetime {
			delete(m.users, k)
		}
	}
}
