// Command voicegate is the edge gateway of an AI voice assistant: it streams chat answers from
// the algorithm service as Server-Sent Events, bridges voice WebSockets, and proxies the plain
// HTTP back ends, behind a load balancer.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/lmittmann/tint"
	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/sse"
	"voicegate/voice"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal starts a graceful shutdown, a second one kills at once.
		<-ctx.Done()
		stop()
	}()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, errHelp) {
			fmt.Fprintln(os.Stderr, "voicegate:", err)
		}
		os.Exit(1)
	}
}

// run is the whole program: it parses the configuration, wires the gateway, serves until ctx
// is done, then shuts down gracefully. Tests call it directly.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 1 {
		switch args[1] {
		case "token":
			return runToken(args[2:], getenv, stdout, stderr)
		case "demo-algo":
			return runDemoAlgo(ctx, args[2:], getenv, stderr)
		}
	}
	cfg, err := parseConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	if cfg.Version {
		printVersion(stdout)
		return nil
	}
	if cfg.HealthCheck {
		return healthCheck(ctx, cfg.ListenAddr)
	}
	logger := newLogger(cfg, stderr)
	if cfg.Instance == "" {
		cfg.Instance, _ = os.Hostname()
	}

	var demoToken string
	ownSecret := cfg.JWTSecret != nil
	if cfg.Demo {
		demo, err := startDemo(logger, "127.0.0.1:0")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		defer demo.Close()
		cfg.AlgoURLs = []*url.URL{demo.URL}
		if cfg.JWTSecret == nil {
			cfg.JWTSecret = demoSecret()
		}
		if demoToken, err = demoTokenFor(cfg); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}

	tel, err := newTelemetry(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		tel.shutdown(ctx) // flush the last spans
	}()
	if tel.tracing {
		logger = slog.New(traceLogs{logger.Handler()})
	}

	gw, err := newGateway(ctx, cfg, logger, tel)
	if err != nil {
		return err
	}
	defer gw.close()
	handler, err := gw.handler()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}
	watchCtx, stopWatching := context.WithCancel(ctx)
	var background sync.WaitGroup
	defer background.Wait()
	defer stopWatching()
	background.Go(func() { gw.policy.Watch(watchCtx, cfg.PolicyWatch) })
	if gw.streamDir != nil {
		background.Go(func() { gw.streamDir.Run(watchCtx, gw.streams) })
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-watchCtx.Done():
				return
			case <-hup:
				_ = gw.policy.Reload() // a refusal is logged; the running policy stays
			}
		}
	}()
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		// No server-wide write deadline: it would cut every stream and voice session at that
		// age. Streams bound themselves with pings and cancellation instead.
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 32 << 10,
		ErrorLog:       slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		BaseContext:    func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	serveErr := make(chan error, 2)
	go func() { serveErr <- srv.Serve(ln) }()
	var metricsSrv *http.Server
	if cfg.MetricsEnabled && cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			srv.Close()
			return fmt.Errorf("METRICS_ADDR: listen on %s: %w", cfg.MetricsAddr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", tel.metricsHandler())
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metricsSrv.Serve(mln) }()
		defer metricsSrv.Close()
		logger.Info("metrics listening", "addr", mln.Addr().String())
	}
	addr := ln.Addr().String()
	// Before the "listening" line, which tells whoever waits for it that -healthcheck works.
	if cfg.ListenAddrFile != "" {
		if err := writeAddrFile(cfg.ListenAddrFile, addr); err != nil {
			// Not fatal: -healthcheck then falls back to LISTEN_ADDR.
			logger.Warn("cannot write LISTEN_ADDR_FILE; -healthcheck will use LISTEN_ADDR", "err", err)
		} else {
			defer os.Remove(cfg.ListenAddrFile)
		}
	}
	logger.Info("listening", "addr", addr, "version", buildVersion())
	if cfg.Demo {
		printDemo(stdout, addr, demoToken, ownSecret)
	}

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	return gw.shutdown(srv, serveErr)
}

// healthCheck asks the gateway on addr (its listen address) for /healthz.
func healthCheck(ctx context.Context, addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("LISTEN_ADDR: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+dialAddr(addr)+"/healthz", nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: status %d", res.StatusCode)
	}
	return nil
}

