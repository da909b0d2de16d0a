package main

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// access is what a route asks of its caller.
type access int

const (
	open       access = iota // no token: health, readiness, metrics
	token                    // a token, then the policy's binding: permission, rates, caps
	tokenLater               // the same, but the handler charges rates and caps itself once it has validated the request (policy.Admit)
	tokenWS                  // tokenLater for the WebSocket route, where browsers send the token as a subprotocol
)

// upgrade says whether a route may switch protocols. Only a route that declares an upgrade
// gets a request's Upgrade; every other route serves such a request as the plain request it also
// is (proxy.StripUpgrade), and no proxied back end's 101 is ever relayed (proxy.New).
type upgrade bool

const (
	plain    upgrade = false
	upgrades upgrade = true // a WebSocket route
)

// bind is what the built-in policy asks of a route's caller: the permission, per-method
// permissions, rate class and concurrency lease (its Route is the route's pattern). bind{} on a
// route with a token means any authenticated caller; open routes have none.
type bind = policy.Binding

// route is one entry of the route table.
type route struct {
	pattern string
	access  access
	upgrade upgrade
	handler http.Handler
	bind    bind
}

// handlers are the route table's handlers, before protection; newGateway makes them.
type handlers struct {
	healthz, readyz                  http.Handler
	chat, chatResume, cancel, revoke http.Handler
	voice                            http.Handler
	voiceSessions, voiceSession      http.Handler
	voiceClose, voiceBroadcast       http.Handler
	admin, docs, openapi             http.Handler
	console, metrics                 http.Handler // nil unless CONSOLE_ENABLED, METRICS_ENABLED
	chatAnswer                       http.Handler // POST /api/v2/chat
	completions, models              http.Handler // OpenAI's chat and model list
	realtime                         http.Handler // OpenAI's Realtime API over the voice bridge
}

// routes is the whole route table, the one list of the gateway's routes: the router registers
// it, the built-in policy binds it (bindings; a POLICY_FILE binds no other route), and the
// OpenAPI tests compare it with openapi.json. Entries are positional, so a route cannot be added
// without saying whether it upgrades and how the built-in policy binds it. It builds nothing
// and looks into no handler, so its patterns and bindings are known before any handler is
// made (routeBindings): the policy is made from them, and handlers from the policy.
func routes(cfg *config, h handlers) []route {
	rs := []route{
		{"GET /healthz", open, plain, h.healthz, bind{}},
		{"GET /readyz", open, plain, h.readyz, bind{}},
		{"POST /api/v2/chat/stream", tokenLater, plain, h.chat, bind{Permission: "chat:write", Class: "chat", Lease: "chat"}},
		{"GET /api/v2/chat/stream/{request_id}", tokenLater, plain, h.chatResume, bind{Permission: "chat:write", Lease: "chat"}},
		{"POST /api/v2/chat/cancel", token, plain, h.cancel, bind{}},
		{"POST /api/v2/auth/revoke", token, plain, h.revoke, bind{}},
		{"GET /api/v2/voice/stream", tokenWS, upgrades, h.voice, bind{Permission: "voice:write", Class: "voice", Lease: "voice"}},
		{"GET /api/v2/voice/sessions", token, plain, h.voiceSessions, bind{Permission: "voice:admin"}},
		{"GET /api/v2/voice/sessions/{session_id}", token, plain, h.voiceSession, bind{Permission: "voice:admin"}},
		{"DELETE /api/v2/voice/sessions/{session_id}", token, plain, h.voiceClose, bind{Permission: "voice:admin"}},
		{"POST /api/v2/voice/broadcast", token, plain, h.voiceBroadcast, bind{Permission: "voice:admin"}},
		{"/api/v2/admin/", token, plain, h.admin, bind{Permission: "admin:write",
			Methods: map[string]string{"GET": "admin:read", "HEAD": "admin:read"}, Class: "admin"}},
		{"/api/v2/documents/", token, plain, h.docs, bind{Permission: "document:write",
			Methods: map[string]string{"GET": "document:read", "HEAD": "document:read", "DELETE": "document:delete"}, Class: "documents"}},
		{"GET /openapi.json", open, plain, h.openapi, bind{}},
		{"POST /api/v2/chat", tokenLater, plain, h.chatAnswer, bind{Permission: "chat:write", Class: "chat", Lease: "chat"}},
		{"POST /v1/chat/completions", tokenLater, plain, h.completions, bind{Permission: "chat:write", Class: "chat", Lease: "chat"}},
		{"GET /v1/models", token, plain, h.models, bind{Permission: "chat:write"}},
		{"GET /v1/realtime", tokenWS, upgrades, h.realtime, bind{Permission: "voice:write", Class: "voice", Lease: "voice"}},
	}
	if cfg.ConsoleEnabled {
		rs = append(rs, route{"GET /console", open, plain, h.console, bind{}},
			route{"GET /console/{file}", open, plain, h.console, bind{}})
	}
	if cfg.MetricsEnabled && cfg.MetricsAddr == "" {
		rs = append(rs, route{"GET /metrics", open, plain, h.metrics, bind{}})
	}
	return rs
}

