package main

// The harness every root test shares: TestMain and child processes, the gateway started in this
// process through run (as main does) or in a process of its own, the fake algorithm service and
// other back ends on loopback, calling the gateway over real connections (HTTP, Server-Sent
// Events, voice WebSockets), tokens, waiting for a condition, its logs and metrics, policy files,
// and a real redis-server and Redis Cluster.

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/redis/rueidis"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// ---- TestMain and child processes ---------------------------------------------------------------

// TestMain fails the tests if any goroutine outlives them: a gateway started by run must leave
// nothing behind when its context ends. Started as a child process (startChild, runMain), the
// test binary serves as that child instead.
//
// Most of this package's tests wait: on child processes, on a browser, on timers a gateway
// runs by. Those call t.Parallel, and unless -parallel says otherwise run waitingTests at a
// time, not GOMAXPROCS (go test's default, made for tests that compute): on two cores the
// package would otherwise spend most of its time idle. Tests that time the machine, count
// this process's goroutines or allocations, hold a thousand connections, or change the shared
// Redis Cluster's topology do not call t.Parallel, and run alone, before the others.
func TestMain(m *testing.M) {
	if role := os.Getenv(childEnv); role != "" {
		runChild(role) // never returns
	}
	flag.Parse()
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		_ = flag.Set("test.parallel", strconv.Itoa(max(waitingTests, runtime.GOMAXPROCS(0))))
	}
	goleak.VerifyTestMain(stopsCluster{m},
		// After the cluster's topology changed (a failover, a reshard), rueidis closes the
		// connections it no longer needs 5 s later, and reloads the slot map after a random
		// delay of up to a second, each from a goroutine that only sleeps until then, even
		// past Close: bounded, and not the gateway's.
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"),
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"),
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient).redirectOrNew.func1"))
}

// waitingTests is how many of the tests that call t.Parallel run at once by default: enough to
// keep two cores busy while most of them wait.
const waitingTests = 4

// stopsCluster runs the tests, then stops the Redis Cluster they shared (startCluster)
// before goleak looks for goroutines left behind.
type stopsCluster struct{ m *testing.M }

func (s stopsCluster) Run() int {
	defer stopSharedCluster()
	return s.m.Run()
}

// childEnv names the role of this test binary started as a child process (see TestMain and
// runChild); childVarsEnv and childArgsEnv carry, as JSON, the environment and the arguments
// its role gets.
const (
	childEnv     = "VOICEGATE_TEST_CHILD"
	childVarsEnv = "VOICEGATE_TEST_VARS"
	childArgsEnv = "VOICEGATE_TEST_ARGS"
)

// runChild serves as the child named by role and never returns. The voicegate command runs as
// main does, on this process's environment; a gateway and a bare proxy log their address in a
// JSON "listening" line on stderr and stop when their stdin closes (the parent gone or done).
func runChild(role string) {
	var args []string
	if err := json.Unmarshal([]byte(cmp.Or(os.Getenv(childArgsEnv), "[]")), &args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	vars := map[string]string{}
	if err := json.Unmarshal([]byte(cmp.Or(os.Getenv(childVarsEnv), "{}")), &vars); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	switch role {
	case "main":
		os.Args = append([]string{"voicegate"}, args...)
		main()
		os.Exit(0)
	case "gateway":
		os.Exit(runChildGateway(args, vars))
	case "bare-proxy":
		target, err := url.Parse(vars["VOICEGATE_TEST_TARGET"])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		serveChild(bareReverseProxy(target, ""))
	case "voice-echo":
		serveChild(http.HandlerFunc(echoVoice))
	case "voice-burst":
		serveChild(http.HandlerFunc(burstVoice))
	case loadRole:
		runLoad()
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", role)
		os.Exit(2)
	}
}

// runChildGateway runs the gateway with args and vars as its whole environment until its stdin
// closes, SIGTERM drains it as in production, or a minute has passed, and returns the exit code.
func runChildGateway(args []string, vars map[string]string) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM)
	defer stop()
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	if err := run(ctx, append([]string{"voicegate"}, args...), envFunc(vars), os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// bareReverseProxy is the standard-library baseline of every benchmark: an
// httputil.ReverseProxy with a pooled transport, flushing every write, that sends every request
// to target (to path on it, unless path is ""). It relays WebSocket upgrades as a byte copy in
// each direction.
func bareReverseProxy(target *url.URL, path string) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			if path != "" {
				pr.Out.URL.Path = path
			}
		},
		Transport:     &http.Transport{MaxIdleConnsPerHost: 1024},
		FlushInterval: -1,
	}
}

// serveChild serves h on a loopback port, as the child's only work, and logs the address as the
// gateway does.
func serveChild(h http.Handler) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	line, _ := json.Marshal(map[string]string{"msg": "listening", "addr": ln.Addr().String()})
	fmt.Fprintf(os.Stderr, "%s\n", line)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintln(os.Stderr, srv.Serve(ln))
	os.Exit(1)
}

// childCommand is this test binary as the child role, with vars (as JSON) and args.
func childCommand(tb testing.TB, role string, vars map[string]string, args ...string) *exec.Cmd {
	tb.Helper()
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	a, _ := json.Marshal(args)
	v, _ := json.Marshal(vars)
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+role, childArgsEnv+"="+string(a), childVarsEnv+"="+string(v))
	return cmd
}

// child is a server run by a process of its own: a gateway that can be killed outright or
// measured from /proc, or a benchmark's baseline.
type child struct {
	name   string
	cmd    *exec.Cmd
	addr   string       // host:port it listens on
	url    string       // http://addr
	client *http.Client // of its own, so that its connections can be closed
	stderr *logBuffer   // what it logged
	stdin  io.WriteCloser
	done   chan struct{} // closed when it has exited
	once   sync.Once
}

// childOptions says what startChild runs.
type childOptions struct {
	name string // for messages
	// bin is the gateway binary to run (buildGateway); "" runs this test binary as role.
	bin  string
	role string // "gateway" (the default) or "bare-proxy"
	env  map[string]string
	// logLimit is the bytes of the child's log kept; 0 keeps everything. A benchmark's child,
	// whose access log is long, keeps its start only, as a container runtime reads and drops.
	logLimit int
}

// startChild starts the child and waits for its "listening" log line. A gateway gets env on
// top of LISTEN_ADDR=127.0.0.1:0, LOG_FORMAT=json and JWT_SECRET, and the defaults of everything
// else: as its whole environment when it is this test binary, and on top of PATH when it is the
// built one. At cleanup its stdin closes and it is interrupted, then killed if it is still
// running 5 s later; a failed test shows its log.
func startChild(tb testing.TB, o childOptions) *child {
	tb.Helper()
	vars := map[string]string{"LISTEN_ADDR": "127.0.0.1:0", "LOG_FORMAT": "json", "JWT_SECRET": testSecret}
	maps.Copy(vars, o.env)
	var cmd *exec.Cmd
	if o.bin != "" {
		cmd = exec.Command(o.bin)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		for k, v := range vars {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	} else {
		cmd = childCommand(tb, cmp.Or(o.role, "gateway"), vars)
	}
	c := &child{name: cmp.Or(o.name, "the child gateway"), cmd: cmd, client: &http.Client{Transport: &http.Transport{}},
		stderr: newLogBuffer(), done: make(chan struct{})}
	c.stderr.max = o.logLimit
	cmd.Stderr = c.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	c.stdin = stdin
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() {
		_ = cmd.Wait()
		close(c.done)
	}()
	tb.Cleanup(func() {
		c.stdin.Close()
		_ = c.cmd.Process.Signal(os.Interrupt)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			c.kill()
		}
		c.client.CloseIdleConnections()
		if tb.Failed() {
			tb.Logf("the log of %s:\n%s", c.name, clipTail(c.stderr.String()))
		}
	})
	select {
	case c.addr = <-c.stderr.addr:
	case <-c.done:
		tb.Fatalf("%s exited at start:\n%s", c.name, c.stderr)
	case <-time.After(10 * time.Second):
		c.kill()
		tb.Fatalf("%s: no listening line within 10s:\n%s", c.name, c.stderr)
	}
	c.url = "http://" + c.addr
	return c
}

// kill ends the child with SIGKILL, as a crash would, and waits for it.
func (c *child) kill() {
	c.once.Do(func() {
		_ = c.cmd.Process.Kill()
		<-c.done
		c.client.CloseIdleConnections()
	})
}

// startChildGateway runs the gateway in this test binary, in a process of its own so that it
// can be killed outright, with env (and test defaults: a short SHUTDOWN_GRACE, no DRAIN_DELAY)
// as its environment, and waits for its /readyz.
func startChildGateway(t *testing.T, env map[string]string) *child {
	t.Helper()
	vars := map[string]string{"SHUTDOWN_GRACE": "1s", "DRAIN_DELAY": "0s"}
	maps.Copy(vars, env)
	c := startChild(t, childOptions{env: vars})
	eventually(t, 5*time.Second, "the child gateway's /readyz answers 200", func() bool {
		res, err := c.client.Get(c.url + "/readyz")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	return c
}

// startBare starts this test binary as the bare ReverseProxy in front of target.
func startBare(tb testing.TB, target string) *child {
	tb.Helper()
	return startChild(tb, childOptions{name: "bare ReverseProxy", role: "bare-proxy",
		env: map[string]string{"VOICEGATE_TEST_TARGET": target}})
}

// startEcho starts this test binary as an echoing algorithm service (echoVoice).
func startEcho(tb testing.TB, name string) *child {
	tb.Helper()
	return startChild(tb, childOptions{name: name, role: "voice-echo"})
}

// buildGateway builds the gateway binary, without the race detector: the figures of a
// benchmark are those of the gateway as it runs in production.
func buildGateway(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "voicegate")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startGatewayProcess starts the built gateway with env (its defaults for everything else) and
// waits for its "listening" log line. Its log, access log included, is read and dropped past
// its start, as a container runtime would read it.
func startGatewayProcess(tb testing.TB, bin, name string, env map[string]string) *child {
	tb.Helper()
	return startChild(tb, childOptions{name: name, bin: bin, env: env, logLimit: 64 << 10})
}

// runMain runs the test binary as the voicegate command (main itself, exit code and all) with
// args and the variables env on top of this process's environment, and returns what it wrote
// to stderr and its exit code.
func runMain(t *testing.T, env map[string]string, args ...string) (stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := childCommand(t, "main", nil, args...)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var errOut strings.Builder
	cmd.Stderr = &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := context.AfterFunc(ctx, func() { _ = cmd.Process.Kill() })
	defer stop()
	err := cmd.Wait()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return errOut.String(), cmd.ProcessState.ExitCode()
}

// cpu returns the child's user+system CPU time so far, from /proc/PID/stat.
func (c *child) cpu(tb testing.TB) time.Duration {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	// The command name is in parentheses and may hold spaces; fields count from after it.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / clockTicks
}

// clockTicks is Linux's USER_HZ, the unit of /proc/PID/stat times: 100 on every common build.
const clockTicks = 100

// rss returns the child's resident set size, from /proc/PID/status.
func (c *child) rss(tb testing.TB) int64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	tb.Fatal("no VmRSS")
	return 0
}

// needProcfs skips benchmarks that read /proc where there is none.
func needProcfs(tb testing.TB) {
	tb.Helper()
	if runtime.GOOS != "linux" {
		tb.Skip("process benchmarks read /proc: Linux only")
	}
}

// profile records the child's CPU profile with perf for the given time, when
// VOICEGATE_BENCH_PERF names a folder: the profile that shows where a missed figure goes. The
// returned function waits for the recording.
func (c *child) profile(tb testing.TB, d time.Duration) func() { return c.profileAs(tb, "", d) }

// profileAs is profile, the file named for the child and label (a phase of the benchmark).
func (c *child) profileAs(tb testing.TB, label string, d time.Duration) func() {
	dir := os.Getenv("VOICEGATE_BENCH_PERF")
	if dir == "" {
		return func() {}
	}
	name := strings.TrimSpace(c.name + " " + label)
	out := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".perf")
	cmd := exec.Command("perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", out,
		"-p", strconv.Itoa(c.cmd.Process.Pid), "--", "sleep", strconv.Itoa(int(d.Seconds())))
	if err := cmd.Start(); err != nil {
		tb.Logf("perf: %v", err)
		return func() {}
	}
	return func() {
		cmd.Wait()
		tb.Logf("%s: CPU profile in %s", name, out)
	}
}

