package policy

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"voicegate/proxy"
)

// Subject is the caller as policy sees it.
type Subject struct {
	UserID   string
	TenantID string
	Roles    []string
	Grants   []string // direct permissions from the token
}

// EnforcerOptions configures an Enforcer.
type EnforcerOptions struct {
	// Policy returns the policy in force (a Store's Policy method).
	Policy func() *Policy
	// Subject returns the request's authenticated caller; ok is false without one.
	Subject func(r *http.Request) (s Subject, ok bool)
	// Admitter enforces fair use: rates, quota and concurrency slots; nil means none.
	Admitter Admitter
	// Budget bounds each admission and each release; zero means 100 ms. When the store cannot
	// answer in time the request goes through (fair use fails open, counted and logged):
	// refusing every request because a counter is unreachable would be worse than a few extra.
	Budget time.Duration
	// OnLimited is called for every request refused by a rate, quota or cap (metrics).
	OnLimited func()
	// OnStoreError is called when the limiter or the leases fail (metrics).
	OnStoreError func()
	// Now is the clock that spaces out store-failure log lines; nil means time.Now.
	Now func() time.Time
	Log *slog.Logger
}

// Enforcer is the authorization and fair-use middleware. It goes inside the router, on each
// route, so that the request's route pattern names its binding.
type Enforcer struct {
	o       EnforcerOptions
	lastLog atomic.Int64 // unix ms of the last store-failure log line, to rate-limit them
}

// NewEnforcer returns an Enforcer.
func NewEnforcer(o EnforcerOptions) *Enforcer {
	if o.Budget <= 0 {
		o.Budget = 100 * time.Millisecond
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Enforcer{o: o}
}

// Permission headers and path wildcards the policy looks at.
const (
	HeaderTenant = proxy.HeaderTenantID // a client names a tenant in it; upstreams get the caller's
	ParamTenant  = "tenant_id"
	ParamUser    = "user_id"
)

// Decide answers whether s may make request r under p: 401 without a caller, 403 for another
// tenant, another user's resource or a missing permission. It allocates only to refuse.
func (p *Policy) Decide(r *http.Request, s *Subject, ok bool) *proxy.Error {
	b := p.bindings[r.Pattern]
	if b == nil {
		return &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodePermission,
			Message: "this route is not bound in the policy"}
	}
	if !ok {
		return &proxy.Error{Status: http.StatusUnauthorized, Code: proxy.CodeAuthRequired,
			Message: "authentication required",
			Header:  http.Header{"Www-Authenticate": {`Bearer error="invalid_token"`}}}
	}
	if perr := checkNames(r, b); perr != nil {
		return perr
	}
	super := IsSuper(s.Roles)
	if !super {
		tenant := r.Header.Get(HeaderTenant)
		if tenant == "" && b.tenantParam {
			tenant = r.PathValue(ParamTenant)
		} else if b.tenantParam && r.PathValue(ParamTenant) != tenant {
			tenant = "\x00" // header and path disagree: refuse
		}
		if tenant != "" && tenant != s.TenantID {
			return &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodePermission,
				Message: "this tenant is not yours"}
		}
		if b.userParam && r.PathValue(ParamUser) != s.UserID &&
			(b.ownerOverride == "" || !p.Rules.Allows(s.Roles, s.Grants, b.ownerOverride)) {
			return &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodePermission,
				Message: "this resource belongs to another user"}
		}
	}
	if need := b.permFor(r.Method); need != "" && !p.Rules.Allows(s.Roles, s.Grants, need) {
		return &proxy.Error{Status: http.StatusForbidden, Code: proxy.CodePermission,
			Message: "permission " + need + " required",
			// An array of objects, as every error's details are (VALIDATION_ERROR's list fields).
			Details: []map[string]string{{"permission": need, "reason": "required"}}}
	}
	return nil
}

