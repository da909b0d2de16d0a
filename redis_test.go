package main

// A real redis-server for the end-to-end tests: started on a free loopback port, killed and
// restarted on demand, and spoken to with a few lines of RESP so the tests can look at the keys
// the gateway writes without a second client library.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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
			return nil
		} else if time.Now().After(deadline) {
			r.Kill()
			return fmt.Errorf("redis-server on port %d did not answer PING within 5s: %v\n%s", r.port, err, out)
		}
		time.Sleep(5 * time.Millisecond)
	}
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
}
