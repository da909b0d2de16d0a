package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/otlptranslator"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"voicegate/proxy"
)

// telemetry holds the tracer and meter providers and the gateway's instruments. Providers are
// passed explicitly to what needs them; no global OpenTelemetry state is set.
type telemetry struct {
	tracer     trace.TracerProvider
	tracing    bool // a real exporter is configured
	propagator propagation.TextMapPropagator
	shutdownTP func(context.Context) error
	metrics    bool // METRICS_ENABLED: instruments record and /metrics is served
	meter      metric.MeterProvider
	shutdownMP func(context.Context) error
	registry   *prometheus.Registry

	requests  metric.Int64Counter
	duration  metric.Float64Histogram
	wsActive  metric.Int64UpDownCounter
	sseActive metric.Int64UpDownCounter
	sseEvents metric.Int64Counter
	// The replay log's writes to Redis: pipelines (round trips) and the event batches in them.
	replayPipelines, replayBatches metric.Int64Counter
	firstEvent                     metric.Float64Histogram
	voiceBytes                     metric.Int64Counter
	voiceLength                    metric.Float64Histogram
	upstream                       metric.Int64Counter
	upstreamTime                   metric.Float64Histogram
	redisTime                      metric.Float64Histogram
	authFailures                   metric.Int64Counter
	rateLimited                    metric.Int64Counter
	redisErrors                    metric.Int64Counter
	voiceSessions                  metric.Int64Counter
	buildInfo                      metric.Int64Gauge

	sets    sync.Map // label values → attribute set, so recording allocates nothing once warm
	reqSets sync.Map // requestLabels → [2]metric.MeasurementOption (with and without status)
	oneSets sync.Map // oneLabel → []metric.AddOption, for the per-event counters
	recSets sync.Map // oneLabel → []metric.RecordOption, for the per-call histograms
	upSets  sync.Map // upstreamLabels → upstreamSets
}

// upstreamLabels are the labels of one upstream attempt.
type upstreamLabels struct{ upstream, outcome string }

// upstreamSets are the options of an attempt's count and its duration, made once per labels.
type upstreamSets struct {
	add []metric.AddOption
	rec []metric.RecordOption
}

// requestLabels are one request's metric labels; a comparable key needs no string building.
type requestLabels struct {
	method, route string
	status        int
}

