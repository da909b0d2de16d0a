package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// Redis Cluster: REDIS_URL with several addresses (or one address of a cluster node) gives a
// cluster client, which routes every command to the master of its key's slot and follows
// MOVED and ASK during a resharding. Three things are the gateway's own:
//
//   - the slot map is refreshed every clusterRefresh, not only after an error, so an instance
//     that was idle while a replica was promoted sends its first request to the new master;
//   - revocations are acknowledged only once a replica has them (auth.RedisRevocationsOptions
//     .Replicas), so that a failover cannot lose one;
//   - readiness asks every node whether the cluster serves all its slots;
//   - a call that could not reach the node the client chose (it refused the connection, or
//     its slot's breaker is open) is sent once to the master the cluster itself names for the
//     slot now (clusterRoutes): right after a promotion the client library's own slot map is
//     still the old one for up to two seconds, but the request must not wait for it.

// clusterRefresh is how often a cluster client reloads the slot map. A reload is one
// CLUSTER SLOTS to one node, so this costs nothing; it bounds how long an idle instance keeps
// an old master after a failover.
const clusterRefresh = time.Second

// clusterSlots is the number of hash slots of Redis Cluster.
const clusterSlots = 16384

// clusterOption is the cluster part of the client's options (ignored by a single Redis).
func clusterOption() rueidis.ClusterOption {
	return rueidis.ClusterOption{ShardsRefreshInterval: clusterRefresh}
}

// retryDelay is how long rueidis waits before it sends a failed read again: as by default
// (exponential, with jitter, at most a second), except after a refused connection, which it
// does not retry. It would retry until the caller's deadline; on a cluster the call is sent
// instead to the master the cluster now names for its slot (guardedRedis.undelivered), and on
// a single Redis it fails at once rather than at the end of its budget.
func retryDelay(attempts int, _ rueidis.Completed, err error) time.Duration {
	if unsent(err) {
		return -1
	}
	base := time.Duration(1<<min(attempts, 20)) * time.Microsecond
	return min(time.Second, base+rand.N(base))
}

// revocationReplicas is how many replicas must confirm a revocation: one on a cluster (every
// master there must have a replica), none on a single Redis, which has nothing to wait for.
func revocationReplicas(c rueidis.Client) int {
	if c.Mode() == rueidis.ClientModeCluster {
		return 1
	}
	return 0
}

// redisReadiness is "ready", "redis unreachable", or on a cluster that some node sees slots
// unserved (unassigned, or on a failed master not yet replaced) "redis cluster: N of 16384
// slots not served", so that /readyz says why. Every node is asked at once, each within ctx.
func redisReadiness(ctx context.Context, c rueidis.Client) string {
	if c.Mode() != rueidis.ClientModeCluster {
		if err := c.Do(ctx, c.B().Ping().Build()).Error(); err != nil {
			return "redis unreachable"
		}
		return "ready"
	}
	nodes := c.Nodes()
	infos := make(chan clusterInfo, len(nodes))
	for _, n := range nodes {
		go func() {
			res := bounded(ctx, func() rueidis.RedisResult { return n.Do(ctx, n.B().ClusterInfo().Build()) })
			text, err := res.ToString()
			if err != nil {
				infos <- clusterInfo{}
				return
			}
			infos <- parseClusterInfo(text)
		}()
	}
	answered, notServed, down := 0, 0, false
	for range nodes {
		info := <-infos
		if !info.answered {
			continue // a node that is down is what the others report on
		}
		answered++
		notServed = max(notServed, clusterSlots-info.slotsOK)
		down = down || info.state != "ok"
	}
	switch {
	case answered == 0:
		return "redis unreachable"
	case notServed > 0:
		return fmt.Sprintf("redis cluster: %d of %d slots not served", notServed, clusterSlots)
	case down:
		return "redis cluster: a node reports the cluster down"
	}
	return "ready"
}

// clusterInfo is what readiness reads from CLUSTER INFO.
type clusterInfo struct {
	answered bool
	state    string // cluster_state: ok or fail
	slotsOK  int    // cluster_slots_ok: assigned to a master that is not failing
}