// checkNames refuses (400) a request whose X-Tenant-ID, {tenant_id} or {user_id} is not a
// label proxy.ValidLabel accepts: a super admin reaches other tenants' streams and back ends
// by these names, and no token's tenant or user looks like that.
func checkNames(r *http.Request, b *binding) *proxy.Error {
	if t := r.Header.Get(HeaderTenant); !proxy.ValidLabel(t, 0) {
		return proxy.InvalidFields(proxy.FieldError{Field: "X-Tenant-ID", Reason: proxy.LabelReason(0)})
	}
	if b.tenantParam && !proxy.ValidLabel(r.PathValue(ParamTenant), 0) {
		return proxy.InvalidFields(proxy.FieldError{Field: ParamTenant, Reason: proxy.LabelReason(0)})
	}
	if b.userParam && !proxy.ValidLabel(r.PathValue(ParamUser), 0) {
		return proxy.InvalidFields(proxy.FieldError{Field: ParamUser, Reason: proxy.LabelReason(0)})
	}
	return nil
}

// Allows reports whether the request's caller holds permission perm under the policy in force.
func (e *Enforcer) Allows(r *http.Request, perm string) bool {
	s, ok := e.o.Subject(r)
	return ok && e.o.Policy().Rules.Allows(s.Roles, s.Grants, perm)
}

// Wrap returns h behind authorization and fair use: the request is charged, and holds its
// concurrency slot, before h runs and until it returns.
func (e *Enforcer) Wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := e.o.Policy()
		s, ok := e.o.Subject(r)
		if perr := p.Decide(r, &s, ok); perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		release, _, perr := e.admit(w, r, p, p.bindings[r.Pattern], &s, nil, generates)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		defer release()
		h.ServeHTTP(w, r)
	})
}

// Guard returns h behind authorization only. Fair use is left to h, which calls Admit once it
// has read and validated the request: a request refused as invalid then costs its caller no
// rate, and a slow or bad body holds no concurrency slot. Handlers whose work outlives
// ServeHTTP (a voice session) keep the slot until they release it.
func (e *Enforcer) Guard(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := e.o.Policy()
		s, ok := e.o.Subject(r)
		if perr := p.Decide(r, &s, ok); perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		a := &admission{e: e, p: p, b: p.bindings[r.Pattern], s: s}
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), admissionKey{}, a)))
	})
}

type admissionKey struct{}

// errNoAdmission is the logged cause of a refused Admit without Guard.
var errNoAdmission = errors.New("policy: the route's handler asks for an admission, but no guard authorized the request (a public path over it, or a route not behind Guard)")

// admission is what Guard decided, for Admit to charge.
type admission struct {
	e *Enforcer
	p *Policy
	b *binding
	s Subject
}

// Admit charges a request that Guard let through to its rates and quota, takes its
// concurrency slot and claim (nil: none), all in one call to the store. On a refusal it answers
// the request (429, or 409 for a held claim) and returns false; otherwise the caller must call
// release once the work is over, which gives back the slot and the claim before it returns
// (bounded by the enforcer's budget).
//
// A request that did not pass Guard is refused (500): its handler expects a verified caller
// whose permission was checked, and charging nobody would let it run ungoverned. That is a
// route left public (AUTH_PUBLIC_PATHS) or a wiring mistake, never the client's doing; the cause
// goes to the access log.
func Admit(w http.ResponseWriter, r *http.Request, claim *Claim) (release func(), ok bool) {
	release, _, err := AdmitClaim(w, r, claim)
	if errors.Is(err, ErrClaimed) {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusConflict, Code: proxy.CodeConflict, Message: claim.Conflict})
		return nil, false
	}
	return release, err == nil
}

// ErrAnswered means an admission was refused and the request has been answered.
var ErrAnswered = errors.New("policy: the request was refused and answered")