// newTelemetry sets up tracing (OTLP over HTTP when OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, none otherwise) and metrics (an OpenTelemetry meter
// read by a Prometheus exporter).
func newTelemetry(ctx context.Context, cfg *config) (*telemetry, error) {
	t := &telemetry{
		propagator: propagation.TraceContext{}, // W3C traceparent/tracestate
		tracer:     noop.NewTracerProvider(),
		shutdownTP: func(context.Context) error { return nil },
	}
	res := resource.NewSchemaless(semconv.ServiceName(cfg.ServiceName), semconv.ServiceInstanceID(cfg.InstanceID))
	if cfg.OTLPEndpoint != "" {
		opts := []otlptracehttp.Option{otlptracehttp.WithEndpointURL(cfg.OTLPEndpoint)}
		if len(cfg.OTLPHeaders) > 0 {
			opts = append(opts, otlptracehttp.WithHeaders(cfg.OTLPHeaders))
		}
		exp, err := otlptracehttp.New(ctx, opts...)
		if err != nil {
			return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_ENDPOINT: %w", err)
		}
		tp := sdktrace.NewTracerProvider(
			sdktrace.WithBatcher(exp),
			sdktrace.WithResource(res),
			sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.TraceSampleRatio))),
		)
		t.tracer, t.tracing, t.shutdownTP = tp, true, tp.Shutdown
	}

	t.metrics = cfg.MetricsEnabled
	t.meter, t.shutdownMP = metricnoop.NewMeterProvider(), func(context.Context) error { return nil }
	if t.metrics {
		t.registry = prometheus.NewRegistry()
		exporter, err := otelprom.New(
			otelprom.WithRegisterer(t.registry),
			otelprom.WithoutTargetInfo(),
			otelprom.WithoutScopeInfo(),
			// The instruments already carry their Prometheus names.
			otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithoutSuffixes),
		)
		if err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter), sdkmetric.WithResource(res))
		t.meter, t.shutdownMP = mp, mp.Shutdown
		// The process and the Go runtime, from the Prometheus client's own collectors on the
		// same registry: they export the names operators' alerts and dashboards are written
		// against (process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds
		// and process_max_fds, go_goroutines, go_gc_duration_seconds, go_memstats_*).
		// OpenTelemetry's runtime instrumentation names the runtime's figures differently
		// (go_goroutine_count, go_memory_used_bytes) and has no file descriptors or process CPU
		// at all, so a leak alert written for any other Go service would not fire here.
		for _, c := range []prometheus.Collector{
			collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
			collectors.NewGoCollector(),
		} {
			if err := t.registry.Register(c); err != nil {
				return nil, fmt.Errorf("metrics: %w", err)
			}
		}
	}
	m := t.meter.Meter("voicegate")
	latency := metric.WithExplicitBucketBoundaries(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
	var errs []error
	must := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	t.requests, err = m.Int64Counter("http_requests_total", metric.WithDescription("HTTP requests, by method, route pattern and status."))
	must(err)
	t.duration, err = m.Float64Histogram("http_request_duration_seconds", metric.WithDescription("HTTP request duration: chat streams their whole life; the voice WebSocket only its handshake and dial (the handler returns once the session runs; voice_session_duration_seconds times sessions)."), metric.WithUnit("s"), latency)
	must(err)
	t.wsActive, err = m.Int64UpDownCounter("websocket_connections_active", metric.WithDescription("Open WebSocket connections: client (voice apps) and upstream (algorithm service)."))
	must(err)
	t.sseActive, err = m.Int64UpDownCounter("sse_streams_active", metric.WithDescription("Chat streams being served."))
	must(err)
	t.sseEvents, err = m.Int64Counter("sse_events_total", metric.WithDescription("SSE events sent, by event name (upstream types outside the known set count as other)."))
	must(err)
	t.replayPipelines, err = m.Int64Counter("sse_replay_pipelines_total", metric.WithDescription("Pipelines (Redis round trips) the resumable streams' replay log sent."))
	must(err)
	t.replayBatches, err = m.Int64Counter("sse_replay_batches_total", metric.WithDescription("Batches of events the replay log appended to Redis (one per write to a client, or fewer)."))
	must(err)
	// Exported from the start, at zero, like every other series the dashboard reads.
	t.replayPipelines.Add(context.Background(), 0)
	t.replayBatches.Add(context.Background(), 0)
	t.firstEvent, err = m.Float64Histogram("sse_time_to_first_event_seconds", metric.WithDescription("From a chat request to its first upstream event."), metric.WithUnit("s"), latency)
	must(err)
	t.voiceBytes, err = m.Int64Counter("voice_audio_bytes_total", metric.WithDescription("Audio bytes relayed, by direction (in: from voice apps, out: to them)."))
	must(err)
	t.voiceSessions, err = m.Int64Counter("voice_sessions_total", metric.WithDescription("Voice sessions ended, by close code."))
	must(err)
	// Sessions last seconds to an hour (VOICE_IDLE_TIMEOUT and the policy's maximum length
	// end them); past an hour only the count matters.
	t.voiceLength, err = m.Float64Histogram("voice_session_duration_seconds", metric.WithDescription("Voice session length, from the upgrade to the end of the session, by close code."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 2700, 3600))
	must(err)
	t.upstream, err = m.Int64Counter("upstream_requests_total", metric.WithDescription("Requests to upstreams, by upstream and outcome."))
	must(err)
	t.upstreamTime, err = m.Float64Histogram("upstream_request_duration_seconds", metric.WithDescription("Upstream attempts, by upstream and outcome: from sending the request to the answer's headers (a voice dial: to its 101), or to the failure."),
		metric.WithUnit("s"), latency)
	must(err)
	// Around the budgets of the calls (AUTH_BUDGET 75 ms, LIMIT_BUDGET 100 ms), finely below.
	t.redisTime, err = m.Float64Histogram("redis_command_duration_seconds", metric.WithDescription("Redis calls (a command, or a pipeline), by what their keys are for, as long as their caller waited; blocking commands and calls the breaker held back are not counted."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(.0005, .001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, 1, 2.5))
	must(err)
	t.authFailures, err = m.Int64Counter("auth_failures_total", metric.WithDescription("Refused authentications, by error code."))
	must(err)
	t.rateLimited, err = m.Int64Counter("rate_limited_total", metric.WithDescription("Requests refused by a rate limit, quota or concurrency cap."))
	must(err)
	t.redisErrors, err = m.Int64Counter("redis_errors_total", metric.WithDescription("Redis calls that failed (revocation, limits, leases)."))
	must(err)
	t.buildInfo, err = m.Int64Gauge("voicegate_build_info", metric.WithDescription("Always 1; the labels say which build runs."))
	must(err)
	if len(errs) > 0 {
		return nil, fmt.Errorf("metrics: %v", errs)
	}
	// Export every series that can start at zero from the start, so the first increase after a
	// restart shows in rate() and increase().
	t.rateLimited.Add(context.Background(), 0)
	t.redisErrors.Add(context.Background(), 0)
	t.sseActive.Add(context.Background(), 0)
	t.wsActive.Add(context.Background(), 0, t.set("type", "client"))
	t.wsActive.Add(context.Background(), 0, t.set("type", "upstream"))
	t.buildInfo.Record(context.Background(), 1, t.set("version", buildVersion(), "go_version", runtime.Version()))
	return t, nil
}

// observeReady exports voicegate_ready, 1 while ready answers true (what /readyz says), asked
// at every scrape.
func (t *telemetry) observeReady(ready func(context.Context) bool) error {
	_, err := t.meter.Meter("voicegate").Int64ObservableGauge("voicegate_ready",
		metric.WithDescription("1 when /readyz would answer 200; 0 while draining or while Redis is unreachable."),
		metric.WithInt64Callback(func(ctx context.Context, o metric.Int64Observer) error {
			v := int64(0)
			if ready(ctx) {
				v = 1
			}
			o.Observe(v)
			return nil
		}))
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// shutdown flushes spans and stops the providers.
func (t *telemetry) shutdown(ctx context.Context) {
	_ = t.shutdownTP(ctx)
	_ = t.shutdownMP(ctx)
}

// set returns the cached attribute set for key/value pairs.
func (t *telemetry) set(kv ...string) metric.MeasurementOption {
	key := strings.Join(kv, "\x00")
	if s, ok := t.sets.Load(key); ok {
		return s.(metric.MeasurementOption)
	}
	attrs := make([]attribute.KeyValue, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		attrs = append(attrs, attribute.String(kv[i], kv[i+1]))
	}
	s, _ := t.sets.LoadOrStore(key, metric.WithAttributeSet(attribute.NewSet(attrs...)))
	return s.(metric.MeasurementOption)
}

// oneLabel is a label and its value.
type oneLabel struct{ key, value string }

// add1 is the options of an Add with a single label, made once: it runs per event, where
// building the key, or the variadic slice at each call, would allocate.
func (t *telemetry) add1(key, value string) []metric.AddOption {
	if s, ok := t.oneSets.Load(oneLabel{key, value}); ok {
		return s.([]metric.AddOption)
	}
	s, _ := t.oneSets.LoadOrStore(oneLabel{key, value}, []metric.AddOption{t.set(key, value)})
	return s.([]metric.AddOption)
}

// record1 is add1 for a histogram's Record.
func (t *telemetry) record1(key, value string) []metric.RecordOption {
	if s, ok := t.recSets.Load(oneLabel{key, value}); ok {
		return s.([]metric.RecordOption)
	}
	s, _ := t.recSets.LoadOrStore(oneLabel{key, value}, []metric.RecordOption{t.set(key, value)})
	return s.([]metric.RecordOption)
}

// upstreamResult counts an upstream attempt and records how long it took (a proxy.Pool's and
// the user service's OnResult).
func (t *telemetry) upstreamResult(upstream, outcome string, took time.Duration) {
	l := upstreamLabels{upstream, outcome}
	s, ok := t.upSets.Load(l)
	if !ok {
		set := t.set("upstream", upstream, "outcome", outcome)
		s, _ = t.upSets.LoadOrStore(l, upstreamSets{add: []metric.AddOption{set}, rec: []metric.RecordOption{set}})
	}
	sets := s.(upstreamSets)
	t.upstream.Add(context.Background(), 1, sets.add...)
	t.upstreamTime.Record(context.Background(), took.Seconds(), sets.rec...)
}

// redisCall records how long a Redis call of class took (the guarded client's timing hook).
func (t *telemetry) redisCall(class string, took time.Duration) {
	t.redisTime.Record(context.Background(), took.Seconds(), t.record1("command_class", class)...)
}

// redisError counts a Redis call that failed (redis_errors_total).
func (t *telemetry) redisError() { t.redisErrors.Add(context.Background(), 1) }

// voiceSessionEnded records a voice session's length by its close code.
func (t *telemetry) voiceSessionEnded(code int, length time.Duration) {
	t.voiceLength.Record(context.Background(), length.Seconds(), t.record1("close_code", strconv.Itoa(code))...)
}

// requestSets returns the cached attribute sets of a request's labels.
func (t *telemetry) requestSets(l requestLabels) [2]metric.MeasurementOption {
	if s, ok := t.reqSets.Load(l); ok {
		return s.([2]metric.MeasurementOption)
	}
	s := [2]metric.MeasurementOption{
		t.set("method", l.method, "route", l.route, "status", strconv.Itoa(l.status)),
		t.set("method", l.method, "route", l.route),
	}
	t.reqSets.Store(l, s)
	return s
}

// methodLabel bounds the method label.
func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions:
		return m
	}
	return "OTHER"
}

