package main

// Every shared feature on a real Redis Cluster (cluster_test.go), across two gateway
// instances, and through failovers.

import (
	"net/http"
	"testing"
)

// clusterTenants are tenants whose keys must each stay in one slot: none, braces that would
// cut a hash tag short or leave it empty, and text that is not ASCII.
var clusterTenants = []string{"", "{", "}", "{}", "a{b}c", "tenant-ü-日本"}

// TestClusterHelper: the cluster is whole, keySlot agrees with Redis, and a gateway given
// the nodes' addresses is ready.
func TestClusterHelper(t *testing.T) {
	c := startCluster(t)
	for _, key := range []string{"a", "voicegate:rl:{acme}:x", "{}x", "x{}{y}", "{{a}}", "ü{日本}", "voicegate:lease:{%}:chat:t"} {
		got, err := rawDo(c.nodes[0].Addr(), "CLUSTER", "KEYSLOT", key)
		if err != nil {
			t.Fatal(err)
		}
		if got != int64(keySlot(key)) {
			t.Errorf("keySlot(%q) = %d, Redis says %v", key, keySlot(key), got)
		}
	}
	g := startRun(t, nil, map[string]string{"REDIS_URL": c.URL(), "ALGO_URL": doneAlgo(t).URL})
	res, err := g.Client.Get(g.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("/readyz = %d", res.StatusCode)
	}
}
