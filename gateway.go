package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/console"
	"voicegate/openapi"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/sse"
	"voicegate/voice"
)

// gateway is everything built from the configuration: the shared state, the handlers of the
// routes, and what shutdown must reach.
type gateway struct {
	cfg *config
	log *slog.Logger
	tel *telemetry

	redis     rueidis.Client // nil without REDIS_URL
	authn     *auth.Authenticator
	enforcer  *policy.Enforcer
	policy    *policy.Store
	streams   *sse.Registry
	streamDir *sse.Directory   // nil without Redis
	replay    *sse.RedisReplay // nil without Redis or with resuming off
	bulkRedis rueidis.Client   // the replay log's own connection; nil without it
	voices    *voice.Registry
	vadmin    voiceAdmin
	renewer   *renewer // nil without Redis
	h         handlers
	handler   http.Handler // the route table behind the edge middleware

	closers  []func() // what close releases, last first
	draining atomic.Bool
}

// handlers are the routes' own handlers, before protection.
type handlers struct {
	chat, chatResume, cancel, revoke, voice, voiceSessions, admin, docs http.Handler
	openapi, console                                                    http.Handler // console: nil unless CONSOLE_ENABLED
}

// Permissions that handlers check themselves, besides those the policy binds routes to.
var handlerPerms = []string{auth.PermRevoke, "chat:admin", "voice:admin"}

// newGateway builds every dependency and every handler, in the order they need each other:
// Redis, the stores it backs, authentication, the handlers, the policy (which checks itself
// against the route table), and the route table behind the edge.
func newGateway(ctx context.Context, cfg *config, logger *slog.Logger, tel *telemetry) (_ *gateway, err error) {
	g := &gateway{cfg: cfg, log: logger, tel: tel}
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	if len(cfg.RedisAddrs) > 0 {
		client, err := connectRedis(ctx, cfg, 0)
		if err != nil {
			return nil, err
		}
		timing := redisTiming{keys: policy.NewKeys(cfg.RedisPrefix)}
		if tel.metrics {
			timing.record = tel.redisCall
		}
		g.redis = guardRedis(client, logger, timing)
		g.closers = append(g.closers, g.redis.Close)
		// Stopped once whatever releases leases and sessions has closed, just before the client:
		// its last round takes their releases to Redis.
		g.renewer = newRenewer(cfg.LeaseTTL/3, logger)
		g.closers = append(g.closers, g.renewer.stop)
		if cfg.SSEResumeWindow > 0 {
			// The replay log's appends are bulk traffic: on a connection of their own, a
			// pipeline of them never delays a token check or an admission queued behind it.
			// Its one blocking command is the resumers' reader's XREAD: one connection for it.
			bulk, err := connectRedis(ctx, cfg, 1)
			if err != nil {
				return nil, err
			}
			g.bulkRedis = guardRedis(bulk, logger, timing)
			g.closers = append(g.closers, g.bulkRedis.Close)
		}
	}
	if err := g.buildAuth(ctx); err != nil {
		return nil, err
	}
	g.buildFairUse()
	if err := g.buildHandlers(); err != nil {
		return nil, err
	}
	g.policy, err = policy.NewStore(policy.StoreOptions{Path: cfg.PolicyFile, Routes: bindings(g.routes()),
		ExtraPerms: handlerPerms, Log: logger})
	if err != nil {
		return nil, fmt.Errorf("POLICY_FILE: %w", err)
	}
	g.handler = g.edge(g.router())
	if g.renewer != nil {
		g.renewer.start()
	}
	if err := tel.observeReady(func(ctx context.Context) bool { return g.readiness(ctx) == "ready" }); err != nil {
		return nil, err
	}
	return g, nil
}

