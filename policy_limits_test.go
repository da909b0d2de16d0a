package main

// The fair-use stores on their edges, against a real redis-server: a lease that expired while
// Redis was out of reach, instance clocks that disagree with Redis's, rates finer than a
// millisecond, an admission answered late, audio reservations, lease renewal rounds.

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/policy"
)

// TestLeaseRenewalRestores: a slot whose entry vanished from Redis (it expired while Redis could
// not be reached, or Redis lost its data) is put back by the next renewal, because its session
// still runs; releasing it then frees it as usual.
func TestLeaseRenewalRestores(t *testing.T) {
	r := startRedis(t)
	client := testClient(t, r)
	const ttl = 300 * time.Millisecond
	now := time.Now()
	clock := func() time.Time { return now }
	leases := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:", TTL: ttl, Now: clock})
	ask := &policy.Ask{Charge: policy.Charge{Tenant: "acme", User: "alice"}, Slot: &policy.Slot{Kind: "chat", PerUser: 1}}
	_, release, err := leases.Admit(t.Context(), ask)
	if err != nil {
		t.Fatal(err)
	}
	user, tenant := "voicegate:lease:{acme}:chat:u:alice", "voicegate:lease:{acme}:chat:t"
	if n := r.Do(t, "ZCARD", user); n != int64(1) {
		t.Fatalf("ZCARD %s = %#v after Acquire, want 1", user, n)
	}
	r.Do(t, "DEL", user, tenant) // what an outage longer than the TTL leaves behind
	if err := leases.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	if r.Do(t, "ZCARD", user) != int64(0) {
		t.Fatal("Renew renewed before a quarter of the TTL had gone by")
	}
	now = now.Add(ttl / 3)
	if err := leases.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	if r.Do(t, "ZCARD", user) != int64(1) || r.Do(t, "ZCARD", tenant) != int64(1) {
		t.Fatal("the renewal did not put the slot back")
	}
	// Back in the count: a second slot for the user is refused.
	if _, _, err := leases.Admit(t.Context(), ask); err == nil {
		t.Error("a second slot was granted while the restored one is held (cap 1)")
	}
	release(t.Context())
	if n := r.Do(t, "ZCARD", user); n != int64(0) {
		t.Errorf("ZCARD %s = %#v after release, want 0: the release is done when it returns", user, n)
	}
	// The expiry is on Redis's clock: TTL from Redis's now, not this process's.
	_, release, err = leases.Admit(t.Context(), ask)
	if err != nil {
		t.Fatal(err)
	}
	defer release(t.Context())
	members, _ := r.Do(t, "ZRANGE", user, "0", "-1", "WITHSCORES").([]any)
	if len(members) != 2 {
		t.Fatalf("ZRANGE = %#v", members)
	}
	score, _ := strconv.ParseInt(members[1].(string), 10, 64)
	if d := time.UnixMilli(score).Sub(redisNow(t, r)); d > ttl || d < ttl-time.Second {
		t.Errorf("lease expires %v after Redis's now, want about %v", d, ttl)
	}
}

// TestQuotaOnRedisDay: instances whose clocks are hours off count a user's requests in one key,
// the one of Redis's UTC day; an instance a whole day off is refused (and, through the
// enforcer, fails open) rather than counting somewhere else.
func TestQuotaOnRedisDay(t *testing.T) {
	r := startRedis(t)
	client := testClient(t, r)
	day := redisNow(t, r).UTC().Format("20060102")
	key := "voicegate:quota:{acme}:alice:" + day
	for i, skew := range []time.Duration{0, 20 * time.Hour, -20 * time.Hour, 23 * time.Hour} {
		lim := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:", Now: func() time.Time { return time.Now().Add(skew) }})
		v, err := lim.Allow(t.Context(), &policy.Charge{Tenant: "acme", User: "alice", Quota: 100})
		if err != nil || !v.Allowed {
			t.Fatalf("clock off by %v: %+v, %v", skew, v, err)
		}
		if redisNow(t, r).UTC().Format("20060102") != day {
			t.Skip("Redis's UTC day changed during the test")
		}
		if got := r.Do(t, "GET", key); got != strconv.Itoa(i+1) {
			t.Fatalf("clock off by %v: GET %s = %#v, want %d (keys %v)", skew, key, got, i+1, r.Do(t, "KEYS", "voicegate:quota:*"))
		}
	}
	if keys, _ := r.Do(t, "KEYS", "voicegate:quota:*").([]any); len(keys) != 1 {
		t.Errorf("quota keys %v, want only %s", keys, key)
	}
	lim := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:", Now: func() time.Time { return time.Now().Add(72 * time.Hour) }})
	if _, err := lim.Allow(t.Context(), &policy.Charge{Tenant: "acme", User: "alice", Quota: 100}); err == nil {
		t.Error("an instance three days off was answered; want an error")
	}

	// Refused at the quota: Retry-After runs to Redis's next UTC midnight.
	lim = policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:"})
	v, err := lim.Allow(t.Context(), &policy.Charge{Tenant: "acme", User: "alice", Quota: 4})
	if err != nil || v.Allowed || !v.QuotaExceeded {
		t.Fatalf("fifth request with a quota of 4: %+v, %v", v, err)
	}
	now := redisNow(t, r)
	midnight := now.UTC().Truncate(24 * time.Hour).Add(24 * time.Hour)
	if d := midnight.Sub(now) - v.RetryAfter; d < -time.Second || d > time.Second {
		t.Errorf("RetryAfter %v, want the %v to Redis's next UTC midnight", v.RetryAfter, midnight.Sub(now))
	}
}

