package main

// What the gateway asks of Redis per unit of work, for sizing a deployment (README, "Sizing"),
// read from Redis's own counters (INFO stats) around a known amount of work; and rate-limit
// checks per second on one Redis and on the test cluster, side by side.

import (
	"context"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
)

// redisStats is Redis's count of commands processed and its network bytes so far.
func redisStats(tb testing.TB, addr string) (cmds, in, out int64) {
	tb.Helper()
	v, err := rawDo(addr, "INFO", "stats")
	if err != nil {
		tb.Fatal(err)
	}
	text, _ := v.(string)
	get := func(k string) int64 {
		for line := range strings.SplitSeq(text, "\r\n") {
			if rest, ok := strings.CutPrefix(line, k+":"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
				return n
			}
		}
		tb.Fatalf("INFO stats without %s", k)
		return 0
	}
	return get("total_commands_processed"), get("total_net_input_bytes"), get("total_net_output_bytes")
}

// BenchmarkRedisCost reports what Redis does per chat request (fresh token: nothing cached;
// and one token again and again), per voice session (start and end) and per second of an
// open voice session (renewals; the 500 ms rechecks are answered from the client-side cache),
// with the default settings:
//
//	VOICEGATE_REQUIRE_REDIS=1 go test -run '^$' -bench RedisCost -benchtime 1x .
//
// Commands are Redis's total_commands_processed: those a script calls count too. Bytes are
// Redis's network input and output, invalidation messages included.
func BenchmarkRedisCost(b *testing.B) {
	r := startRedisB(b)
	algo := doneAlgo(b)
	srv, _ := benchGateway(b, map[string]string{"REDIS_URL": r.URL(), "ALGO_URL": algo.URL})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
	chat := func(tok string) {
		req, _ := http.NewRequest("POST", srv.URL+"/api/v2/chat/stream", strings.NewReader(`{"message":"hi"}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		res, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		defer res.Body.Close()
		if _, err := readLatencies(res.Body, nil); err != nil || res.StatusCode != http.StatusOK {
			b.Fatalf("chat: %d %v", res.StatusCode, err)
		}
	}
	measure := func(name, unit string, n int, work func()) {
		time.Sleep(100 * time.Millisecond) // the renewer's queued releases of earlier work go first
		c0, i0, o0 := redisStats(b, r.Addr())
		work()
		time.Sleep(100 * time.Millisecond) // and this work's releases are in
		c1, i1, o1 := redisStats(b, r.Addr())
		cmds := float64(c1-c0-1) / float64(n) // minus the first INFO
		in, out := float64(i1-i0)/float64(n), float64(o1-o0)/float64(n)
		b.Logf("%-34s %6.2f commands  %7.0f B in  %7.0f B out", name, cmds, in, out)
		b.ReportMetric(cmds, unit+"-cmds")
		b.ReportMetric(in+out, unit+"-bytes")
	}
	for b.Loop() {
		const n = 200
		chat(tokenFor(b, "u-warm", []string{"user"}, nil))
		fresh := make([]string, n)
		for i := range fresh {
			fresh[i] = tokenFor(b, "u-cost-"+strconv.Itoa(i), []string{"user"}, nil)
		}
		measure("chat, fresh token", "chat-fresh", n, func() {
			for _, tok := range fresh {
				chat(tok)
			}
		})
		same := tokenFor(b, "u-cost-same", []string{"user"}, nil)
		chat(same)
		measure("chat, same token", "chat-same", n, func() {
			for range n {
				chat(same)
			}
		})
		ws := "ws" + strings.TrimPrefix(srv.URL, "http") + "/api/v2/voice/stream"
		const sessions = 50
		measure("voice session, start and end", "voice-session", sessions, func() {
			for _, c := range openSessions(b, ws, sessions, true) {
				_ = c.Close(websocket.StatusNormalClosure, "")
			}
		})
		conns := openSessions(b, ws, sessions, true)
		const window = 20 * time.Second // two renewal rounds at the default LEASE_TTL of 30 s
		measure("voice session, per second open", "voice-open-second", sessions*int(window/time.Second), func() { time.Sleep(window) })
		for _, c := range conns {
			_ = c.Close(websocket.StatusNormalClosure, "")
		}
	}
}

// BenchmarkRateLimitCluster: rate-limit checks per second from two clients made as two
// gateway instances make theirs (connectRedis, guardRedis), on one Redis and on the
// three-master test cluster, in the same run. A check is the gateway's one script call for a
// request (a user's and a tenant's bucket and a daily quota); tenants vary, so the cluster's
// masters share the work:
//
//	VOICEGATE_REQUIRE_REDIS=1 go test -run '^$' -bench RateLimitCluster -benchtime 5s .
func BenchmarkRateLimitCluster(b *testing.B) {
	one := startRedisB(b)
	for _, target := range []struct{ name, url string }{{"one-redis", one.Addr()}, {"cluster-3-masters", ""}} {
		b.Run(target.name, func(b *testing.B) {
			url := target.url
			if url == "" {
				url = startCluster(b).URL()
			}
			var lims []*policy.RedisAdmitter
			for range 2 {
				cfg := &config{RedisAddrs: strings.Split(url, ","), RedisConnectWithin: 5 * time.Second}
				client, err := connectRedis(context.Background(), cfg, 0)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(client.Close)
				lims = append(lims, policy.NewRedisAdmitter(guardRedis(client, slog.New(slog.DiscardHandler), redisTiming{}),
					policy.RedisAdmitterOptions{Prefix: "voicegate:"}))
			}
			// Redis's own command count (scripts' inner commands included) over the run: the
			// unit of a Redis core's capacity in the README's sizing.
			addrs := strings.Split(url, ",")
			processed := func() int64 {
				var sum int64
				for _, a := range addrs {
					if v, err := rawDo(a, "ROLE"); err == nil {
						if role, _ := v.([]any); len(role) > 0 && role[0] == "master" {
							n, _, _ := redisStats(b, a)
							sum += n
						}
					}
				}
				return sum
			}
			var next atomic.Int64
			b.SetParallelism(16)
			before := processed()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := next.Add(1)
					tenant, user := "t-"+strconv.Itoa(int(i%64)), "u-"+strconv.Itoa(int(i%512))
					c := &policy.Charge{Tenant: tenant, User: user, Quota: 1 << 40, Buckets: []policy.Bucket{
						{Parts: []string{"u", user}, Interval: time.Microsecond, Burst: 1 << 30, Limit: 1000000},
						{Parts: []string{"t"}, Interval: time.Microsecond, Burst: 1 << 30, Limit: 1000000}}}
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					v, err := lims[i%2].Allow(ctx, c)
					cancel()
					if err != nil || !v.Allowed {
						b.Errorf("check: %+v, %v", v, err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "checks/s")
			b.ReportMetric(float64(processed()-before)/float64(b.N), "redis-cmds/check")
		})
	}
}

// scriptCalls reads, from INFO commandstats, how many scripts clients have sent Redis: EVAL,
// EVALSHA (and their _RO forms) and SCRIPT subcommands. Commands that scripts call themselves
// are counted under their own names, never under these.
func scriptCalls(b *testing.B, client rueidis.Client) int64 {
	b.Helper()
	info, err := client.Do(context.Background(), client.B().Info().Section("commandstats").Build()).ToString()
	if err != nil {
		b.Fatal(err)
	}
	var total int64
	for _, line := range strings.Split(info, "\n") {
		name, stats, ok := strings.Cut(strings.TrimSpace(line), ":")
		name = strings.TrimPrefix(name, "cmdstat_")
		if !ok || !(strings.HasPrefix(name, "eval") || strings.HasPrefix(name, "script")) {
			continue
		}
		for _, kv := range strings.Split(stats, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					b.Fatalf("commandstats line %q: %v", line, err)
				}
				total += n
			}
		}
	}
	return total
}

// BenchmarkRateLimitRedis: one rate-limit check of a charge of three buckets and a daily
// quota, by the real RedisLimiter against a real redis-server, is exactly one round trip
// (redis-calls/op, from Redis's own command statistics); ns/op is its latency. "ping" is the
// floor: one bare round trip with the same client. "memory" is the in-process limiter.
func BenchmarkRateLimitRedis(b *testing.B) {
	r := startRedisB(b)
	client := testClient(b, r)
	ctx := context.Background()
	charge := func() *policy.Charge {
		// Limits never reached, so every check does the full work of an admitted request.
		huge := func(key string) policy.Bucket {
			return policy.Bucket{Parts: []string{key}, Interval: time.Millisecond, Burst: 1 << 30, Limit: 1000}
		}
		return &policy.Charge{Tenant: "tenant-a", User: "u-bench",
			Buckets: []policy.Bucket{huge("u:u-bench"), huge("t"), huge("u:u-bench:c:chat")}, Quota: 1 << 40}
	}

	b.Run("check", func(b *testing.B) {
		lim := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:"})
		c := charge()
		// The first check loads the script (EVALSHA, NOSCRIPT, EVAL); the loop measures the
		// steady state.
		if v, err := lim.Allow(ctx, c); err != nil || !v.Allowed {
			b.Fatalf("warm-up check = %+v, %v; want allowed", v, err)
		}
		before := scriptCalls(b, client)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := lim.Allow(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
		calls := scriptCalls(b, client) - before
		b.ReportMetric(float64(calls)/float64(b.N), "redis-calls/op")
		if calls != int64(b.N) {
			b.Fatalf("%d checks sent %d scripts to Redis, want exactly one each", b.N, calls)
		}
		if v, err := lim.Allow(ctx, c); err != nil || !v.Allowed || v.Limit != 1000 {
			b.Fatalf("check after the loop = %+v, %v; want allowed with limit 1000", v, err)
		}
	})
	b.Run("ping", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := client.Do(ctx, client.B().Ping().Build()).Error(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("memory", func(b *testing.B) {
		lim := policy.NewMemoryLimiter(nil)
		c := charge()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := lim.Allow(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
	})
}