// buildAuth builds token verification (key sources, verifier), revocations and the
// authenticator.
func (g *gateway) buildAuth(ctx context.Context) error {
	cfg := g.cfg
	// A user revocation must outlive every token it covers, and the verifier accepts a token
	// until its exp (at most JWT_MAX_LIFETIME away) plus the leeway.
	keep := cfg.JWTMaxLifetime + cfg.JWTLeeway
	var revocations auth.Revocations = auth.NewMemoryRevocations(keep, nil)
	if g.redis != nil {
		revocations = auth.NewRedisRevocations(g.redis, auth.RedisRevocationsOptions{Prefix: cfg.RedisPrefix, MaxLifetime: keep,
			Replicas: revocationReplicas(g.redis)})
	}
	var jwks *auth.JWKS
	if cfg.JWKSURL != nil {
		jwks = auth.NewJWKS(ctx, auth.JWKSOptions{URL: cfg.JWKSURL.String(), Refresh: cfg.JWKSRefresh,
			MinRefetch: cfg.JWKSMinRefetch, Log: g.log})
		g.closers = append(g.closers, jwks.Close)
	}
	verifier, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: cfg.JWTSecret, JWKS: jwks,
		Issuer: cfg.JWTIssuer, Audience: cfg.JWTAudience, Leeway: cfg.JWTLeeway, MaxLifetime: cfg.JWTMaxLifetime,
		Claims: cfg.Claims})
	if err != nil {
		return err
	}
	var users *auth.UserStatus
	if cfg.UserServiceURL != nil {
		users = auth.NewUserStatus(auth.UserStatusOptions{URL: cfg.UserServiceURL, Redis: g.redis, Prefix: cfg.RedisPrefix,
			OnResult: func(outcome string, took time.Duration) { g.tel.upstreamResult("user", outcome, took) }})
	}
	tel := g.tel
	g.authn = auth.New(auth.Options{
		OnFailure:     func(code string) { tel.authFailures.Add(context.Background(), 1, tel.add1("code", code)...) },
		OnStoreError:  g.redisError,
		Verifier:      verifier,
		Revocations:   revocations,
		Users:         users,
		Budget:        cfg.AuthBudget,
		FailOpen:      cfg.AuthFailOpen,
		RefreshWindow: cfg.AuthRefreshWindow,
		PublicPaths:   cfg.AuthPublicPaths,
		Log:           g.log,
	})
	return nil
}

// buildFairUse builds the rate limiter, the concurrency leases and the enforcer. The enforcer
// reads the policy in force from the store, made once the routes are known.
func (g *gateway) buildFairUse() {
	cfg := g.cfg
	admitter := policy.Compose(policy.NewMemoryLimiter(nil), policy.NewMemoryLeases())
	if g.redis != nil {
		ra := policy.NewRedisAdmitter(g.redis, policy.RedisAdmitterOptions{Prefix: cfg.RedisPrefix, TTL: cfg.LeaseTTL,
			OnChange: g.renewer.Kick})
		g.renewer.add("concurrency leases", ra.Renew)
		admitter = ra
	}
	g.enforcer = policy.NewEnforcer(policy.EnforcerOptions{
		OnLimited:    func() { g.tel.rateLimited.Add(context.Background(), 1) },
		OnStoreError: g.redisError,
		Policy:       func() *policy.Policy { return g.policy.Policy() },
		Subject:      subject,
		Admitter:     admitter,
		Budget:       cfg.LimitBudget,
		Log:          g.log,
	})
}

