package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/redis/rueidis"
	"go.opentelemetry.io/otel/metric"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
	"voicegate/voice/realtime"
)

// newVoiceRegistry makes the registry of live voice sessions: this instance's, and with Redis
// every instance's, published and kept alive by the renewer.
func newVoiceRegistry(cfg *config, redis rueidis.Client, renew *renewer, log *slog.Logger) *voice.Registry {
	sessions := voice.NewRegistry(voice.RegistryOptions{Instance: cfg.Instance, ID: cfg.InstanceID, Redis: redis, Prefix: cfg.RedisPrefix,
		TTL: cfg.LeaseTTL, UsageMaxLen: int64(cfg.VoiceUsageMaxLen), OnChange: renew.Kick, Log: log})
	if redis != nil {
		renew.add("voice sessions", sessions.Renew)
	}
	return sessions
}

// newVoiceHandlers are GET /api/v2/voice/stream and GET /v1/realtime (OpenAI's Realtime API,
// the same bridge in another dialect): the bridge to the algorithm service's voice endpoint on
// its replicas, governed by the policy in force (audio quotas metered in Redis or memory,
// session limits, pace) and rechecking its caller's token while it runs. Both put their
// sessions in one registry and charge one meter.
func newVoiceHandlers(cfg *config, redis rueidis.Client, algo *proxy.Pool, sessions *voice.Registry,
	policies *policy.Store, authn *auth.Authenticator, outbound proxy.Outbound, tel *telemetry, log *slog.Logger) (v2, openAI *voice.Handler, err error) {
	metrics, err := newVoiceMetrics(tel, policies)
	if err != nil {
		return nil, nil, err
	}
	var meter policy.AudioMeter = policy.NewMemoryAudioMeter()
	if redis != nil {
		meter = policy.NewRedisAudioMeter(redis, cfg.RedisPrefix)
	}
	o := voice.Options{
		AlgoURL:      algo.Primary(),
		Via:          algo.Via, // voice dials share the replicas' health with chat
		AllowOrigin:  proxy.CORSOptions{Origins: cfg.CORSOrigins}.AllowOrigin,
		PingInterval: cfg.VoicePing,
		IdleTimeout:  cfg.VoiceIdle,
		WriteTimeout: cfg.VoiceWriteTimeout,
		RawAudio:     cfg.VoiceRawAudio,
		Audio: voice.AudioConfig{Language: cfg.VoiceLanguage, Format: cfg.VoiceAudio.Codec,
			SampleRate: cfg.VoiceAudio.SampleRate, Channels: cfg.VoiceAudio.Channels,
			EchoCancellation: cfg.VoiceEchoCancellation},
		TTSPacing:    cfg.VoiceTTSPacing,
		TTSLead:      cfg.VoiceTTSLead,
		TTSQueue:     int(cfg.VoiceTTSQueue),
		Registry:     sessions,
		Owner:        auth.Owner,
		Token:        auth.Token,
		Admit:        func(w http.ResponseWriter, r *http.Request) (func(), bool) { return policy.Admit(w, r, nil) },
		Recheck:      recheck(authn),
		Expiry:       authn.Expiry,
		Outbound:     outbound,
		Meter:        meter,
		Limits:       func(tenant string) policy.VoiceLimits { return policies.Policy().VoiceLimits(tenant) },
		Reservation:  cfg.VoiceReservation,
		ChargeBudget: cfg.LimitBudget,
		Pace:         cfg.VoicePace,
		PaceBurst:    cfg.VoicePaceBurst,
		ResumeWindow: cfg.VoiceResumeWindow,
		AdmitResume:  policy.AdmitHandover,
		OnResume:     metrics.resumed,
		OnLatency:    metrics.latency,
		OnBargeIn:    metrics.bargeIn,
		OnStart: func() {
			tel.wsActive.Add(context.Background(), 1, tel.add1("type", "client")...)
			tel.wsActive.Add(context.Background(), 1, tel.add1("type", "upstream")...)
		},
		OnEnd: func(s voice.Stats) {
			tel.wsActive.Add(context.Background(), -1, tel.add1("type", "client")...)
			tel.wsActive.Add(context.Background(), -1, tel.add1("type", "upstream")...)
			tel.voiceBytes.Add(context.Background(), s.AudioBytesIn, tel.add1("direction", "in")...)
			tel.voiceBytes.Add(context.Background(), s.AudioBytesOut, tel.add1("direction", "out")...)
			tel.voiceSessions.Add(context.Background(), 1, tel.add1("code", strconv.Itoa(int(s.CloseCode)))...)
			tel.voiceSessionEnded(int(s.CloseCode), s.Duration)
		},
		Log: log,
	}
	v2 = voice.NewHandler(o)
	o.Dialect = realtime.New()
	return v2, voice.NewHandler(o), nil
}

