package main

// Every Redis call is bounded by its budget whatever the client library does, and timed by class
// for the metrics: guardedRedis against a fake client that freezes and refuses.

import (
	"context"
	"errors"
	"go/ast"
	"go/parser"
	gotoken "go/token"
	"io"
	"log/slog"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
)

// fakeRedis stands in for rueidis in the guard's unit tests. Frozen, a call waits until thaw
// whatever its context says — as rueidis does while it waits for a reconnection; refusing, it
// fails at once with a connection error; otherwise it answers.
type fakeRedis struct {
	rueidis.Client // nil: only Do is called

	calls  atomic.Int64
	mu     sync.Mutex
	frozen chan struct{} // nil: not frozen
	refuse bool
}

func (f *fakeRedis) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	f.calls.Add(1)
	f.mu.Lock()
	frozen, refuse := f.frozen, f.refuse
	f.mu.Unlock()
	if frozen != nil {
		<-frozen
	}
	if refuse {
		return rueidis.NewErrorResult(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	}
	return rueidis.NewResult(rueidis.RedisMessage{}, nil)
}

// Mode: a single Redis, one breaker.
func (f *fakeRedis) Mode() rueidis.ClientMode { return rueidis.ClientModeStandalone }

func (f *fakeRedis) freeze() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frozen = make(chan struct{})
}

func (f *fakeRedis) thaw() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.frozen)
	f.frozen = nil
}

func (f *fakeRedis) setRefuse(v bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refuse = v
}

// timed is one guarded call with budget, and how long it took.
func timed(g *guardedRedis, budget time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	start := time.Now()
	err := g.Do(ctx, rueidis.Completed{}).Error()
	return time.Since(start), err
}

// TestGuardedRedisFrozen: against a Redis that does not answer (and a client library that
// does not look at contexts while it waits), every call returns by its deadline; after three
// such calls, once Redis has answered nothing for breakerSilence, the breaker opens and calls fail at once without being sent; after the pause one
// probe goes out while the others still fail at once; and once Redis answers again (here the
// stuck calls finish late) calls go through at once. Time is synctest's: the durations are
// exact.
func TestGuardedRedisFrozen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeRedis{}
		g := guardRedis(f, slog.New(slog.NewTextHandler(io.Discard, nil)), redisTiming{})
		const budget = 75 * time.Millisecond
		if took, err := timed(g, budget); err != nil || took != 0 {
			t.Fatalf("healthy: %v after %v", err, took)
		}

		f.freeze()
		frozen := time.Now()
		for i := 0; i < breakerFailures || time.Since(frozen) < breakerSilence; i++ {
			took, err := timed(g, budget)
			if !errors.Is(err, context.DeadlineExceeded) || took != budget {
				t.Fatalf("frozen call %d: %v after %v, want the deadline after exactly %v", i+1, err, took, budget)
			}
		}
		sent := f.calls.Load()
		took, err := timed(g, budget)
		if !errors.Is(err, errRedisPaused) || took != 0 {
			t.Fatalf("after %d timeouts: %v after %v, want errRedisPaused at once", breakerFailures, err, took)
		}
		if f.calls.Load() != sent {
			t.Fatal("a call was sent while the breaker is open")
		}

		time.Sleep(breakerOpen)
		probe := make(chan error, 1)
		go func() { _, err := timed(g, budget); probe <- err }()
		synctest.Wait() // the probe is out, stuck in the frozen Redis
		if f.calls.Load() != sent+1 {
			t.Fatalf("%d calls sent after the pause, want exactly one probe", f.calls.Load()-sent)
		}
		if took, err := timed(g, budget); !errors.Is(err, errRedisPaused) || took != 0 {
			t.Fatalf("during the probe: %v after %v, want errRedisPaused at once", err, took)
		}
		if err := <-probe; !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("probe: %v, want its deadline", err)
		}
		if _, err := timed(g, budget); !errors.Is(err, errRedisPaused) {
			t.Fatalf("after a failed probe: %v, want errRedisPaused", err)
		}

		f.thaw() // the stuck calls finish: Redis answers again
		synctest.Wait()
		if took, err := timed(g, budget); err != nil || took != 0 {
			t.Fatalf("after Redis answered again: %v after %v, want an answer at once", err, took)
		}
	})
}