// metricsHandler serves /metrics.
func (t *telemetry) metricsHandler() http.Handler {
	return promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{})
}

// observe records http_requests_total and http_request_duration_seconds for every request,
// labelled by route pattern — never by raw path — so cardinality stays bounded.
func (t *telemetry) observe() proxy.Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			next.ServeHTTP(w, r)
			info := proxy.InfoFrom(r.Context())
			route, status := "unmatched", http.StatusOK
			if info != nil {
				if info.Route != "" {
					route = info.Route
				}
				if info.Status != 0 {
					status = info.Status
				}
			}
			sets := t.requestSets(requestLabels{methodLabel(r.Method), route, status})
			ctx := context.WithoutCancel(r.Context())
			t.requests.Add(ctx, 1, sets[0])
			t.duration.Record(ctx, time.Since(start).Seconds(), sets[1])
		})
	}
}

// traceRequests starts a server span per request, continuing the caller's W3C trace context,
// and names it by route pattern once the router has matched (low cardinality).
func (t *telemetry) traceRequests() proxy.Middleware {
	tracer := t.tracer.Tracer("voicegate")
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctx := t.propagator.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
			ctx, span := tracer.Start(ctx, r.Method, trace.WithSpanKind(trace.SpanKindServer))
			defer span.End()
			next.ServeHTTP(w, r.WithContext(ctx))
			if info := proxy.InfoFrom(ctx); info != nil {
				route := info.Route
				if route == "" {
					route = "unmatched"
				}
				span.SetName(route)
				span.SetAttributes(semconv.HTTPRequestMethodKey.String(methodLabel(r.Method)),
					semconv.HTTPRoute(route), semconv.HTTPResponseStatusCode(info.Status))
				if info.Status >= 500 {
					span.SetStatus(2, http.StatusText(info.Status)) // codes.Error
				}
			}
		})
	}
}

