package main

// Every shared feature on a real Redis Cluster (the harness's startCluster), across two gateway
// instances: revocations, limits, leases, cancels, voice listings and resumes for tenants whose
// hash tags are awkward; every multi-key command in one slot; parsing the cluster's answers.

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/policy"
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

// clusterPair is two gateways, "a" and "b", on the cluster.
func clusterPair(t *testing.T, c *testCluster, algo *fakeAlgo, backend *fakeBackend, more map[string]string) (a, b *testGateway) {
	t.Helper()
	env := with(map[string]string{"ALGO_URL": algo.URL, "ADMIN_URL": backend.URL, "DOCS_URL": backend.URL,
		"REDIS_URL": c.URL(), "JWT_SECRET": testSecret}, more)
	a = startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b = startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	return a, b
}

// chatWithID starts a chat stream with that request_id on g and returns once stream_start
// arrived.
func chatWithID(t *testing.T, g *testGateway, token, id, message string) *sseReader {
	t.Helper()
	res := doRequest(t, g.Client, "POST", g.URL+"/api/v2/chat/stream",
		strings.NewReader(`{"message":"`+message+`","request_id":"`+id+`"}`), map[string]string{"Authorization": "Bearer " + token})
	t.Cleanup(func() { res.Body.Close() })
	s := wantStream(t, res)
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event = %q, want stream_start", ev.Event)
	}
	return s
}