// dialAddr turns a listen address into one a client on this host can reach: a wildcard host
// (":8080", "0.0.0.0:8080", "[::]:8080") becomes 127.0.0.1.
func dialAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// writeAddrFile records the address listened on for -healthcheck, atomically, so that a probe
// never reads half a file.
func writeAddrFile(file, addr string) error {
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte(addr+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// gateway holds what the handlers share and what shutdown must reach.
type gateway struct {
	cfg         *config
	log         *slog.Logger
	transport   *http.Transport
	voice       *voice.Handler // its dials' idle connections close with the gateway
	pool        *proxy.BufferPool
	tel         *telemetry
	algo        *proxy.Pool
	streams     *sse.Registry
	streamDir   *sse.Directory // nil without Redis
	voices      *voice.Registry
	redis       rueidis.Client // nil without REDIS_URL
	jwks        *auth.JWKS     // nil without JWT_JWKS_URL
	revocations auth.Revocations
	authn       *auth.Authenticator
	policy      *policy.Store // set by handler, which knows the routes
	enforcer    *policy.Enforcer
	limiter     policy.Limiter
	leases      policy.Leases
	redisLeases *policy.RedisLeases // to stop its renewal; nil without Redis
	draining    atomic.Bool
}

// Permissions that handlers check themselves, besides those the policy binds routes to.
var handlerPerms = []string{auth.PermRevoke, "chat:admin", "voice:admin"}

// newGateway builds the gateway's dependencies: Redis (when configured), the token verifier and
// its key sources, the revocation store, the policy.
func newGateway(ctx context.Context, cfg *config, logger *slog.Logger, tel *telemetry) (*gateway, error) {
	g := &gateway{
		cfg:       cfg,
		log:       logger,
		transport: proxy.NewTransport(proxy.TransportOptions{ResponseHeaderTimeout: cfg.UpstreamTimeout}),
		pool:      proxy.NewBufferPool(0),
		tel:       tel,
	}
	g.algo = g.newPool("algo", cfg.AlgoURLs)
	ok := false
	defer func() {
		if !ok {
			g.close()
		}
	}()

	// A user revocation must outlive every token it covers, and the verifier accepts a token
	// until its exp (at most JWT_MAX_LIFETIME away) plus the leeway.
	keepRevocations := cfg.JWTMaxLifetime + cfg.JWTLeeway
	if len(cfg.RedisAddrs) > 0 {
		client, err := connectRedis(ctx, cfg)
		if err != nil {
			return nil, err
		}
		g.redis = guardRedis(client, logger)
		g.revocations = auth.NewRedisRevocations(g.redis, auth.RedisRevocationsOptions{
			Prefix: cfg.RedisPrefix, MaxLifetime: keepRevocations})
	} else {
		g.revocations = auth.NewMemoryRevocations(keepRevocations)
	}
	if cfg.JWKSURL != nil {
		g.jwks = auth.NewJWKS(ctx, auth.JWKSOptions{URL: cfg.JWKSURL.String(), Refresh: cfg.JWKSRefresh,
			MinRefetch: cfg.JWKSMinRefetch, Log: logger})
	}
	verifier, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: cfg.JWTSecret, JWKS: g.jwks,
		Issuer: cfg.JWTIssuer, Audience: cfg.JWTAudience, Leeway: cfg.JWTLeeway, MaxLifetime: cfg.JWTMaxLifetime,
		Claims: cfg.Claims})
	if err != nil {
		return nil, err
	}
	var users *auth.UserStatus
	if cfg.UserServiceURL != nil {
		users = auth.NewUserStatus(auth.UserStatusOptions{URL: cfg.UserServiceURL, Redis: g.redis, Prefix: cfg.RedisPrefix})
	}
	g.authn = auth.New(auth.Options{
		OnFailure:     func(code string) { tel.authFailures.Add(context.Background(), 1, tel.set("code", code)) },
		OnStoreError:  g.redisError,
		Verifier:      verifier,
		Revocations:   g.revocations,
		Users:         users,
		Budget:        cfg.AuthBudget,
		FailOpen:      cfg.AuthFailOpen,
		RefreshWindow: cfg.AuthRefreshWindow,
		PublicPaths:   cfg.AuthPublicPaths,
		Log:           logger,
	})
	if g.redis != nil {
		g.streamDir = sse.NewDirectory(g.redis, cfg.RedisPrefix, 0, logger)
	}
	g.streams = sse.NewRegistry(g.streamDir)
	g.voices = voice.NewRegistry(voice.RegistryOptions{Instance: cfg.Instance, Redis: g.redis,
		Prefix: cfg.RedisPrefix, TTL: cfg.LeaseTTL, Log: logger})
	if g.redis != nil {
		g.limiter = policy.NewRedisLimiter(g.redis, policy.RedisLimiterOptions{Prefix: cfg.RedisPrefix})
		g.redisLeases = policy.NewRedisLeases(g.redis, cfg.RedisPrefix, cfg.LeaseTTL, logger)
		g.leases = g.redisLeases
	} else {
		g.limiter = policy.NewMemoryLimiter()
		g.leases = policy.NewMemoryLeases()
	}
	g.enforcer = policy.NewEnforcer(policy.EnforcerOptions{
		OnLimited:    func() { tel.rateLimited.Add(context.Background(), 1) },
		OnStoreError: g.redisError,
		Policy:       func() *policy.Policy { return g.policy.Policy() },
		Subject:      subject,
		Limiter:      g.limiter,
		Leases:       g.leases,
		Budget:       cfg.LimitBudget,
		Log:          logger,
	})
	if err := tel.observeReady(func(ctx context.Context) bool { return g.readiness(ctx) == "ready" }); err != nil {
		return nil, err
	}
	ok = true
	return g, nil
}

