package main

// Redis frozen rather than down: redis-server stopped with SIGSTOP keeps its port, the kernel
// keeps accepting connections for it, and nothing answers. The gateway must keep its time
// budgets all the same, and come back on its own once Redis does.

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// requestDurations returns, from g's access log, the duration the gateway itself took for each
// request whose ID starts with prefix: what it spent, without the test client's own scheduling.
func requestDurations(t *testing.T, g *testGateway, prefix string) []time.Duration {
	t.Helper()
	var out []time.Duration
	for _, rec := range logRecords(t, g) {
		id, _ := rec["request_id"].(string)
		if rec["msg"] != "request" || !strings.HasPrefix(id, prefix) {
			continue
		}
		text, _ := rec["duration"].(string) // JSON logs write durations as text
		d, err := time.ParseDuration(text)
		if err != nil {
			t.Fatalf("access log line without a duration: %v", rec)
		}
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// percentile is the p-th percentile (0 < p ≤ 1) of sorted d, nearest rank.
func percentile(d []time.Duration, p float64) time.Duration {
	return d[int(math.Ceil(p*float64(len(d))))-1]
}

// TestAuthRedisFrozen: while Redis is frozen for 7 s, 200 requests with fresh tokens (nothing
// about them is cached anywhere) get 503 AUTH_SERVICE_ERROR, each within AUTH_BUDGET + 25 ms as
// the gateway measures itself (p99); a gateway with AUTH_FAIL_OPEN=true serves the same
// requests (and fails its rate limits open) within AUTH_BUDGET + LIMIT_BUDGET + 25 ms. Within
// 2 s of Redis answering again, both serve fresh tokens normally.
//
// The latencies are the gateways' own (their access logs), so a busy test machine delays the
// test client, not the figures. Run it on its own with:
//
//	VOICEGATE_REQUIRE_REDIS=1 go test -race -count=1 -run '^TestAuthRedisFrozen$' -v .
func TestAuthRedisFrozen(t *testing.T) {
	const (
		authBudget  = 75 * time.Millisecond
		limitBudget = 100 * time.Millisecond
		freeze      = 7 * time.Second
		workers     = 20
		perWorker   = 10
	)
	r := startRedis(t)
	backend := okBackend(t)
	algo := doneAlgo(t)
	closed := startRun(t, nil, redisEnv(r, algo, backend, map[string]string{
		"AUTH_BUDGET": authBudget.String(), "LIMIT_BUDGET": limitBudget.String()}))
	open := startRun(t, nil, redisEnv(r, algo, backend, map[string]string{
		"AUTH_BUDGET": authBudget.String(), "LIMIT_BUDGET": limitBudget.String(), "AUTH_FAIL_OPEN": "true"}))
	w := watchTokens(t, closed, open)
	const doc = "/api/v2/documents/x"
	for _, g := range []*testGateway{closed, open} {
		wantStatus(t, call(t, g, "GET", doc, w.token(t, "u-warm", []string{"user"}, nil), ""), http.StatusOK)
	}

	// Fresh tokens, made before the freeze so that minting them costs the load nothing.
	tokens := make([]string, workers*perWorker)
	for i := range tokens {
		tokens[i] = w.token(t, fmt.Sprintf("u-frozen-%d", i), []string{"user"}, nil)
	}
	type answer struct {
		gw, status int
		code       string
		err        error
	}
	answers := make(chan answer, 2*len(tokens))
	r.Freeze()
	thawed := false
	defer func() {
		if !thawed {
			r.Thaw()
		}
	}()
	start := time.Now()
	// Each worker sends its requests a tenth of the freeze apart, the workers staggered, so the
	// 200 requests cover the whole freeze: the trouble used to start some seconds in, when the
	// client library's reconnection began.
	gap := freeze / perWorker
	var wg sync.WaitGroup
	for k := range workers {
		wg.Go(func() {
			for j := range perWorker {
				at := start.Add(time.Duration(j)*gap + time.Duration(k)*gap/workers)
				select {
				case <-t.Context().Done():
					return
				case <-time.After(time.Until(at)):
				}
				i := j*workers + k
				for gi, g := range []*testGateway{closed, open} {
					res, err := try(t.Context(), g, "GET", doc, tokens[i], "",
						map[string]string{"X-Request-ID": fmt.Sprintf("frozen-%d-%d", gi, i)})
					a := answer{gw: gi, err: err}
					if err == nil {
						a.status, a.code = res.StatusCode, errorCode(res)
					}
					answers <- a
				}
			}
		})
	}
	wg.Wait()
	frozenFor := time.Since(start)
	r.Thaw()
	thawed = true
	back := time.Now()
	close(answers)

	for a := range answers {
		switch {
		case a.err != nil:
			t.Errorf("gateway %d: request failed: %v", a.gw, a.err)
		case a.gw == 0 && (a.status != http.StatusServiceUnavailable || a.code != "AUTH_SERVICE_ERROR"):
			t.Errorf("fail-closed gateway: %d %s during the freeze, want 503 AUTH_SERVICE_ERROR", a.status, a.code)
		case a.gw == 1 && a.status != http.StatusOK:
			t.Errorf("fail-open gateway: %d %s during the freeze, want 200", a.status, a.code)
		}
	}
	if frozenFor < freeze-gap {
		t.Errorf("the requests took %v, want them to cover the %v freeze", frozenFor, freeze)
	}

	for _, c := range []struct {
		g     *testGateway
		name  string
		bound time.Duration
	}{
		{closed, "fail-closed", authBudget + 25*time.Millisecond},
		{open, "fail-open", authBudget + limitBudget + 25*time.Millisecond},
	} {
		gi := 0
		if c.g == open {
			gi = 1
		}
		d := requestDurations(t, c.g, fmt.Sprintf("frozen-%d-", gi))
		if len(d) != len(tokens) {
			t.Fatalf("%s gateway logged %d of the %d requests", c.name, len(d), len(tokens))
		}
		p50, p99 := percentile(d, 0.5), percentile(d, 0.99)
		t.Logf("%s gateway, %d requests during a %v freeze: p50 %v, p99 %v, max %v (bound %v)",
			c.name, len(d), frozenFor.Round(time.Millisecond), p50, p99, d[len(d)-1], c.bound)
		if p99 > c.bound {
			t.Errorf("%s gateway: p99 %v during the freeze, want at most %v", c.name, p99, c.bound)
		}
	}

	// Back: fresh tokens pass again within 2 s on both, nothing restarted.
	for _, g := range []*testGateway{closed, open} {
		for i := 0; ; i++ {
			tok := w.token(t, fmt.Sprintf("u-back-%d", i), []string{"user"}, nil)
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			res, err := try(ctx, g, "GET", doc, tok, "", nil)
			cancel()
			if err == nil && res.StatusCode == http.StatusOK {
				if g == closed {
					t.Logf("fail-closed gateway serves fresh tokens %v after Redis answered again", time.Since(back).Round(time.Millisecond))
				}
				break
			}
			if time.Since(back) > 2*time.Second {
				code := ""
				if res != nil {
					code = errorCode(res)
				}
				t.Fatalf("2s after Redis answered again: %v %s, want 200", describeResult(res, err), code)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