// TestRateFinerThanAMillisecond: GCRA works in microseconds, so a rate of 2,000 a second or of
// 1,000 per 1.5 s is kept as such, not rounded to one request per millisecond.
func TestRateFinerThanAMillisecond(t *testing.T) {
	r := startRedis(t)
	client := testClient(t, r)
	lim := policy.NewRedisAdmitter(client, policy.RedisAdmitterOptions{Prefix: "voicegate:"})
	for _, interval := range []time.Duration{500 * time.Microsecond, 1500 * time.Microsecond, 3 * time.Millisecond} {
		c := &policy.Charge{Tenant: "acme", User: "alice",
			Buckets: []policy.Bucket{{Parts: []string{"u", "alice", interval.String()}, Interval: interval, Burst: 1, Limit: 1}}}
		v, err := lim.Allow(context.Background(), c)
		if err != nil || !v.Allowed {
			t.Fatalf("interval %v, first request: %+v, %v", interval, v, err)
		}
		// A fresh bucket of burst 1 is full again one interval after the request.
		if d := v.Reset - interval; d < -5*time.Microsecond || d > 5*time.Microsecond {
			t.Errorf("interval %v: Reset = %v, want the interval", interval, v.Reset)
		}
	}
}

// TestAdmissionAnsweredLate: Redis stalls (CLIENT PAUSE 300 ms) while a chat stream is
// admitted, so the admission's answer comes after LIMIT_BUDGET and the stream goes through
// unmetered; the admission script still runs once Redis resumes, and takes the user's one slot
// and the stream's claim. Whatever it took is given back when the stream ends, as if it had
// been admitted: the user's next stream is admitted and the request ID is free, at once rather
// than after LEASE_TTL.
func TestAdmissionAnsweredLate(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := doneAlgo(t)
	f := e2ePolicy(t)
	f.Limits.Concurrency["chat"] = policy.Concurrency{PerUser: 1, PerTenant: 100}
	pol := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, pol, f)
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), map[string]string{
		"POLICY_FILE": pol, "LIMIT_BUDGET": "100ms", "AUTH_BUDGET": "2s", "LEASE_TTL": "30s"}))
	w := watchTokens(t, g)
	alice := w.token(t, "u-alice", []string{"user"}, nil)
	chat := func(id string) *http.Response {
		return chatRequest(t, g.Client, g.URL, alice, id, "hi", "")
	}
	// Warm: the token's revocation answer is cached, so only the admission meets the stall.
	res := chat("late-warm")
	readEvents(t, wantStream(t, res))
	res.Body.Close()

	r.Do(t, "CLIENT", "PAUSE", "300", "ALL")
	paused := time.Now()
	res = chat("late-1")
	readEvents(t, wantStream(t, res))
	res.Body.Close()
	if d := time.Since(paused); d >= 300*time.Millisecond {
		t.Logf("the stream took %v, the whole stall: it may not have met it", d)
	}
	if n, _ := logCount(t, g, "fair-use store unavailable; not limiting or capping"); n == 0 {
		t.Fatalf("the admission did not time out (no fail-open log line):\n%s", clipTail(g.Stderr.String()))
	}
	// The script ran once the pause was over (it took the slot then, or found it released).
	leases := "voicegate:lease:{tenant-a}:chat:u:u-alice"
	// Admitted by Redis, that is: an admission that fails open (a breaker still open after the
	// stall) says nothing, and carries no RateLimit headers.
	for _, id := range []string{"late-2", "late-1"} {
		eventually(t, 5*time.Second, "the next stream ("+id+") is admitted", func() bool {
			res := chat(id)
			defer res.Body.Close()
			if res.StatusCode != http.StatusOK {
				return false
			}
			readEvents(t, wantStream(t, res))
			return res.Header.Get("RateLimit-Limit") != ""
		})
	}
	eventually(t, 5*time.Second, "no slot left held", func() bool {
		n, _ := r.Do(t, "ZCARD", leases).(int64)
		return n == 0
	})
	if keys, _ := r.Do(t, "KEYS", "voicegate:stream:*").([]any); len(keys) != 0 {
		t.Errorf("directory entries left behind: %v", keys)
	}
}

