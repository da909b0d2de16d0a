package voice

import (
	"context"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/proxy"
)

// Governance: every session's audio is charged to its user's and tenant's daily quotas while it
// runs, in increments of Options.ChargeInterval, by the handler's one clock (timers.go), all
// sessions due in one batch; and once more as it ends, for exactly what it used. A charge
// carries the session's whole use so far, not an increment, so a retried or repeated charge
// never costs twice, and an instance that dies loses at most the increment since its last
// charge. Between charges the clock holds each session to what its last charge said was left,
// and to the policy's maximum session length.
//
// A session that would start with a quota used up is refused before the upgrade (429
// QUOTA_EXCEEDED); one that crosses a quota gets an error QUOTA_EXCEEDED and close 4429, one
// that reaches voice_max_session an error SESSION_TOO_LONG and close 4408. When the meter
// cannot answer in time, sessions go on (fair use fails open, as rate limits do) and the use
// is charged by a later increment.

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

// governor is a session's quota state. The clock goroutine owns it, but for charged, which the
// session's end and its live detail read too.
type governor struct {
	limits     policy.VoiceLimits
	metered    bool          // there is a quota and a meter
	bounded    bool          // the last charge said how much is left
	left       time.Duration // what the last charge said is left, beyond charged
	lastCharge time.Time
	charged    atomic.Int64 // ns of audio charged so far
}

// used is the audio the session's quotas count: both directions.
func (s *session) used() time.Duration {
	return s.m.audio(s.n.audioIn.Load(), &s.m.estIn) + s.m.audio(s.n.audioOut.Load(), &s.m.estOut)
}

// admitQuota refuses, with 429 QUOTA_EXCEEDED, a session whose user or tenant has no audio left
// today, and otherwise sets g up: the session's limits, and what it may use until its first
// charge.
func (h *Handler) admitQuota(w http.ResponseWriter, r *http.Request, user, tenant string, g *governor) bool {
	var lim policy.VoiceLimits
	if h.o.Limits != nil {
		lim = h.o.Limits(tenant)
	}
	g.limits = lim
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
		return true
	}
	g.left, g.bounded = u.Remaining(lim)
	if g.bounded && g.left <= 0 {
		retry := policy.RetryTomorrow(time.Now())
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusTooManyRequests, Code: CodeQuotaExceeded,
			Message: "the daily voice audio quota is used up",
			Header:  http.Header{"Retry-After": {strconv.Itoa(int(retry.Seconds()) + 1)}}})
		return false
	}
	return true
}

// govern holds s to its limits at the clock's tick, and says whether its quota is due a charge.
func (s *session) govern(now time.Time) (due bool) {
	g := &s.gov
	if m := g.limits.MaxSession; m > 0 && now.Sub(s.start) >= m {
		s.end(ending{code: CloseSessionTooLong, errCode: CodeSessionTooLong,
			reason: "the session reached its maximum length of " + m.String()})
		return false
	}
	if !g.metered {
		return false
	}
	if s.overQuota() {
		return false
	}
	return now.Sub(g.lastCharge) >= s.h.o.ChargeInterval
}

// overQuota ends s if it used what its last charge said was left.
func (s *session) overQuota() bool {
	g := &s.gov
	if g.bounded && s.used()-time.Duration(g.charged.Load()) >= g.left {
		s.end(ending{code: CloseQuotaExceeded, errCode: CodeQuotaExceeded,
			reason: "the daily voice audio quota is used up"})
		return true
	}
	return false
}

// chargeWarnEvery spaces the log lines of failed charges: a store that is down fails every tick.
const chargeWarnEvery = 10 * time.Second

// charge charges every session in batch in one call and holds each to what is left.
func (t *timers) charge(ctx context.Context, now time.Time, batch []*session) {
	if len(batch) == 0 {
		return
	}
	uses := make([]*policy.AudioUse, len(batch))
	for i, s := range batch {
		uses[i] = &policy.AudioUse{Tenant: s.info.TenantID, User: s.info.UserID, Session: s.info.SessionID, Used: s.used()}
	}
	if err := t.h.o.Meter.Charge(ctx, uses); err != nil && now.Sub(t.chargeWarned) >= chargeWarnEvery {
		t.chargeWarned = now
		t.h.o.Log.Warn("charging voice audio failed; a later increment charges it", "sessions", len(batch),
			"err", proxy.Describe(err))
	}
	for i, s := range batch {
		u := uses[i]
		if u.Err != nil {
			continue
		}
		g := &s.gov
		g.lastCharge = now
		g.charge(u.Used)
		g.left, g.bounded = u.Remaining(g.limits)
		if !s.ended.Load() {
			s.overQuota()
		}
	}

}

// finalCharge charges what s used in all, as it ends; bounded by ChargeBudget.
func (s *session) finalCharge() {
	g := &s.gov
	if !g.metered {
		return
	}
	u := &policy.AudioUse{Tenant: s.info.TenantID, User: s.info.UserID, Session: s.info.SessionID, Used: s.used()}
	ctx, cancel := context.WithTimeout(context.Background(), s.h.o.ChargeBudget)
	defer cancel()
	if err := s.h.o.Meter.Charge(ctx, []*policy.AudioUse{u}); err != nil {
		s.h.o.Log.Warn("charging a voice session's last audio failed", "session_id", s.info.SessionID,
			"err", proxy.Describe(err))
		return
	}
	g.charge(u.Used)
}

// charge notes that the session was charged for used: never less than before, since a tick's
// charge may land after the session's last.
func (g *governor) charge(used time.Duration) {
	for {
		old := g.charged.Load()
		if int64(used) <= old || g.charged.CompareAndSwap(old, int64(used)) {
			return
		}
	}
}