// buildHandlers builds the handler of every route: chat and its cancel, revocation, voice and
// its listing, the proxies of the plain back ends, the API description and the console.
func (g *gateway) buildHandlers() error {
	cfg, tel, bg := g.cfg, g.tel, context.Background()
	transport := proxy.NewTransport(proxy.TransportOptions{ResponseHeaderTimeout: cfg.UpstreamTimeout})
	g.closers = append(g.closers, transport.CloseIdleConnections)
	outbound := proxy.Outbound{Identity: auth.UpstreamHeaders}
	algo := g.newPool("algo", cfg.AlgoURLs, transport)

	if g.redis != nil {
		g.streamDir = sse.NewDirectory(g.redis, cfg.RedisPrefix, cfg.InstanceID, g.log)
	}
	g.streams = sse.NewRegistry()
	var replay sse.ReplayLog // nil: resuming off
	if cfg.SSEResumeWindow > 0 {
		if g.redis != nil {
			g.replay = sse.NewRedisReplay(g.bulkRedis, sse.RedisReplayOptions{Prefix: cfg.RedisPrefix,
				Retention: cfg.SSEResumeRetention, Log: g.log,
				OnSend: func(batches int) {
					tel.replayPipelines.Add(bg, 1)
					tel.replayBatches.Add(bg, int64(batches))
				}})
			replay = g.replay
		} else {
			replay = sse.NewMemoryReplay(cfg.SSEResumeRetention, nil)
		}
	}
	chat := sse.HandlerOptions{
		AlgoURL:         algo.Primary(),
		Transport:       algo,
		Registry:        g.streams,
		Directory:       g.streamDir,
		Replay:          replay,
		ResumeWindow:    cfg.SSEResumeWindow,
		Outbound:        outbound,
		MaxBodyBytes:    cfg.ChatMaxBodyBytes,
		MaxMessageChars: cfg.ChatMaxMessage,
		MaxTokens:       cfg.ChatMaxTokens,
		DefaultModel:    cfg.ChatDefaultModel,
		MaxLineBytes:    cfg.SSEMaxLineBytes,
		PingInterval:    cfg.SSEPingInterval,
		WriteTimeout:    cfg.SSEWriteTimeout,
		Admit:           policy.AdmitClaim,
		AdmitReplay:     policy.AdmitReplay,
		Resumes:         sse.NewResumeLimit(cfg.SSEMaxResumes, returnMemory()),
		Owner:           auth.Owner,
		Token:           auth.Token,
		OnEvents:        func(name string, n int64) { tel.sseEvents.Add(bg, n, tel.add1("event", name)...) },
		OnStreamStart:   func() { tel.sseActive.Add(bg, 1) },
		OnStreamEnd:     func() { tel.sseActive.Add(bg, -1) },
		OnFirstEvent:    func(d time.Duration) { tel.firstEvent.Record(bg, d.Seconds()) },
		Log:             g.log,
	}
	g.h.chat = sse.NewHandler(chat)
	g.h.chatResume = sse.NewResumeHandler(chat)
	cancel := sse.CancelOptions{
		Registry: g.streams,
		Owner:    auth.Owner,
		Tenant:   addressedTenant,
		Admin:    func(r *http.Request) bool { return g.can(r, "chat:admin") },
	}
	if g.streamDir != nil {
		cancel.Remote = func(ctx context.Context, k sse.StreamKey) error {
			// Bounded like a revocation: a frozen Redis must not hold the request.
			ctx, stop := context.WithTimeout(ctx, remoteCancelBudget)
			defer stop()
			return g.streamDir.Cancel(ctx, k)
		}
	}
	g.h.cancel = sse.NewCancelHandler(cancel)
	g.h.revoke = auth.NewRevokeHandler(auth.RevokeOptions{
		Revocations: g.authn.Revocations(),
		Can:         g.can,
		MaxLifetime: cfg.JWTMaxLifetime,
		Leeway:      cfg.JWTLeeway,
		OnRevoked:   g.revoked,
	})

	vo := voice.RegistryOptions{Instance: cfg.Instance, Redis: g.redis, Prefix: cfg.RedisPrefix,
		TTL: cfg.LeaseTTL, UsageMaxLen: int64(cfg.VoiceUsageMaxLen), Log: g.log}
	if g.renewer != nil {
		vo.OnChange = g.renewer.Kick
	}
	g.voices = voice.NewRegistry(vo)
	if g.renewer != nil {
		g.renewer.add("voice sessions", g.voices.Renew)
	}
	vopts := voice.Options{
		AlgoURL:      algo.Primary(),
		Via:          algo.Via, // voice dials share the replicas' health with chat
		AllowOrigin:  proxy.CORSOptions{Origins: cfg.CORSOrigins}.AllowOrigin,
		PingInterval: cfg.VoicePing,
		IdleTimeout:  cfg.VoiceIdle,
		WriteTimeout: cfg.VoiceWriteTimeout,
		RawAudio:     cfg.VoiceRawAudio,
		Audio:        voice.AudioConfig{Language: cfg.VoiceLanguage},
		Registry:     g.voices,
		Owner:        auth.Owner,
		Token:        auth.Token,
		Admit:        func(w http.ResponseWriter, r *http.Request) (func(), bool) { return policy.Admit(w, r, nil) },
		Recheck:      g.recheck,
		Outbound:     outbound,
		OnStart: func() {
			tel.wsActive.Add(bg, 1, tel.add1("type", "client")...)
			tel.wsActive.Add(bg, 1, tel.add1("type", "upstream")...)
		},
		OnEnd: func(s voice.Stats) {
			tel.wsActive.Add(bg, -1, tel.add1("type", "client")...)
			tel.wsActive.Add(bg, -1, tel.add1("type", "upstream")...)
			tel.voiceBytes.Add(bg, s.AudioBytesIn, tel.add1("direction", "in")...)
			tel.voiceBytes.Add(bg, s.AudioBytesOut, tel.add1("direction", "out")...)
			tel.voiceSessions.Add(bg, 1, tel.add1("code", strconv.Itoa(int(s.CloseCode)))...)
			tel.voiceSessionEnded(int(s.CloseCode), s.Duration)
		},
		Log: g.log,
	}
	if err := g.voiceGovernance(&vopts); err != nil {
		return err
	}
	vh := voice.NewHandler(vopts)
	g.closers = append(g.closers, vh.Close)
	g.h.voice = vh
	g.h.voiceSessions = voice.NewSessionsHandler(g.voices, voiceCaller)
	g.vadmin = voiceAdmin{session: voice.NewSessionHandler(g.voices, voiceCaller),
		close:     voice.NewCloseHandler(g.voices, voiceCaller),
		broadcast: voice.NewBroadcastHandler(g.voices, voiceCaller)}

	g.h.admin = g.backend("admin", "admin service", cfg.AdminURLs, transport, outbound)
	g.h.docs = g.backend("docs", "documents service", cfg.DocsURLs, transport, outbound)
	g.h.openapi = openapi.Handler()
	if cfg.ConsoleEnabled {
		g.h.console = console.Handler(console.Options{Gateways: cfg.ConsoleGateways, Demo: cfg.Demo})
	}
	return nil
}