// ---- the gateway under test ---------------------------------------------------------------------

// testGateway is one run of the gateway, started by startRun.
type testGateway struct {
	t      *testing.T
	URL    string       // http://127.0.0.1:port
	Addr   string       // the "addr" of the "listening" log line
	Client *http.Client // a client of its own, so its idle connections can be closed
	Stdout *logBuffer
	Stderr *logBuffer

	cancel   context.CancelFunc
	finished chan struct{} // closed when run has returned
	runErr   error         // run's result; read only after finished is closed
	stopOnce sync.Once
}

// startGateway starts the gateway with env as its whole environment and waits until /readyz
// answers 200. stop cancels run's context and fails the test unless run returns nil; it also
// runs at cleanup.
func startGateway(t *testing.T, env map[string]string) (baseURL string, stop func()) {
	t.Helper()
	g := startRun(t, nil, env)
	return g.URL, g.stop
}

// startRun is startGateway with flags and access to the gateway's output. Unless env says
// otherwise it listens on 127.0.0.1:0, logs JSON, and gives streams a short shutdown grace so
// that a test which leaves a stream open does not wait the default 25 s.
func startRun(t *testing.T, args []string, env map[string]string) *testGateway {
	t.Helper()
	vars := map[string]string{
		"LISTEN_ADDR":    "127.0.0.1:0",
		"LOG_FORMAT":     "json",
		"LOG_LEVEL":      "debug",
		"SHUTDOWN_GRACE": "2s",
		"DRAIN_DELAY":    "0s",
		"JWT_SECRET":     testSecret,
		// Generous limits, so tests of other things are never rate limited.
		"POLICY_FILE": "testdata/policy/e2e.json",
	}
	for k, v := range env {
		vars[k] = v
	}
	getenv := func(k string) string { return vars[k] }

	ctx, cancel := context.WithCancel(context.Background())
	g := &testGateway{
		t: t,
		// The client authenticates as an admin unless a test sets its own Authorization.
		Client:   &http.Client{Transport: withToken{&http.Transport{Proxy: nil}, tokenFor(t, "u-admin", []string{"admin"}, nil)}},
		Stdout:   &logBuffer{},
		Stderr:   newLogBuffer(),
		cancel:   cancel,
		finished: make(chan struct{}),
	}
	go func() {
		defer close(g.finished)
		g.runErr = run(ctx, append([]string{"voicegate"}, args...), getenv, g.Stdout, g.Stderr)
	}()
	t.Cleanup(g.stop)

	select {
	case g.Addr = <-g.Stderr.addr:
	case <-g.finished:
		t.Fatalf("run returned before listening: %v\nlog:\n%s", g.runErr, g.Stderr)
	case <-time.After(5 * time.Second):
		t.Fatalf("no \"listening\" log line within 5s\nlog:\n%s", g.Stderr)
	}
	g.URL = "http://" + g.Addr
	if file := vars["TLS_CERT_FILE"]; file != "" {
		// Over TLS: the client trusts the test's certificate and speaks HTTP/2 where offered.
		g.URL = "https://" + g.Addr
		g.Client.Transport = withToken{tlsTransport(t, file), tokenFor(t, "u-admin", []string{"admin"}, nil)}
	}

	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := g.Client.Get(g.URL + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return g
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /readyz did not answer 200 within 5s (last: %v)", describeResult(res, err))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop cancels run's context and waits for it to return nil.
func (g *testGateway) stop() {
	g.t.Helper()
	g.stopOnce.Do(func() {
		g.cancel()
		select {
		case <-g.finished:
			if g.runErr != nil {
				g.t.Errorf("run returned %v, want nil\nlog:\n%s", g.runErr, g.Stderr)
			}
		case <-time.After(10 * time.Second):
			g.t.Errorf("run did not return within 10s of its context ending\nlog:\n%s", g.Stderr)
		}
		g.Client.CloseIdleConnections()
	})
}

// runCommand runs run with args and env as its whole environment, and returns its output.
func runCommand(t *testing.T, env map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = run(t.Context(), append([]string{"voicegate"}, args...), func(k string) string { return env[k] }, &out, &errOut)
	return out.String(), errOut.String(), err
}

// benchGateway serves the gateway's real handler (middleware, routes, proxies) with env as its
// configuration; access logs are formatted and discarded so their cost counts.
func benchGateway(tb testing.TB, env map[string]string) (*httptest.Server, *gateway) {
	tb.Helper()
	env["JWT_SECRET"] = testSecret
	if env["POLICY_FILE"] == "" {
		// Every limit is in the path but none is ever reached.
		env["POLICY_FILE"] = "testdata/policy/bench.json"
	}
	cfg, err := parseConfig([]string{"voicegate"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		tb.Fatal(err)
	}
	tel, err := newTelemetry(context.Background(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	gw, err := newGateway(context.Background(), cfg, slog.New(slog.NewJSONHandler(io.Discard, nil)), tel)
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(gw.handler)
	tb.Cleanup(func() {
		srv.Close()
		gw.close()
		tel.shutdown(context.Background())
	})
	return srv, gw
}

// benchClient is a keep-alive client that authenticates as an admin (the bare proxies ignore the
// header).
func benchClient(tb testing.TB) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 2048, MaxConnsPerHost: 0}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: withToken{tr, tokenFor(tb, "u-bench", []string{"admin"}, nil)}}
}

// envFunc serves env, with a JWT secret unless env says otherwise.
func envFunc(env map[string]string) func(string) string {
	return func(k string) string {
		if v, ok := env[k]; ok {
			return v
		}
		if k == "JWT_SECRET" {
			return testSecret
		}
		return ""
	}
}

// roomyBudgets are the AUTH_BUDGET and LIMIT_BUDGET of tests about shared state rather than
// time budgets: on a loaded machine (-race, parallel packages) a Redis answer can take longer
// than the defaults, and a limiter that times out fails open, which would miscount the limits.
var roomyBudgets = map[string]string{"AUTH_BUDGET": "2s", "LIMIT_BUDGET": "2s"}

// with returns m with more added, m itself unchanged.
func with(m map[string]string, more map[string]string) map[string]string {
	out := maps.Clone(m)
	maps.Copy(out, more)
	return out
}

// newRunID is a short random text that makes the names a test writes into a shared store its
// own: the package's one Redis Cluster outlives each test, and keeps what a run wrote
// (revocations, quotas, leases, kept streams) for the next run of the same test under -count.
func newRunID() string { return strings.ToLower(crand.Text()[:8]) }

func describeResult(res *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	return res.Status
}

// logBuffer keeps what a process or a gateway wrote (a log, stdout), safe for concurrent use.
// It hands over, on addr, the address of the first JSON "listening" line. The zero value keeps
// everything and hands over nothing.
type logBuffer struct {
	mu      sync.Mutex
	all     bytes.Buffer
	max     int // the bytes kept; 0 keeps everything
	pending []byte
	found   bool
	addr    chan string
}

// newLogBuffer is a logBuffer that hands over the "listening" address.
func newLogBuffer() *logBuffer { return &logBuffer{addr: make(chan string, 1)} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.max == 0 {
		b.all.Write(p)
	} else if room := b.max - b.all.Len(); room > 0 {
		b.all.Write(p[:min(len(p), room)])
	}
	if b.addr == nil || b.found {
		return len(p), nil
	}
	b.pending = append(b.pending, p...)
	for {
		i := bytes.IndexByte(b.pending, '\n')
		if i < 0 {
			break
		}
		var rec struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal(b.pending[:i], &rec) == nil && rec.Msg == "listening" && rec.Addr != "" {
			b.found, b.pending = true, nil
			b.addr <- rec.Addr
			break
		}
		b.pending = b.pending[i+1:]
	}
	return len(p), nil
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.all.String()
}

// ---- fake back ends -----------------------------------------------------------------------------

// recordedRequest is what a fake back end received.
type recordedRequest struct {
	Method   string
	Path     string
	RawQuery string
	Header   http.Header
	RawBody  []byte
	Body     map[string]any // RawBody decoded, when it is a JSON object
}

// fakeBackend is an httptest server that records every request and answers with handler.
type fakeBackend struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []recordedRequest
}

// newFakeBackend starts a recording back end; it is closed at cleanup (after a gateway started
// later in the test has stopped).
func newFakeBackend(t testing.TB, h http.HandlerFunc) *fakeBackend {
	t.Helper()
	f := &fakeBackend{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		rec := recordedRequest{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery,
			Header: r.Header.Clone(), RawBody: raw}
		_ = json.Unmarshal(raw, &rec.Body)
		f.mu.Lock()
		f.reqs = append(f.reqs, rec)
		f.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(raw))
		h(w, r)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeBackend) requests() []recordedRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recordedRequest(nil), f.reqs...)
}

