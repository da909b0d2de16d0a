package voice

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/proxy"
)

// Governance: every session's audio is charged to its user's and tenant's daily quotas as it
// arrives, frame by frame, both directions, against seconds reserved ahead. A session holds a
// reservation taken from the meter (Redis) in advance, Options.Reservation of audio (2 s) at a
// time: a frame is relayed only if what the session holds covers it, and once less than half a
// reservation is left the next one is asked for, in a goroutine of its own, so that the relay
// never waits for Redis while audio flows at up to the pace bound. A reservation is granted only
// as far as the user's and the tenant's quotas leave room for it, atomically across every
// instance; when the meter grants nothing more and what is held is spent, the session gets an
// error QUOTA_EXCEEDED and close 4429, and the frame that found nothing left is not relayed. So
// what a session relays exceeds its quota by at most one reservation (by nothing at all while
// the meter answers). As it ends, the session is settled: charged exactly what it relayed, and
// what it held beyond that given back.
//
// Each charge carries the session's whole use and holding so far, not an increment, so a retried
// charge never costs twice. An instance that dies leaves its sessions charged what they held:
// at most one reservation more than they relayed.
//
// When the meter cannot answer in time, the session goes on without a reservation (fair use
// fails open, as rate limits do), and a reservation is asked again at most every second. What
// it relays meanwhile is bounded by the pace bound (pace.go: client audio at most
// Options.Pace times real time, beyond a burst) and by voice_max_session, and all of it is
// charged by the next reservation the meter grants, which ends the session 4429 if that puts it
// over its quota.
//
// A session that would start with a quota used up is refused before the upgrade (429
// QUOTA_EXCEEDED); one that reaches voice_max_session gets an error SESSION_TOO_LONG and close
// 4408, on the handler's clock (timers.go).

// Error codes of governance, in error messages and (QUOTA_EXCEEDED) HTTP answers.
const (
	CodeQuotaExceeded  = "QUOTA_EXCEEDED"
	CodeSessionTooLong = "SESSION_TOO_LONG"
)

// Close codes of governance.
const (
	CloseQuotaExceeded  websocket.StatusCode = 4429
	CloseSessionTooLong websocket.StatusCode = 4408
)

// reserveRetry spaces the reservations a session asks for while the meter does not answer.
const reserveRetry = time.Second

// governor is a session's quota state: what it used and what it holds, atomics that both relay
// goroutines read and add to, and whether it awaits a reservation, under mu.
type governor struct {
	limits  policy.VoiceLimits
	metered bool          // there is a quota and a meter
	size    time.Duration // of a reservation

	use  atomic.Int64 // ns of audio relayed (or about to be), both ways: what the quotas count
	held atomic.Int64 // ns the quotas were charged for the session so far: its use and more ahead

	open    atomic.Bool  // the meter did not answer the last reservation: audio goes on without one
	retryAt atomic.Int64 // unix ns before which an open session asks no reservation
	capped  atomic.Bool  // the last reservation was granted short: the quotas leave nothing beyond held

	mu      sync.Mutex
	pending chan struct{} // closed when the reservation asked for is answered; nil when none is
}

// admitQuota refuses, with 429 QUOTA_EXCEEDED, a session whose user or tenant has no audio left
// today, and otherwise sets g up. A meter that cannot answer lets the session in without a
// reservation (fail open).
func (h *Handler) admitQuota(w http.ResponseWriter, r *http.Request, user, tenant string, g *governor) bool {
	var lim policy.VoiceLimits
	if h.o.Limits != nil {
		lim = h.o.Limits(tenant)
	}
	g.limits, g.size = lim, h.o.Reservation
	g.metered = h.o.Meter != nil && lim.Metered()
	if !g.metered {
		return true
	}
	u := &policy.AudioUse{Tenant: tenant, User: user}
	ctx, cancel := context.WithTimeout(r.Context(), h.o.ChargeBudget)
	err := h.o.Meter.Charge(ctx, []*policy.AudioUse{u})
	cancel()
	if err != nil {
		h.o.Log.Warn("the audio quota could not be checked; the session goes ahead", "err", proxy.Describe(err))
		g.open.Store(true)
		return true
	}
	if left, bounded := u.Remaining(lim); bounded && left <= 0 {
		retry := policy.RetryTomorrow(time.Now())
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusTooManyRequests, Code: CodeQuotaExceeded,
			Message: "the daily voice audio quota is used up",
			Header:  http.Header{"Retry-After": {strconv.Itoa(int(retry.Seconds()) + 1)}}})
		return false
	}
	return true
}

// govern holds s to its maximum length at the clock's tick.
func (s *session) govern(now time.Time) {
	if m := s.gov.limits.MaxSession; m > 0 && now.Sub(s.start) >= m {
		s.end(ending{code: CloseSessionTooLong, errCode: CodeSessionTooLong,
			reason: "the session reached its maximum length of " + m.String()})
	}
}