// clientSpan starts a client span for one upstream attempt (a proxy.PoolOptions.Trace hook);
// the trace context travels on in the request's headers. Without tracing it is nil.
func (t *telemetry) clientSpan() func(context.Context, string) (context.Context, func(http.Header), func(int, error)) {
	if !t.tracing {
		return nil
	}
	tracer := t.tracer.Tracer("voicegate")
	return func(ctx context.Context, method string) (context.Context, func(http.Header), func(int, error)) {
		m := methodLabel(method)
		ctx, span := tracer.Start(ctx, "upstream "+m, trace.WithSpanKind(trace.SpanKindClient))
		inject := func(h http.Header) { t.propagator.Inject(ctx, propagation.HeaderCarrier(h)) }
		end := func(status int, err error) {
			switch {
			case err != nil:
				span.SetStatus(2, "transport error") // codes.Error; the error text may name hosts
			case status >= 500:
				span.SetStatus(2, http.StatusText(status))
			}
			if status != 0 {
				span.SetAttributes(semconv.HTTPRequestMethodKey.String(m), semconv.HTTPResponseStatusCode(status))
			}
			span.End()
		}
		return ctx, inject, end
	}
}

// traceLogs adds trace_id and span_id to every log record made with a request's context.
type traceLogs struct{ slog.Handler }

func (h traceLogs) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceLogs) WithAttrs(attrs []slog.Attr) slog.Handler {
	return traceLogs{h.Handler.WithAttrs(attrs)}
}

func (h traceLogs) WithGroup(name string) slog.Handler { return traceLogs{h.Handler.WithGroup(name)} }
