package policy

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrCapReached means a concurrency cap is full; the error is a *CapError saying which.
var ErrCapReached = errors.New("policy: concurrency cap reached")

// CapError says which concurrency cap is full.
type CapError struct {
	Kind  string // "chat" or "voice"
	Level string // "user" or "tenant"
	Cap   int
}

func (e *CapError) Error() string {
	return fmt.Sprintf("at most %d open %s sessions per %s", e.Cap, e.Kind, e.Level)
}

// Is makes errors.Is(err, ErrCapReached) true.
func (e *CapError) Is(target error) bool { return target == ErrCapReached }

// LeaseRequest asks for one slot of kind ("chat", "voice") for a user of a tenant.
type LeaseRequest struct {
	Kind, Tenant, User string
	PerUser, PerTenant int // caps; 0 means no cap at that level
}

// Leases hands out concurrency slots. Release frees a slot; a slot whose holder died expires on
// its own.
type Leases interface {
	// Acquire takes a slot, or returns a *CapError (errors.Is ErrCapReached) when full.
	Acquire(ctx context.Context, req LeaseRequest) (release func(), err error)
}

// MemoryLeases counts slots in this process.
type MemoryLeases struct {
	mu     sync.Mutex
	counts map[string]int
}

// NewMemoryLeases returns in-process leases.
func NewMemoryLeases() *MemoryLeases { return &MemoryLeases{counts: map[string]int{}} }

// Acquire implements Leases.
func (m *MemoryLeases) Acquire(_ context.Context, req LeaseRequest) (func(), error) {
	uk := req.Kind + "|" + req.Tenant + "|u|" + req.User
	tk := req.Kind + "|" + req.Tenant + "|t"
	m.mu.Lock()
	defer m.mu.Unlock()
	if req.PerUser > 0 && m.counts[uk] >= req.PerUser {
		return nil, &CapError{req.Kind, "user", req.PerUser}
	}
	if req.PerTenant > 0 && m.counts[tk] >= req.PerTenant {
		return nil, &CapError{req.Kind, "tenant", req.PerTenant}
	}
	m.counts[uk]++
	m.counts[tk]++
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			for _, k := range []string{uk, tk} {
				if m.counts[k]--; m.counts[k] <= 0 {
					delete(m.counts, k)
				}
			}
		})
	}, nil
}