// remoteCancelBudget bounds the Redis calls of a cancel for a stream on another instance (the
// lookup of its owner and the publication).
const remoteCancelBudget = 500 * time.Millisecond

// backend proxies to a plain back end's replicas, or answers 404 when it has none.
func (g *gateway) backend(label, name string, targets []*url.URL, t *http.Transport, outbound proxy.Outbound) http.Handler {
	pool := g.newPool(label, targets, t)
	if pool == nil {
		return http.HandlerFunc(proxy.NotFound)
	}
	return proxy.Chain(proxy.New(proxy.Options{
		Target:       pool.Primary(),
		Transport:    pool,
		BufferPool:   proxy.NewBufferPool(0),
		Name:         name,
		Outbound:     outbound,
		Rewrite:      backendCredentials(g.cfg),
		WriteTimeout: g.cfg.ProxyWriteTimeout,
	}), proxy.BodyLimit(g.cfg.MaxBodyBytes))
}

// backendCredentials removes the client's credentials from requests to ADMIN_URL and DOCS_URL,
// unless BACKEND_FORWARD_CREDENTIALS passes them on. By default those back ends learn who the
// caller is from the identity headers only: a bearer token is a credential for the gateway,
// and a back end that never sees it cannot leak or replay it; cookies of the gateway's domain
// may belong to other applications. A back end that verifies the token itself, or calls others
// on the user's behalf, asks for it with BACKEND_FORWARD_CREDENTIALS=authorization.
func backendCredentials(cfg *config) func(*httputil.ProxyRequest) {
	if cfg.ForwardAuthorization && cfg.ForwardCookies {
		return nil
	}
	return func(pr *httputil.ProxyRequest) {
		if !cfg.ForwardAuthorization {
			pr.Out.Header.Del("Authorization")
		}
		if !cfg.ForwardCookies {
			pr.Out.Header.Del("Cookie")
		}
	}
}

// newPool balances an upstream's replicas over t; its attempts are traced and counted. Without
// targets it is nil.
func (g *gateway) newPool(name string, targets []*url.URL, t *http.Transport) *proxy.Pool {
	if len(targets) == 0 {
		return nil
	}
	return proxy.NewPool(proxy.PoolOptions{
		Name:      name,
		Targets:   targets,
		Transport: t,
		Trace:     g.tel.clientSpan(),
		OnResult:  g.tel.upstreamResult,
	})
}

func (g *gateway) redisError() { g.tel.redisErrors.Add(context.Background(), 1) }

// close releases what newGateway acquired, last first.
func (g *gateway) close() {
	for i := len(g.closers) - 1; i >= 0; i-- {
		g.closers[i]()
	}
	g.closers = nil
}

// recheck tells a long-lived voice session whether its token still holds: revoked, expired or
// disabled ends it. A revocation store that cannot answer does not: a Redis blip must not
// drop every call in progress.
func (g *gateway) recheck(r *http.Request) func(context.Context) error {
	id := auth.FromContext(r.Context())
	return func(ctx context.Context) error {
		perr := g.authn.Check(ctx, id)
		if perr == nil || perr.Status != http.StatusUnauthorized {
			return nil
		}
		return errors.New(perr.Message)
	}
}

// can reports whether the request's caller holds permission p.
func (g *gateway) can(r *http.Request, p string) bool { return g.enforcer.Allows(r, p) }

// addressedTenant is the tenant whose streams or sessions a request addresses: the one it names
// in X-Tenant-Id (the policy lets only a super admin name another than its own), or else the
// caller's.
func addressedTenant(r *http.Request) string {
	if t := r.Header.Get(policy.HeaderTenant); t != "" {
		return t
	}
	_, tenant := auth.Owner(r)
	return tenant
}