// AdmitClaim is Admit for a caller that decides itself what a held claim means: it answers
// every other refusal (ErrAnswered), a request that did not pass Guard included, but returns
// ErrClaimed without answering. claimed reports whether the claim was checked and taken by the
// store (with its Absent key): not in memory, not when the store did not answer.
func AdmitClaim(w http.ResponseWriter, r *http.Request, claim *Claim) (release func(), claimed bool, err error) {
	a := admissionOf(w, r)
	if a == nil {
		return nil, false, ErrAnswered
	}
	release, claimed, perr := a.e.admit(w, r, a.p, a.b, &a.s, claim, generates)
	if perr == errHeld {
		return nil, false, ErrClaimed
	}
	if perr != nil {
		proxy.WriteError(w, r, perr)
		return nil, false, ErrAnswered
	}
	return release, claimed, nil
}

// AdmitReplay admits a request that Guard let through and that is answered from what an
// earlier request generated and paid for: a resumed stream, a repeated request served from its
// replay log. It takes the route's concurrency slot (a reader holds what a stream holds) and
// charges the per-user and per-tenant rates every request pays, but neither the route's class
// nor the daily quota: those are the generation's, paid once. On a refusal it answers the
// request and returns false (500 for one that did not pass Guard, as Admit); otherwise the
// caller calls release when the answer is over.
func AdmitReplay(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	a := admissionOf(w, r)
	if a == nil {
		return nil, false
	}
	return admitAs(w, r, replays)
}

// AdmitHandover admits the resume of a voice session that runs on another instance, as
// AdmitReplay does, except that its slot may exceed the caps by one. Until the handover ends
// (bounded by the voice package's 2 s handover bound) the instance the session leaves holds the
// session's slot, and releases it as it lets go: without the allowance a user at the cap could
// not resume on another instance, and the session it moves would be lost. The overlap lasts as
// long as the handover, never longer: a failed handover closes the older connection too.
func AdmitHandover(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	return admitAs(w, r, movesIn)
}

func admitAs(w http.ResponseWriter, r *http.Request, how use) (release func(), ok bool) {
	a := admissionOf(w, r)
	if a == nil {
		return nil, false
	}
	release, _, perr := a.e.admit(w, r, a.p, a.b, &a.s, nil, how)
	if perr != nil {
		proxy.WriteError(w, r, perr)
		return nil, false
	}
	return release, true
}

// use is what an admitted request does with what it is admitted to.
type use int

const (
	generates use = iota // generates an answer: charged to its class and the daily quota
	replays              // is answered from what an earlier request generated and paid for
	movesIn              // moves a live session here from another instance (AdmitHandover)
)

// admissionOf is what Guard decided for r; without it, r is answered 500 (see Admit).
func admissionOf(w http.ResponseWriter, r *http.Request) *admission {
	a, _ := r.Context().Value(admissionKey{}).(*admission)
	if a == nil {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusInternalServerError, Code: proxy.CodeInternal,
			Message: "internal error", Cause: errNoAdmission})
	}
	return a
}

// errHeld is admit's answer for a held claim, which its caller answers.
var errHeld = &proxy.Error{Status: http.StatusConflict, Code: proxy.CodeConflict}