// recheck tells a long-lived voice session whether its token still holds: revoked, expired or
// disabled ends it. A revocation store that cannot answer does not: a Redis blip must not
// drop every call in progress.
func recheck(authn *auth.Authenticator) func(r *http.Request) func(context.Context) error {
	return func(r *http.Request) func(context.Context) error {
		id := auth.FromContext(r.Context())
		return func(ctx context.Context) error {
			perr := authn.Check(ctx, id)
			if perr == nil || perr.Status != http.StatusUnauthorized {
				return nil
			}
			return errors.New(perr.Message)
		}
	}
}

// voiceCaller is the caller of the voice admin routes: their tenant, and whether they are a
// super admin.
func voiceCaller(r *http.Request) (tenant string, super bool) {
	id := auth.FromContext(r.Context())
	if id == nil {
		return "", false
	}
	return id.TenantID, policy.IsSuper(id.Roles)
}

// voiceMetrics are the instruments of voice governance: the latencies users feel and
// barge-ins, per tenant for the tenants the policy in force names and "other" for every other,
// so that however many tenants there are the series stay bounded by the policy.
type voiceMetrics struct {
	tel      *telemetry
	policies *policy.Store
	response metric.Float64Histogram
	asr      metric.Float64Histogram
	bargeIns metric.Int64Counter
	resumes  metric.Int64Counter
	gap      metric.Float64Histogram
}

func newVoiceMetrics(t *telemetry, policies *policy.Store) (*voiceMetrics, error) {
	m := t.meter.Meter("voicegate")
	buckets := metric.WithExplicitBucketBoundaries(.05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10)
	v := &voiceMetrics{tel: t, policies: policies}
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
	if v.resumes, err = m.Int64Counter("voice_resumes_total",
		metric.WithDescription("Voice session resumes, by outcome: resumed, gap (resumed, some messages lost), failed, not_found.")); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	if v.gap, err = m.Float64Histogram("voice_resume_gap_seconds",
		metric.WithDescription("From a voice client's lost connection, as its session's instance noticed it, to its first replayed message after a resume."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(.01, .025, .05, .1, .15, .25, .5, 1, 2.5, 5, 10, 30)); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return v, nil
}

// resumed counts a voice resume (voice.Options.OnResume).
func (v *voiceMetrics) resumed(outcome string, gap time.Duration) {
	v.resumes.Add(context.Background(), 1, v.tel.add1("outcome", outcome)...)
	if outcome == voice.ResumeOK || outcome == voice.ResumeGap {
		v.gap.Record(context.Background(), gap.Seconds())
	}
}

// latency records a latency a user of tenant felt (voice.Options.OnLatency).
func (v *voiceMetrics) latency(k voice.LatencyKind, tenant string, d time.Duration) {
	h := v.response
	if k == voice.LatencyASR {
		h = v.asr
	}
	h.Record(context.Background(), d.Seconds(), v.tel.set("tenant", v.tenantLabel(tenant)))
}

// bargeIn counts a barge-in by a user of tenant (voice.Options.OnBargeIn).
func (v *voiceMetrics) bargeIn(tenant string) {
	v.bargeIns.Add(context.Background(), 1, v.tel.add1("tenant", v.tenantLabel(tenant))...)
}

// otherTenant labels every tenant the policy does not name.
const otherTenant = "other"

// tenantLabel is the tenant label of tenant under the policy in force.
func (v *voiceMetrics) tenantLabel(tenant string) string {
	if v.policies.Policy().NamesTenant(tenant) {
		return tenant
	}
	return otherTenant
}