// routeBindings are the route table's bindings, read from the table without its handlers.
func routeBindings(cfg *config) []policy.Binding { return bindings(routes(cfg, handlers{})) }

// bindings are the routes that need a token, each bound as the built-in policy binds it; a
// policy file may bind no other, and one it leaves out keeps this binding
// (policy.File.WithDefaults).
func bindings(rs []route) []policy.Binding {
	var bs []policy.Binding
	for _, r := range rs {
		if r.access != open {
			b := r.bind
			b.Route = r.pattern
			bs = append(bs, b)
		}
	}
	return bs
}

// router registers the route table, each route behind what its access asks for; only the
// routes that declare an upgrade get a request's Upgrade.
func router(rs []route, g guard) *proxy.Router {
	rt := proxy.NewRouter()
	for _, r := range rs {
		h := g.protect(r.handler, r.access)
		if openAIRoute(r.pattern) {
			// Outside the protection: a refusal by authentication or the policy is in
			// OpenAI's words too, so that the SDKs raise their error classes.
			h = proxy.OpenAIErrors()(h)
		}
		if r.upgrade {
			rt.HandleUpgrade(r.pattern, h)
		} else {
			rt.Handle(r.pattern, h)
		}
	}
	return rt
}

// openAIRoute reports whether the route of pattern speaks OpenAI's API: every route under
// /v1/, whose errors are OpenAI's error document (proxy.OpenAIErrors).
func openAIRoute(pattern string) bool {
	_, path, _ := strings.Cut(pattern, " ")
	if path == "" {
		path = pattern
	}
	return strings.HasPrefix(path, "/v1/")
}

// guard is what protects a route: authentication, then the policy.
type guard struct {
	authn    *auth.Authenticator
	enforcer *policy.Enforcer
	// allowOrigin is CORS_ORIGINS' check, for the WebSocket route's in-band refusals.
	allowOrigin func(origin string) bool
}

// protect puts h behind authentication (401 without a valid token), then the policy:
// permission, tenant and ownership (403), rates, quota and concurrency caps (429). Paths in
// AUTH_PUBLIC_PATHS skip both: this is the one place that decides it.
func (g guard) protect(h http.Handler, a access) http.Handler {
	var guarded http.Handler
	switch a {
	case open:
		return h
	case token:
		guarded = g.authn.Require(false)(g.enforcer.Wrap(h))
	case tokenLater:
		guarded = g.authn.Require(false)(g.enforcer.Guard(h))
	case tokenWS:
		// Browsers cannot read a refused upgrade's status: they are told in-band instead.
		guarded = voice.RefuseInBand(g.allowOrigin, g.authn.Require(true)(g.enforcer.Guard(h)))
		h = voice.RefuseInBand(g.allowOrigin, h)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.authn.Public(r.URL.Path) {
			h.ServeHTTP(w, r)
			return
		}
		guarded.ServeHTTP(w, r)
	})
}

// edge is the middleware every request passes through, outermost first.
func edge(h http.Handler, cfg *config, tel *telemetry, log *slog.Logger) http.Handler {
	mws := []proxy.Middleware{proxy.Recover(log), proxy.RequestID()}
	if tel.tracing {
		mws = append(mws, tel.traceRequests())
	}
	mws = append(mws, proxy.AccessLog(log))
	if tel.metrics {
		mws = append(mws, tel.observe())
	}
	mws = append(mws,
		// Before anything can refuse a request: net/http reads what is left of a refused
		// request's body too, and that must be bounded as well.
		proxy.CloseChunked(),
		proxy.BodyDeadline(proxy.BodyDeadlineOptions{Grace: cfg.BodyReadTimeout, MinRate: cfg.BodyMinRate}),
		proxy.ClientIP(cfg.TrustedProxies),
		// Before CORS and the path check, which would answer a CONNECT's authority form.
		proxy.RefuseMethods(),
		proxy.CORS(proxy.CORSOptions{Origins: cfg.CORSOrigins}),
		proxy.CanonicalPath(),
	)
	return proxy.Chain(h, mws...)
}

// health is what /healthz, /readyz and voicegate_ready report.
type health struct {
	redis    rueidis.Client // nil without Redis
	draining atomic.Bool    // set when shutdown begins
}

// status is "ready", "draining", or what redisReadiness says is wrong with Redis.
func (s *health) status(ctx context.Context) string {
	if s.draining.Load() {
		return "draining"
	}
	if s.redis != nil {
		ctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		defer cancel()
		return redisReadiness(ctx, s.redis)
	}
	return "ready"
}

func (s *health) ready(ctx context.Context) bool { return s.status(ctx) == "ready" }

func (s *health) healthz(w http.ResponseWriter, r *http.Request) {
	proxy.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *health) readyz(w http.ResponseWriter, r *http.Request) {
	if status := s.status(r.Context()); status != "ready" {
		proxy.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"status": status})
		return
	}
	proxy.WriteJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