// newPool balances an upstream's replicas; its attempts are traced and counted.
func (g *gateway) newPool(name string, targets []*url.URL) *proxy.Pool {
	if len(targets) == 0 {
		return nil
	}
	return proxy.NewPool(proxy.PoolOptions{
		Name:      name,
		Targets:   targets,
		Transport: g.transport,
		Trace:     g.tel.clientSpan(),
		OnResult: func(upstream, outcome string) {
			g.tel.upstream.Add(context.Background(), 1, g.tel.set("upstream", upstream, "outcome", outcome))
		},
	})
}

func (g *gateway) redisError() { g.tel.redisErrors.Add(context.Background(), 1) }

// close releases what newGateway acquired.
func (g *gateway) close() {
	if g.voices != nil {
		g.voices.Close()
	}
	if g.redisLeases != nil {
		g.redisLeases.Close()
	}
	if g.jwks != nil {
		g.jwks.Close()
	}
	if g.redis != nil {
		g.redis.Close()
	}
	g.transport.CloseIdleConnections()
	if g.voice != nil {
		g.voice.Close()
	}
}

// connectRedis connects to Redis or Redis Cluster, retrying until REDIS_CONNECT_TIMEOUT:
// instances often start before their Redis is ready. Later outages are ridden out by the client,
// which reconnects on its own.
func connectRedis(ctx context.Context, cfg *config) (rueidis.Client, error) {
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

// handler is the whole route table, with the edge middleware around it. Every route but the
// health checks goes through protect; what each needs is the policy's route binding, checked
// against this table when the policy loads.
func (g *gateway) handler() (http.Handler, error) {
	cfg := g.cfg
	rt := newRouter()

	rt.handle("GET", "/healthz", http.HandlerFunc(g.healthz))
	rt.handle("GET", "/readyz", http.HandlerFunc(g.readyz))
	if cfg.MetricsEnabled && cfg.MetricsAddr == "" {
		rt.handle("GET", "/metrics", g.tel.metricsHandler())
	}

	tel, bg := g.tel, context.Background()
	chat := sse.NewHandler(sse.HandlerOptions{
		AlgoURL:         g.algo.Primary(),
		Transport:       g.algo,
		Registry:        g.streams,
		TrustedProxies:  cfg.TrustedProxies,
		MaxBodyBytes:    cfg.ChatMaxBodyBytes,
		MaxMessageChars: cfg.ChatMaxMessage,
		MaxTokens:       cfg.ChatMaxTokens,
		DefaultModel:    cfg.ChatDefaultModel,
		MaxLineBytes:    cfg.SSEMaxLineBytes,
		PingInterval:    cfg.SSEPingInterval,
		WriteTimeout:    cfg.SSEWriteTimeout,
		Admit:           policy.Admit,
		UpstreamHeaders: auth.UpstreamHeaders,
		Owner: func(r *http.Request) (string, string) {
			id := auth.FromContext(r.Context())
			return id.UserID, id.TenantID
		},
		OnEvents:      func(name string, n int64) { tel.sseEvents.Add(bg, n, tel.add1("event", name)...) },
		OnStreamStart: func() { tel.sseActive.Add(bg, 1) },
		OnStreamEnd:   func() { tel.sseActive.Add(bg, -1) },
		OnFirstEvent:  func(d time.Duration) { tel.firstEvent.Record(bg, d.Seconds()) },
		Log:           g.log,
	})
	rt.handle("POST", "/api/v2/chat/stream", g.protectAdmitting(chat))
	mayCancel := func(r *http.Request, owner string) bool {
		return owner == auth.FromContext(r.Context()).UserID || g.can(r, "chat:admin")
	}
	cancel := sse.CancelOptions{
		Registry: g.streams,
		Allowed:  func(r *http.Request, s *sse.Stream) bool { return mayCancel(r, s.UserID) },
	}
	if g.streamDir != nil {
		cancel.Remote = func(ctx context.Context, r *http.Request, id string) error {
			return g.streamDir.Cancel(ctx, id, func(owner, _ string) bool { return mayCancel(r, owner) })
		}
	}
	rt.handle("POST", "/api/v2/chat/cancel", g.protect(sse.NewCancelHandler(cancel)))
	rt.handle("POST", "/api/v2/auth/revoke", g.protect(auth.NewRevokeHandler(auth.RevokeOptions{
		Revocations: g.revocations,
		Can:         g.can,
		MaxLifetime: cfg.JWTMaxLifetime,
		Leeway:      cfg.JWTLeeway,
	})))

	g.voice = voice.NewHandler(voice.Options{
		AlgoURL:      g.algo.Primary(),
		Via:          g.algo.Via, // voice dials share the replicas' health with chat
		AllowOrigin:  proxy.CORSOptions{Origins: cfg.CORSOrigins}.AllowOrigin,
		PingInterval: cfg.VoicePing,
		IdleTimeout:  cfg.VoiceIdle,
		WriteTimeout: cfg.VoiceWriteTimeout,
		RawAudio:     cfg.VoiceRawAudio,
		Audio:        voice.AudioConfig{Language: cfg.VoiceLanguage},
		Registry:     g.voices,
		Owner: func(r *http.Request) (string, string) {
			id := auth.FromContext(r.Context())
			return id.UserID, id.TenantID
		},
		Admit:           policy.Admit,
		Recheck:         g.recheck,
		UpstreamHeaders: auth.UpstreamHeaders,
		OnStart: func() {
			tel.wsActive.Add(bg, 1, tel.set("type", "client"))
			tel.wsActive.Add(bg, 1, tel.set("type", "upstream"))
		},
		OnEnd: func(s voice.Stats) {
			tel.wsActive.Add(bg, -1, tel.set("type", "client"))
			tel.wsActive.Add(bg, -1, tel.set("type", "upstream"))
			tel.voiceBytes.Add(bg, s.AudioBytesIn, tel.set("direction", "in"))
			tel.voiceBytes.Add(bg, s.AudioBytesOut, tel.set("direction", "out"))
			tel.voiceSessions.Add(bg, 1, tel.set("code", strconv.Itoa(int(s.CloseCode))))
		},
		Log: g.log,
	})
	rt.handle("GET", "/api/v2/voice/stream", g.protectWS(g.voice))
	rt.handle("GET", "/api/v2/voice/sessions", g.protect(http.HandlerFunc(g.voiceSessions)))

	for _, b := range []struct {
		path    string
		targets []*url.URL
		name    string
		label   string
	}{
		{"/api/v2/admin/", cfg.AdminURLs, "admin service", "admin"},
		{"/api/v2/documents/", cfg.DocsURLs, "documents service", "docs"},
	} {
		var h http.Handler = http.HandlerFunc(notFound)
		if pool := g.newPool(b.label, b.targets); pool != nil {
			h = proxy.Chain(proxy.New(proxy.Options{
				Target:          pool.Primary(),
				Transport:       pool,
				BufferPool:      g.pool,
				TrustedProxies:  cfg.TrustedProxies,
				Name:            b.name,
				UpstreamHeaders: auth.UpstreamHeaders,
				Rewrite:         backendCredentials(cfg),
			}), proxy.BodyLimit(cfg.MaxBodyBytes))
		}
		rt.handle("", b.path, g.protect(h))
	}

	var err error
	g.policy, err = policy.NewStore(policy.StoreOptions{Path: cfg.PolicyFile, Routes: rt.protected,
		ExtraPerms: handlerPerms, Log: g.log})
	if err != nil {
		return nil, fmt.Errorf("POLICY_FILE: %w", err)
	}
	edge := []proxy.Middleware{proxy.Recover(g.log), proxy.RequestID()}
	if tel.tracing {
		edge = append(edge, tel.traceRequests())
	}
	edge = append(edge, proxy.AccessLog(g.log))
	if tel.metrics {
		edge = append(edge, tel.observe())
	}
	edge = append(edge,
		// Before anything can refuse a request: net/http reads what is left of a refused
		// request's body too, and that must be bounded as well.
		proxy.CloseChunked(),
		proxy.BodyDeadline(proxy.BodyDeadlineOptions{Grace: cfg.BodyReadTimeout, MinRate: cfg.BodyMinRate}),
		proxy.ClientIP(cfg.TrustedProxies),
		proxy.CORS(proxy.CORSOptions{Origins: cfg.CORSOrigins}),
		proxy.CanonicalPath(),
	)
	return proxy.Chain(rt.mux, edge...), nil
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

// protect puts a route behind authentication (401 without a valid token), then the policy:
// permission, tenant and ownership (403), rates, quota and concurrency caps (429).
// Paths listed in AUTH_PUBLIC_PATHS skip both.
func (g *gateway) protect(h http.Handler) http.Handler {
	return g.protectWith(h, g.enforcer.Wrap)
}

// protectAdmitting is protect for a handler that charges fair use itself (policy.Admit) once
// it has validated the request, so that a bad request costs no rate and holds no slot.
func (g *gateway) protectAdmitting(h http.Handler) http.Handler {
	return g.protectWith(h, g.enforcer.Guard)
}

func (g *gateway) protectWith(h http.Handler, policy func(http.Handler) http.Handler) http.Handler {
	guarded := g.authn.Require(false)(policy(h))
	return protected{http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.authn.Public(r.URL.Path) {
			h.ServeHTTP(w, r)
			return
		}
		guarded.ServeHTTP(w, r)
	})}
}

