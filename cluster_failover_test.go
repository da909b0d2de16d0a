package main

// Failovers of the test cluster under traffic: a master killed (SIGKILL) or frozen (SIGSTOP),
// its replica promoted, the old master back as a replica; revocations acknowledged before a
// kill survive it, and a revocation that no replica confirms is not acknowledged; readiness,
// unreachable nodes at start, and a reshard under traffic.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
)

func inSlots(slot int, ranges [][2]int) bool {
	for _, r := range ranges {
		if slot >= r[0] && slot <= r[1] {
			return true
		}
	}
	return false
}

// tenantOn returns a tenant whose keys — its revocations, limits and leases, all under its
// hash tag (policy.Tag) — live in ranges, or, when on is false, do not.
func tenantOn(ranges [][2]int, on bool, seed string) string {
	for i := 0; ; i++ {
		tenant := fmt.Sprintf("%s-%d", seed, i)
		if inSlots(keySlot(policy.Tag(tenant)), ranges) == on {
			return tenant
		}
	}
}

// metricSum is the sum of a counter's series on g's /metrics.
func metricSum(t *testing.T, g *testGateway, name string) float64 {
	t.Helper()
	fam := scrape(t, g.URL+"/metrics")[name]
	sum := 0.0
	for _, m := range fam.GetMetric() {
		sum += m.GetCounter().GetValue()
	}
	return sum
}

