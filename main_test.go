package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the tests if any goroutine outlives them: a gateway started by run must leave
// nothing behind when its context ends. Started as a child process (startChild, runMain), the
// test binary serves as that child instead.
func TestMain(m *testing.M) {
	if role := os.Getenv(childEnv); role != "" {
		runChild(role) // never returns
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

// stopsCluster runs the tests, then stops the Redis Cluster they shared (cluster_test.go)
// before goleak looks for goroutines left behind.
type stopsCluster struct{ m *testing.M }

func (s stopsCluster) Run() int {
	defer stopSharedCluster()
	return s.m.Run()
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

// TestMainCommandLineErrors: what a user who mistyped sees. A mistyped flag is one line, once,
// naming it and where the list is (not the error, ninety lines of usage, and the error again);
// a bad value names the flag as typed or the variable it came from; -h prints the usage.
func TestMainCommandLineErrors(t *testing.T) {
	env := map[string]string{"ALGO_URL": "http://127.0.0.1:9", "JWT_SECRET": testSecret, "SHUTDOWN_GRACE": ""}
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"unknown flag", nil, []string{"-no-such-flag"}, "voicegate: unknown flag -no-such-flag (voicegate -h lists the flags)\n"},
		{"bad flag value", nil, []string{"-shutdown-grace", "abc"}, `voicegate: -shutdown-grace: invalid value "abc": want a duration of at least 0s, such as 15s` + "\n"},
		{"bad variable", map[string]string{"SHUTDOWN_GRACE": "abc"}, nil, `voicegate: invalid SHUTDOWN_GRACE "abc": want a duration of at least 0s, such as 15s` + "\n"},
		{"unknown flag of a subcommand", nil, []string{"token", "--rols", "admin"}, "voicegate: unknown flag --rols (voicegate token -h lists the flags)\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := map[string]string{}
			for k, v := range env {
				e[k] = v
			}
			for k, v := range tt.env {
				e[k] = v
			}
			stderr, code := runMain(t, e, tt.args...)
			if stderr != tt.want || code != 1 {
				t.Errorf("exit %d, stderr:\n%s\nwant exit 1 and:\n%s", code, stderr, tt.want)
			}
		})
	}
	t.Run("-h", func(t *testing.T) {
		stderr, _ := runMain(t, env, "-h")
		if !strings.HasPrefix(stderr, "Usage: voicegate [flags]") || !strings.Contains(stderr, "-shutdown-grace") {
			t.Errorf("-h printed:\n%s", stderr)
		}
	})
}