// only fails the test unless the back end got exactly one request, and returns it.
func (f *fakeBackend) only(t *testing.T) recordedRequest {
	t.Helper()
	reqs := f.requests()
	if len(reqs) != 1 {
		t.Fatalf("back end received %d requests, want 1", len(reqs))
	}
	return reqs[0]
}

// okBackend answers every request 200 with a small JSON body.
func okBackend(t *testing.T) *fakeBackend {
	return newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
}

// voiceSubprotocol is the subprotocol of voice sessions, to the gateway and to the algorithm
// service.
const voiceSubprotocol = "voice-protocol-v2"

// fakeAlgo is the fake algorithm service. POST /query is answered by its Query handler, whose
// request body has already been read (and recorded). GET /voice/stream accepts voice sessions
// that read until the gateway closes them or the test ends, keeping the text messages and
// answering each message as its Replier says. Every request is recorded (fakeBackend).
type fakeAlgo struct {
	*fakeBackend
	voiceOpen  atomic.Int64  // voice sessions open now
	voiceEnded chan struct{} // one send per voice session that ended, the first 64 kept unread

	mu        sync.Mutex
	voiceText []string // the text messages voice sessions received
}

// algoOptions configures a fakeAlgo. The zero value answers /query 404 and reads voice sessions
// without answering.
type algoOptions struct {
	// Query answers POST /query; nil answers 404.
	Query http.HandlerFunc
	// Replier makes, for each voice session, what answers the messages it receives; nil
	// answers nothing.
	Replier func() voiceReplier
	// Voice, when set, serves GET /voice/stream instead of the sessions above: it accepts,
	// reads and counts on its own.
	Voice http.HandlerFunc
}

// voiceReplier answers one message of a voice session with the frames to send back.
type voiceReplier func(typ websocket.MessageType, msg []byte) []voiceFrame

// voiceFrame is one message the fake algorithm service sends on a voice session: Text, or else a
// binary frame of Audio bytes of silence.
type voiceFrame struct {
	Text  string
	Audio int
}

// newAlgo starts the fake algorithm service; it is closed at cleanup.
func newAlgo(t testing.TB, o algoOptions) *fakeAlgo {
	t.Helper()
	a := &fakeAlgo{voiceEnded: make(chan struct{}, 64)}
	testDone := t.Context()
	a.fakeBackend = newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/query" && o.Query != nil:
			o.Query(w, r)
		case r.URL.Path == "/voice/stream" && o.Voice != nil:
			o.Voice(w, r)
		case r.URL.Path == "/voice/stream":
			var reply voiceReplier
			if o.Replier != nil {
				reply = o.Replier()
			}
			a.session(testDone, w, r, reply)
		default:
			http.NotFound(w, r)
		}
	})
	return a
}

// newFakeAlgo is the fake algorithm service with query answering POST /query.
func newFakeAlgo(t testing.TB, query http.HandlerFunc) *fakeAlgo {
	t.Helper()
	return newAlgo(t, algoOptions{Query: query})
}

// session is one voice session of the fake algorithm service.
func (a *fakeAlgo) session(testDone context.Context, w http.ResponseWriter, r *http.Request, reply voiceReplier) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{voiceSubprotocol}})
	if err != nil {
		return
	}
	a.voiceOpen.Add(1)
	defer func() {
		c.CloseNow()
		a.voiceOpen.Add(-1)
		select {
		case a.voiceEnded <- struct{}{}:
		default:
		}
	}()
	c.SetReadLimit(1 << 20)
	for {
		typ, msg, err := c.Read(testDone)
		if err != nil {
			return
		}
		if typ == websocket.MessageText {
			a.mu.Lock()
			a.voiceText = append(a.voiceText, string(msg))
			a.mu.Unlock()
		}
		if reply == nil {
			continue
		}
		for _, f := range reply(typ, msg) {
			typ, out := websocket.MessageText, []byte(f.Text)
			if f.Text == "" {
				typ, out = websocket.MessageBinary, make([]byte, f.Audio)
			}
			if err := c.Write(testDone, typ, out); err != nil {
				return
			}
		}
	}
}

// textReceived returns the text messages voice sessions received so far.
func (a *fakeAlgo) textReceived() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.voiceText)
}

// dials returns the upgrade requests the gateway sent to /voice/stream.
func (a *fakeAlgo) dials() []recordedRequest {
	var out []recordedRequest
	for _, r := range a.requests() {
		if r.Path == "/voice/stream" {
			out = append(out, r)
		}
	}
	return out
}

// audioReceived is the audio, in 16 kHz mono PCM, of the audio_chunk messages the algorithm
// service received.
func (a *fakeAlgo) audioReceived(t *testing.T) time.Duration {
	t.Helper()
	var bytes int64
	for _, m := range a.textReceived() {
		var c struct {
			Type  string `json:"type"`
			Audio []byte `json:"audio_chunk"` // base64 in JSON
		}
		if err := json.Unmarshal([]byte(m), &c); err != nil {
			t.Fatalf("the algorithm service got %s: %v", m, err)
		}
		if c.Type == "audio_chunk" {
			bytes += int64(len(c.Audio))
		}
	}
	return time.Duration(bytes) * time.Second / 32000
}

// ndjson writes lines as the fake algorithm service's 200 answer, flushing after each.
func ndjson(w http.ResponseWriter, lines ...string) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	rc := http.NewResponseController(w)
	for _, l := range lines {
		_, _ = io.WriteString(w, l+"\n")
		_ = rc.Flush()
	}
}

// startNDJSON sends the 200 headers of an NDJSON answer at once.
func startNDJSON(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	_ = http.NewResponseController(w).Flush()
}

var happyLines = []string{
	`{"type":"retrieval_start","query":"hi"}`,
	`{"type":"generation_chunk","content":"Hel","index":0}`,
	`{"type":"generation_chunk","content":"lo","index":1}`,
	`{"type":"generation_done","finish_reason":"stop"}`,
}

// doneAlgo is the fake algorithm service that ends every chat answer at once; its voice
// sessions read until they close.
func doneAlgo(t testing.TB) *fakeAlgo {
	return newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_chunk","content":"hi"}`, `{"type":"generation_done"}`)
	})
}

// holdAlgo is the fake algorithm service whose chat answer depends on the message: "hold"
// answers 200 and stays silent until release is closed (then ends normally; a nil release is
// never closed), "hold-forever" stays silent until the gateway goes away, anything else ends
// at once. Voice sessions are accepted and read until they close.
func holdAlgo(t *testing.T, release <-chan struct{}) *fakeAlgo {
	return newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Messages []struct {
				Content string `json:"content"`
			} `json:"messages"`
		}
		raw, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(raw, &body)
		msg := ""
		if len(body.Messages) > 0 {
			msg = body.Messages[0].Content
		}
		switch msg {
		case "hold":
			startNDJSON(w)
			select {
			case <-release:
				ndjson(w, `{"type":"generation_done"}`)
			case <-r.Context().Done():
			}
		case "hold-forever":
			startNDJSON(w)
			<-r.Context().Done()
		default:
			ndjson(w, `{"type":"generation_chunk","content":"hi"}`, `{"type":"generation_done"}`)
		}
	})
}

// answerStop is a voiceReplier maker for the fake algorithm service: the end of an utterance
// (stop) is answered with an asr_partial and 20 ms of TTS audio.
func answerStop() voiceReplier {
	return func(_ websocket.MessageType, msg []byte) []voiceFrame {
		if bytes.Contains(msg, []byte(`"type":"stop"`)) {
			return []voiceFrame{{Text: `{"type":"asr_partial","text":"hi"}`}, {Audio: 640}}
		}
		return nil
	}
}

// resumeAlgo is an algorithm service whose answers are 30 lines: the first 10 at once, the
// rest once release is closed (or at once, for a message other than "gated"). It counts the
// requests it got and reports each one whose client went away before the answer was over.
type resumeAlgo struct {
	*fakeAlgo
	calls     atomic.Int64
	release   chan struct{}
	cancelled chan struct{}
}

const resumeLines = 30

func newResumeAlgo(t *testing.T) *resumeAlgo {
	a := &resumeAlgo{release: make(chan struct{}), cancelled: make(chan struct{}, 16)}
	a.fakeAlgo = newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		a.calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		gated := strings.Contains(string(body), `"gated"`)
		startNDJSON(w)
		for i := 1; i <= resumeLines; i++ {
			if i == 11 && gated {
				select {
				case <-a.release:
				case <-r.Context().Done():
					a.cancelled <- struct{}{}
					return
				}
			}
			typ := "generation_chunk"
			if i == resumeLines {
				typ = "generation_done"
			}
			ndjson(w, fmt.Sprintf(`{"type":%q,"content":"part %d"}`, typ, i))
		}
	})
	return a
}

// redisEnv is the environment of a gateway on r with fake back ends.
func redisEnv(r *testRedis, algo *fakeAlgo, backend *fakeBackend, more map[string]string) map[string]string {
	env := map[string]string{
		"ALGO_URL":   algo.URL,
		"ADMIN_URL":  backend.URL,
		"DOCS_URL":   backend.URL,
		"REDIS_URL":  r.URL(),
		"JWT_SECRET": testSecret,
	}
	for k, v := range more {
		env[k] = v
	}
	return env
}

// fakeCollector is an OTLP/HTTP trace collector: it decodes every export and keeps the spans.
type fakeCollector struct {
	*httptest.Server
	mu      sync.Mutex
	spans   []*tracepb.Span
	exports int
	bytes   int64
	errs    []string
}

func newFakeCollector(t testing.TB, keep bool) *fakeCollector {
	t.Helper()
	c := &fakeCollector{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
			http.NotFound(w, r)
			return
		}
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body = zr
		}
		raw, err := io.ReadAll(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		c.exports++
		c.bytes += int64(len(raw))
		if keep {
			var req collectortrace.ExportTraceServiceRequest
			if err := proto.Unmarshal(raw, &req); err != nil {
				c.errs = append(c.errs, fmt.Sprintf("%s: %v", r.Header.Get("Content-Type"), err))
			}
			for _, rs := range req.GetResourceSpans() {
				for _, ss := range rs.GetScopeSpans() {
					c.spans = append(c.spans, ss.GetSpans()...)
				}
			}
		}
		c.mu.Unlock()
		out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *fakeCollector) received() ([]*tracepb.Span, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.spans), slices.Clone(c.errs)
}

// ---- talking to the gateway ---------------------------------------------------------------------

