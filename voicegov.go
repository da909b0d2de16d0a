package main

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/metric"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/voice"
)

// voiceMetrics are the instruments of voice governance: the latencies users feel and
// barge-ins, per tenant for the tenants the policy names and "other" for every other, so that
// however many tenants there are the series stay bounded by the policy.
type voiceMetrics struct {
	tel      *telemetry
	response metric.Float64Histogram
	asr      metric.Float64Histogram
	bargeIns metric.Int64Counter
}

func newVoiceMetrics(t *telemetry) (*voiceMetrics, error) {
	m := t.meter.Meter("voicegate")
	buckets := metric.WithExplicitBucketBoundaries(.05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10)
	v := &voiceMetrics{tel: t}
	var err error
	if v.response, err = m.Float64Histogram("voice_response_latency_seconds",
		metric.WithDescription("From the end of a user's utterance (stop, or asr_final) to the first TTS audio sent to them, by tenant."),
		metric.WithUnit("s"), buckets); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	if v.asr, err = m.Float64Histogram("voice_asr_latency_seconds",
		metric.WithDescription("From the first audio frame of an utterance to its first asr_partial, by tenant."),
		metric.WithUnit("s"), buckets); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	if v.bargeIns, err = m.Int64Counter("voice_barge_ins_total",
		metric.WithDescription("Users speaking, or sending interrupt, while TTS audio flows to them, by tenant.")); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	v.bargeIns.Add(context.Background(), 0, t.add1("tenant", otherTenant)...)
	return v, nil
}

// otherTenant labels every tenant the policy does not name.
const otherTenant = "other"

// tenantLabel is the tenant label of tenant under the policy in force.
func (g *gateway) tenantLabel(tenant string) string {
	if g.policy != nil && g.policy.Policy().NamesTenant(tenant) {
		return tenant
	}
	return otherTenant
}

// voiceGovernance fills in o's metering, quotas, pace bound and latency metrics.
func (g *gateway) voiceGovernance(o *voice.Options) error {
	vm, err := newVoiceMetrics(g.tel)
	if err != nil {
		return err
	}
	if g.redis != nil {
		o.Meter = policy.NewRedisAudioMeter(g.redis, g.cfg.RedisPrefix)
	} else {
		o.Meter = policy.NewMemoryAudioMeter()
	}
	o.Limits = func(tenant string) policy.VoiceLimits { return g.policy.Policy().VoiceLimits(tenant) }
	o.Reservation = g.cfg.VoiceReservation
	o.ChargeBudget = g.cfg.LimitBudget
	o.Pace, o.PaceBurst = g.cfg.VoicePace, g.cfg.VoicePaceBurst
	bg := context.Background()
	o.OnLatency = func(k voice.LatencyKind, tenant string, d time.Duration) {
		h := vm.response
		if k == voice.LatencyASR {
			h = vm.asr
		}
		h.Record(bg, d.Seconds(), g.tel.set("tenant", g.tenantLabel(tenant)))
	}
	o.OnBargeIn = func(tenant string) { vm.bargeIns.Add(bg, 1, g.tel.add1("tenant", g.tenantLabel(tenant))...) }
	return nil
}

// voiceAdmin are the handlers of the voice admin routes: one session's live detail, closing it,
// and broadcast.
type voiceAdmin struct{ session, close, broadcast http.Handler }

// voiceCaller is the caller of the voice admin routes: their tenant, and whether they are a
// super admin.
func voiceCaller(r *http.Request) (tenant string, super bool) {
	id := auth.FromContext(r.Context())
	if id == nil {
		return "", false
	}
	return id.TenantID, policy.IsSuper(id.Roles)
}
