package main

// Benchmarks of servers under load run the built gateway and its standard-library baseline as
// child processes, at the same fixed offered load, and read each child's CPU time and memory
// from /proc: a figure per unit of work taken that way holds on a busy machine.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// childEnv names the role of a test binary started as a child process (see TestMain).
const childEnv = "VOICEGATE_TEST_CHILD"

// runChild serves as the child named by role and never returns; it reports its address on
// stdout and exits when its stdin closes (the parent is gone or done).
func runChild(role string) {
	switch role {
	case "bare-proxy":
		target, err := url.Parse(os.Getenv("VOICEGATE_TEST_TARGET"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		serveChild(bareReverseProxy(target))
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", role)
		os.Exit(2)
	}
}

// bareReverseProxy is the standard-library baseline of every process benchmark: an
// httputil.ReverseProxy with a pooled transport, flushing every write. It relays WebSocket
// upgrades as a byte copy in each direction.
func bareReverseProxy(target *url.URL) http.Handler {
	return &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     &http.Transport{MaxIdleConnsPerHost: 1024},
		FlushInterval: -1,
	}
}

func serveChild(h http.Handler) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(ln.Addr().String())
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintln(os.Stderr, srv.Serve(ln))
	os.Exit(1)
}

// child is a server process started by a benchmark.
type child struct {
	name  string
	cmd   *exec.Cmd
	addr  string
	stdin io.WriteCloser
	done  chan struct{}
}

// startBare starts this test binary as the bare ReverseProxy in front of target.
func startBare(tb testing.TB, target string) *child {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=bare-proxy", "VOICEGATE_TEST_TARGET="+target)
	c := &child{name: "bare ReverseProxy", cmd: cmd}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	c.start(tb)
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		tb.Fatalf("bare proxy: no address: %v", err)
	}
	c.addr = strings.TrimSpace(line)
	return c
}

// buildGateway builds the gateway binary once per benchmark, without the race detector.
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

// startGatewayProcess starts the built gateway with env (its defaults for everything else) and waits
// for its "listening" log line. Its logs, access log included, go to a pipe that is read and
// dropped, as a container runtime would read them.
func startGatewayProcess(tb testing.TB, bin, name string, env map[string]string) *child {
	tb.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LISTEN_ADDR=127.0.0.1:0", "LOG_FORMAT=json",
		"JWT_SECRET=" + testSecret}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	errs, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	c := &child{name: name, cmd: cmd}
	c.start(tb)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(errs)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var line struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "listening" {
				addr <- line.Addr
				break
			}
		}
		io.Copy(io.Discard, errs)
	}()
	select {
	case c.addr = <-addr:
	case <-c.done:
		tb.Fatalf("%s exited at start", name)
	case <-time.After(10 * time.Second):
		tb.Fatalf("%s: no listening line within 10s", name)
	}
	return c
}

func (c *child) start(tb testing.TB) {
	tb.Helper()
	stdin, err := c.cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	c.stdin = stdin
	if err := c.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	c.done = make(chan struct{})
	go func() {
		c.cmd.Wait()
		close(c.done)
	}()
	tb.Cleanup(func() {
		c.stdin.Close()
		c.cmd.Process.Signal(os.Interrupt)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	})
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