// spend charges d of audio, in either direction, to what s holds, and reports whether the frame
// may be relayed. It costs a few atomic operations and allocates nothing while the session holds
// enough; once less than half a reservation is left it asks for the next one without waiting.
func (s *session) spend(d time.Duration) bool {
	g := &s.gov
	if !g.metered {
		return true
	}
	for {
		use, held := g.use.Load(), g.held.Load()
		after := use + int64(d)
		if after > held && !g.open.Load() {
			return s.spendWaiting(d)
		}
		if g.use.CompareAndSwap(use, after) {
			if held-after < int64(g.size/2) && !g.capped.Load() {
				s.reserve(0)
			}
			return true
		}
	}
}

// spendWaiting is spend for a frame that what s holds does not cover: it waits, within
// ChargeBudget, for a reservation that does. The relay waits for Redis only here: at the quota,
// or when audio comes faster than reservations. A meter that does not answer in time lets the
// frame through (fail open); one that grants nothing more ends the session 4429, and the frame
// is not relayed.
func (s *session) spendWaiting(d time.Duration) bool {
	g := &s.gov
	late := time.NewTimer(s.h.o.ChargeBudget)
	defer late.Stop()
	for {
		if s.ended.Load() {
			return false
		}
		if answered := s.reserve(d); answered != nil {
			select {
			case <-answered:
			case <-s.ending:
				return false
			case <-late.C:
				g.use.Add(int64(d))
				return true
			}
		}
		use, held := g.use.Load(), g.held.Load()
		switch {
		case use+int64(d) <= held || g.open.Load():
			if g.use.CompareAndSwap(use, use+int64(d)) {
				return true
			}
		case g.capped.Load():
			s.end(ending{code: CloseQuotaExceeded, errCode: CodeQuotaExceeded,
				reason: "the daily voice audio quota is used up"})
			return false
		}
	}
}

// reserve asks the meter, in a goroutine of its own, for the session's next reservation — enough
// to cover need beyond its use, and at least a reservation — unless one is asked for already.
// It returns a channel closed once the reservation is answered, or nil when none is asked: the
// session has ended, or the meter did not answer lately.
func (s *session) reserve(need time.Duration) <-chan struct{} {
	g := &s.gov
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.pending != nil {
		return g.pending
	}
	if s.ended.Load() || g.open.Load() && time.Now().UnixNano() < g.retryAt.Load() {
		return nil
	}
	use := time.Duration(g.use.Load())
	u := &policy.AudioUse{Tenant: s.info.TenantID, User: s.info.UserID, Session: s.info.SessionID,
		Used: use, Hold: use + max(need, g.size), Limits: g.limits}
	g.pending = make(chan struct{})
	go s.reserveNow(u, g.pending)
	return g.pending
}

// reserveNow takes the reservation u asked for by reserve, bounded by ChargeBudget.
func (s *session) reserveNow(u *policy.AudioUse, answered chan struct{}) {
	g := &s.gov
	ctx, cancel := context.WithTimeout(context.Background(), s.h.o.ChargeBudget)
	err := s.h.o.Meter.Charge(ctx, []*policy.AudioUse{u})
	cancel()
	if err != nil {
		g.retryAt.Store(time.Now().Add(reserveRetry).UnixNano())
		g.open.Store(true)
		s.h.chargeFailed(err)
	} else {
		g.raise(u.Held)
		g.capped.Store(u.Held < u.Hold)
		g.open.Store(false)
	}
	g.mu.Lock()
	g.pending = nil
	g.mu.Unlock()
	close(answered)
}

// raise notes that the session is charged held in all: never less than before, but as it is
// settled.
func (g *governor) raise(held time.Duration) {
	for {
		old := g.held.Load()
		if int64(held) <= old || g.held.CompareAndSwap(old, int64(held)) {
			return
		}
	}
}

// chargeWarnEvery spaces the log lines of failed charges: a store that is down fails every
// session's every reservation.
const chargeWarnEvery = 10 * time.Second

func (h *Handler) chargeFailed(err error) {
	now := time.Now().UnixNano()
	last := h.chargeWarned.Load()
	if now-last < int64(chargeWarnEvery) || !h.chargeWarned.CompareAndSwap(last, now) {
		return
	}
	h.o.Log.Warn("reserving voice audio failed; sessions go on, and are charged once the meter answers",
		"err", proxy.Describe(err))
}

// settle charges s exactly what it relayed, as it ends, and gives back what it held beyond
// that; bounded by ChargeBudget, after the reservation in flight, if any, is answered (bounded
// too). A session that cannot be settled stays charged what it held.
func (s *session) settle() {
	g := &s.gov
	if !g.metered {
		return
	}
	g.mu.Lock()
	pending := g.pending
	g.mu.Unlock()
	if pending != nil {
		<-pending
	}
	u := &policy.AudioUse{Tenant: s.info.TenantID, User: s.info.UserID, Session: s.info.SessionID,
		Used: time.Duration(g.use.Load()), Final: true, Limits: g.limits}
	ctx, cancel := context.WithTimeout(context.Background(), s.h.o.ChargeBudget)
	defer cancel()
	if err := s.h.o.Meter.Charge(ctx, []*policy.AudioUse{u}); err != nil {
		s.h.o.Log.Warn("settling a voice session's audio failed; it stays charged what it held",
			"session_id", s.info.SessionID, "err", proxy.Describe(err))
		return
	}
	g.held.Store(int64(u.Held))
}