// TestClusterSharedFeatures: on the cluster, two gateways share, for tenants whose tags are
// awkward (none, lone braces, an empty pair, Unicode), exactly what they share on one Redis:
// revocations (with B's cached answer invalidated), a rate limit and a daily quota as one
// budget, a concurrency lease, a cancel sent to the instance that does not run the stream, the
// voice session listing, and the user-status cache.
func TestClusterSharedFeatures(t *testing.T) {
	c := startCluster(t)
	var mu sync.Mutex
	asked := map[string]int{}
	users := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		asked[r.URL.Path]++
		mu.Unlock()
		io.WriteString(w, `{"status":"active"}`)
	})
	backend := okBackend(t)
	a, b := clusterPair(t, c, holdAlgo(t, nil), backend, with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-cluster.json", "USER_SERVICE_URL": users.URL}))
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"
	// Users of this run only: the cluster keeps an earlier run's revocations and quotas.
	run := newRunID()

	for ti, tenant := range clusterTenants {
		tok := func(user string, roles ...string) string {
			return w.token(t, fmt.Sprintf("%s-%d-%s", user, ti, run), roles, map[string]any{"tenant_id": tenant})
		}
		t.Run(fmt.Sprintf("tenant %q", tenant), func(t *testing.T) {
			t.Run("revocation reaches the other instance", func(t *testing.T) {
				user := tok("u-rev", "user")
				for _, g := range []*testGateway{a, b, b} { // B twice: its cached answer is warm
					wantStatus(t, call(t, g, "GET", doc, user, ""), http.StatusOK)
				}
				wantStatus(t, call(t, a, "POST", "/api/v2/auth/revoke", user, ""), http.StatusOK)
				res, took := pollRefused(t, b, "GET", doc, user, time.Now())
				wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
				if took > 100*time.Millisecond {
					t.Errorf("B refused the revoked token %v after A's 200, want within 100ms", took)
				}
				admin, x := tok("u-admin", "admin"), tok("u-x", "user")
				wantStatus(t, call(t, b, "GET", doc, x, ""), http.StatusOK)
				wantStatus(t, call(t, a, "POST", "/api/v2/auth/revoke", admin, fmt.Sprintf(`{"user_id":"u-x-%d-%s"}`, ti, run)), http.StatusOK)
				res, _ = pollRefused(t, b, "GET", doc, x, time.Now())
				wantError(t, res, http.StatusUnauthorized, "TOKEN_REVOKED")
			})
			t.Run("one rate limit", func(t *testing.T) {
				user := tok("u-rate", "user")
				for i := range 6 {
					wantStatus(t, call(t, []*testGateway{a, b}[i%2], "GET", doc, user, ""), http.StatusOK)
				}
				for _, g := range []*testGateway{a, b} {
					wantError(t, call(t, g, "GET", doc, user, ""), http.StatusTooManyRequests, "RATE_LIMITED")
				}
			})
			t.Run("one daily quota", func(t *testing.T) {
				user := tok("u-quota", "admin")
				for i := range 10 {
					wantStatus(t, call(t, []*testGateway{a, b}[i%2], "GET", "/api/v2/admin/x", user, ""), http.StatusOK)
				}
				for _, g := range []*testGateway{a, b} {
					d := wantError(t, call(t, g, "GET", "/api/v2/admin/x", user, ""), http.StatusTooManyRequests, "RATE_LIMITED")
					if !strings.Contains(d.Error, "quota") {
						t.Errorf("429 = %s, want the daily quota", d.raw)
					}
				}
			})
			t.Run("one lease; a cancel through the other instance", func(t *testing.T) {
				user := tok("u-lease", "user")
				id := fmt.Sprintf("cluster-hold-%d", ti)
				s := chatWithID(t, a, user, id, "hold")
				wantError(t, call(t, b, "POST", "/api/v2/chat/stream", user, `{"message":"second"}`), http.StatusTooManyRequests, "RATE_LIMITED")
				wantStatus(t, call(t, b, "POST", "/api/v2/chat/cancel", user, `{"request_id":"`+id+`"}`), http.StatusOK)
				evs := readEvents(t, s)
				if len(evs) == 0 || evs[len(evs)-1].Event != "stream_cancelled" {
					t.Fatalf("A's events after B's cancel: %v, want stream_cancelled", eventNames(evs))
				}
				eventually(t, 2*time.Second, "the lease is free for B", func() bool {
					return call(t, b, "POST", "/api/v2/chat/stream", user, `{"message":"again"}`).StatusCode == http.StatusOK
				})
			})
			t.Run("voice sessions listed by the other instance", func(t *testing.T) {
				admin := tok("u-voice-admin", "admin")
				v := openVoice(t, a, "?conversation_id=c-cluster", bearer(tok("u-voice", "user")))
				l := listVoice(t, b, admin)
				if !l.hasSession(v.id) {
					t.Fatalf("B lists %+v, want A's session %s", l.Sessions, v.id)
				}
				for _, s := range l.Sessions {
					if s.SessionID == v.id && (s.Instance != "a" || s.TenantID != tenant) {
						t.Errorf("B lists %+v, want instance a, tenant %q", s, tenant)
					}
				}
				_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
				eventually(t, 2*time.Second, "the closed session leaves B's listing", func() bool {
					return !listVoice(t, b, admin).hasSession(v.id)
				})
			})
		})
	}

	t.Run("user status cached for both instances", func(t *testing.T) {
		user := w.token(t, "u-status-"+run, []string{"user"}, nil)
		mu.Lock()
		before := asked["/users/u-status-"+run]
		mu.Unlock()
		wantStatus(t, call(t, a, "GET", doc, user, ""), http.StatusOK)
		wantStatus(t, call(t, b, "GET", doc, user, ""), http.StatusOK)
		mu.Lock()
		n := asked["/users/u-status-"+run] - before
		mu.Unlock()
		if n != 1 {
			t.Errorf("the user service was asked %d times for one user by two instances, want once (B reads Redis)", n)
		}
	})
}

// clusterClient is a rueidis client on the cluster, closed at cleanup.
func clusterClient(t *testing.T, c *testCluster) rueidis.Client {
	t.Helper()
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: strings.Split(c.URL(), ","), DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	return client
}

// oneSlot runs f, a call of a store that runs scripts, and fails the test if its keys span
// slots: the cluster client refuses to build such a command (it panics), and Redis answers
// CROSSSLOT to any it did not check.
func oneSlot(t *testing.T, what string, f func() error) {
	t.Helper()
	err := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		return f()
	}()
	if err != nil {
		t.Errorf("%s: %v", what, err)
	}
}