// revoked ends, on every instance, the chat streams and voice sessions of the tokens v
// revokes, in v's tenant only. Failures are logged: the voice sessions' periodic recheck still
// closes them, and a stream ends with its answer.
func (g *gateway) revoked(ctx context.Context, v policy.Revocation) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	g.streams.Revoke(v) // this instance's at once
	if g.streamDir != nil {
		if err := g.streamDir.Revoke(ctx, v); err != nil {
			g.log.Warn("telling other instances about a revocation failed", "err", proxy.Describe(err))
		}
	}
	if err := g.voices.Revoke(ctx, v); err != nil {
		g.log.Warn("telling other instances about a revocation failed", "err", proxy.Describe(err))
	}
}

// subject presents the authenticated caller to the policy.
func subject(r *http.Request) (policy.Subject, bool) {
	id := auth.FromContext(r.Context())
	if id == nil {
		return policy.Subject{}, false
	}
	return policy.Subject{UserID: id.UserID, TenantID: id.TenantID, Roles: id.Roles, Grants: id.Permissions}, true
}

// readiness is what /readyz and voicegate_ready report: "ready", "draining", or what
// redisReadiness says is wrong with Redis.
func (g *gateway) readiness(ctx context.Context) string {
	if g.draining.Load() {
		return "draining"
	}
	if g.redis != nil {
		ctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		defer cancel()
		return redisReadiness(ctx, g.redis)
	}
	return "ready"
}

// connectRedis connects to Redis or Redis Cluster, retrying until REDIS_CONNECT_TIMEOUT:
// instances often start before their Redis is ready. Later outages are ridden out by the client,
// which reconnects on its own. blocking bounds the connections for blocking commands, per node
// (0: the client library's default).
func connectRedis(ctx context.Context, cfg *config, blocking int) (rueidis.Client, error) {
	opt := rueidis.ClientOption{
		InitAddress: cfg.RedisAddrs,
		SelectDB:    cfg.RedisDB,
		Username:    cfg.RedisUser,
		Password:    cfg.RedisPassword,
		// Keep per-connection memory modest; the gateway's values are tiny.
		CacheSizeEachConn:   16 << 20,
		ReadBufferEachConn:  64 << 10,
		WriteBufferEachConn: 64 << 10,
		Dialer:              net.Dialer{Timeout: time.Second, KeepAlive: time.Second},
		ClusterOption:       clusterOption(),
		RetryDelay:          retryDelay,
		BlockingPoolSize:    blocking,
	}
	opt.ConnWriteTimeout = 2 * time.Second // notice a dead Redis connection within seconds
	deadline := time.Now().Add(cfg.RedisConnectWithin)
	for {
		// A client is made only once an address accepts a connection: a client made against
		// nothing leaves a goroutine of its own behind for a while (a cluster-topology refresh
		// scheduled before it failed).
		err := reachable(ctx, cfg.RedisAddrs)
		if err == nil {
			var client rueidis.Client
			if client, err = rueidis.NewClient(opt); err == nil {
				return client, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("REDIS_URL: cannot reach Redis: %v", proxy.Describe(err))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// reachable reports whether one of addrs accepts a TCP connection within a second.
func reachable(ctx context.Context, addrs []string) error {
	var first error
	for _, a := range addrs {
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", a)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// returnMemory gives what a storm of resumers held back to the operating system as soon as the
// last of them has left, rather than at the runtime's next collection (up to two minutes away
// on an idle instance) and at its scavenger's pace: RSS is what an operator watches for leaks,
// and a thousand waiting clients' stacks and buffers are tens of megabytes. Crowds smaller than
// stormSize are left to the runtime, and it runs at most once every stormGap: a storm that ends
// sooner after the last return is returned once the gap is over, not skipped.
func returnMemory() func(peak int64) {
	const stormSize, stormGap = 64, time.Second
	var (
		mu      sync.Mutex
		last    time.Time // when the last return began
		pending bool      // a return is scheduled, and covers every storm that ends before it
	)
	return func(peak int64) {
		if peak < stormSize {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if pending {
			return
		}
		pending = true
		time.AfterFunc(max(0, stormGap-time.Since(last)), func() {
			mu.Lock()
			pending, last = false, time.Now()
			mu.Unlock()
			// Two collections: a buffer put back in a sync.Pool survives the first in the pool's
			// victim cache, and is freed by the second.
			runtime.GC()
			debug.FreeOSMemory()
		})
	}
}
