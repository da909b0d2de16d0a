package main

// A real Redis Cluster for the end-to-end tests: six redis-server processes with
// --cluster-enabled yes on loopback, joined by redis-cli --cluster create into three masters with
// a replica each, with a short cluster-node-timeout so that a failover takes about a second.
// One cluster serves the whole package run (TestMain stops it): making one costs seconds, and
// the tests that break a node leave the cluster whole again (healthy) before the next test.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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
	c.heal(t)
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
			return fmt.Sprintf("node %d: cluster not ok", i)
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
	for i, n := range c.nodes {
		if !c.running(i) {
			if err := n.launch(); err != nil {
				t.Fatalf("restart cluster node %d: %v", i, err)
			}
			continue
		}
		n.mu.Lock()
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
		n.mu.Unlock()
	}
	if err := c.waitHealthy(20 * time.Second); err != nil {
		t.Fatal(err)
	}
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