// admit charges the request (with generation, to its class and the quota too) and takes its
// slot and claim; the release it returns is safe to call more than once. claimed reports
// whether the store took the claim.
func (e *Enforcer) admit(w http.ResponseWriter, r *http.Request, p *Policy, b *binding, s *Subject, claim *Claim, how use) (release func(), claimed bool, perr *proxy.Error) {
	generation := how == generates
	if e.o.Admitter == nil {
		return func() {}, false, nil
	}
	l := &p.Limits
	var buckets [3]Bucket
	ask := Ask{Charge: Charge{Tenant: s.TenantID, User: s.UserID, Buckets: buckets[:0]}, Claim: claim}
	if generation {
		ask.Quota = l.DailyRequestsPerUser
	}
	if l.PerUser != nil {
		ask.Buckets = append(ask.Buckets, bucket(*l.PerUser, "u", s.UserID))
	}
	if l.PerTenant != nil {
		ask.Buckets = append(ask.Buckets, bucket(*l.PerTenant, "t"))
	}
	if rate, ok := l.Classes[b.class]; ok && b.class != "" && generation {
		ask.Buckets = append(ask.Buckets, bucket(rate, "c", b.class, "u", s.UserID))
	}
	if b.lease != "" {
		c := l.Concurrency[b.lease]
		ask.Slot = &Slot{Kind: b.lease, PerUser: c.PerUser, PerTenant: c.PerTenant}
		if how == movesIn {
			ask.Slot.PerUser, ask.Slot.PerTenant = overOne(c.PerUser), overOne(c.PerTenant)
		}
	}
	if ask.empty() {
		return func() {}, false, nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), e.o.Budget)
	v, given, err := e.o.Admitter.Admit(ctx, &ask)
	cancel()
	switch {
	case errors.Is(err, ErrCapReached):
		e.limited()
		return nil, false, &proxy.Error{Status: http.StatusTooManyRequests, Code: proxy.CodeRateLimited,
			Message: "concurrency cap reached: " + err.Error(), RetryAfter: 1}
	case errors.Is(err, ErrClaimed):
		return nil, false, errHeld
	case err != nil:
		e.storeFailed("fair-use store unavailable; not limiting or capping", err)
		if given == nil {
			return func() {}, false, nil
		}
		// What the unanswered call may have taken is the request's until it ends.
		return e.releaser(r, given), false, nil
	}
	h := w.Header()
	if len(ask.Buckets) > 0 {
		h.Set("RateLimit-Limit", strconv.Itoa(v.Limit))
		h.Set("RateLimit-Remaining", strconv.Itoa(max(v.Remaining, 0)))
		h.Set("RateLimit-Reset", strconv.FormatInt(int64((v.Reset+time.Second-1)/time.Second), 10))
	}
	if !v.Allowed {
		e.limited()
		retry := max(int((v.RetryAfter+time.Second-1)/time.Second), 1)
		msg := "rate limit exceeded; retry later"
		if v.QuotaExceeded {
			msg = "daily request quota exceeded"
		}
		return nil, false, &proxy.Error{Status: http.StatusTooManyRequests, Code: proxy.CodeRateLimited, Message: msg, RetryAfter: retry}
	}
	return e.releaser(r, given), v.Claimed, nil
}

// overOne is a cap raised by one; 0, no cap, stays none.
func overOne(c int) int {
	if c == 0 {
		return 0
	}
	return c + 1
}

// releaser is the release of what r was given. It outlives the request's cancellation (a client
// gone is the commonest end of a stream) but keeps its values, and is bounded like the
// admission.
func (e *Enforcer) releaser(r *http.Request, given Release) func() {
	rctx := context.WithoutCancel(r.Context())
	return func() {
		ctx, cancel := context.WithTimeout(rctx, e.o.Budget)
		defer cancel()
		given(ctx)
	}
}

func bucket(r Rate, parts ...string) Bucket {
	return Bucket{Parts: parts, Interval: max(time.Duration(r.Per)/time.Duration(r.Requests), time.Microsecond),
		Burst: max(r.Burst, 1), Limit: r.Requests}
}

func (e *Enforcer) limited() {
	if e.o.OnLimited != nil {
		e.o.OnLimited()
	}
}

// storeFailed counts a failure and logs it at most every 10 seconds.
func (e *Enforcer) storeFailed(msg string, err error) {
	if e.o.OnStoreError != nil {
		e.o.OnStoreError()
	}
	now := e.o.Now().UnixMilli()
	if last := e.lastLog.Load(); now-last > 10_000 && e.lastLog.CompareAndSwap(last, now) {
		e.o.Log.Warn(msg, "err", proxy.Describe(err))
	}
}
