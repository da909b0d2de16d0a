package auth

import (
	"crypto/sha256"
	"sync"
	"time"
)

// tokenCache remembers verified tokens, keyed by a SHA-256 of the token (never the token
// itself), so a repeat request skips parsing and the signature check. Entries expire with their
// token. It never skips the revocation check, which happens after it.
type tokenCache struct {
	mu      sync.RWMutex
	entries map[[sha256.Size]byte]*Identity
	max     int
}

func newTokenCache(max int) *tokenCache {
	if max <= 0 {
		max = 10000
	}
	return &tokenCache{entries: make(map[[sha256.Size]byte]*Identity, min(max, 1024)), max: max}
}

func (c *tokenCache) get(key [sha256.Size]byte, now time.Time) *Identity {
	c.mu.RLock()
	id := c.entries[key]
	c.mu.RUnlock()
	if id == nil || !now.Before(id.ExpiresAt) {
		return nil
	}
	return id
}

func (c *tokenCache) put(key [sha256.Size]byte, id *Identity, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= c.max {
		// Full: drop what has expired, then, if need be, an arbitrary eighth (map order is
		// random), so a flood of distinct tokens costs bounded memory.
		for k, e := range c.entries {
			if !now.Before(e.ExpiresAt) {
				delete(c.entries, k)
			}
		}
		for k := range c.entries {
			if len(c.entries) < c.max-c.max/8 {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[key] = id
}
