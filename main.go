// Command voicegate is the edge gateway of an AI voice assistant: it streams chat answers from
// the algorithm service as Server-Sent Events, bridges voice WebSockets, and proxies the plain
// HTTP back ends, behind a load balancer.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/lmittmann/tint"

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
		case "policy":
			return runPolicy(args[2:], stdout, stderr)
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
		return healthCheck(ctx, cfg.ListenAddr, cfg.TLSCertFile)
	}
	logger := newLogger(cfg, stderr)

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
	return gw.serve(ctx, stdout, demoToken, ownSecret)
}

// serve listens and serves until ctx is done, with the policy watched and reloaded on SIGHUP
// and cancels from other instances delivered meanwhile, then shuts down.
func (gw *gateway) serve(ctx context.Context, stdout io.Writer, demoToken string, ownSecret bool) error {
	cfg, logger, tel := gw.cfg, gw.log, gw.tel
	var certs *certReloader
	if cfg.TLSCertFile != "" {
		var err error
		if certs, err = newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, logger, time.Now); err != nil {
			return err
		}
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
	background.Go(func() { gw.voices.RunBroadcasts(watchCtx) })
	// Until the drain is over: a draining instance hands its voice sessions over to the
	// instances their clients resume on.
	handoverCtx, stopHandovers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopHandovers()
	background.Go(func() { gw.voices.RunHandovers(handoverCtx) })
	if dir := gw.chat.directory; dir != nil {
		background.Go(func() { dir.Run(watchCtx, gw.chat.running) })
	}
	if replay := gw.chat.redisReplay; replay != nil {
		// Runs until the drain is over: streams fill their logs to the end of the grace.
		replayCtx, stopReplay := context.WithCancel(context.WithoutCancel(ctx))
		defer stopReplay()
		background.Go(func() { replay.Run(replayCtx) })
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
		Handler:           gw.handler,
		ReadHeaderTimeout: 10 * time.Second,
		// No server-wide write deadline: it would cut every stream and voice session at that
		// age. Streams, voice sessions and proxied responses put a deadline on each write
		// instead (SSE_WRITE_TIMEOUT, VOICE_WRITE_TIMEOUT, PROXY_WRITE_TIMEOUT).
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 32 << 10,
		ErrorLog:       slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		BaseContext:    func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		HTTP2:          http2Limits(),
	}
	serveErr := make(chan error, 2)
	if certs != nil {
		srv.TLSConfig = serverTLS(certs)
		go func() { serveErr <- srv.ServeTLS(ln, "", "") }()
	} else {
		go func() { serveErr <- srv.Serve(ln) }()
	}
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
	logger.Info("listening", "addr", addr, "tls", certs != nil, "version", buildVersion(), "instance", cfg.InstanceID)
	if cfg.Demo {
		printDemo(stdout, addr, demoToken, ownSecret, cfg.ConsoleEnabled)
	}

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	return gw.shutdown(srv, serveErr)
}

// healthCheck asks the gateway on addr (its listen address) for /healthz, over TLS when
// certFile (TLS_CERT_FILE) is set.
func healthCheck(ctx context.Context, addr, certFile string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("LISTEN_ADDR: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	scheme, client := "http://", http.DefaultClient
	if certFile != "" {
		conf, err := healthTLS(certFile)
		if err != nil {
			return fmt.Errorf("healthcheck: %w", err)
		}
		scheme = "https://"
		client = &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
		defer client.CloseIdleConnections()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+dialAddr(addr)+"/healthz", nil)
	if err != nil {
		return err
	}
	res, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: status %d", res.StatusCode)
	}
	return nil
}

// buildVersion is the version the go command stamped into the binary: the module version
// (v1.2.3, or a pseudo-version such as v0.0.0-20250101120000-abcdef123456 for a build from a
// git checkout), else the VCS revision, else "devel" (a build without VCS information, such as
// the image's, whose build context leaves .git out).
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev string
	dirty := false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "devel"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return "devel-" + rev
}

// printVersion answers -version.
func printVersion(w io.Writer) {
	fmt.Fprintf(w, "voicegate %s (%s, %s/%s)\n", buildVersion(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
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

// shutdown drains: readiness fails at once, the listener stops, running streams get until the
// grace period is nearly over to finish and are then ended with server_shutdown, and whatever is
// left when it is over is closed.
func (g *gateway) shutdown(srv *http.Server, serveErr <-chan error) error {
	g.health.draining.Store(true)
	grace, drain := g.cfg.ShutdownGrace, g.cfg.DrainDelay
	// Say what the wait is for: a silent pause after Ctrl-C looks like a hang.
	g.log.Info("shutting down: /readyz answers 503, requests are served for DRAIN_DELAY, then open streams get the rest of SHUTDOWN_GRACE; a second signal stops at once",
		"drain_delay", drain, "grace", grace, "streams", g.chat.running.Len(), "voice_sessions", g.voices.Len())
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	// Readiness already fails; keep serving new requests for a while so the load balancer
	// notices and stops sending them, then stop listening. The delay counts against the grace
	// (parseConfig keeps it at most half of it).
	if drain > 0 {
		time.Sleep(drain) // a second SIGTERM still kills at once: main restored the default
	}
	// Resumable streams tell their clients to resume on another instance now, and go on
	// filling their logs for them; resumable voice sessions keep their upstreams until another
	// instance takes them over.
	g.chat.running.Drain()
	if n := g.voices.Drain(); n > 0 {
		g.log.Info("voice clients told to resume on another instance", "voice_sessions", n)
	}
	// Streams and voice sessions get the grace period to finish, and are ended a little before
	// its end so their last words get out: server_shutdown for streams, 1012 for sessions.
	margin := min(grace/5, 2*time.Second)
	deadline, _ := ctx.Deadline()
	endAll := time.AfterFunc(time.Until(deadline)-margin, func() {
		g.chat.running.EndAll()
		g.voices.CloseAll(ctx, websocket.StatusServiceRestart, voice.CodeShutdown, "the server is restarting; reconnect")
	})
	defer endAll.Stop()
	defer g.chat.running.EndAll()

	err := srv.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		g.log.Warn("grace period over; closing remaining connections")
		err = srv.Close()
	}
	// Shutdown does not wait for hijacked connections, nor for resumable streams that went on
	// without their clients: wait for them here, until they have all ended (on their own, or
	// closed 1012 and cut short near the deadline).
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for (g.voices.Len() > 0 || g.chat.running.Len() > 0) && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	if serr := <-serveErr; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", serr)
	}
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