func parseClusterInfo(text string) clusterInfo {
	info := clusterInfo{answered: true}
	// RESP3 sends the text as a verbatim string, whose format may lead it.
	sc := bufio.NewScanner(strings.NewReader(strings.TrimPrefix(text, "txt:")))
	for sc.Scan() {
		k, v, _ := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		switch k {
		case "cluster_state":
			info.state = v
		case "cluster_slots_ok":
			info.slotsOK, _ = strconv.Atoi(v)
		}
	}
	return info
}

// bounded runs do and returns its result, or ctx's error as soon as ctx ends (do then finishes
// on its own goroutine, by rueidis's own timeouts): guarded without a breaker, for calls to
// one node.
func bounded(ctx context.Context, do func() rueidis.RedisResult) rueidis.RedisResult {
	return guarded(nil, nil, ctx, do, rueidis.NewErrorResult, func(r rueidis.RedisResult) error { return r.Error() })
}

// clusterRoutes answers "which node serves this slot now" from the cluster itself (CLUSTER
// NODES, asked of every node), at most once per routesEvery, for the calls the client library
// could not deliver. It names only masters that answered that question themselves, so a frozen
// master whose breaker holds calls back is never sent them anyway. It leaves the library's
// own routing alone.
type clusterRoutes struct {
	client rueidis.Client // the cluster client, for its nodes

	mu      sync.Mutex // guards the fields below; never held during a lookup
	at      time.Time  // when owners was read
	loading bool
	owners  []slotOwner
	alive   map[string]bool // the nodes that answered that lookup
}

// routesEvery bounds how often a gateway asks the cluster for its slot owners: while a shard
// is down, every call to it would otherwise ask. routesLinger is how long a lookup waits for
// the other nodes after the first answer: on one network they answer within a millisecond, a
// frozen one never.
const (
	routesEvery  = 100 * time.Millisecond
	routesLinger = 10 * time.Millisecond
)

// slotOwner is a range of slots and the address of the master that serves them, as one node
// sees it, masters marked failing left out.
type slotOwner struct {
	lo, hi int
	addr   string
}

// ownerOf is a client on the master that serves slot now and answers, or nil when there is
// none (or the client library does not know it: it makes the connections).
func (r *clusterRoutes) ownerOf(ctx context.Context, slot uint16) rueidis.Client {
	owners, alive := r.current(ctx)
	for _, o := range owners {
		if int(slot) >= o.lo && int(slot) <= o.hi && alive[o.addr] {
			return r.client.Nodes()[o.addr]
		}
	}
	return nil
}

// liveMaster is a client on a master that answered the latest lookup, or nil: for what has no
// key and may go to any node (pub/sub, which the cluster carries to every node).
func (r *clusterRoutes) liveMaster(ctx context.Context) rueidis.Client {
	owners, alive := r.current(ctx)
	nodes := r.client.Nodes()
	for _, o := range owners {
		if n := nodes[o.addr]; n != nil && alive[o.addr] {
			return n
		}
	}
	return nil
}

// current is the latest lookup, made again first if it is older than routesEvery and no
// other caller is making it.
func (r *clusterRoutes) current(ctx context.Context) ([]slotOwner, map[string]bool) {
	r.mu.Lock()
	owners, alive := r.owners, r.alive
	load := !r.loading && time.Since(r.at) >= routesEvery
	if load {
		r.loading = true
	}
	r.mu.Unlock()
	if load {
		fresh, answered := r.load(ctx)
		r.mu.Lock()
		r.loading = false
		if fresh != nil {
			owners, alive = fresh, answered
			r.owners, r.alive, r.at = fresh, answered, time.Now()
		}
		r.mu.Unlock()
	}
	return owners, alive
}