// TestAudioMeterReservations: the voice audio meters, in memory and on Redis, decide alike.
// A reservation is granted only as far as the user's and the tenant's quotas leave room, and a
// retried one costs nothing twice; audio a session used beyond what it held (while the meter
// could not answer) is charged all the same; settling a session charges exactly its use, gives
// back what it held beyond it, and nothing charged after that changes it.
func TestAudioMeterReservations(t *testing.T) {
	r := startRedis(t)
	lim := policy.VoiceLimits{UserSecondsPerDay: 10, TenantSecondsPerDay: 15}
	s := time.Second
	for _, m := range []struct {
		name  string
		meter policy.AudioMeter
	}{{"memory", policy.NewMemoryAudioMeter()}, {"redis", policy.NewRedisAudioMeter(testClient(t, r), "voicegate:")}} {
		t.Run(m.name, func(t *testing.T) {
			for i, step := range []struct {
				user, session    string
				used, hold       time.Duration
				final            bool
				held, uUsed, tot time.Duration // what the answer says
			}{
				{"alice", "s1", 0, 4 * s, false, 4 * s, 4 * s, 4 * s},
				{"alice", "s1", 0, 4 * s, false, 4 * s, 4 * s, 4 * s}, // retried
				{"alice", "s2", 0, 4 * s, false, 4 * s, 8 * s, 8 * s},
				{"alice", "s1", 3 * s, 7 * s, false, 6 * s, 10 * s, 10 * s},  // 2 s of the 3 asked: the user's quota
				{"alice", "s2", 1 * s, 5 * s, false, 4 * s, 10 * s, 10 * s},  // nothing left
				{"alice", "s1", 5 * s, 0, true, 5 * s, 9 * s, 9 * s},         // settled: 1 s back
				{"alice", "s1", 9 * s, 20 * s, false, 5 * s, 9 * s, 9 * s},   // after its settlement: nothing
				{"alice", "s2", 6 * s, 10 * s, false, 6 * s, 11 * s, 11 * s}, // used beyond its holding: charged
				{"bob", "s3", 0, 10 * s, false, 4 * s, 4 * s, 15 * s},        // the tenant's quota
				{"alice", "s2", 6 * s, 0, true, 6 * s, 11 * s, 15 * s},
				{"alice", "", 0, 0, false, 0, 11 * s, 15 * s}, // a read
			} {
				u := &policy.AudioUse{Tenant: "acme", User: step.user, Session: step.session, Used: step.used,
					Hold: step.hold, Final: step.final, Limits: lim}
				if err := m.meter.Charge(t.Context(), []*policy.AudioUse{u}); err != nil {
					t.Fatalf("step %d: %v", i+1, err)
				}
				if u.Held != step.held || u.UserUsed != step.uUsed || u.TenantUsed != step.tot {
					t.Errorf("step %d (%s %s used %v hold %v final %v): held %v, user %v, tenant %v; want %v, %v, %v",
						i+1, step.user, step.session, step.used, step.hold, step.final, u.Held, u.UserUsed, u.TenantUsed,
						step.held, step.uUsed, step.tot)
				}
			}
		})
	}
}

// TestRenewerRounds: the renewer runs its tasks every period, at once on a kick (however many
// kicks arrive together), once more at stop, and goes on after a task fails; a task that hangs
// is cut off at the period.
func TestRenewerRounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const period = 10 * time.Second
		r := newRenewer(period, slog.New(slog.DiscardHandler))
		var calls, hung atomic.Int64
		var fail atomic.Bool
		r.add("counted", func(context.Context) error {
			calls.Add(1)
			if fail.Load() {
				return errors.New("down")
			}
			return nil
		})
		r.add("hanging", func(ctx context.Context) error {
			if !fail.Load() || hung.Add(1) > 1 {
				return nil
			}
			<-ctx.Done()
			return ctx.Err()
		})
		r.start()
		synctest.Wait()
		if n := calls.Load(); n != 0 {
			t.Fatalf("%d rounds before any kick or period", n)
		}
		r.Kick()
		r.Kick()
		r.Kick()
		synctest.Wait()
		if n := calls.Load(); n < 1 || n > 2 {
			t.Fatalf("%d rounds after three kicks at once, want 1 or 2", n)
		}
		before := calls.Load()
		time.Sleep(period)
		synctest.Wait()
		if n := calls.Load(); n != before+1 {
			t.Fatalf("%d rounds after a period, want %d", n, before+1)
		}
		fail.Store(true)
		start := time.Now()
		r.Kick()
		synctest.Wait()
		time.Sleep(period) // the hanging task is cut off at the period
		synctest.Wait()
		if hung.Load() == 0 {
			t.Fatal("the hanging task never ran")
		}
		fail.Store(false)
		after := calls.Load()
		r.Kick()
		synctest.Wait()
		if calls.Load() <= after {
			t.Fatal("no round after a failed one")
		}
		if time.Since(start) > 3*period {
			t.Errorf("rounds took %v with a hanging task", time.Since(start))
		}
		last := calls.Load()
		r.stop()
		if calls.Load() != last+1 {
			t.Errorf("stop ran %d rounds, want 1", calls.Load()-last)
		}
	})
}
