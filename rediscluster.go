package main

import (
	"bufio"
	"context"
	"fmt"
	"strconv"
	"strings"
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
//   - readiness asks every node whether the cluster serves all its slots.

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