// load asks every node at once for CLUSTER NODES; it takes the slot owners of the first
// answer, and which nodes answered by routesLinger after it.
func (r *clusterRoutes) load(ctx context.Context) ([]slotOwner, map[string]bool) {
	type answer struct {
		addr   string
		owners []slotOwner
	}
	nodes := r.client.Nodes()
	answers := make(chan answer, len(nodes))
	for addr, n := range nodes {
		go func() {
			text, err := bounded(ctx, func() rueidis.RedisResult { return n.Do(ctx, n.B().ClusterNodes().Build()) }).ToString()
			if err != nil {
				answers <- answer{}
				return
			}
			answers <- answer{addr, parseSlotOwners(text)}
		}()
	}
	var owners []slotOwner
	alive := map[string]bool{}
	var linger <-chan time.Time
	for range nodes {
		select {
		case a := <-answers:
			if a.owners == nil {
				continue
			}
			alive[a.addr] = true
			if owners == nil {
				owners = a.owners
				linger = time.After(routesLinger)
			}
			continue
		case <-linger:
		}
		break
	}
	return owners, alive
}

// parseSlotOwners reads the masters' slot ranges from CLUSTER NODES: one line per node, "id
// ip:port@cport[,hostname] flags master-id ping pong epoch link slot...".
func parseSlotOwners(text string) []slotOwner {
	var out []slotOwner
	for line := range strings.SplitSeq(strings.TrimPrefix(text, "txt:"), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 {
			continue
		}
		flags := strings.Split(f[2], ",")
		if !slices.Contains(flags, "master") || slices.Contains(flags, "fail") || slices.Contains(flags, "fail?") {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") {
				continue // a slot being migrated: MOVED and ASK take care of it
			}
			lo, hi, isRange := strings.Cut(r, "-")
			a, err := strconv.Atoi(lo)
			if err != nil {
				continue
			}
			b := a
			if isRange {
				if b, err = strconv.Atoi(hi); err != nil {
					continue
				}
			}
			out = append(out, slotOwner{lo: a, hi: b, addr: addr})
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// unsent reports whether a call's error means the command never reached Redis: the breaker
// held it back, or the connection could not be made. Only those are sent again elsewhere, so
// no write is ever applied twice.
func unsent(err error) bool {
	var op *net.OpError
	return errors.Is(err, errRedisPaused) || (errors.As(err, &op) && op.Op == "dial")
}

// keylessSlot is the slot rueidis gives a command without a key (its cmds.InitSlot): such a
// command goes to whichever node the client library lists first, a frozen one included.
const keylessSlot = 1 << 14

// isPublish reports whether cmd is a PUBLISH, which any live node takes for the whole cluster.
func isPublish(cmd rueidis.Completed) bool {
	parts := cmd.Commands()
	return cmd.Slot() == keylessSlot && len(parts) > 0 && parts[0] == "PUBLISH"
}

// errNodeSilent ends a subscription whose node stopped answering.
var errNodeSilent = errors.New("redis: the subscribed node stopped answering")

// subscriptionCheck is how often a cluster subscription's node is asked whether it still
// answers, and how long it has to answer.
const subscriptionCheck = time.Second

// receive runs a subscription without a key (SUBSCRIBE) on a master that answers, and ends it
// with errNodeSilent as soon as that node stops answering: a frozen node keeps its connection
// open and delivers nothing, and the caller resubscribes (elsewhere) only on an error.
func (r *clusterRoutes) receive(ctx context.Context, n rueidis.Client, subscribe rueidis.Completed, fn func(rueidis.PubSubMessage)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel(nil)
	wg.Go(func() {
		tick := time.NewTicker(subscriptionCheck)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			pctx, pcancel := context.WithTimeout(ctx, subscriptionCheck)
			err := bounded(pctx, func() rueidis.RedisResult { return n.Do(pctx, n.B().Ping().Build()) }).Error()
			pcancel()
			if err != nil && ctx.Err() == nil {
				cancel(errNodeSilent)
				return
			}
		}
	})
	err := n.Receive(ctx, subscribe, fn)
	if cause := context.Cause(ctx); errors.Is(cause, errNodeSilent) {
		return cause
	}
	return err
}