// TestClusterFailover: the master of the shard that holds tenant-a's limits and a share of the
// revocation keys is killed (SIGKILL) or frozen (SIGSTOP) while gateway A serves steady
// traffic and gateway B sits idle. Meanwhile every answer is 200 or 503 AUTH_SERVICE_ERROR
// (revocation checks fail closed, limits fail open and count a Redis error), within
// AUTH_BUDGET + LIMIT_BUDGET as the gateway measures itself; a chat stream and a voice session
// opened before keep running. Once the replica is promoted, A serves every token again within
// cluster-node-timeout plus a few seconds, and B's first request then succeeds. Tokens whose
// keys live on the healthy shards are served throughout. The old master
// comes back as a replica, and both gateways serve on.
func TestClusterFailover(t *testing.T) {
	const (
		authBudget  = 75 * time.Millisecond
		limitBudget = 100 * time.Millisecond
		recoverBy   = clusterNodeTimeout + 4*time.Second
	)
	for _, how := range []string{"SIGKILL", "SIGSTOP"} {
		t.Run(how, func(t *testing.T) {
			c := startCluster(t)
			t.Cleanup(func() { c.heal(t) })
			backend := okBackend(t)
			algo := holdAlgo(t, nil)
			a, b := clusterPair(t, c, algo, backend, map[string]string{
				"AUTH_BUDGET": authBudget.String(), "LIMIT_BUDGET": limitBudget.String()})
			w := watchTokens(t, a, b)
			const doc = "/api/v2/documents/x"
			// Users of this run only: the cluster keeps an earlier run's streams and leases.
			run := newRunID()

			master, replica := c.masterOf(t, keySlot("{tenant-a}"))
			dead := c.slotsOf(t, master)
			// Tokens whose revocation keys are on the shard that fails (tenant-a's, under its
			// tag), and others' (of a tenant whose tag is elsewhere).
			healthy := map[string]any{"tenant_id": tenantOn(dead, false, "t-fo-e")}
			var onDead, elsewhere []string
			for i := range 8 {
				onDead = append(onDead, w.token(t, fmt.Sprintf("u-fo-d%d-%s", i, run), []string{"user"}, nil))
				elsewhere = append(elsewhere, w.token(t, fmt.Sprintf("u-fo-e%d-%s", i, run), []string{"user"}, healthy))
			}
			for _, tok := range append(onDead, elsewhere...) {
				wantStatus(t, call(t, a, "GET", doc, tok, ""), http.StatusOK)
			}
			// And fresh ones, each used once: a cached answer (kept while a frozen node's
			// connection looks alive) would hide what the check does without Redis.
			fresh := make([]string, 1200)
			for i := range fresh {
				fresh[i] = tokenFor(t, fmt.Sprintf("u-fo-f%d-%s", i, run), []string{"user"}, nil)
			}
			var nextFresh atomic.Int64
			// Running before the failure: a chat stream and a voice session on A.
			streamUser := w.token(t, "u-fo-stream-"+run, []string{"user"}, nil)
			s := chatWithID(t, a, streamUser, "fo-stream-"+how, "hold")
			v := openVoice(t, a, "?conversation_id=c-fo", bearer(w.token(t, "u-fo-voice-"+run, []string{"user"}, nil)))
			voiceEnded := v.readToClose(t.Context())
			errorsBefore := metricSum(t, a, "redis_errors_total")

			// Steady traffic on A: two workers, every token in turn, until stopped.
			type answer struct {
				status int
				code   string
				err    error
				at     time.Time
				dead   bool
			}
			var (
				mu      sync.Mutex
				answers []answer
				stop    = make(chan struct{})
				wg      sync.WaitGroup
			)
			for k := range 2 {
				wg.Go(func() {
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						default:
						}
						onD := (i+k)%2 == 0
						tok := elsewhere[i%len(elsewhere)]
						if onD {
							tok = onDead[i%len(onDead)]
							if n := nextFresh.Add(1); n <= int64(len(fresh)) {
								tok = fresh[n-1]
							}
						}
						res, err := try(t.Context(), a, "GET", doc, tok, "",
							map[string]string{"X-Request-ID": fmt.Sprintf("fo-%d-%d", k, i)})
						an := answer{err: err, at: time.Now(), dead: onD}
						if err == nil {
							an.status, an.code = res.StatusCode, errorCode(res)
						}
						mu.Lock()
						answers = append(answers, an)
						mu.Unlock()
						time.Sleep(5 * time.Millisecond) // a steady rate, not a flood: 2 cores are shared
					}
				})
			}
			stopTraffic := func() {
				select {
				case <-stop:
				default:
					close(stop)
					wg.Wait()
				}
			}
			defer stopTraffic()

			time.Sleep(200 * time.Millisecond) // some traffic before the failure
			// What ran before the failure is on the replica: writes acknowledged within the
			// replication lag before a failure are lost in a failover (the README says which
			// ones matter), and this test is about what keeps running.
			c.replicated(t, master, replica)
			failed := time.Now()
			switch how {
			case "SIGKILL":
				c.nodes[master].Kill()
			case "SIGSTOP":
				c.nodes[master].mu.Lock()
				_ = c.nodes[master].cmd.Process.Signal(syscall.SIGSTOP)
				c.nodes[master].mu.Unlock()
			}
			idleTok := w.token(t, "u-fo-idle-"+run, []string{"user"}, nil)
			promoted := c.promoted(t, replica, 15*time.Second)
			// B was idle all along: its first request, sent as soon as every node sees the
			// replica promoted, with a token it never saw whose keys are on the failed shard,
			// succeeds.
			idleRes := call(t, b, "GET", doc, idleTok, "")
			idleAt := time.Now()

			// A is busy: the first moment after which tokens on the failed shard pass again.
			var busyBack time.Time
			for busyBack.IsZero() {
				mu.Lock()
				for j := len(answers) - 1; j >= 0; j-- {
					an := answers[j]
					if an.at.Before(promoted) {
						break
					}
					if an.dead && an.status == http.StatusOK {
						busyBack = an.at
						break
					}
				}
				mu.Unlock()
				if time.Since(failed) > recoverBy+5*time.Second {
					t.Fatalf("A did not serve tokens of the failed shard again within %v", time.Since(failed))
				}
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond) // more traffic after the recovery
			stopTraffic()

			t.Logf("%s: replica promoted %v after the failure; busy A served the failed shard again after %v, idle B's first request (%v after) answered %d",
				how, promoted.Sub(failed).Round(time.Millisecond), busyBack.Sub(failed).Round(time.Millisecond),
				idleAt.Sub(failed).Round(time.Millisecond), idleRes.StatusCode)
			if idleRes.StatusCode != http.StatusOK {
				t.Errorf("idle B's first request after the promotion = %d %s, want 200", idleRes.StatusCode, errorCode(idleRes))
				for _, rec := range logRecords(t, b) {
					if rec["level"] != "DEBUG" {
						t.Logf("B: %v", rec)
					}
				}
			}
			if d := busyBack.Sub(failed); d > recoverBy {
				t.Errorf("A recovered %v after the failure, want within cluster-node-timeout %v + a few seconds (%v)", d, clusterNodeTimeout, recoverBy)
			}

			refused, served := 0, 0
			for _, an := range answers {
				switch {
				case an.err != nil:
					t.Errorf("request failed: %v", an.err)
				case an.status == http.StatusOK:
					served++
				case an.status == http.StatusServiceUnavailable && an.code == "AUTH_SERVICE_ERROR":
					refused++
					if !an.dead {
						t.Errorf("a token whose keys are on healthy shards was refused: the failure of one shard spread")
					}
				default:
					t.Errorf("answer %d %s during the failover, want 200 or 503 AUTH_SERVICE_ERROR", an.status, an.code)
				}
			}
			t.Logf("%s: %d requests served, %d refused (503) from the failure to the recovery", how, served, refused)
			if refused == 0 {
				t.Errorf("no request was refused: the failure did not reach the traffic, and the test shows nothing")
			}
			if n := metricSum(t, a, "redis_errors_total") - errorsBefore; n == 0 {
				t.Error("redis_errors_total did not grow: failures are not counted")
			}
			failedOpen := false
			for _, rec := range logRecords(t, a) {
				msg, _ := rec["msg"].(string)
				failedOpen = failedOpen || strings.Contains(msg, "not limiting")
			}
			if !failedOpen {
				t.Error("A never logged that its rate limits failed open, though tenant-a's limits are on the failed shard")
			}
			d := requestDurations(t, a, "fo-")
			if bound := authBudget + limitBudget + 25*time.Millisecond; percentile(d, 0.99) > bound || d[len(d)-1] > bound+250*time.Millisecond {
				t.Errorf("request durations p99 %v, max %v, want p99 within AUTH_BUDGET + LIMIT_BUDGET (+25ms) = %v", percentile(d, 0.99), d[len(d)-1], bound)
			}

			// Still running: the stream takes a cancel from B, the session was never closed.
			select {
			case e := <-voiceEnded:
				t.Errorf("the voice session ended during the failover: %d %v", e.code, e.err)
			default:
			}
			// B cancels A's stream. An attempt that answered an error may still have reached
			// A (its publication went out before the answer's deadline), so a 404 afterwards is
			// checked with A itself: the stream must be gone there.
			var attempts []string
			cancelled := time.Now()
			body := `{"request_id":"fo-stream-` + how + `"}`
			for {
				res := call(t, b, "POST", "/api/v2/chat/cancel", streamUser, body)
				attempts = append(attempts, fmt.Sprintf("%d %s", res.StatusCode, errorCode(res)))
				if res.StatusCode == http.StatusOK {
					break
				}
				if res.StatusCode == http.StatusNotFound {
					if ra := call(t, a, "POST", "/api/v2/chat/cancel", streamUser, body); ra.StatusCode != http.StatusNotFound {
						t.Errorf("B answered 404 for the stream A still runs (A: %d); B's attempts: %v", ra.StatusCode, attempts)
						for _, g := range []*testGateway{a, b} {
							for _, rec := range logRecords(t, g) {
								if rec["level"] == "WARN" && rec["msg"] != "request" {
									t.Logf("%s: %v", g.Addr, rec)
								}
							}
						}
						key := "voicegate:stream:fo-stream-" + how
						for i, n := range c.nodes {
							v, err := rawDo(n.Addr(), "SCAN", "0", "MATCH", key, "COUNT", "100000")
							role, _ := rawDo(n.Addr(), "ROLE")
							t.Logf("node %d (%v, slot %d on it? %v): %v %v", i, role, keySlot(key), inSlots(keySlot(key), c.slotsOf(t, i)), v, err)
						}
					}
					break
				}
				if time.Since(cancelled) > 3*time.Second {
					t.Fatalf("B could not cancel A's stream within 3s of the recovery: %v", attempts)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if evs := readEvents(t, s); len(evs) == 0 || evs[len(evs)-1].Event != "stream_cancelled" {
				t.Errorf("the stream running through the failover ended with %v, want stream_cancelled", eventNames(evs))
			}
			if err := v.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
				t.Errorf("closing the voice session that ran through the failover: %v", err)
			}

			// The old master back, as a replica: the cluster is whole and both serve on.
			c.heal(t)
			if _, r := c.masterOf(t, keySlot("{tenant-a}")); r != master {
				t.Errorf("the old master came back as node %d's replica? replica is %d, want %d", replica, r, master)
			}
			for _, g := range []*testGateway{a, b} {
				for _, tok := range onDead[:2] {
					ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
					res, err := try(ctx, g, "GET", doc, tok, "", nil)
					cancel()
					if err != nil || res.StatusCode != http.StatusOK {
						t.Errorf("after the old master rejoined: %s", describeResult(res, err))
					}
				}
			}
		})
	}
}