// protectWS is protect for the WebSocket route, where browsers may carry the token as a
// "bearer.<token>" subprotocol. Fair use is charged by the handler (policy.Admit), after it
// validated the request: the session then holds its concurrency slot for its whole life.
func (g *gateway) protectWS(h http.Handler) http.Handler {
	return protected{g.authn.Require(true)(g.enforcer.Guard(h))}
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

// voiceSessions lists the live voice sessions of every instance.
func (g *gateway) voiceSessions(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	list, err := g.voices.List(ctx)
	if err != nil {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
			Message: "the session registry is unavailable", Cause: err})
		return
	}
	if list == nil {
		list = []voice.Info{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"sessions": list, "count": len(list)})
}

// protected marks a handler for the router, which lists its route for the policy.
type protected struct{ http.Handler }

// can reports whether the request's caller holds permission p.
func (g *gateway) can(r *http.Request, p string) bool { return g.enforcer.Allows(r, p) }

// subject presents the authenticated caller to the policy.
func subject(r *http.Request) (policy.Subject, bool) {
	id := auth.FromContext(r.Context())
	if id == nil {
		return policy.Subject{}, false
	}
	return policy.Subject{UserID: id.UserID, TenantID: id.TenantID, Roles: id.Roles, Grants: id.Permissions}, true
}

