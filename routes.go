package main

import (
	"net/http"

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

// route is one entry of the route table.
type route struct {
	pattern string
	access  access
	handler http.Handler
}

// routes is the whole route table. It builds nothing: every handler is made by newGateway.
// Every route but the open ones must be bound by the policy, which checks this when it loads.
func (g *gateway) routes() []route {
	rs := []route{
		{"GET /healthz", open, http.HandlerFunc(g.healthz)},
		{"GET /readyz", open, http.HandlerFunc(g.readyz)},
		{"POST /api/v2/chat/stream", tokenLater, g.h.chat},
		{"GET /api/v2/chat/stream/{request_id}", tokenLater, g.h.chatResume},
		{"POST /api/v2/chat/cancel", token, g.h.cancel},
		{"POST /api/v2/auth/revoke", token, g.h.revoke},
		{"GET /api/v2/voice/stream", tokenWS, g.h.voice},
		{"GET /api/v2/voice/sessions", token, g.h.voiceSessions},
		{"GET /api/v2/voice/sessions/{session_id}", token, g.vadmin.session},
		{"DELETE /api/v2/voice/sessions/{session_id}", token, g.vadmin.close},
		{"POST /api/v2/voice/broadcast", token, g.vadmin.broadcast},
		{"/api/v2/admin/", token, g.h.admin},
		{"/api/v2/documents/", token, g.h.docs},
		{"GET /openapi.json", open, g.h.openapi},
	}
	if g.cfg.ConsoleEnabled {
		rs = append(rs, route{"GET /console", open, g.h.console}, route{"GET /console/{file}", open, g.h.console})
	}
	if g.cfg.MetricsEnabled && g.cfg.MetricsAddr == "" {
		rs = append(rs, route{"GET /metrics", open, g.tel.metricsHandler()})
	}
	return rs
}

// protectedPatterns are the patterns of the routes that need a token.
func protectedPatterns(rs []route) []string {
	var ps []string
	for _, r := range rs {
		if r.access != open {
			ps = append(ps, r.pattern)
		}
	}
	return ps
}

// router registers the route table, each route behind what its access asks for.
func (g *gateway) router() *proxy.Router {
	rt := proxy.NewRouter()
	for _, r := range g.routes() {
		rt.Handle(r.pattern, g.protect(r.handler, r.access))
	}
	return rt
}

// protect puts h behind authentication (401 without a valid token), then the policy:
// permission, tenant and ownership (403), rates, quota and concurrency caps (429). Paths in
// AUTH_PUBLIC_PATHS skip both: this is the one place that decides it.
func (g *gateway) protect(h http.Handler, a access) http.Handler {
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
		allow := proxy.CORSOptions{Origins: g.cfg.CORSOrigins}.AllowOrigin
		guarded = voice.RefuseInBand(allow, g.authn.Require(true)(g.enforcer.Guard(h)))
		h = voice.RefuseInBand(allow, h)
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
func (g *gateway) edge(h http.Handler) http.Handler {
	cfg, tel := g.cfg, g.tel
	mws := []proxy.Middleware{proxy.Recover(g.log), proxy.RequestID()}
	if tel.tracing {
		mws = append(mws, tel.traceRequests())
	}
	mws = append(mws, proxy.AccessLog(g.log))
	if tel.metrics {
		mws = append(mws, tel.observe())
	}
	mws = append(mws,
		// Before anything can refuse a request: net/http reads what is left of a refused
		// request's body too, and that must be bounded as well.
		proxy.CloseChunked(),
		proxy.BodyDeadline(proxy.BodyDeadlineOptions{Grace: cfg.BodyReadTimeout, MinRate: cfg.BodyMinRate}),
		proxy.ClientIP(cfg.TrustedProxies),
		proxy.CORS(proxy.CORSOptions{Origins: cfg.CORSOrigins}),
		proxy.CanonicalPath(),
	)
	return proxy.Chain(h, mws...)
}

func (g *gateway) healthz(w http.ResponseWriter, r *http.Request) {
	proxy.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (g *gateway) readyz(w http.ResponseWriter, r *http.Request) {
	if status := g.readiness(r.Context()); status != "ready" {
		proxy.WriteJSON(w, http.StatusServiceUnavailable, map[string]string{"status": status})
		return
	}
	proxy.WriteJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