// TestClusterRevocationSurvivesKill: a revocation answered 200 is still in force after the
// master that took it is killed right after the answer and its replica promoted.
func TestClusterRevocationSurvivesKill(t *testing.T) {
	c := startCluster(t)
	t.Cleanup(func() { c.heal(t) })
	backend := okBackend(t)
	a, b := clusterPair(t, c, holdAlgo(t, nil), backend, nil)
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"
	master, replica := c.masterOf(t, 0)
	slots := c.slotsOf(t, master)
	onMaster := map[string]any{"tenant_id": tenantOn(slots, true, "t-keep")}
	// Users of this run only: an earlier run revoked its own.
	run := newRunID()
	var toks []string
	for i := range 5 {
		tok := w.token(t, fmt.Sprintf("u-keep-%d-%s", i, run), []string{"user"}, onMaster)
		wantStatus(t, call(t, b, "GET", doc, tok, ""), http.StatusOK) // cached on B as not revoked
		toks = append(toks, tok)
	}
	for i, tok := range toks {
		g := []*testGateway{a, b}[i%2]
		wantStatus(t, call(t, g, "POST", "/api/v2/auth/revoke", tok, ""), http.StatusOK)
	}
	c.nodes[master].Kill()
	killed := time.Now()
	c.promoted(t, replica, 15*time.Second)
	for _, g := range []*testGateway{a, b} {
		for i, tok := range toks {
			for {
				res := call(t, g, "GET", doc, tok, "")
				if res.StatusCode == http.StatusOK {
					t.Fatalf("revoked token %d served after the failover: the revocation was lost", i)
				}
				if res.StatusCode == http.StatusUnauthorized {
					wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
					break
				}
				if time.Since(killed) > 10*time.Second {
					t.Fatalf("revoked token %d: %d %s 10s after the kill, want 401 TOKEN_REVOKED", i, res.StatusCode, errorCode(res))
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	t.Logf("5 revocations acknowledged just before the kill: 0 lost; refused again %v after the kill", time.Since(killed).Round(time.Millisecond))
}

// TestClusterRevocationNeedsReplica: with the replica of the master that would take it
// frozen, a revocation answers 503 AUTH_SERVICE_ERROR within its budget instead of 200, since
// nothing could promise it survives that master; with the replica back it is acknowledged.
func TestClusterRevocationNeedsReplica(t *testing.T) {
	c := startCluster(t)
	t.Cleanup(func() { c.heal(t) })
	g := startRun(t, nil, map[string]string{"REDIS_URL": c.URL(), "ALGO_URL": doneAlgo(t).URL, "DOCS_URL": okBackend(t).URL})
	w := watchTokens(t, g)
	master, replica := c.masterOf(t, 0)
	slots := c.slotsOf(t, master)
	tenant := tenantOn(slots, true, "t-wait")
	// A user and token ID of this run only: an earlier run revoked its own.
	run := newRunID()
	tok := w.token(t, "u-wait-"+run, []string{"user"}, map[string]any{"tenant_id": tenant, "jti": "jti-wait-" + run})
	wantStatus(t, call(t, g, "GET", "/api/v2/documents/x", tok, ""), http.StatusOK)

	c.nodes[replica].mu.Lock()
	_ = c.nodes[replica].cmd.Process.Signal(syscall.SIGSTOP)
	c.nodes[replica].mu.Unlock()
	start := time.Now()
	res := call(t, g, "POST", "/api/v2/auth/revoke", tok, "")
	took := time.Since(start)
	wantError(t, res, http.StatusServiceUnavailable, "AUTH_SERVICE_ERROR")
	const budget = 500 * time.Millisecond // the revocation's budget
	if took > budget+200*time.Millisecond {
		t.Errorf("the unconfirmed revocation answered after %v, want within its %v budget", took, budget)
	}
	t.Logf("revocation without a replica: 503 after %v", took.Round(time.Millisecond))

	c.nodes[replica].mu.Lock()
	_ = c.nodes[replica].cmd.Process.Signal(syscall.SIGCONT)
	c.nodes[replica].mu.Unlock()
	// The master did take it: the token is refused; a revocation answered 503 is safe to send
	// again, and is acknowledged once the replica is back.
	wantError(t, call(t, g, "GET", "/api/v2/documents/x", tok, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
	admin := w.token(t, "u-wait-admin-"+run, []string{"admin"}, map[string]any{"tenant_id": tenant})
	eventually(t, 5*time.Second, "the revocation is acknowledged once the replica is back", func() bool {
		res := call(t, g, "POST", "/api/v2/auth/revoke", admin, `{"jti":"jti-wait-`+run+`"}`)
		return res.StatusCode == http.StatusOK
	})
}

// TestClusterReadiness: a cluster with slots no master serves makes /readyz answer 503 and
// say how many; serving them again makes it ready.
func TestClusterReadiness(t *testing.T) {
	c := startCluster(t)
	t.Cleanup(func() { c.heal(t) })
	g := startRun(t, nil, map[string]string{"REDIS_URL": c.URL(), "ALGO_URL": doneAlgo(t).URL})
	master, _ := c.masterOf(t, 100)
	if _, err := rawDo(c.nodes[master].Addr(), "CLUSTER", "DELSLOTSRANGE", "100", "109"); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if _, err := rawDo(c.nodes[master].Addr(), "CLUSTER", "ADDSLOTSRANGE", "100", "109"); err != nil {
				t.Error(err)
			}
		}
	}
	defer restore()
	var body string
	eventually(t, 5*time.Second, "/readyz answers 503", func() bool {
		res := call(t, g, "GET", "/readyz", "", "")
		b, _ := io.ReadAll(res.Body)
		body = string(b)
		return res.StatusCode == http.StatusServiceUnavailable
	})
	if !strings.Contains(body, "redis cluster: 10 of 16384 slots not served") {
		t.Errorf("/readyz body %s, want it to say 10 of 16384 slots are not served", body)
	}
	restore()
	eventually(t, 5*time.Second, "/readyz answers 200 again", func() bool {
		return call(t, g, "GET", "/readyz", "", "").StatusCode == http.StatusOK
	})
}

// TestClusterUnreachableAtStart: with no node of the cluster listening, the gateway stops
// within REDIS_CONNECT_TIMEOUT with one line naming REDIS_URL.
func TestClusterUnreachableAtStart(t *testing.T) {
	var addrs []string
	for range 3 {
		p, err := freeClusterPort(map[int]bool{})
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, fmt.Sprintf("%s:%d", redisHost, p))
	}
	var stderr logBuffer
	env := map[string]string{"REDIS_URL": strings.Join(addrs, ","), "REDIS_CONNECT_TIMEOUT": "1s",
		"ALGO_URL": "http://127.0.0.1:1", "JWT_SECRET": testSecret, "LISTEN_ADDR": "127.0.0.1:0", "LOG_FORMAT": "json"}
	start := time.Now()
	err := run(t.Context(), []string{"voicegate"}, func(k string) string { return env[k] }, &logBuffer{}, &stderr)
	took := time.Since(start)
	if err == nil || !strings.HasPrefix(err.Error(), "REDIS_URL: cannot reach Redis") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("run = %v, want one line starting REDIS_URL: cannot reach Redis", err)
	}
	if took > 3*time.Second {
		t.Errorf("run gave up after %v, want about REDIS_CONNECT_TIMEOUT (1s)", took)
	}
}

// tenantIn is a tenant whose hash tag's slot is below n.
func tenantIn(n int, seed string) string {
	for i := 0; ; i++ {
		tenant := fmt.Sprintf("%s-%d", seed, i)
		if keySlot("x"+"{"+tenant+"}") < n { // policy.Tag(tenant) for a tenant without braces or %
			return tenant
		}
	}
}

// TestClusterReshard: slots 0–15, holding the limits and leases of two tenants and the
// revocations of some tokens, move to another master (redis-cli --cluster reshard) and back
// while two gateways serve those tenants and tokens: MOVED, ASK and TRYAGAIN are followed
// inside the gateway, and every request is answered 200.
func TestClusterReshard(t *testing.T) {
	c := startCluster(t)
	t.Cleanup(func() { c.heal(t) })
	// Roomy budgets: a Redis answer late on a loaded machine is not a reshard's failure, and
	// the errors counted below must be the reshard's alone.
	a, b := clusterPair(t, c, holdAlgo(t, nil), okBackend(t), roomyBudgets)
	w := watchTokens(t, a, b)
	const moved = 16
	// Users and token IDs of this run only, so no earlier run's quota or revocation applies.
	run := newRunID()
	var toks []string
	for i := range 4 {
		tenant := tenantIn(moved, fmt.Sprintf("t-reshard-%d", i%2))
		toks = append(toks, w.token(t, fmt.Sprintf("u-reshard-%d-%s", i, run), []string{"user"}, map[string]any{
			"tenant_id": tenant, "jti": fmt.Sprintf("reshard-%d-%s", i, run)}))
	}
	// Keys beside the gateway's in the tenants' slots, moved one at a time, so the migration
	// lasts while requests come: the gateway's keys of a slot are then partly moved.
	client := clusterClient(t, c)
	for i := range 2 {
		tag := policy.Tag(tenantIn(moved, fmt.Sprintf("t-reshard-%d", i)))
		var cmds rueidis.Commands
		for j := range 1500 {
			cmds = append(cmds, client.B().Set().Key(fmt.Sprintf("fill:%s:%d", tag, j)).Value("x").Build())
		}
		for _, r := range client.DoMulti(t.Context(), cmds...) {
			if err := r.Error(); err != nil {
				t.Fatal(err)
			}
		}
	}
	src, _ := c.masterOf(t, 0)
	dst, _ := c.masterOf(t, 16383)
	if src == dst {
		t.Fatal("slots 0 and 16383 on one master")
	}
	ids := map[int]string{}
	nodes, err := c.view()
	if err != nil {
		t.Fatal(err)
	}
	for _, cn := range nodes {
		ids[c.index(t, cn.port)] = cn.id
	}
	errorsBefore := metricSum(t, a, "redis_errors_total") + metricSum(t, b, "redis_errors_total")

	var (
		mu   sync.Mutex
		bad  []string
		n    atomic.Int64
		stop = make(chan struct{})
		wg   sync.WaitGroup
	)
	for k, g := range []*testGateway{a, b} {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				res, err := try(t.Context(), g, "GET", "/api/v2/documents/x", toks[(i+k)%len(toks)], "", nil)
				n.Add(1)
				if err != nil || res.StatusCode != http.StatusOK {
					mu.Lock()
					bad = append(bad, describeResult(res, err))
					mu.Unlock()
				}
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	reshard := func(from, to int) {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, c.cli, "--cluster", "reshard", c.nodes[from].Addr(),
			"--cluster-from", ids[from], "--cluster-to", ids[to], "--cluster-slots", strconv.Itoa(moved),
			"--cluster-yes", "--cluster-pipeline", "1").CombinedOutput()
		if err != nil {
			t.Fatalf("redis-cli --cluster reshard: %v\n%s", err, out)
		}
	}
	reshard(src, dst)
	if m, _ := c.masterOf(t, 0); m != dst {
		t.Fatalf("slot 0 is on node %d after the reshard, want %d", m, dst)
	}
	if err := c.waitHealthy(10 * time.Second); err != nil { // every node knows, as redis-cli requires
		t.Fatal(err)
	}
	reshard(dst, src) // and back: the next test finds the cluster as it was
	close(stop)
	wg.Wait()
	if m, _ := c.masterOf(t, 0); m != src {
		t.Errorf("slot 0 is on node %d after resharding back, want %d", m, src)
	}
	redisErrors := metricSum(t, a, "redis_errors_total") + metricSum(t, b, "redis_errors_total") - errorsBefore
	t.Logf("%d requests during two reshards of %d slots; %d not answered 200; %v Redis errors counted",
		n.Load(), moved, len(bad), redisErrors)
	if len(bad) > 0 {
		t.Errorf("answers other than 200 during the reshard: %v", bad[:min(len(bad), 5)])
	}
	// Limits fail open, so a 200 alone could hide a failed call: none may fail.
	if redisErrors != 0 {
		t.Errorf("%v Redis calls failed during the reshard, want 0", redisErrors)
	}
}
