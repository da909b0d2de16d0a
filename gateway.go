package main

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"voicegate/auth"
	"voicegate/console"
	"voicegate/openapi"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// gateway is what serve and shutdown work with once newGateway has built everything: the route
// table behind the edge, the state that outlives a request (watched, run and drained while
// serving), and what close releases.
type gateway struct {
	cfg *config
	log *slog.Logger
	tel *telemetry

	handler http.Handler    // the route table behind the edge middleware
	health  *health         // /readyz; shutdown marks it draining
	policy  *policy.Store   // watched, and reloaded on SIGHUP
	chat    *chatStreams    // running streams: cancels and replay run while serving; drained and ended at shutdown
	voices  *voice.Registry // live sessions: broadcasts run while serving; closed at shutdown
	closers closers         // what close releases, last first
}

// newGateway builds the gateway from its configuration. Each part is made from the parts it
// needs, passed in, so nothing is used before it is made and nothing is assigned after a
// closure that reads it: shared state first, then who may do what, the upstreams, chat and
// voice, the handlers, and the route table behind the edge. What it acquires is released, last
// first, by close, or at once if a later part fails.
func newGateway(ctx context.Context, cfg *config, log *slog.Logger, tel *telemetry) (_ *gateway, err error) {
	var release closers
	defer func() {
		if err != nil {
			release.close()
		}
	}()

	// Shared state: Redis (none without REDIS_URL: in-memory stores then serve one instance),
	// and the renewer that keeps this instance's leases and sessions alive in it. The renewer
	// stops once whatever releases leases and sessions has closed, just before Redis: its last
	// round takes their releases there.
	redis, err := connectShared(ctx, cfg, log, tel)
	if err != nil {
		return nil, err
	}
	release.add(redis.close)
	renew := newRenewer(cfg.LeaseTTL/3, log)
	release.add(renew.stop)

	// Who may do what. The policy binds the route table's routes, which are known before any
	// handler is made; authentication checks tokens and their revocations; the enforcer holds
	// callers to the policy in force: permissions, tenants, rates, quotas and concurrency.
	policies, err := newPolicyStore(cfg, log)
	if err != nil {
		return nil, err
	}
	jwks := newJWKS(ctx, cfg, log)
	if jwks != nil {
		release.add(jwks.Close)
	}
	revocations := newRevocations(cfg, redis.client)
	authn, err := newAuth(cfg, jwks, revocations, redis.client, tel, log)
	if err != nil {
		return nil, err
	}
	enforcer := newFairUse(cfg, redis.client, renew, policies, tel, log)

	// The upstreams: one transport for every HTTP upstream, the algorithm service's replicas
	// (chat and voice share their health), and what every request to them carries.
	transport := proxy.NewTransport(proxy.TransportOptions{ResponseHeaderTimeout: cfg.UpstreamTimeout})
	release.add(transport.CloseIdleConnections)
	algo := newPool("algo", cfg.AlgoURLs, transport, tel)
	outbound := proxy.Outbound{Identity: auth.UpstreamHeaders}

	// Chat streams and voice sessions: this instance's, and how the others reach them.
	chat := newChatStreams(cfg, redis, tel, log)
	voices := newVoiceRegistry(cfg, redis.client, renew, log)

	// The handlers of the route table, before protection.
	status := &health{redis: redis.client}
	chatRoutes := newChatHandlers(cfg, chat, algo, outbound, tel, log)
	voiceHandler, realtimeHandler, err := newVoiceHandlers(cfg, redis.client, algo, voices, policies, authn, outbound, tel, log)
	if err != nil {
		return nil, err
	}
	release.add(voiceHandler.Close)
	release.add(realtimeHandler.Close)
	h := handlers{
		healthz:        http.HandlerFunc(status.healthz),
		readyz:         http.HandlerFunc(status.readyz),
		chat:           chatRoutes.stream,
		chatResume:     chatRoutes.resume,
		chatAnswer:     chatRoutes.answer,
		completions:    chatRoutes.completions,
		models:         newModelsHandler(cfg.OpenAIModels, time.Now()),
		cancel:         newCancelHandler(chat, enforcer.Allows),
		revoke:         newRevokeHandler(cfg, revocations, enforcer.Allows, endRevoked(chat, voices, log)),
		voice:          voiceHandler,
		realtime:       realtimeHandler,
		voiceSessions:  voice.NewSessionsHandler(voices, voiceCaller),
		voiceSession:   voice.NewSessionHandler(voices, voiceCaller),
		voiceClose:     voice.NewCloseHandler(voices, voiceCaller),
		voiceBroadcast: voice.NewBroadcastHandler(voices, voiceCaller),
		admin:          newBackend(cfg, "admin", "admin service", cfg.AdminURLs, transport, outbound, tel),
		docs:           newBackend(cfg, "docs", "documents service", cfg.DocsURLs, transport, outbound, tel),
		openapi:        openapi.Handler(),
	}
	if cfg.ConsoleEnabled {
		h.console = console.Handler(console.Options{Gateways: cfg.ConsoleGateways, Demo: cfg.Demo})
	}
	if cfg.MetricsEnabled {
		h.metrics = tel.metricsHandler()
	}

	// The route table, each route behind authentication and the policy as it asks, behind the
	// edge middleware every request passes through.
	protect := guard{authn: authn, enforcer: enforcer, allowOrigin: proxy.CORSOptions{Origins: cfg.CORSOrigins}.AllowOrigin}
	handler := edge(router(routes(cfg, h), protect), cfg, tel, log)

	// Everything is built: the renewer has all its tasks.
	renew.start()
	if err := tel.observeReady(status.ready); err != nil {
		return nil, err
	}
	return &gateway{cfg: cfg, log: log, tel: tel, handler: handler, health: status, policy: policies,
		chat: chat, voices: voices, closers: release}, nil
}

// close releases what newGateway acquired, last first.
func (g *gateway) close() { g.closers.close() }

// closers are what releases the resources a gateway acquired, in the order they were acquired.
type closers []func()

func (c *closers) add(f func()) { *c = append(*c, f) }

// close calls them last first, once.
func (c *closers) close() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
	*c = nil
}
