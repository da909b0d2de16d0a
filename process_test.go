package main

// Benchmarks of servers under load run the built gateway and its standard-library baseline as
// child processes, at the same fixed offered load, and read each child's CPU time and memory
// from /proc: a figure per unit of work taken that way holds on a busy machine.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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

// settle waits a moment for a child's goroutines to park and its GC to run after a burst of
// work, before its memory is read.
func settle(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// envInt reads a benchmark's size from the environment, or def.
func envInt(tb testing.TB, name string, def int) int {
	tb.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// profile records the child's CPU profile with perf for the given time, when
// VOICEGATE_BENCH_PERF names a folder: the profile that shows where a missed figure goes. The
// returned function waits for the recording.
func (c *child) profile(tb testing.TB, d time.Duration) func() {
	dir := os.Getenv("VOICEGATE_BENCH_PERF")
	if dir == "" {
		return func() {}
	}
	out := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".perf")
	cmd := exec.Command("perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", out,
		"-p", strconv.Itoa(c.cmd.Process.Pid), "--", "sleep", strconv.Itoa(int(d.Seconds())))
	if err := cmd.Start(); err != nil {
		tb.Logf("perf: %v", err)
		return func() {}
	}
	return func() {
		cmd.Wait()
		tb.Logf("%s: CPU profile in %s", c.name, out)
	}
}