func (g *gateway) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (g *gateway) readyz(w http.ResponseWriter, r *http.Request) {
	if status := g.readiness(r.Context()); status != "ready" {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": status})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// readiness is what /readyz and voicegate_ready report: "ready", "draining" or
// "redis unreachable".
func (g *gateway) readiness(ctx context.Context) string {
	if g.draining.Load() {
		return "draining"
	}
	if g.redis != nil {
		ctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		defer cancel()
		if err := g.redis.Do(ctx, g.redis.B().Ping().Build()).Error(); err != nil {
			return "redis unreachable"
		}
	}
	return "ready"
}

func notFound(w http.ResponseWriter, r *http.Request) {
	proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "no such route")
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// shutdown drains: readiness fails at once, the listener stops, running streams get until the
// grace period is nearly over to finish and are then ended with server_shutdown, and whatever is
// left when it is over is closed.
func (g *gateway) shutdown(srv *http.Server, serveErr <-chan error) error {
	g.draining.Store(true)
	grace, drain := g.cfg.ShutdownGrace, g.cfg.DrainDelay
	// Say what the wait is for: a silent pause after Ctrl-C looks like a hang.
	g.log.Info("shutting down: /readyz answers 503, requests are served for DRAIN_DELAY, then open streams get the rest of SHUTDOWN_GRACE; a second signal stops at once",
		"drain_delay", drain, "grace", grace, "streams", g.streams.Len(), "voice_sessions", g.voices.Len())
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	// Readiness already fails; keep serving new requests for a while so the load balancer
	// notices and stops sending them, then stop listening. The delay counts against the grace
	// (parseConfig keeps it at most half of it).
	if drain > 0 {
		time.Sleep(drain) // a second SIGTERM still kills at once: main restored the default
	}
	// Streams and voice sessions get the grace period to finish, and are ended a little before
	// its end so their last words get out: server_shutdown for streams, 1012 for sessions.
	margin := min(grace/5, 2*time.Second)
	deadline, _ := ctx.Deadline()
	endAll := time.AfterFunc(time.Until(deadline)-margin, func() {
		g.streams.EndAll()
		g.voices.CloseAll(ctx, websocket.StatusServiceRestart, voice.CodeShutdown, "the server is restarting; reconnect")
	})
	defer endAll.Stop()
	defer g.streams.EndAll()

	err := srv.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		g.log.Warn("grace period over; closing remaining connections")
		err = srv.Close()
	}
	// Shutdown does not wait for hijacked connections: wait for the voice sessions here, until
	// they have all ended (on their own or closed 1012 near the deadline).
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for g.voices.Len() > 0 && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	if serr := <-serveErr; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", serr)
	}
	g.transport.CloseIdleConnections()
	g.log.Info("stopped")
	return err
}

