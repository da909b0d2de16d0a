package policy

import (
	"context"
	"errors"
)

// ErrClaimed means the key an admission asked to claim is held by someone else, or the key
// the claim needs absent (Claim.Absent) exists.
var ErrClaimed = errors.New("policy: the claimed key is already held")

// Claim is a key that an admission takes only if nobody holds it, holds for as long as the
// admission (renewed with its concurrency slot, so it outlives a dead instance by at most the
// lease TTL) and deletes on release only if it still holds it. A chat stream claims its entry
// in the stream directory this way, so that announcing the stream costs no round trip of its
// own. The key must carry the tenant's hash tag (Tag), like the admission's other keys.
type Claim struct {
	Key, Value string
	// Absent, if set, is a key (with the same hash tag) that must not exist for the claim to be
	// taken: checked in the same step, so nothing can create it in between. A chat stream names
	// its replay log: a request ID whose log is kept is served from it, never generated again.
	Absent string
	// Conflict is the message of the 409 that a request gets when the key is held.
	Conflict string
}

// Ask is everything one admission takes for the caller (Charge's Tenant and User): a charge to
// rates and quota (possibly empty), a concurrency slot and a claim. An Admitter takes all of
// it or none.
type Ask struct {
	Charge
	Slot  *Slot  // nil: no concurrency slot
	Claim *Claim // nil: none
}

// Slot asks for one concurrency slot of a kind ("chat", "voice") under the caps given.
type Slot struct {
	Kind               string
	PerUser, PerTenant int // 0: no cap at that level
}

func (a *Ask) empty() bool {
	return len(a.Buckets) == 0 && a.Quota == 0 && a.Slot == nil && a.Claim == nil
}

// Release gives back what an admission holds. It returns once that is done, or ctx ends (then
// it is done later, or left to expire); calling it again does nothing.
type Release func(ctx context.Context)

// Admitter admits requests. A refusal by rate or quota is a verdict that is not Allowed; a full
// concurrency cap is a *CapError (errors.Is ErrCapReached); a held claim is ErrClaimed. On any
// refusal nothing was taken, and the Release is nil.
//
// Any other error means the store did not answer in time, and the caller lets the request go
// through (fair use fails open). A call that timed out may still have run, and taken the slot
// and the claim: the Release returned with such an error gives back whatever it may have
// taken, and the caller must call it when the request ends, as if it had been admitted.
type Admitter interface {
	Admit(ctx context.Context, a *Ask) (Verdict, Release, error)
}

// Compose is the Admitter made of a Limiter and Leases, either of which may be nil: in
// memory, within one process, where the two need no shared round trip. The slot is taken first
// and given back if the charge is refused, so a refusal costs nothing. Claims name Redis keys
// and are ignored: without Redis there is no other instance to tell.
func Compose(l Limiter, leases Leases) Admitter { return composed{l, leases} }

type composed struct {
	limiter Limiter
	leases  Leases
}

func (c composed) Admit(ctx context.Context, a *Ask) (Verdict, Release, error) {
	release := func() {}
	if a.Slot != nil && c.leases != nil {
		r, err := c.leases.Acquire(ctx, LeaseRequest{Kind: a.Slot.Kind, Tenant: a.Tenant, User: a.User,
			PerUser: a.Slot.PerUser, PerTenant: a.Slot.PerTenant})
		if err != nil {
			return Verdict{}, nil, err
		}
		release = r
	}
	v := Verdict{Allowed: true, Remaining: -1}
	if c.limiter != nil && (len(a.Buckets) > 0 || a.Quota > 0) {
		var err error
		if v, err = c.limiter.Allow(ctx, &a.Charge); err != nil || !v.Allowed {
			release()
			if err != nil {
				// The caller admits a request whose store failed; the slot is not held then.
				return Verdict{}, nil, err
			}
			return v, nil, nil
		}
	}
	return v, func(context.Context) { release() }, nil
}
