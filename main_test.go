package main

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the tests if any goroutine outlives them: a gateway started by run must leave
// nothing behind when its context ends. Started as a child process by a benchmark, the test
// binary serves as that child instead (see process_test.go).
func TestMain(m *testing.M) {
	if role := os.Getenv(childEnv); role != "" {
		runChild(role)
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