// awkwardStrings are the fixed tenants plus random ones built from braces, the tag's escape
// character, separators and Unicode.
func awkwardStrings(n int) []string {
	out := append([]string{"%", "%7B", "{%}", "}{", "{{}}", "a}b{c"}, clusterTenants...)
	alphabet := []rune{'{', '}', '%', ':', 'a', 'ü', '日', ' ', '7', 'B'}
	r := rand.New(rand.NewPCG(13, 13))
	for range n {
		s := make([]rune, r.IntN(7))
		for i := range s {
			s[i] = alphabet[r.IntN(len(alphabet))]
		}
		out = append(out, string(s))
	}
	return out
}

// TestClusterScriptsOneSlot: every multi-key command the gateway sends — the rate-limit and
// quota script, the lease scripts and their renewal, the revocation writes and lookups —
// keeps its keys in one slot for any tenant and user, run against the cluster itself. A
// script whose keys span slots is caught here, as the control case shows.
func TestClusterScriptsOneSlot(t *testing.T) {
	c := startCluster(t)
	client := clusterClient(t, c)
	ctx := t.Context()

	t.Run("control: keys in two slots are caught", func(t *testing.T) {
		script := rueidis.NewLuaScript("return 1")
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("panic: %v", r)
				}
			}()
			return script.Exec(ctx, client, []string{"x:{a}", "x:{b}"}, nil).Error()
		}()
		if err == nil {
			t.Fatal("a script with keys in two slots ran; the check below would catch nothing")
		}
	})

	// TTL/4 later on this clock, every Renew renews.
	now := time.Now()
	adm := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:", TTL: 30 * time.Second,
		Now: func() time.Time { now = now.Add(10 * time.Second); return now }})
	revs := auth.NewRedisRevocations(client, auth.RedisRevocationsOptions{Prefix: "voicegate:", Replicas: 1})
	users := awkwardStrings(8)
	for i, tenant := range awkwardStrings(60) {
		user := users[i%len(users)]
		oneSlot(t, fmt.Sprintf("rate limit and quota, tenant %q, user %q", tenant, user), func() error {
			_, err := adm.Allow(ctx, &policy.Charge{Tenant: tenant, User: user, Quota: 100, Buckets: []policy.Bucket{
				{Parts: []string{"u", user}, Interval: time.Second, Burst: 10, Limit: 10},
				{Parts: []string{"t"}, Interval: time.Millisecond, Burst: 100, Limit: 1000},
				{Parts: []string{"c", "chat", "u", user}, Interval: time.Second, Burst: 10, Limit: 10}}})
			return err
		})
		oneSlot(t, fmt.Sprintf("chat admission (rate, quota, lease, directory claim), tenant %q, user %q", tenant, user), func() error {
			_, release, err := adm.Admit(ctx, &policy.Ask{
				Charge: policy.Charge{Tenant: tenant, User: user, Quota: 100, Buckets: []policy.Bucket{
					{Parts: []string{"u", user}, Interval: time.Second, Burst: 10, Limit: 10}}},
				Slot:  &policy.Slot{Kind: "chat", PerUser: 100, PerTenant: 100},
				Claim: &policy.Claim{Key: "voicegate:stream:" + policy.Tag(tenant) + ":r-" + user, Value: "mine"}})
			if err != nil {
				return err
			}
			if err := adm.Renew(ctx); err != nil { // renews the slot and the claim
				return err
			}
			release(ctx)
			return adm.Renew(ctx) // retries the release if it failed
		})
		oneSlot(t, fmt.Sprintf("revocation, tenant %q, user %q", tenant, user), func() error {
			if _, err := revs.RevokeUser(ctx, tenant, user); err != nil {
				return err
			}
			if err := revs.RevokeToken(ctx, tenant, "jti-"+user, time.Now().Add(time.Minute)); err != nil {
				return err
			}
			_, err := revs.Revoked(ctx, &auth.Identity{UserID: user, TenantID: tenant, TokenID: "jti-" + user, IssuedAt: time.Now()})
			return err
		})
	}
}