// doRequest sends a request with a 10 s budget; the response body is closed at cleanup at the latest.
func doRequest(t *testing.T, c *http.Client, method, url string, body io.Reader, header map[string]string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		if v == "" {
			req.Header.Del(k)
			continue
		}
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// call sends one request to g with token as its bearer token (none when token is ""), and
// returns the response with its body already read, so that it can be closed at once and still
// be inspected (wantError reads it).
func call(t *testing.T, g *testGateway, method, path, token, body string) *http.Response {
	t.Helper()
	return callWith(t, g, method, path, token, body, nil)
}

// callWith is call with extra request headers.
func callWith(t *testing.T, g *testGateway, method, path, token, body string, header map[string]string) *http.Response {
	t.Helper()
	res, err := try(t.Context(), g, method, path, token, body, header)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return res
}

// try sends one request to g with token as its bearer token (none when token is "") and returns the response with its
// body already read (and replaced by a copy). It does not touch t, so goroutines may use it.
func try(ctx context.Context, g *testGateway, method, path, token, body string, header map[string]string) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, g.URL+path, rd)
	if err != nil {
		return nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token == "" {
		req.Header.Set("X-Test-No-Token", "1") // not even the client's default admin token
	} else {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := g.Client.Do(req)
	if err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	res.Body = io.NopCloser(bytes.NewReader(raw))
	return res, nil
}

// wantStatus fails the test unless res has the status.
func wantStatus(t *testing.T, res *http.Response, status int) {
	t.Helper()
	if res.StatusCode != status {
		body, _ := io.ReadAll(res.Body)
		t.Fatalf("%s %s = %d, want %d; body %s", res.Request.Method, res.Request.URL.Path, res.StatusCode, status, body)
	}
}

// errorCode returns the "code" of a JSON error body without consuming it.
func errorCode(res *http.Response) string {
	raw, _ := io.ReadAll(res.Body)
	res.Body = io.NopCloser(bytes.NewReader(raw))
	var doc struct {
		Code string `json:"code"`
	}
	_ = json.Unmarshal(raw, &doc)
	return doc.Code
}

// errorDoc is the JSON error document of DESIGN.md.
type errorDoc struct {
	Error     string          `json:"error"`
	Code      string          `json:"code"`
	RequestID string          `json:"request_id"`
	Details   json.RawMessage `json:"details"`
	raw       string
}

// wantError checks that res is a JSON error with status and code, and returns it.
func wantError(t *testing.T, res *http.Response, status int, code string) errorDoc {
	t.Helper()
	raw, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatalf("read error body: %v", err)
	}
	var doc errorDoc
	doc.raw = string(raw)
	if res.StatusCode != status {
		t.Errorf("status = %d, want %d; body %s", res.StatusCode, status, raw)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("error body is not JSON: %v: %s", err, raw)
	}
	if doc.Code != code {
		t.Errorf("code = %q, want %q; body %s", doc.Code, code, raw)
	}
	if doc.Error == "" {
		t.Errorf("error message is empty; body %s", raw)
	}
	if doc.RequestID == "" || doc.RequestID != res.Header.Get("X-Request-ID") {
		t.Errorf("request_id = %q, want the X-Request-ID header %q", doc.RequestID, res.Header.Get("X-Request-ID"))
	}
	return doc
}

// pollRefused sends method path with token to g every 5 ms, starting at once, until an answer
// other than 200 arrives or 2 s have passed since since. It returns the refusal and how long
// after since it arrived.
func pollRefused(t *testing.T, g *testGateway, method, path, token string, since time.Time) (*http.Response, time.Duration) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		res := call(t, g, method, path, token, "")
		took := time.Since(since)
		if res.StatusCode != http.StatusOK {
			return res, took
		}
		if took > 2*time.Second {
			t.Fatalf("%s %s still answers 200 %v after the revocation", method, path, took)
		}
		<-tick.C
	}
}

// postChat posts body to the chat stream route.
func postChat(t *testing.T, g *testGateway, body string, header map[string]string) *http.Response {
	t.Helper()
	return doRequest(t, g.Client, http.MethodPost, g.URL+"/api/v2/chat/stream", strings.NewReader(body), header)
}