// TestGuardedRedisRefused: a Redis that refuses connections opens the breaker too; a probe that
// gets an answer closes it, within the pause and one call of Redis coming back.
func TestGuardedRedisRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeRedis{}
		g := guardRedis(f, slog.New(slog.NewTextHandler(io.Discard, nil)), redisTiming{})
		f.setRefuse(true)
		for range breakerFailures {
			if _, err := timed(g, time.Second); err == nil || errors.Is(err, errRedisPaused) {
				t.Fatalf("refused call: %v, want the connection error", err)
			}
		}
		if _, err := timed(g, time.Second); !errors.Is(err, errRedisPaused) {
			t.Fatalf("after %d refusals: %v, want errRedisPaused", breakerFailures, err)
		}
		f.setRefuse(false)
		back := time.Now()
		for {
			_, err := timed(g, time.Second)
			if err == nil {
				break
			}
			if !errors.Is(err, errRedisPaused) {
				t.Fatalf("while recovering: %v", err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if d := time.Since(back); d > breakerOpen {
			t.Errorf("calls resumed %v after Redis came back, want within %v", d, breakerOpen)
		}
	})
}

// TestGuardedRedisNeutral: a caller that gives up (its context canceled) says nothing about
// Redis, and error replies are answers.
func TestGuardedRedisNeutral(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want outcome
	}{
		{nil, answered},
		{&rueidis.RedisError{}, answered},
		{context.Canceled, neutral},
		{rueidis.ErrClosing, neutral},
		{context.DeadlineExceeded, unanswered},
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, unanswered},
		{io.EOF, unanswered},
	} {
		if got := outcomeOf(tc.err); got != tc.want {
			t.Errorf("outcomeOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

// timings records what a guarded client's timing hook is told.
type timings struct {
	mu   sync.Mutex
	took map[string][]time.Duration // class → durations
}

func (tm *timings) record(class string, took time.Duration) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	if tm.took == nil {
		tm.took = map[string][]time.Duration{}
	}
	tm.took[class] = append(tm.took[class], took)
}

// count returns how many calls of class were timed, and the whole of them.
func (tm *timings) count() (map[string]int, int) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	out, all := map[string]int{}, 0
	for c, l := range tm.took {
		out[c] = len(l)
		all += len(l)
	}
	return out, all
}

// TestRedisClass: every kind of key policy.Keys makes has a class of its own group, never
// "other", so no call of the gateway's hides there; keys named by another deployment's
// prefix, and commands without a key, are "other". The kinds are read from policy/keys.go, so
// a new kind without a class fails here.
func TestRedisClass(t *testing.T) {
	f, err := parser.ParseFile(gotoken.NewFileSet(), filepath.Join("policy", "keys.go"), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	keys := policy.NewKeys("vg:")
	rt := redisTiming{keys: keys}
	kinds := 0
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != gotoken.CONST {
			continue
		}
		for _, spec := range g.Specs {
			v := spec.(*ast.ValueSpec)
			for i, n := range v.Names {
				lit, ok := v.Values[i].(*ast.BasicLit)
				if !ok || !strings.HasPrefix(n.Name, "Kind") {
					continue
				}
				kinds++
				kind := strings.Trim(lit.Value, `"`)
				key := keys.Tenant(kind, "acme", "u-1")
				class := rt.class([]string{"GET", key})
				if class == "other" || !slices.Contains(redisClasses, class) {
					t.Errorf("%s (%q): class %q, want one of %v but other", n.Name, kind, class, redisClasses)
				}
				if got := rt.class([]string{"EVALSHA", "abc", "2", key, "x", "arg"}); got != class {
					t.Errorf("a script on %s: class %q, want %q", n.Name, got, class)
				}
			}
		}
	}
	if kinds < 10 {
		t.Fatalf("found %d kinds in policy/keys.go", kinds)
	}
	for _, cmd := range [][]string{{"PING"}, {"INFO", "replication"}, {"CLUSTER", "INFO"}, {"EVALSHA", "abc", "0", "x"},
		{"GET", "other:" + policy.KindRevoked + ":{acme}:jti:1"}} {
		if got := rt.class(cmd); got != "other" {
			t.Errorf("class(%q) = %q, want other", cmd, got)
		}
	}
}

// TestGuardedRedisTiming: against a real Redis, each call the guarded client sends is timed
// once under its key's class: commands, pipelines (by their first command), scripts; answers
// from the client-side cache are not Redis calls, nor are blocking commands (they wait by
// design); a call that outlives its budget is timed as long as its caller waited, and those the
// breaker holds back are not timed.
func TestGuardedRedisTiming(t *testing.T) {
	r := startRedis(t)
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{r.Addr()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	keys := policy.NewKeys("vg:")
	tm := &timings{}
	g := guardRedis(client, slog.New(slog.DiscardHandler), redisTiming{keys: keys, record: tm.record})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	b := g.B()

	revoked := keys.Tenant(policy.KindRevoked, "acme", "jti", "t-1")
	lease := keys.Tenant(policy.KindLease, "acme", "chat", "u", "alice")
	session := keys.Key(policy.KindSession, "s-1")
	if err := g.Do(ctx, b.Set().Key(revoked).Value("1").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second is answered from the client-side cache
		if err := g.DoCache(ctx, b.Get().Key(revoked).Cache(), time.Minute).Error(); err != nil {
			t.Fatal(err)
		}
	}
	for _, res := range g.DoMulti(ctx, b.Zadd().Key(lease).ScoreMember().ScoreMember(1, "a").Build(), b.Pexpire().Key(lease).Milliseconds(1000).Build()) {
		if err := res.Error(); err != nil {
			t.Fatal(err)
		}
	}
	script := rueidis.NewLuaScript(`return redis.call('EXISTS', KEYS[1])`)
	if err := script.Exec(ctx, g, []string{session}, nil).Error(); err != nil { // EVALSHA, then EVAL: it is not loaded yet
		t.Fatal(err)
	}
	// The breaker counts silence from the last call Redis answered, which is no earlier than
	// this: the freeze below comes later, and how much later depends on the machine.
	lastSent := time.Now()
	if err := g.Do(ctx, b.Ping().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if err := g.Do(ctx, b.Blpop().Key(keys.Key(policy.KindBroadcast, "r-1")).Timeout(0.01).Build()).Error(); !rueidis.IsRedisNil(err) {
		t.Fatalf("BLPOP on an empty list: %v, want nil", err)
	}
	got, _ := tm.count()
	want := map[string]int{"auth": 2, "leases": 1, "registry": 2, "other": 1}
	if !maps.Equal(got, want) {
		t.Errorf("timed calls by class = %v, want %v", got, want)
	}

	// Frozen: the calls time out at their budget, and are timed so; then (once Redis has
	// answered nothing for breakerSilence) the breaker holds calls back, untimed.
	r.Freeze()
	defer r.Thaw()
	frozen := time.Now()
	const budget = 100 * time.Millisecond
	fresh := keys.Tenant(policy.KindRevoked, "acme", "jti", "t-2")
	call := func() error {
		ctx, cancel := context.WithTimeout(t.Context(), budget)
		defer cancel()
		return g.Do(ctx, b.Get().Key(fresh).Build()).Error()
	}
	timedOut := 0
	for {
		err := call()
		if errors.Is(err, context.DeadlineExceeded) {
			timedOut++
			if timedOut > breakerFailures && time.Since(frozen) > breakerSilence+2*budget {
				t.Fatalf("call %d, %v into the freeze, still sent: want the breaker open after %v of silence", timedOut, time.Since(frozen), breakerSilence)
			}
			continue
		}
		if !errors.Is(err, errRedisPaused) || timedOut < breakerFailures || time.Since(lastSent) < breakerSilence {
			t.Fatalf("call %d, %v into the freeze and %v after the last answer: %v, want %v until %d calls and %v of silence, then %v",
				timedOut+1, time.Since(frozen), time.Since(lastSent), err, context.DeadlineExceeded, breakerFailures, breakerSilence, errRedisPaused)
		}
		break
	}
	if err := call(); !errors.Is(err, errRedisPaused) {
		t.Fatalf("with the breaker open: %v, want %v", err, errRedisPaused)
	}
	tm.mu.Lock()
	auth := slices.Clone(tm.took["auth"])
	tm.mu.Unlock()
	if len(auth) != 2+timedOut {
		t.Fatalf("auth calls timed = %d, want %d: the %d that timed out, not those held back", len(auth), 2+timedOut, timedOut)
	}
	for _, d := range auth[2:] {
		if d < budget*9/10 {
			t.Errorf("a call that ran out its %v budget was timed at %v, want what its caller waited", budget, d)
		}
	}
}