// TestClusterResume: on the cluster, resumers of streams of tenants in different hash slots
// wait at their tails on one instance at once (one XREAD cannot name keys of two slots: the
// reader reads each slot's logs in one pipeline), and each gets exactly the rest of its own
// stream; a repeat of a finished request is answered from its log there too.
func TestClusterResume(t *testing.T) {
	c := startCluster(t)
	algo := newResumeAlgo(t)
	a, b := clusterPair(t, c, algo.fakeAlgo, okBackend(t), with(roomyBudgets, map[string]string{"SSE_RESUME_WINDOW": "5s"}))
	tenants := []string{"acme", "globex", "initech"}
	if keySlot("{acme}") == keySlot("{globex}") || keySlot("{globex}") == keySlot("{initech}") {
		t.Fatal("the tenants' tags share a slot; pick others")
	}
	// Users of this run only: the cluster keeps an earlier run's streams, whose repeats would
	// be answered from their logs.
	run := newRunID()
	var resumed []*sseReader
	for i, tenant := range tenants {
		tok := tokenFor(t, "u-"+tenant+"-"+run, []string{"user"}, map[string]any{"tenant_id": tenant})
		res := chatRequest(t, a.Client, a.URL, tok, "cr-"+strconv.Itoa(i), "gated", "")
		defer res.Body.Close()
		readN(t, wantStream(t, res), 10)
		res = chatRequest(t, b.Client, b.URL, tok, "cr-"+strconv.Itoa(i), "gated", strconv.Itoa(5+i))
		defer res.Body.Close()
		resumed = append(resumed, wantStream(t, res))
	}
	close(algo.release)
	for i, s := range resumed {
		wantRest(t, s, 5+i)
	}
	tok := tokenFor(t, "u-acme-"+run, []string{"user"}, map[string]any{"tenant_id": "acme"})
	res := chatRequest(t, b.Client, b.URL, tok, "cr-0", "gated", "")
	defer res.Body.Close()
	if evs := readEvents(t, wantStream(t, res)); len(evs) != resumeLines+2 || evs[0].Event != "stream_start" {
		t.Errorf("a repeat of a finished request on the cluster: %v, want the whole answer from its log", eventNames(evs))
	}
	if n := algo.calls.Load(); n != int64(len(tenants)) {
		t.Errorf("the algorithm service got %d requests, want %d", n, len(tenants))
	}
}

// TestParseClusterInfo: readiness reads cluster_state and cluster_slots_ok, whether the text
// comes plain (RESP2) or as a verbatim string with its format in front (RESP3).
func TestParseClusterInfo(t *testing.T) {
	for _, text := range []string{
		"cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\ncluster_slots_pfail:0\r\n",
		"txt:cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\n",
	} {
		got := parseClusterInfo(text)
		if !got.answered || got.state != "fail" || got.slotsOK != 10923 {
			t.Errorf("parseClusterInfo(%q) = %+v, want state fail, 10923 slots ok", text, got)
		}
	}
}

// TestParseSlotOwners: the slot owners are the masters that are not failing, by range, a slot
// being migrated left to MOVED and ASK; without any, nil.
func TestParseSlotOwners(t *testing.T) {
	text := "txt:" +
		"a1 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460 [5461->-b2]\n" +
		"b2 10.0.0.2:6379@16379,host-b master - 0 0 2 connected 5461-10922\n" +
		"c3 10.0.0.3:6379@16379 master,fail - 0 0 3 disconnected 10923-16383\n" +
		"d4 10.0.0.4:6379@16379 slave a1 0 0 1 connected\n" +
		"e5 10.0.0.5:6379@16379 master - 0 0 5 connected 16000\n"
	got := parseSlotOwners(text)
	want := []slotOwner{{0, 5460, "10.0.0.1:6379"}, {5461, 10922, "10.0.0.2:6379"}, {16000, 16000, "10.0.0.5:6379"}}
	if !slices.Equal(got, want) {
		t.Errorf("parseSlotOwners = %+v, want %+v", got, want)
	}
	if got := parseSlotOwners("c3 10.0.0.3:6379@16379 master,fail? - 0 0 3 connected 0-16383\n"); got != nil {
		t.Errorf("only a failing master: %+v, want nil", got)
	}
}