// openStream starts a chat stream on g and returns once its stream_start event arrived (the
// gateway has admitted it and holds its lease); the body is closed at cleanup at the latest.
func openStream(t *testing.T, g *testGateway, token, message string) (*http.Response, *sseReader) {
	t.Helper()
	res := doRequest(t, g.Client, "POST", g.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"`+message+`"}`),
		map[string]string{"Authorization": "Bearer " + token})
	s := wantStream(t, res)
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	return res, s
}

// chatRequest sends a chat for token with request_id id; lastID, when not empty, resumes.
func chatRequest(t *testing.T, c *http.Client, base, token, id, message, lastID string) *http.Response {
	t.Helper()
	h := map[string]string{"Authorization": "Bearer " + token, "Content-Type": "application/json"}
	if lastID != "" {
		h["Last-Event-ID"] = lastID
	}
	return doRequest(t, c, "POST", base+"/api/v2/chat/stream",
		strings.NewReader(`{"message":"`+message+`","request_id":"`+id+`"}`), h)
}

// cancelStream asks g to cancel request_id id for token, with extra headers.
func cancelStream(t *testing.T, g *testGateway, token, id string, header map[string]string) *http.Response {
	t.Helper()
	return cancelUserStream(t, g, token, "", id, header)
}

// cancelUserStream asks g to cancel user's (none: the caller's) stream of request_id id.
func cancelUserStream(t *testing.T, g *testGateway, token, user, id string, header map[string]string) *http.Response {
	t.Helper()
	h := map[string]string{"Authorization": "Bearer " + token, "Content-Type": "application/json"}
	for k, v := range header {
		h[k] = v
	}
	body := `{"request_id":"` + id + `"}`
	if user != "" {
		body = `{"request_id":"` + id + `","user_id":"` + user + `"}`
	}
	return doRequest(t, g.Client, "POST", g.URL+"/api/v2/chat/cancel", strings.NewReader(body), h)
}

// idAttack is one value no ID or label may hold.
type idAttack struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// idAttacks is the table shared with proxy's tests of the validator.
func idAttacks(t *testing.T) []idAttack {
	t.Helper()
	b, err := os.ReadFile("testdata/ids/attacks.json")
	if err != nil {
		t.Fatal(err)
	}
	var as []idAttack
	if err := json.Unmarshal(b, &as); err != nil || len(as) == 0 {
		t.Fatalf("testdata/ids/attacks.json: %v (%d entries)", err, len(as))
	}
	return as
}

// wantFieldError checks that res is a 400 VALIDATION_ERROR whose details name field first.
func wantFieldError(t *testing.T, res *http.Response, field string) {
	t.Helper()
	doc := wantError(t, res, http.StatusBadRequest, proxy.CodeValidation)
	var details []struct{ Field, Reason string }
	if err := json.Unmarshal(doc.Details, &details); err != nil || len(details) == 0 {
		t.Fatalf("details = %s, want a list of field errors", doc.Details)
	}
	if details[0].Field != field || details[0].Reason == "" {
		t.Errorf("details = %s, want field %q with a reason", doc.Details, field)
	}
}

// jsonBody encodes fields as a JSON object.
func jsonBody(t *testing.T, fields map[string]any) string {
	t.Helper()
	b, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ---- Server-Sent Events -------------------------------------------------------------------------

// sseEvent is one dispatched Server-Sent Event.
type sseEvent struct {
	ID       string
	Event    string
	Data     string
	Comments []string // comment lines (without the colon) seen since the previous event
}

// fields decodes the event's data as a JSON object.
func (e sseEvent) fields(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(e.Data), &m); err != nil {
		t.Fatalf("event %q: data is not a JSON object: %v: %s", e.Event, err, e.Data)
	}
	return m
}

// sseReader parses an event stream as the HTML living standard describes, keeping the raw text.
type sseReader struct {
	br  *bufio.Reader
	raw bytes.Buffer
}

func newSSEReader(r io.Reader) *sseReader {
	s := &sseReader{}
	s.br = bufio.NewReader(io.TeeReader(r, &s.raw))
	return s
}

// next returns the next event; io.EOF after the last one, io.ErrUnexpectedEOF when the stream
// stops inside an event.
func (s *sseReader) next() (sseEvent, error) {
	var ev sseEvent
	var data []string
	pending := false
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) && (pending || line != "") {
				return ev, io.ErrUnexpectedEOF
			}
			return ev, err
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		switch {
		case line == "":
			if pending {
				ev.Data = strings.Join(data, "\n")
				return ev, nil
			}
		case strings.HasPrefix(line, ":"):
			ev.Comments = append(ev.Comments, strings.TrimPrefix(line[1:], " "))
		default:
			name, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			pending = true
			switch name {
			case "id":
				ev.ID = value
			case "event":
				ev.Event = value
			case "data":
				data = append(data, value)
			}
		}
	}
}

// readEvents reads events until the stream ends cleanly.
func readEvents(t *testing.T, s *sseReader) []sseEvent {
	t.Helper()
	var evs []sseEvent
	for {
		ev, err := s.next()
		if err == io.EOF {
			return evs
		}
		if err != nil {
			t.Fatalf("reading events after %v: %v\nraw:\n%s", eventNames(evs), err, clipText(s.raw.String()))
		}
		evs = append(evs, ev)
	}
}

func nextEvent(t *testing.T, s *sseReader) sseEvent {
	t.Helper()
	ev, err := s.next()
	if err != nil {
		t.Fatalf("reading the next event: %v\nraw:\n%s", err, clipText(s.raw.String()))
	}
	return ev
}

func eventNames(evs []sseEvent) []string {
	var ns []string
	for _, e := range evs {
		ns = append(ns, e.Event)
	}
	return ns
}

// wantStream checks the headers of a 200 SSE answer and returns a reader of its events.
func wantStream(t *testing.T, res *http.Response) *sseReader {
	t.Helper()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(res.Body)
		t.Fatalf("status = %d, want 200; body %s", res.StatusCode, body)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("Content-Type = %q, want text/event-stream", ct)
	}
	return newSSEReader(res.Body)
}

// numField reads a JSON number field.
func numField(t *testing.T, m map[string]any, key string) float64 {
	t.Helper()
	f, ok := m[key].(float64)
	if !ok {
		t.Fatalf("field %q = %#v, want a number (in %v)", key, m[key], m)
	}
	return f
}

// wantRest reads a resumed stream and checks that it holds exactly the events after after,
// each id one more than the last, through the answer's end and stream_end.
func wantRest(t *testing.T, s *sseReader, after int) {
	t.Helper()
	evs := readEvents(t, s)
	want := after + 1
	for _, ev := range evs {
		if ev.ID != strconv.Itoa(want) {
			t.Fatalf("resumed events %v: got id %q, want %d (raw:\n%s)", eventNames(evs), ev.ID, want, clipText(s.raw.String()))
		}
		want++
	}
	if names := eventNames(evs); len(names) < 2 || names[len(names)-2] != "generation_done" || names[len(names)-1] != "stream_end" {
		t.Fatalf("resumed events %v, want the rest of the answer through generation_done, then stream_end (raw:\n%s)", names, clipText(s.raw.String()))
	}
	if want != resumeLines+2 { // the lines, then stream_end
		t.Fatalf("resumed %d events after id %d, want the %d after it", len(evs), after, resumeLines+1-after)
	}
}

// readN reads n events of a stream after stream_start.
func readN(t *testing.T, s *sseReader, n int) {
	t.Helper()
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event %q, want stream_start", ev.Event)
	}
	for i := 1; i <= n; i++ {
		if ev := nextEvent(t, s); ev.ID != strconv.Itoa(i) {
			t.Fatalf("event %d has id %q", i, ev.ID)
		}
	}
}

// ---- voice sessions -----------------------------------------------------------------------------

// bearer is a header carrying token the usual way.
func bearer(token string) http.Header { return http.Header{"Authorization": {"Bearer " + token}} }

// voiceDial dials a voice session on g (query is "" or starts with "?") with header and the
// subprotocols (voice-protocol-v2 when none are given), over a transport of its own that is
// closed at cleanup. A connection that opens is closed at cleanup at the latest; a refused dial
// returns the response, whose body holds the first KiB of the gateway's answer.
func voiceDial(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	if len(protocols) == 0 {
		protocols = []string{voiceSubprotocol}
	}
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, "ws://"+g.Addr+"/api/v2/voice/stream"+query, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: tr},
		HTTPHeader:   header,
		Subprotocols: protocols,
	})
	if conn != nil {
		t.Cleanup(func() { conn.CloseNow() })
	}
	return conn, res, err
}

// voiceRefused dials like voiceDial and fails the test unless the gateway answers with an HTTP
// error instead of upgrading; it returns that answer.
func voiceRefused(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) *http.Response {
	t.Helper()
	conn, res, err := voiceDial(t, g, query, header, protocols...)
	if err == nil {
		t.Fatalf("the voice session opened (subprotocol %q), want it refused before the upgrade", conn.Subprotocol())
	}
	if res == nil {
		t.Fatalf("voice dial failed without an HTTP answer: %v", err)
	}
	if res.StatusCode == http.StatusSwitchingProtocols {
		t.Fatalf("the gateway answered 101 and then failed the handshake (%v), want an HTTP error", err)
	}
	return res
}

// voiceClient is an open voice session through the gateway.
type voiceClient struct {
	conn *websocket.Conn
	res  *http.Response // the 101
	init map[string]any // the session_initialized message
	id   string         // its session_id
}

// openVoice dials like voiceDial, fails the test unless the session opens, and reads its
// session_initialized message.
func openVoice(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) *voiceClient {
	t.Helper()
	conn, res, err := voiceDial(t, g, query, header, protocols...)
	if err != nil {
		status, body := 0, ""
		if res != nil {
			status = res.StatusCode
			var b strings.Builder
			if res.Body != nil {
				buf := make([]byte, 1024)
				n, _ := res.Body.Read(buf)
				b.Write(buf[:n])
			}
			body = b.String()
		}
		t.Fatalf("voice dial: %v (status %d, body %s)", err, status, body)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	typ, msg, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("reading session_initialized: %v", err)
	}
	v := &voiceClient{conn: conn, res: res}
	if err := json.Unmarshal(msg, &v.init); typ != websocket.MessageText || err != nil || v.init["type"] != "session_initialized" {
		t.Fatalf("first message = %s, want session_initialized", msg)
	}
	v.id, _ = v.init["session_id"].(string)
	if v.id == "" {
		t.Fatalf("session_initialized without a session_id: %s", msg)
	}
	return v
}

// dialVoice opens a voice session on g as user u-voice, with the token in the Authorization
// header (unless header sets its own) and conversation c-1, and fails the test unless the
// session speaks voice-protocol-v2.
func dialVoice(t *testing.T, g *testGateway, header http.Header) *voiceClient {
	t.Helper()
	h := bearer(tokenFor(t, "u-voice", []string{"user"}, nil))
	maps.Copy(h, header)
	v := openVoice(t, g, "?conversation_id=c-1", h)
	if p := v.conn.Subprotocol(); p != voiceSubprotocol {
		t.Fatalf("subprotocol = %q, want %s", p, voiceSubprotocol)
	}
	return v
}

// turn ends an utterance on v (after audio) and waits for the TTS audio that answers it, so
// that the latency histograms have a sample.
func (v *voiceClient) turn(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := v.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	for {
		typ, _, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("waiting for the TTS audio: %v", err)
		}
		if typ == websocket.MessageBinary {
			return
		}
	}
}

// readAll reads messages until the connection ends and returns the text messages (decoded) and
// the close status.
func (v *voiceClient) readAll(ctx context.Context) ([]map[string]any, websocket.StatusCode, error) {
	var msgs []map[string]any
	for {
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			return msgs, websocket.CloseStatus(err), err
		}
		if typ == websocket.MessageText {
			var m map[string]any
			_ = json.Unmarshal(msg, &m)
			msgs = append(msgs, m)
		}
	}
}

// send sends a control message.
func (v *voiceClient) send(t *testing.T, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := v.conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatalf("send %s: %v", msg, err)
	}
}

// voiceEnding is how a session ended for its client.
type voiceEnding struct {
	msgs   []map[string]any // text messages, decoded
	binary int              // binary messages
	code   websocket.StatusCode
	err    error
	at     time.Time
}

// errorCodes are the codes of the error messages among e.msgs.
func (e voiceEnding) errorCodes() []string {
	var codes []string
	for _, m := range e.msgs {
		if m["type"] == "error" {
			c, _ := m["code"].(string)
			codes = append(codes, c)
		}
	}
	return codes
}

// readToClose reads v in a goroutine until its connection ends, and then sends how.
func (v *voiceClient) readToClose(ctx context.Context) <-chan voiceEnding {
	done := make(chan voiceEnding, 1)
	go func() {
		var e voiceEnding
		for {
			typ, msg, err := v.conn.Read(ctx)
			if err != nil {
				e.code, e.err, e.at = websocket.CloseStatus(err), err, time.Now()
				done <- e
				return
			}
			if typ == websocket.MessageBinary {
				e.binary++
				continue
			}
			var m map[string]any
			_ = json.Unmarshal(msg, &m)
			e.msgs = append(e.msgs, m)
		}
	}()
	return done
}

// waitEnding waits up to within for the session's end.
func waitEnding(t *testing.T, ended <-chan voiceEnding, within time.Duration) voiceEnding {
	t.Helper()
	select {
	case e := <-ended:
		return e
	case <-time.After(within):
		t.Fatalf("the voice session did not end within %v", within)
		return voiceEnding{}
	}
}

// voiceListing is the body of GET /api/v2/voice/sessions.
type voiceListing struct {
	Sessions []voiceListed `json:"sessions"`
	Count    int           `json:"count"`
}

// voiceListed is one session in a listing.
type voiceListed struct {
	SessionID      string    `json:"session_id"`
	UserID         string    `json:"user_id"`
	TenantID       string    `json:"tenant_id"`
	ConversationID string    `json:"conversation_id"`
	Language       string    `json:"language"`
	Instance       string    `json:"instance"`
	StartedAt      time.Time `json:"started_at"`
}

// listVoice lists the live sessions through g.
func listVoice(t *testing.T, g *testGateway, token string) voiceListing {
	t.Helper()
	res := call(t, g, "GET", "/api/v2/voice/sessions", token, "")
	wantStatus(t, res, http.StatusOK)
	var l voiceListing
	if err := json.NewDecoder(res.Body).Decode(&l); err != nil {
		t.Fatalf("decode the session listing: %v", err)
	}
	if l.Count != len(l.Sessions) {
		t.Errorf("listing count %d for %d sessions", l.Count, len(l.Sessions))
	}
	return l
}

// hasSession reports whether l lists the session id.
func (l voiceListing) hasSession(id string) bool {
	return slices.ContainsFunc(l.Sessions, func(s voiceListed) bool { return s.SessionID == id })
}

// voiceLive asks g for one session's live detail.
func (g *testGateway) voiceLive(t *testing.T, token, id string) (voice.Live, bool, int) {
	t.Helper()
	res := call(t, g, "GET", "/api/v2/voice/sessions/"+id, token, "")
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, res.Body)
		return voice.Live{}, false, res.StatusCode
	}
	var l voice.Live
	if err := json.NewDecoder(res.Body).Decode(&l); err != nil {
		t.Fatalf("decode the session detail: %v", err)
	}
	return l, true, res.StatusCode
}

// waitNoVoice waits until g lists no live voice session, so that stopping g does not wait for
// one still tearing down.
func waitNoVoice(t *testing.T, g *testGateway) {
	t.Helper()
	eventually(t, 5*time.Second, "voice session gone from the registry", func() bool {
		var list struct {
			Count int `json:"count"`
		}
		res := call(t, g, "GET", "/api/v2/voice/sessions", tokenFor(t, "u-ops-admin", []string{"admin"}, nil), "")
		return res.StatusCode == http.StatusOK && json.NewDecoder(res.Body).Decode(&list) == nil && list.Count == 0
	})
}

// voicePolicy writes base (a policy file of testdata/policy) with its limits changed by edit
// to a file of the test's own and returns its path: the routes stay those base binds.
func voicePolicy(tb testing.TB, base string, edit func(*policy.Limits)) string {
	tb.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "policy", base))
	if err != nil {
		tb.Fatal(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		tb.Fatal(err)
	}
	edit(&f.Limits)
	out, err := json.Marshal(f)
	if err != nil {
		tb.Fatal(err)
	}
	file := filepath.Join(tb.TempDir(), "policy.json")
	if err := os.WriteFile(file, out, 0o600); err != nil {
		tb.Fatal(err)
	}
	return file
}

// ---- tokens -------------------------------------------------------------------------------------

// testSecret is the HMAC secret of the gateways the tests start.
const testSecret = "voicegate-test-secret-0123456789abcdef"

// signHS256 makes an HS256 JWT with crypto/hmac directly: a second implementation, independent
// of the library the gateway verifies with.
func signHS256(t testing.TB, secret string, claims map[string]any) string {
	t.Helper()
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signingInput := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signingInput))
	return signingInput + "." + enc.EncodeToString(mac.Sum(nil))
}

// tokenFor returns a valid one-hour token for user with roles; extra claims override.
func tokenFor(t testing.TB, user string, roles []string, extra map[string]any) string {
	now := time.Now()
	claims := map[string]any{
		"sub": user, "jti": crand.Text(), "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(),
		"username": user + "-name", "tenant_id": "tenant-a", "roles": roles,
	}
	for k, v := range extra {
		if v == nil {
			delete(claims, k)
			continue
		}
		claims[k] = v
	}
	return signHS256(t, testSecret, claims)
}

// withToken is a RoundTripper that adds a bearer token to requests that carry none.
type withToken struct {
	base  http.RoundTripper
	token string
}

func (w withToken) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("Authorization") != "" || r.Header.Get("X-Test-No-Token") != "" {
		r.Header.Del("X-Test-No-Token")
		return w.base.RoundTrip(r)
	}
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+w.token)
	return w.base.RoundTrip(r)
}

// tokenWatch mints tokens for a test and, at cleanup, stops the test's gateways and fails the
// test if any of those tokens (or the gateways' default client tokens) appears anywhere in their
// logs, whole or by its signature.
type tokenWatch struct {
	mu     sync.Mutex
	tokens []string
}

func watchTokens(t *testing.T, gws ...*testGateway) *tokenWatch {
	t.Helper()
	w := &tokenWatch{}
	for _, g := range gws {
		if wt, ok := g.Client.Transport.(withToken); ok {
			w.add(wt.token)
		}
	}
	// Registered after the gateways were started, so it runs before their own cleanup: stop
	// them first so that their logs are complete.
	t.Cleanup(func() {
		for _, g := range gws {
			g.stop()
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		for i, g := range gws {
			log := g.Stderr.String()
			for _, tok := range w.tokens {
				sig := tok[strings.LastIndexByte(tok, '.')+1:]
				if strings.Contains(log, tok) || strings.Contains(log, sig) {
					t.Errorf("gateway %d logged a token (%s…):\n%s", i, tok[:min(len(tok), 12)], clipText(log))
				}
			}
		}
	})
	return w
}

func (w *tokenWatch) add(tok string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.tokens = append(w.tokens, tok)
	return tok
}

// token is tokenFor, remembered for the log check.
func (w *tokenWatch) token(t *testing.T, user string, roles []string, extra map[string]any) string {
	t.Helper()
	return w.add(tokenFor(t, user, roles, extra))
}

// ---- waiting ------------------------------------------------------------------------------------

// eventually polls cond every 10 ms until it holds or within has passed, and reports how long
// it took; it fails the test with what when it never holds.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// sleepCtx waits d or until ctx ends, reporting whether the full time passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// settle waits a moment for a child's goroutines to park and its GC to run after a burst of
// work, before its memory is read.
func settle(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// inParallel runs f(i) for i in [0, n) on up to width goroutines and returns the first error.
func inParallel(n, width int, f func(i int) error) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	next := make(chan int)
	for range width {
		wg.Go(func() {
			for i := range next {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

// requestDurations returns, from g's access log, the duration the gateway itself took for each
// request whose ID starts with prefix: what it spent, without the test client's own scheduling.
func requestDurations(t *testing.T, g *testGateway, prefix string) []time.Duration {
	t.Helper()
	var out []time.Duration
	for _, rec := range logRecords(t, g) {
		id, _ := rec["request_id"].(string)
		if rec["msg"] != "request" || !strings.HasPrefix(id, prefix) {
			continue
		}
		text, _ := rec["duration"].(string) // JSON logs write durations as text
		d, err := time.ParseDuration(text)
		if err != nil {
			t.Fatalf("access log line without a duration: %v", rec)
		}
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// percentile is the p-th percentile (0 < p ≤ 1) of sorted d, nearest rank.
func percentile(d []time.Duration, p float64) time.Duration {
	return d[int(math.Ceil(p*float64(len(d))))-1]
}

// ---- logs and metrics ---------------------------------------------------------------------------

// logRecords decodes the gateway's JSON log lines.
func logRecords(t *testing.T, g *testGateway) []map[string]any {
	t.Helper()
	var recs []map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.Stderr.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, sc.Text())
		}
		recs = append(recs, rec)
	}
	return recs
}

// logCount counts the gateway's JSON log lines whose msg contains msg, and returns the first.
func logCount(t *testing.T, g *testGateway, msg string) (int, map[string]any) {
	t.Helper()
	var first map[string]any
	n := 0
	for _, rec := range logRecords(t, g) {
		if m, _ := rec["msg"].(string); strings.Contains(m, msg) {
			if n == 0 {
				first = rec
			}
			n++
		}
	}
	return n, first
}

func clipText(s string) string {
	if len(s) > 4000 {
		return s[:4000] + "…"
	}
	return s
}

// clipTail is the end of a long log, where a failure usually is.
func clipTail(s string) string {
	if len(s) > 8000 {
		return "…" + s[len(s)-8000:]
	}
	return s
}

// scrape fetches url (a /metrics endpoint) and parses it with the Prometheus text parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %d, want 200", url, res.StatusCode)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("GET %s: Content-Type = %q, want the Prometheus text format", url, ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(res.Body)
	if err != nil {
		t.Fatalf("GET %s: not Prometheus text: %v", url, err)
	}
	return fams
}

// labelsOf returns a metric's labels as a map.
func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// sample returns the value of the series of family name whose labels include want (counter,
// gauge or untyped; a histogram's sample count), and whether there is one; several matching
// series are summed.
func sample(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
	sum, found := 0.0, false
	for _, m := range f.GetMetric() {
		ls := labelsOf(m)
		match := true
		for k, v := range want {
			if ls[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum, found
}

// processMetrics are the process and Go runtime metrics docs/operations.md names, with the standard
// names of the Prometheus client's collectors.
var processMetrics = []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
	"process_max_fds", "process_start_time_seconds", "go_goroutines", "go_threads", "go_gc_duration_seconds",
	"go_memstats_heap_inuse_bytes"}

// ---- policy files -------------------------------------------------------------------------------

// writePolicy writes f as JSON to file, atomically: a watcher never sees it half written.
func writePolicy(t *testing.T, file string, f *policy.File) {
	t.Helper()
	data, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, file, data)
}

// writeAtomic replaces file with data through a rename.
func writeAtomic(t *testing.T, file string, data []byte) {
	t.Helper()
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, file); err != nil {
		t.Fatal(err)
	}
}

// e2ePolicy is testdata/policy/e2e.json, parsed, for tests to modify.
func e2ePolicy(t *testing.T) *policy.File {
	t.Helper()
	data, err := os.ReadFile("testdata/policy/e2e.json")
	if err != nil {
		t.Fatal(err)
	}
	f, err := policy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// ---- Redis --------------------------------------------------------------------------------------

// testRedis is one redis-server process that outlives Kill and Restart: its port stays the same.
type testRedis struct {
	t    testing.TB
	bin  string
	dir  string
	port int
	args []string // more redis-server arguments (a cluster node's)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited and been waited for
	out  *logBuffer    // redis-server's own log, for failure messages
}

// startRedis starts redis-server on 127.0.0.3 (where nothing else in the tests binds, so a port
// freed by Kill is still free for Restart) and a free port, and kills it at cleanup. Without
// redis-server on PATH the test is skipped, or fails when VOICEGATE_REQUIRE_REDIS=1 (as in CI).
func startRedis(t testing.TB) *testRedis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("VOICEGATE_REQUIRE_REDIS") == "1" {
			t.Fatal("redis-server not found on PATH, and these tests are required (VOICEGATE_REQUIRE_REDIS=1)")
		}
		t.Skip("redis-server not installed; install it with: apt-get install redis-server")
	}
	r := &testRedis{t: t, bin: bin, dir: t.TempDir()}
	t.Cleanup(r.Kill)
	// The port is free when picked but another process may take it before redis-server binds:
	// try a few.
	var errs []error
	for range 5 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("pick a port for redis-server: %v", err)
		}
		r.port = port
		if err := r.launch(); err != nil {
			errs = append(errs, err)
			continue
		}
		return r
	}
	t.Fatalf("redis-server did not start: %v", errors.Join(errs...))
	return nil
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", redisHost+":0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// launch starts redis-server on r.port and waits until it answers PING.
func (r *testRedis) launch() error {
	args := append([]string{"--save", "", "--appendonly", "no", "--protected-mode", "no",
		"--port", strconv.Itoa(r.port), "--bind", redisHost, "--dir", r.dir}, r.args...)
	cmd := exec.Command(r.bin, args...)
	out := &logBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", r.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	r.mu.Lock()
	r.cmd, r.done, r.out = cmd, done, out
	r.mu.Unlock()

	deadline := time.Now().Add(5 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("redis-server on port %d exited at start: %s", r.port, strings.TrimSpace(out.String()))
		default:
		}
		if err := ping(r.Addr()); err == nil {
			// Another process may hold the port: one of another test run, which picks ports
			// the same way. Then this one cannot bind and exits, but that one answers.
			if pid, err := serverPID(r.Addr()); err != nil || pid != cmd.Process.Pid {
				r.Kill()
				return fmt.Errorf("redis-server on port %d: the server answering there is process %d, not this one (%d): %v",
					r.port, pid, cmd.Process.Pid, err)
			}
			return nil
		} else if time.Now().After(deadline) {
			r.Kill()
			return fmt.Errorf("redis-server on port %d did not answer PING within 5s: %v\n%s", r.port, err, out)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// serverPID is the process ID of the redis-server at addr, from INFO server.
func serverPID(addr string) (int, error) {
	v, err := rawDo(addr, "INFO", "server")
	if err != nil {
		return 0, err
	}
	info, _ := v.(string)
	for line := range strings.Lines(info) {
		if s, ok := strings.CutPrefix(strings.TrimSpace(line), "process_id:"); ok {
			return strconv.Atoi(s)
		}
	}
	return 0, fmt.Errorf("INFO server without process_id: %.200q", info)
}

// ping does a bare PING exchange.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := io.WriteString(c, "PING\r\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// Addr is host:port.
func (r *testRedis) Addr() string { return net.JoinHostPort(redisHost, strconv.Itoa(r.port)) }

// redisHost is the loopback address the test Redis servers use.
const redisHost = "127.0.0.3"

// URL is the REDIS_URL of database 0.
func (r *testRedis) URL() string { return "redis://" + r.Addr() + "/0" }

// Kill sends SIGKILL and waits for the process to be gone; it does nothing when none runs.
func (r *testRedis) Kill() {
	r.mu.Lock()
	cmd, done := r.cmd, r.done
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-done
}

// Freeze stops redis-server with SIGSTOP: it keeps its port and the kernel keeps accepting
// connections for it, but nothing answers — Redis frozen, not down. Thaw resumes it.
func (r *testRedis) Freeze() { r.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen redis-server with SIGCONT.
func (r *testRedis) Thaw() { r.signal(syscall.SIGCONT) }

func (r *testRedis) signal(sig os.Signal) {
	r.t.Helper()
	r.mu.Lock()
	cmd := r.cmd
	r.mu.Unlock()
	if cmd == nil {
		r.t.Fatal("redis-server is not running")
	}
	if err := cmd.Process.Signal(sig); err != nil {
		r.t.Fatalf("signal redis-server: %v", err)
	}
}

// Restart starts redis-server again on the same port (empty: nothing was saved) and waits for
// PING; it fails the test if that does not work.
func (r *testRedis) Restart() {
	r.t.Helper()
	r.Kill()
	if err := r.launch(); err != nil {
		r.t.Fatalf("restart redis-server: %v", err)
	}
}

// Do sends one command and returns its reply: string (simple or bulk), int64, nil (a nil
// reply), []any, or a redisError.
func (r *testRedis) Do(t testing.TB, args ...string) any {
	t.Helper()
	c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err != nil {
		t.Fatalf("redis %s: %v", args[0], err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write(b.Bytes()); err != nil {
		t.Fatalf("redis %s: %v", args[0], err)
	}
	v, err := readRESP(bufio.NewReader(c))
	if err != nil {
		t.Fatalf("redis %s: %v", args[0], err)
	}
	return v
}

// redisError is an error reply.
type redisError string

func readRESP(br *bufio.Reader) (any, error) {
	line, err := br.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || !strings.HasSuffix(line, "\r\n") {
		return nil, fmt.Errorf("malformed reply line %q", line)
	}
	kind, body := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return body, nil
	case '-':
		return redisError(body), nil
	case ':':
		return strconv.ParseInt(body, 10, 64)
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil || n < 0 {
			return nil, err // $-1: nil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readRESP(br); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown reply type %q", line)
}

// testClient is a rueidis client on r, closed at cleanup.
func testClient(t testing.TB, r *testRedis) rueidis.Client {
	t.Helper()
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	return client
}

// redisNow is Redis's own clock.
func redisNow(t *testing.T, r *testRedis) time.Time {
	t.Helper()
	tm, ok := r.Do(t, "TIME").([]any)
	if !ok || len(tm) != 2 {
		t.Fatalf("TIME = %#v", tm)
	}
	sec, _ := strconv.ParseInt(tm[0].(string), 10, 64)
	usec, _ := strconv.ParseInt(tm[1].(string), 10, 64)
	return time.Unix(sec, usec*1000)
}

// deadAddr returns a loopback address where nothing listens (for now). It is on 127.0.0.2,
// where no test server binds, so the port cannot be handed to another listener meanwhile.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestRedisHelper checks the helper itself: it answers, Kill stops it, Restart brings it back on
// the same address with nothing kept.
func TestRedisHelper(t *testing.T) {
	r := startRedis(t)
	if got := r.Do(t, "SET", "k", "v"); got != "OK" {
		t.Fatalf("SET = %#v, want OK", got)
	}
	if got := r.Do(t, "GET", "k"); got != "v" {
		t.Fatalf("GET = %#v, want v", got)
	}
	if got := r.Do(t, "GET", "missing"); got != nil {
		t.Fatalf("GET missing = %#v, want nil", got)
	}
	if got := r.Do(t, "NOPE"); func() bool { _, ok := got.(redisError); return !ok }() {
		t.Fatalf("NOPE = %#v, want an error reply", got)
	}
	if want := "redis://" + r.Addr() + "/0"; r.URL() != want {
		t.Errorf("URL = %q, want %q", r.URL(), want)
	}
	r.Kill()
	if err := ping(r.Addr()); err == nil {
		t.Fatal("PING answered after Kill")
	}
	r.Restart()
	if got := r.Do(t, "GET", "k"); got != nil {
		t.Errorf("GET after restart = %#v, want nil (no persistence)", got)
	}

	// A port that another redis-server holds (of another test process picking ports the same
	// way) is refused, although that one answers PING there: the tests would freeze and kill a
	// server their gateways do not talk to.
	taken := &testRedis{t: t, bin: r.bin, dir: t.TempDir(), port: r.port}
	t.Cleanup(taken.Kill)
	if err := taken.launch(); err == nil {
		t.Errorf("launch on port %d, which another redis-server holds, succeeded", r.port)
	} else if ping(r.Addr()) != nil {
		t.Errorf("the refused launch stopped the redis-server that holds the port")
	}
}

// ---- Redis Cluster ------------------------------------------------------------------------------

// clusterNodeTimeout is the cluster-node-timeout of the test cluster: how long a master may
// be silent before its replica takes over.
const clusterNodeTimeout = time.Second

// testCluster is three masters and three replicas. Nodes keep their ports across kills and
// restarts; a restarted node rejoins with its nodes.conf (as a replica, if it was replaced).
type testCluster struct {
	nodes []*testRedis
	cli   string
	dir   string
}

// sharedCluster is the package's one cluster, made by the first test that asks.
var sharedCluster struct {
	mu  sync.Mutex
	c   *testCluster
	err error
}

// startCluster returns the package's cluster, healthy: every node running, three masters with a
// replica each, all slots served. Without redis-server or redis-cli the test is skipped, or
// fails when VOICEGATE_REQUIRE_REDIS=1 (as in CI). Cluster tests must not run in parallel: they
// break nodes.
func startCluster(t testing.TB) *testCluster {
	t.Helper()
	startRedisBinaries(t)
	sharedCluster.mu.Lock()
	defer sharedCluster.mu.Unlock()
	if sharedCluster.c == nil && sharedCluster.err == nil {
		sharedCluster.c, sharedCluster.err = makeCluster()
	}
	if sharedCluster.err != nil {
		t.Fatalf("redis cluster: %v", sharedCluster.err)
	}
	c := sharedCluster.c
	if err := c.restore(); err != nil {
		// A cluster an earlier test broke and that did not come back (its own cleanup has
		// failed for it) is replaced, so that one such test fails, not every one after it.
		t.Logf("the shared Redis Cluster is not whole (%v); starting a new one", err)
		for _, n := range c.nodes {
			n.Kill()
		}
		_ = os.RemoveAll(c.dir)
		if sharedCluster.c, sharedCluster.err = makeCluster(); sharedCluster.err != nil {
			t.Fatalf("redis cluster: %v", sharedCluster.err)
		}
		c = sharedCluster.c
	}
	return c
}

// startRedisBinaries skips or fails the test without redis-server and redis-cli.
func startRedisBinaries(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("VOICEGATE_REQUIRE_REDIS") == "1" {
				t.Fatalf("%s not found on PATH, and these tests are required (VOICEGATE_REQUIRE_REDIS=1)", bin)
			}
			t.Skipf("%s not installed; install it with: apt-get install redis-server redis-tools", bin)
		}
	}
}

// stopSharedCluster kills the package's cluster, if one was made.
func stopSharedCluster() {
	sharedCluster.mu.Lock()
	defer sharedCluster.mu.Unlock()
	if c := sharedCluster.c; c != nil {
		for _, n := range c.nodes {
			n.Kill()
		}
		_ = os.RemoveAll(c.dir)
		sharedCluster.c = nil
	}
}

// makeCluster starts six nodes and creates the cluster, within about 30 s.
func makeCluster() (_ *testCluster, err error) {
	bin, _ := exec.LookPath("redis-server")
	cli, _ := exec.LookPath("redis-cli")
	dir, err := os.MkdirTemp("", "voicegate-cluster-")
	if err != nil {
		return nil, err
	}
	c := &testCluster{cli: cli, dir: dir}
	defer func() {
		if err != nil {
			for _, n := range c.nodes {
				n.Kill()
			}
			_ = os.RemoveAll(dir)
		}
	}()
	used := map[int]bool{}
	for i := range 6 {
		var errs []error
		for range 5 {
			port, err := freeClusterPort(used)
			if err != nil {
				return nil, err
			}
			nodeDir := fmt.Sprintf("%s/node-%d", dir, i)
			if err := os.MkdirAll(nodeDir, 0o755); err != nil {
				return nil, err
			}
			n := &testRedis{bin: bin, dir: nodeDir, port: port, args: []string{
				"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
				"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout.Milliseconds())),
				// A replica may take over however long it was cut off, and stays where it is.
				"--cluster-replica-validity-factor", "0", "--cluster-allow-replica-migration", "no",
				"--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
				"--cluster-announce-ip", redisHost, // else peers learn 127.0.0.1, the source of loopback connections
				"--loglevel", "warning",
			}}
			if err := n.launch(); err != nil {
				errs = append(errs, err)
				continue
			}
			used[port] = true
			c.nodes = append(c.nodes, n)
			break
		}
		if len(c.nodes) != i+1 {
			return nil, fmt.Errorf("node %d did not start: %w", i, errors.Join(errs...))
		}
	}
	args := []string{"--cluster", "create"}
	for _, n := range c.nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", "1", "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("redis-cli --cluster create: %v\n%s", err, out)
	}
	if err := c.waitHealthy(20 * time.Second); err != nil {
		return nil, err
	}
	return c, nil
}

// freeClusterPort is a loopback port that was free a moment ago, with its cluster bus port
// (port+10000) free too, so below the ephemeral range.
func freeClusterPort(used map[int]bool) (int, error) {
	for range 100 {
		port := 20000 + rand.IntN(10000)
		if used[port] {
			continue
		}
		a, err := net.Listen("tcp", net.JoinHostPort(redisHost, strconv.Itoa(port)))
		if err != nil {
			continue
		}
		b, err := net.Listen("tcp", net.JoinHostPort(redisHost, strconv.Itoa(port+10000)))
		a.Close()
		if err != nil {
			continue
		}
		b.Close()
		return port, nil
	}
	return 0, errors.New("no free pair of ports for a cluster node")
}

// URL is the REDIS_URL of the cluster: every node's address.
func (c *testCluster) URL() string {
	addrs := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		addrs[i] = n.Addr()
	}
	return strings.Join(addrs, ",")
}

// node is one line of CLUSTER NODES.
type clusterNode struct {
	id, addr string
	port     int
	master   bool
	failing  bool   // fail or fail? (pfail)
	masterID string // a replica's master
	slots    [][2]int
}

// clusterNodes is CLUSTER NODES as one running node sees it.
func (c *testCluster) clusterNodes(n *testRedis) ([]clusterNode, error) {
	v, err := rawDo(n.Addr(), "CLUSTER", "NODES")
	if err != nil {
		return nil, err
	}
	text, ok := v.(string)
	if !ok {
		return nil, fmt.Errorf("CLUSTER NODES = %#v", v)
	}
	var out []clusterNode
	for line := range strings.SplitSeq(strings.TrimSpace(text), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		cn := clusterNode{id: f[0], masterID: f[3]}
		cn.addr, _, _ = strings.Cut(f[1], "@")
		_, p, _ := net.SplitHostPort(cn.addr)
		cn.port, _ = strconv.Atoi(p)
		flags := strings.Split(f[2], ",")
		cn.master = slices.Contains(flags, "master")
		cn.failing = slices.Contains(flags, "fail") || slices.Contains(flags, "fail?")
		for _, s := range f[8:] {
			if strings.HasPrefix(s, "[") {
				continue // a slot being migrated
			}
			lo, hi, found := strings.Cut(s, "-")
			a, _ := strconv.Atoi(lo)
			b := a
			if found {
				b, _ = strconv.Atoi(hi)
			}
			cn.slots = append(cn.slots, [2]int{a, b})
		}
		out = append(out, cn)
	}
	return out, nil
}

// running reports whether node i's process runs (it may be frozen).
func (c *testCluster) running(i int) bool {
	n := c.nodes[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil
}

// view is the cluster as the first running node that answers sees it.
func (c *testCluster) view() ([]clusterNode, error) {
	var errs []error
	for i, n := range c.nodes {
		if !c.running(i) || ping(n.Addr()) != nil {
			continue
		}
		nodes, err := c.clusterNodes(n)
		if err == nil {
			return nodes, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("no node answers: %v", errors.Join(errs...))
}

// healthyNow says what keeps the cluster from being whole: every node running and answering,
// cluster_state ok everywhere, three masters each with a replica whose link is up, nobody
// failing in anybody's view, and every node's slot map the same. "" when whole.
func (c *testCluster) healthyNow() string {
	views := map[string]bool{} // each node's slot map, as text: all must agree
	for i, n := range c.nodes {
		if !c.running(i) {
			return fmt.Sprintf("node %d is not running", i)
		}
		info, err := rawDo(n.Addr(), "CLUSTER", "INFO")
		if err != nil {
			return fmt.Sprintf("node %d: %v", i, err)
		}
		if s, _ := info.(string); !strings.Contains(s, "cluster_state:ok") || !strings.Contains(s, "cluster_known_nodes:6") {
			return fmt.Sprintf("node %d: cluster not ok: %s", i, strings.Join(strings.Fields(s)[:min(len(strings.Fields(s)), 6)], " "))
		}
		nodes, err := c.clusterNodes(n)
		if err != nil {
			return err.Error()
		}
		masters, replicas := 0, map[string]int{}
		var view []string
		for _, cn := range nodes {
			if cn.master {
				view = append(view, fmt.Sprint(cn.id, cn.slots))
			}
		}
		slices.Sort(view)
		views[strings.Join(view, " ")] = true
		if len(views) > 1 {
			return fmt.Sprintf("node %d sees other slot owners than the others", i)
		}
		for _, cn := range nodes {
			if cn.failing {
				return fmt.Sprintf("node %d sees %s failing", i, cn.addr)
			}
			if cn.master {
				masters++
			} else {
				replicas[cn.masterID]++
			}
		}
		if masters != 3 || len(replicas) != 3 {
			return fmt.Sprintf("node %d sees %d masters and replicas of %d", i, masters, len(replicas))
		}
		repl, err := rawDo(n.Addr(), "INFO", "replication")
		if err != nil {
			return err.Error()
		}
		s, _ := repl.(string)
		if strings.Contains(s, "role:slave") && !strings.Contains(s, "master_link_status:up") {
			return fmt.Sprintf("node %d: replica not in sync", i)
		}
	}
	return ""
}

// waitHealthy waits until the cluster is whole.
func (c *testCluster) waitHealthy(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		why := c.healthyNow()
		if why == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster not whole after %v: %s", within, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// heal makes the cluster whole again: frozen nodes resumed, stopped ones restarted (a replaced
// master comes back as a replica of its successor), and waits for it.
func (c *testCluster) heal(t testing.TB) {
	t.Helper()
	if err := c.restore(); err != nil {
		t.Fatal(err)
	}
}

// restore is heal, saying what keeps the cluster from being whole if it does not come back.
func (c *testCluster) restore() error {
	for i, n := range c.nodes {
		if !c.running(i) {
			if err := n.launch(); err != nil {
				return fmt.Errorf("restart cluster node %d: %w", i, err)
			}
			continue
		}
		n.mu.Lock()
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
		n.mu.Unlock()
	}
	err := c.waitHealthy(20 * time.Second)
	if err != nil {
		var views []string
		for i, n := range c.nodes {
			nodes, err := rawDo(n.Addr(), "CLUSTER", "NODES")
			views = append(views, fmt.Sprintf("node %d (%s), running %v: %v %v", i, n.Addr(), c.running(i), nodes, err))
		}
		return fmt.Errorf("%w; each node's view:\n%s", err, strings.Join(views, "\n"))
	}
	return nil
}

// index is the node with that port.
func (c *testCluster) index(t *testing.T, port int) int {
	t.Helper()
	for i, n := range c.nodes {
		if n.port == port {
			return i
		}
	}
	t.Fatalf("no node on port %d", port)
	return -1
}

// masterOf is the node that serves slot, and its replica.
func (c *testCluster) masterOf(t *testing.T, slot int) (master, replica int) {
	t.Helper()
	nodes, err := c.view()
	if err != nil {
		t.Fatal(err)
	}
	var id string
	master, replica = -1, -1
	for _, cn := range nodes {
		for _, r := range cn.slots {
			if cn.master && slot >= r[0] && slot <= r[1] {
				master, id = c.index(t, cn.port), cn.id
			}
		}
	}
	for _, cn := range nodes {
		if !cn.master && cn.masterID == id && id != "" {
			replica = c.index(t, cn.port)
		}
	}
	if master < 0 || replica < 0 {
		t.Fatalf("slot %d: master %d, replica %d in %+v", slot, master, replica, nodes)
	}
	return master, replica
}

// promoted waits until node i is a master in the view of every other running node, and
// returns when that was seen.
func (c *testCluster) promoted(t *testing.T, i int, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		all := true
		for j, n := range c.nodes {
			if j == i || !c.running(j) {
				continue
			}
			nodes, err := c.clusterNodes(n)
			if err != nil {
				continue // frozen: it sees nothing
			}
			for _, cn := range nodes {
				if cn.port == c.nodes[i].port && (!cn.master || len(cn.slots) == 0) {
					all = false
				}
			}
		}
		if all {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %d not promoted within %v", i, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// replicated waits until node replica has every write node master had when asked.
func (c *testCluster) replicated(t *testing.T, master, replica int) {
	t.Helper()
	offset := func(i int, field string) int64 {
		v, err := rawDo(c.nodes[i].Addr(), "INFO", "replication")
		if err != nil {
			t.Fatal(err)
		}
		text, _ := v.(string)
		for line := range strings.SplitSeq(text, "\r\n") {
			if rest, ok := strings.CutPrefix(line, field+":"); ok {
				n, _ := strconv.ParseInt(rest, 10, 64)
				return n
			}
		}
		t.Fatalf("node %d: no %s in INFO replication", i, field)
		return 0
	}
	want := offset(master, "master_repl_offset")
	eventually(t, 5*time.Second, "the replica has the master's writes", func() bool {
		return offset(replica, "slave_repl_offset") >= want
	})
}

// slotsOf are the slot ranges of node i, as the cluster sees it now.
func (c *testCluster) slotsOf(t *testing.T, i int) [][2]int {
	t.Helper()
	nodes, err := c.view()
	if err != nil {
		t.Fatal(err)
	}
	for _, cn := range nodes {
		if cn.port == c.nodes[i].port {
			return cn.slots
		}
	}
	return nil
}

// rawDo sends one command to addr, with an error rather than a test failure.
func rawDo(addr string, args ...string) (any, error) {
	c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(b.String())); err != nil {
		return nil, err
	}
	v, err := readRESP(bufio.NewReader(c))
	if e, ok := v.(redisError); ok {
		return nil, errors.New(string(e))
	}
	return v, err
}

// keySlot is Redis Cluster's hash slot of key: CRC16 (XMODEM) of its hash tag, or of the whole
// key without one, modulo 16384.
func keySlot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for k := 0; k < len(key); k++ {
		crc ^= uint16(key[k]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % 16384
}

// ---- tools --------------------------------------------------------------------------------------

// requireTool returns the path of a tool, looked up on PATH and then at its usual place. Without
// it the test is skipped with how to install it, or fails when VOICEGATE_REQUIRE_TOOLS=1.
func requireTool(t *testing.T, name, usual, pkg string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if _, err := os.Stat(usual); err == nil {
		return usual
	}
	missingTool(t, fmt.Sprintf("%s (on PATH or at %s)", name, usual), pkg)
	return ""
}

// missingTool skips the test because what is not installed, saying how to install it, or
// fails it when VOICEGATE_REQUIRE_TOOLS=1.
func missingTool(t *testing.T, what, pkg string) {
	t.Helper()
	if os.Getenv("VOICEGATE_REQUIRE_TOOLS") == "1" {
		t.Fatalf("%s not found, and these tests are required (VOICEGATE_REQUIRE_TOOLS=1)", what)
	}
	t.Skipf("%s not installed; install it with: apt-get install %s", what, pkg)
}

// dig walks a decoded YAML or JSON value by keys (strings) and indexes (ints).
func dig(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func str(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case nil:
		return ""
	}
	return fmt.Sprint(v)
}

// strList reads a YAML list of scalars.
func strList(v any) []string {
	var out []string
	l, _ := v.([]any)
	for _, e := range l {
		out = append(out, str(e))
	}
	return out
}

// toneLevel is the amplitude of the freq component of pcm (16-bit little-endian at rate), by
// the Goertzel algorithm, relative to full scale.
func toneLevel(pcm []byte, rate, freq int) float64 {
	coeff := 2 * math.Cos(2*math.Pi*float64(freq)/float64(rate))
	var s1, s2 float64
	n := len(pcm) / 2
	for i := range n {
		x := float64(int16(uint16(pcm[2*i])|uint16(pcm[2*i+1])<<8)) / 32768
		s1, s2 = x+coeff*s1-s2, s1
	}
	power := s1*s1 + s2*s2 - coeff*s1*s2
	return 2 * math.Sqrt(max(power, 0)) / float64(n)
}