// newLogger builds the one logger: tint text on a terminal, JSON otherwise.
func newLogger(cfg *config, w io.Writer) *slog.Logger {
	format := cfg.LogFormat
	if format == "" {
		format = "json"
		if isTerminal(w) {
			format = "text"
		}
	}
	if format == "text" {
		return slog.New(tint.NewHandler(w, &tint.Options{
			Level:      cfg.LogLevel,
			TimeFormat: time.TimeOnly,
			NoColor:    !isTerminal(w),
		}))
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: cfg.LogLevel, ReplaceAttr: durationText}))
}

// durationText writes durations as Go duration text ("25s", "1.503ms"), the way they are
// configured, instead of slog's integer nanoseconds.
func durationText(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.String(a.Key, a.Value.Duration().String())
	}
	return a
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// router registers Go 1.22 patterns and answers unknown paths with a JSON 404 and known paths
// with the wrong method with a JSON 405 (the mux's own answers are plain text).
type router struct {
	mux       *http.ServeMux
	methods   map[string][]string
	protected []string // patterns of protected routes, each of which the policy must bind
}

func newRouter() *router {
	rt := &router{mux: http.NewServeMux(), methods: map[string][]string{}}
	rt.mux.Handle("/", http.HandlerFunc(notFound))
	return rt
}

// handle registers h for method and path; an empty method matches any.
func (rt *router) handle(method, path string, h http.Handler) {
	pattern := path
	if method != "" {
		pattern = method + " " + path
	}
	if _, ok := h.(protected); ok {
		rt.protected = append(rt.protected, pattern)
	}
	h = proxy.Route(h)
	rt.mux.Handle(pattern, h)
	if method == "" {
		return
	}
	if len(rt.methods[path]) == 0 {
		rt.mux.Handle(path, proxy.Route(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			allowed := strings.Join(rt.methods[path], ", ")
			w.Header().Set("Allow", allowed)
			proxy.Errorf(w, r, http.StatusMethodNotAllowed, proxy.CodeMethodNotAllowed,
				"method not allowed; use "+allowed)
		})))
	}
	rt.methods[path] = append(rt.methods[path], method)
	if method == http.MethodGet {
		rt.methods[path] = append(rt.methods[path], http.MethodHead) // the mux serves HEAD with GET
	}
}
