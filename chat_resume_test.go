package main

// Resumable chat streams: a client cut off mid-answer resumes with Last-Event-ID on any
// instance and gets exactly the rest, from a replay log in Redis (or memory, on one instance);
// a repeat of a finished request is answered from its log; resumers share one reader.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/sse"
)

// TestResumeAcrossInstances runs the resume cases on two instances sharing a real redis-server.
func TestResumeAcrossInstances(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newResumeAlgo(t)
	env := redisEnv(r, algo.fakeAlgo, okBackend(t), with(roomyBudgets, map[string]string{
		"SSE_RESUME_WINDOW": "2s", "LOG_LEVEL": "debug"}))
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	alice := w.token(t, "u-alice", []string{"user"}, nil)
	mallory := w.token(t, "u-mallory", []string{"user"}, nil)

	t.Run("cut on A, resumed on B", func(t *testing.T) {
		before := algo.calls.Load()
		res := chatRequest(t, a.Client, a.URL, alice, "rs-cut", "gated", "")
		readN(t, wantStream(t, res), 10)
		res.Body.Close() // the connection breaks

		res = chatRequest(t, b.Client, b.URL, alice, "rs-cut", "gated", "10")
		defer res.Body.Close()
		s := wantStream(t, res)
		close(algo.release) // the rest of the answer, produced on A for the log
		wantRest(t, s, 10)
		if got := algo.calls.Load() - before; got != 1 {
			t.Errorf("the algorithm service got %d requests, want 1: a resumed stream is never generated twice", got)
		}

		// Finished: the rest is replayed from the log, and nothing new is generated.
		res = doRequest(t, a.Client, "GET", a.URL+"/api/v2/chat/stream/rs-cut", nil,
			map[string]string{"Authorization": "Bearer " + alice, "Last-Event-ID": "20"})
		wantRest(t, wantStream(t, res), 20)
		res.Body.Close()
		if got := algo.calls.Load() - before; got != 1 {
			t.Errorf("after resuming a finished stream the algorithm service got %d requests, want 1", got)
		}

		// Someone else's stream does not exist for them.
		res = doRequest(t, b.Client, "GET", b.URL+"/api/v2/chat/stream/rs-cut", nil,
			map[string]string{"Authorization": "Bearer " + mallory, "Last-Event-ID": "0"})
		wantError(t, res, http.StatusNotFound, "NOT_FOUND")
	})

	t.Run("cut and never resumed: cancelled after the window", func(t *testing.T) {
		algo.release = make(chan struct{})
		defer close(algo.release)
		res := chatRequest(t, a.Client, a.URL, alice, "rs-abandon", "gated", "")
		readN(t, wantStream(t, res), 10)
		cut := time.Now()
		res.Body.Close()
		select {
		case <-algo.cancelled:
			if d := time.Since(cut); d < 2*time.Second {
				t.Errorf("the upstream was cancelled %v after the cut, before the 2s window", d)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream of an abandoned stream was not cancelled within 10s of the cut")
		}
		// The log says so, to a resumer who comes too late.
		res = chatRequest(t, b.Client, b.URL, alice, "rs-abandon", "gated", "10")
		evs := readEvents(t, wantStream(t, res))
		res.Body.Close()
		if names := eventNames(evs); len(names) != 2 || names[0] != "error" || names[1] != "stream_end" ||
			evs[0].fields(t)["code"] != sse.CodeUpstreamIncomplete {
			t.Errorf("a late resume of an abandoned stream = %v (%v), want error UPSTREAM_INCOMPLETE, stream_end; B's log:\n%s",
				names, evs, clipText(b.Stderr.String()))
		}
	})

	t.Run("from before the log's start: RESUME_GAP", func(t *testing.T) {
		// Events 1-10 go out before the rest is released, so they are in batches of their own.
		algo.release = make(chan struct{})
		res := chatRequest(t, a.Client, a.URL, alice, "rs-gap", "gated", "")
		s := wantStream(t, res)
		readN(t, s, 10)
		close(algo.release)
		readEvents(t, s)
		res.Body.Close()
		// What a log trimmed by its length bound looks like: the oldest batches are gone, up to
		// and including the one holding event 4.
		key := "voicegate:replay:{tenant-a}:u-alice:rs-gap"
		eventually(t, 5*time.Second, "the log holds the stream's end", func() bool {
			last, _ := r.Do(t, "XREVRANGE", key, "+", "-", "COUNT", "1").([]any)
			return len(last) == 1 && strings.Contains(fmt.Sprint(last[0]), "stream_end")
		})
		entries, _ := r.Do(t, "XRANGE", key, "-", "+").([]any)
		for _, e := range entries {
			id := e.([]any)[0].(string)
			last, _ := strconv.Atoi(strings.TrimSuffix(id, "-1"))
			if last > 10 {
				t.Fatalf("event 4 is in a batch with events after 10: %v", entries)
			}
			r.Do(t, "XDEL", key, id)
			if last >= 4 {
				break
			}
		}
		res = chatRequest(t, b.Client, b.URL, alice, "rs-gap", "gated", "3")
		evs := readEvents(t, wantStream(t, res))
		res.Body.Close()
		if names := eventNames(evs); len(names) != 2 || names[0] != "error" || evs[0].fields(t)["code"] != sse.CodeResumeGap || names[1] != "stream_end" {
			t.Errorf("resume from before the log's start = %v (%v), want error RESUME_GAP, stream_end", names, evs)
		}
	})

	t.Run("unknown stream", func(t *testing.T) {
		wantError(t, chatRequest(t, b.Client, b.URL, alice, "rs-never", "hi", "4"), http.StatusNotFound, "NOT_FOUND")
	})
}

// TestResumeAfterDrainAndDeath: a draining instance tells its client to resume, and fills the
// log until the answer is complete; an instance that dies is noticed by the resumer within the
// heartbeat bound.
func TestResumeAfterDrainAndDeath(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newResumeAlgo(t)
	env := redisEnv(r, algo.fakeAlgo, okBackend(t), with(roomyBudgets, map[string]string{
		"SSE_RESUME_WINDOW": "5s", "SHUTDOWN_GRACE": "10s", "LOG_LEVEL": "debug"}))
	b := startRun(t, nil, env)
	w := watchTokens(t, b)
	alice := w.token(t, "u-alice", []string{"user"}, nil)

	t.Run("SIGTERM", func(t *testing.T) {
		a := startChildGateway(t, env)
		res := chatRequest(t, a.client, a.url, alice, "rs-drain", "gated", "")
		s := wantStream(t, res)
		readN(t, s, 10)
		if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		ev := nextEvent(t, s)
		if ev.Event != "server_shutdown" || ev.fields(t)["resume"] != true {
			t.Fatalf("on SIGTERM the client got %q %v, want server_shutdown telling it to resume", ev.Event, ev.Data)
		}
		if _, err := s.next(); err != io.EOF {
			t.Fatalf("after server_shutdown the response should end; got %v", err)
		}
		res.Body.Close()
		res = chatRequest(t, b.Client, b.URL, alice, "rs-drain", "gated", "10")
		defer res.Body.Close()
		rest := wantStream(t, res)
		close(algo.release) // A, draining, still produces the rest into the log
		wantRest(t, rest, 10)
	})

	t.Run("SIGKILL", func(t *testing.T) {
		algo.release = make(chan struct{})
		defer close(algo.release)
		a := startChildGateway(t, env)
		res := chatRequest(t, a.client, a.url, alice, "rs-kill", "gated", "")
		readN(t, wantStream(t, res), 10)
		res.Body.Close()
		res = chatRequest(t, b.Client, b.URL, alice, "rs-kill", "gated", "10")
		defer res.Body.Close()
		s := wantStream(t, res)
		a.kill()
		killed := time.Now()
		evs := readEvents(t, s)
		if names := eventNames(evs); len(names) != 2 || names[0] != "error" || evs[0].fields(t)["code"] != sse.CodeUpstreamIncomplete || names[1] != "stream_end" {
			t.Fatalf("resuming a stream whose instance died = %v (%v), want error UPSTREAM_INCOMPLETE, stream_end", names, evs)
		}
		t.Logf("the resumer was told %v after the kill", time.Since(killed))
		if d := time.Since(killed); d > 6*time.Second {
			t.Errorf("the resumer noticed the dead instance after %v, want within a few seconds", d)
		}
	})
}

// TestResumeInMemory: without Redis, one instance resumes its own streams from memory.
func TestResumeInMemory(t *testing.T) {
	algo := newResumeAlgo(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "JWT_SECRET": testSecret, "SSE_RESUME_WINDOW": "2s"})
	w := watchTokens(t, g)
	alice := w.token(t, "u-alice", []string{"user"}, nil)
	mallory := w.token(t, "u-mallory", []string{"user"}, nil)

	res := chatRequest(t, g.Client, g.URL, alice, "rm-cut", "gated", "")
	readN(t, wantStream(t, res), 10)
	res.Body.Close()
	res = chatRequest(t, g.Client, g.URL, alice, "rm-cut", "gated", "10")
	s := wantStream(t, res)
	close(algo.release)
	wantRest(t, s, 10)
	res.Body.Close()
	if n := algo.calls.Load(); n != 1 {
		t.Errorf("the algorithm service got %d requests, want 1", n)
	}
	res = doRequest(t, g.Client, "GET", g.URL+"/api/v2/chat/stream/rm-cut", nil,
		map[string]string{"Authorization": "Bearer " + alice, "Last-Event-ID": "25"})
	wantRest(t, wantStream(t, res), 25)
	res.Body.Close()
	res = doRequest(t, g.Client, "GET", g.URL+"/api/v2/chat/stream/rm-cut", nil,
		map[string]string{"Authorization": "Bearer " + mallory})
	wantError(t, res, http.StatusNotFound, "NOT_FOUND")
}

// resumePolicy writes the e2e policy with the chat class rate and chat concurrency caps given
// to a file of its own, and returns its path.
func resumePolicy(t *testing.T, chat policy.Rate, perUser, perTenant int) string {
	t.Helper()
	f := e2ePolicy(t)
	f.Limits.Classes = map[string]policy.Rate{"chat": chat}
	f.Limits.Concurrency["chat"] = policy.Concurrency{PerUser: perUser, PerTenant: perTenant}
	file := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, file, f)
	return file
}

// resumeGET resumes id for token on g after lastID ("": from the start).
func resumeGET(t *testing.T, g *testGateway, token, id, lastID string) *http.Response {
	t.Helper()
	h := map[string]string{"Authorization": "Bearer " + token}
	if lastID != "" {
		h["Last-Event-ID"] = lastID
	}
	return doRequest(t, g.Client, "GET", g.URL+"/api/v2/chat/stream/"+id, nil, h)
}

// sameEvents fails unless got is want, event for event.
func sameEvents(t *testing.T, what string, got, want []sseEvent) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d events %v, want the %d of the first answer %v", what, len(got), eventNames(got), len(want), eventNames(want))
	}
	for i := range want {
		if got[i].ID != want[i].ID || got[i].Event != want[i].Event || got[i].Data != want[i].Data {
			t.Fatalf("%s: event %d = %+v, want %+v", what, i, got[i], want[i])
		}
	}
}

// TestResumeFindsOnlyTheOwnersStream: a request ID belongs to its user. Another user of the
// same tenant finds nothing of someone else's stream, whatever the IDs: not when his user ID and
// request ID join into the same text as hers (u-a + x:y, u-a:x + y: the ':' attack on key
// names), not for her very request ID; and the same ID is free for a stream of his own.
func TestResumeFindsOnlyTheOwnersStream(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newResumeAlgo(t)
	env := redisEnv(r, algo.fakeAlgo, okBackend(t), with(roomyBudgets, map[string]string{"SSE_RESUME_WINDOW": "2s"}))
	a := startRun(t, nil, env)
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	alice := w.token(t, "u-a", []string{"user"}, nil)
	mallory := w.token(t, "u-a:x", []string{"user"}, nil)
	bob := w.token(t, "u-bob", []string{"user"}, nil)

	res := chatRequest(t, a.Client, a.URL, alice, "x:y", "hi", "")
	answer := readEvents(t, wantStream(t, res))
	res.Body.Close()
	if names := eventNames(answer); len(names) != resumeLines+2 || names[len(names)-1] != "stream_end" {
		t.Fatalf("Alice's answer: %v", names)
	}

	t.Run("user IDs and request IDs holding ':'", func(t *testing.T) {
		for _, g := range []*testGateway{a, b} {
			wantError(t, resumeGET(t, g, mallory, "y", ""), http.StatusNotFound, "NOT_FOUND")
			wantError(t, resumeGET(t, g, mallory, "y", "0"), http.StatusNotFound, "NOT_FOUND")
			wantError(t, chatRequest(t, g.Client, g.URL, mallory, "y", "hi", "5"), http.StatusNotFound, "NOT_FOUND")
		}
		// His own request "y" is generated for him, never answered from her log.
		before := algo.calls.Load()
		res := chatRequest(t, b.Client, b.URL, mallory, "y", "hi", "")
		evs := readEvents(t, wantStream(t, res))
		res.Body.Close()
		if got := algo.calls.Load() - before; got != 1 {
			t.Errorf("Mallory's own request y reached the algorithm service %d times, want 1", got)
		}
		if len(evs) == 0 || evs[0].fields(t)["request_id"] != "y" {
			t.Fatalf("Mallory's request y was answered with %v", evs)
		}
	})

	t.Run("a colleague and the same request_id", func(t *testing.T) {
		res := chatRequest(t, a.Client, a.URL, alice, "shared", "gated", "")
		defer res.Body.Close()
		readN(t, wantStream(t, res), 10)
		for _, g := range []*testGateway{a, b} {
			wantError(t, resumeGET(t, g, bob, "shared", ""), http.StatusNotFound, "NOT_FOUND")
			wantError(t, chatRequest(t, g.Client, g.URL, bob, "shared", "hi", "3"), http.StatusNotFound, "NOT_FOUND")
			wantError(t, cancelStream(t, g, bob, "shared", nil), http.StatusNotFound, "NOT_FOUND")
		}
		// Bob takes the same ID for a stream of his own while hers runs, and resumes his own.
		before := algo.calls.Load()
		res = chatRequest(t, b.Client, b.URL, bob, "shared", "hi", "")
		evs := readEvents(t, wantStream(t, res))
		res.Body.Close()
		if got := algo.calls.Load() - before; got != 1 || len(evs) != resumeLines+2 {
			t.Fatalf("Bob's stream of Alice's request ID: %d upstream calls, events %v; want his own answer", got, eventNames(evs))
		}
		res = resumeGET(t, a, bob, "shared", "28")
		wantRest(t, wantStream(t, res), 28)
		res.Body.Close()
	})
}

// TestChatRepeatServedFromLog: the same request again, without Last-Event-ID, while its stream
// runs or once it has ended, is answered from its replay log from the start: the algorithm
// service is asked once, the chat rate is charged once, and the log gets nothing more. In Redis
// (across instances) and in memory.
func TestChatRepeatServedFromLog(t *testing.T) {
	for _, shared := range []bool{true, false} {
		name := "memory"
		if shared {
			name = "redis"
		}
		t.Run(name, func(t *testing.T) {
			algo := newResumeAlgo(t)
			// One chat request an hour: a repeat that were charged would be refused.
			env := map[string]string{"ALGO_URL": algo.URL, "SSE_RESUME_WINDOW": "2s",
				"POLICY_FILE": resumePolicy(t, policy.Rate{Requests: 1, Per: policy.Duration(time.Hour), Burst: 1}, 10, 100)}
			var r *testRedis
			if shared {
				r = startRedis(t)
				env = redisEnv(r, algo.fakeAlgo, okBackend(t), with(roomyBudgets, env))
			}
			a := startRun(t, nil, env)
			b := a
			if shared {
				b = startRun(t, nil, env)
			}
			w := watchTokens(t, a, b)
			alice := w.token(t, "u-alice", []string{"user"}, nil)

			// Running: the repeat follows the one generation from its start.
			res := chatRequest(t, a.Client, a.URL, alice, "rp-1", "gated", "")
			first := wantStream(t, res)
			readN(t, first, 10)
			again := chatRequest(t, b.Client, b.URL, alice, "rp-1", "gated", "")
			close(algo.release)
			rest := readEvents(t, first)
			res.Body.Close()
			answer := readEventsFrom(t, first.raw.String())
			if len(answer) != resumeLines+2 || len(rest) == 0 {
				t.Fatalf("the first answer: %v", eventNames(answer))
			}
			sameEvents(t, "a repeat while the stream ran", readEvents(t, wantStream(t, again)), answer)
			again.Body.Close()

			// Ended: the repeat is the same answer again, from the log.
			var logLen int64
			key := "voicegate:replay:{tenant-a}:u-alice:rp-1"
			if shared {
				eventually(t, 5*time.Second, "the log holds the stream's end", func() bool {
					last, _ := r.Do(t, "XREVRANGE", key, "+", "-", "COUNT", "1").([]any)
					return len(last) == 1 && strings.Contains(fmt.Sprint(last[0]), "stream_end")
				})
				logLen, _ = r.Do(t, "XLEN", key).(int64)
			}
			for _, g := range []*testGateway{a, b} {
				res := chatRequest(t, g.Client, g.URL, alice, "rp-1", "gated", "")
				sameEvents(t, "a repeat of an ended stream", readEvents(t, wantStream(t, res)), answer)
				res.Body.Close()
			}
			if got := algo.calls.Load(); got != 1 {
				t.Errorf("the algorithm service got %d requests, want 1: a repeat is never generated again", got)
			}
			if shared {
				if n, _ := r.Do(t, "XLEN", key).(int64); n != logLen {
					t.Errorf("the log grew from %d to %d entries with the repeats, want nothing appended", logLen, n)
				}
			}
			// The one generation was charged: a new request ID is over the rate.
			wantError(t, chatRequest(t, a.Client, a.URL, alice, "rp-2", "hi", ""), http.StatusTooManyRequests, "RATE_LIMITED")
		})
	}
}

// readEventsFrom parses a whole event stream's text.
func readEventsFrom(t *testing.T, raw string) []sseEvent {
	t.Helper()
	return readEvents(t, newSSEReader(strings.NewReader(raw)))
}

// TestResumeTakesAChatSlot: a resume holds a chat slot of its user while it reads, like the
// stream it reads (across instances), and gives it back the moment its client leaves; an
// instance answers at most SSE_MAX_RESUMES of them at once.
func TestResumeTakesAChatSlot(t *testing.T) {
	r := startRedis(t)
	algo := newResumeAlgo(t)
	defer close(algo.release)
	pol := resumePolicy(t, policy.Rate{Requests: 1000, Per: policy.Duration(time.Minute), Burst: 100}, 2, 100)
	env := redisEnv(r, algo.fakeAlgo, okBackend(t), with(roomyBudgets, map[string]string{
		"SSE_RESUME_WINDOW": "5s", "POLICY_FILE": pol}))
	a := startRun(t, nil, with(env, map[string]string{"SSE_MAX_RESUMES": "1"}))
	b := startRun(t, nil, env)
	w := watchTokens(t, a, b)
	alice := w.token(t, "u-alice", []string{"user"}, nil)
	bob := w.token(t, "u-bob", []string{"user"}, nil)

	res := chatRequest(t, a.Client, a.URL, alice, "slot-1", "gated", "")
	defer res.Body.Close()
	readN(t, wantStream(t, res), 10)
	// The stream holds one of Alice's two slots, the resume the other.
	resumed := resumeGET(t, b, alice, "slot-1", "10")
	wantStream(t, resumed)
	wantError(t, resumeGET(t, b, alice, "slot-1", "10"), http.StatusTooManyRequests, "RATE_LIMITED")
	wantError(t, resumeGET(t, a, alice, "slot-1", "10"), http.StatusTooManyRequests, "RATE_LIMITED")
	resumed.Body.Close()
	eventually(t, 5*time.Second, "a resume is admitted once the last one's client left", func() bool {
		res := resumeGET(t, b, alice, "slot-1", "10")
		defer res.Body.Close()
		return res.StatusCode == http.StatusOK
	})

	// A's bound of one resume at a time, whoever asks.
	resB := chatRequest(t, a.Client, a.URL, bob, "slot-2", "gated", "")
	defer resB.Body.Close()
	readN(t, wantStream(t, resB), 10)
	held := resumeGET(t, a, bob, "slot-2", "10")
	defer held.Body.Close()
	wantStream(t, held)
	res503 := resumeGET(t, a, alice, "slot-1", "10")
	wantError(t, res503, http.StatusServiceUnavailable, "SERVICE_UNAVAILABLE")
	if res503.Header.Get("Retry-After") == "" {
		t.Error("a resume refused for the instance's bound has no Retry-After")
	}
}

// TestResumeCatchingUpIsWatched: a resume that starts within the resume window, with the whole
// backlog of an answer already in the log, and is still catching up when the window ends (the
// client reads slowly, and the backlog is megabytes), keeps the stream going: it
// counts as watched from its first read of the log, not only once it reaches the live tail. It
// gets the whole answer, never UPSTREAM_INCOMPLETE. In Redis and in memory. Mostly waiting for
// the window, both run in parallel with the package's other slow, waiting tests.
func TestResumeCatchingUpIsWatched(t *testing.T) {
	t.Parallel()
	const lines, lineBytes = 800, 8 << 10 // more than the sockets between gateway and client buffer
	const window = 5 * time.Second
	for _, shared := range []bool{true, false} {
		name := "memory"
		if shared {
			name = "redis"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			release := make(chan struct{})
			cancelled := make(chan struct{}, 1)
			chunk := strings.Repeat("x", lineBytes)
			algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
				startNDJSON(w)
				for i := 1; i <= lines; i++ {
					ndjson(w, fmt.Sprintf(`{"type":"generation_chunk","n":%d,"content":%q}`, i, chunk))
				}
				select {
				case <-release:
					ndjson(w, `{"type":"generation_done"}`)
				case <-r.Context().Done():
					cancelled <- struct{}{}
				}
			})
			env := map[string]string{"ALGO_URL": algo.URL, "SSE_RESUME_WINDOW": window.String(), "SSE_WRITE_TIMEOUT": "60s"}
			var r *testRedis
			if shared {
				r = startRedis(t)
				env = redisEnv(r, algo, okBackend(t), with(roomyBudgets, env))
			}
			g := startRun(t, nil, env)
			w := watchTokens(t, g)
			alice := w.token(t, "u-alice", []string{"user"}, nil)

			// The first client reads the backlog, all of it in the log by then, and leaves: the
			// window starts.
			res := chatRequest(t, g.Client, g.URL, alice, "slow-1", "hi", "")
			readN(t, wantStream(t, res), lines)
			res.Body.Close()
			left := time.Now()

			// A slow client: a small receive buffer, and it reads nothing until the window is
			// over; the gateway is then stuck writing the backlog to it.
			slow := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{Control: smallReceiveBuffer}).DialContext}}
			defer slow.CloseIdleConnections()
			req, _ := http.NewRequest("GET", g.URL+"/api/v2/chat/stream/slow-1", nil)
			req.Header.Set("Authorization", "Bearer "+alice)
			resumed, err := slow.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resumed.Body.Close()
			s := wantStream(t, resumed)
			if d := time.Since(left); d >= window {
				t.Fatalf("the resume was answered %v after the first client left, after the %v window: nothing to test", d, window)
			}
			// Not waiting for anything the test could see: this is how slowly the client reads.
			time.Sleep(time.Until(left.Add(window + 2*time.Second)))
			for i := 0; ; i++ {
				ev := nextEvent(t, s)
				if ev.Event == "error" {
					t.Fatalf("after %d events the resume got %s: the stream was abandoned while it was being caught up", i, ev.Data)
				}
				if ev.ID == strconv.Itoa(lines) {
					break
				}
			}
			select {
			case <-cancelled:
				t.Fatal("the upstream was cancelled while the stream was being resumed")
			default:
			}
			close(release)
			if names := eventNames(readEvents(t, s)); len(names) != 2 || names[0] != "generation_done" || names[1] != "stream_end" {
				t.Fatalf("the end of the resumed stream: %v, want generation_done, stream_end", names)
			}
		})
	}
}

// smallReceiveBuffer keeps a client socket's receive buffer at 16 KiB, as a slow mobile client's
// would be, so that what it does not read backs up into the sender.
func smallReceiveBuffer(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
	})
	if err != nil {
		return err
	}
	return serr
}

// TestResumeWaitersShareOneReader: a thousand clients resume streams and wait at their tails,
// then all leave at once; twice. No waiting client holds a Redis connection of its own (the
// instance's one reader serves them all: the connections stay the handful the clients open
// under any load), and within 5 s of their leaving the gateway's open files, goroutines
// (go_goroutines on /metrics) and Redis connections are back where they were at rest.
//
// Memory: a waiting client costs what a waiting HTTP request costs (its goroutines, its
// buffers), so RSS is asked to stay within that cost per client while they wait, which a
// connection or buffer kept per client (the old design's 450 KB) would break at once; once they
// have left, the gateway gives that memory back (returnMemory), and RSS is back within a fixed
// bound of its rest within 5 s, the same after each storm. The gateway is the built binary, run
// as a child process as in production, whose /proc this reads.
func TestResumeWaitersShareOneReader(t *testing.T) {
	needProcfs(t)
	const users, perUser, storms = 10, 100, 2
	r := startRedis(t)
	gates := make([]chan struct{}, storms+1) // one more event per storm, then the end
	for i := range gates {
		gates[i] = make(chan struct{})
	}
	defer close(gates[storms])
	algo := newFakeAlgo(t, func(w http.ResponseWriter, req *http.Request) {
		startNDJSON(w)
		for i := 1; i <= 10; i++ {
			ndjson(w, fmt.Sprintf(`{"type":"generation_chunk","content":"part %d"}`, i))
		}
		for _, gate := range gates {
			select {
			case <-gate:
			case <-req.Context().Done():
				return
			}
			ndjson(w, `{"type":"generation_chunk","content":"more"}`)
		}
		ndjson(w, `{"type":"generation_done"}`)
	})
	f := e2ePolicy(t)
	f.Limits.Concurrency["chat"] = policy.Concurrency{PerUser: 2 * perUser, PerTenant: 2 * users * perUser}
	pol := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, pol, f)
	gw := startGatewayProcess(t, buildGateway(t), "gateway", map[string]string{
		"ALGO_URL": algo.URL, "REDIS_URL": r.URL(), "POLICY_FILE": pol, "SSE_RESUME_WINDOW": "30s",
		"SSE_MAX_RESUMES": "2000", "AUTH_BUDGET": "2s", "LIMIT_BUDGET": "2s"})
	base := "http://" + gw.addr
	pid := gw.cmd.Process.Pid
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	redisClients := func() int {
		info, _ := r.Do(t, "INFO", "clients").(string)
		for line := range strings.Lines(info) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_clients:"); ok {
				n, _ := strconv.Atoi(v)
				return n - 1 // not this test's own
			}
		}
		t.Fatalf("INFO clients without connected_clients:\n%s", info)
		return 0
	}
	mb := func(n int64) float64 { return float64(n) / 1e6 }
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: -1}}
	defer client.CloseIdleConnections()
	goroutines := func() int {
		res := doRequest(t, client, "GET", base+"/metrics", nil, nil)
		defer res.Body.Close()
		body, _ := io.ReadAll(res.Body)
		for line := range strings.Lines(string(body)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "go_goroutines "); ok {
				n, _ := strconv.ParseFloat(v, 64)
				return int(n)
			}
		}
		t.Fatal("no go_goroutines on /metrics")
		return 0
	}

	tokens := make([]string, users)
	for u := range users {
		tokens[u] = tokenFor(t, "u-wait-"+strconv.Itoa(u), []string{"user"}, nil)
		res := doRequest(t, client, "POST", base+"/api/v2/chat/stream",
			strings.NewReader(`{"message":"hi","request_id":"wait-`+strconv.Itoa(u)+`"}`),
			map[string]string{"Authorization": "Bearer " + tokens[u], "Content-Type": "application/json"})
		defer res.Body.Close()
		readN(t, wantStream(t, res), 10)
	}
	// The streams run and their clients read them: this is the gateway at rest.
	settle(t.Context(), time.Second)
	fd0, rss0, rc0, gr0 := fds(), gw.rss(t), redisClients(), goroutines()
	t.Logf("at rest: %d fds, %d goroutines, RSS %.1f MB, %d Redis connections", fd0, gr0, mb(rss0), rc0)

	// What may come with load, whatever the number of waiters: the Redis clients open their
	// pipelined connections as load asks for them, and the reader its blocking one.
	const connSlack = 4
	// Each of those connections has its reader and writer goroutines; a scrape of /metrics is
	// served by one more, and the reader's calls in flight have theirs.
	const goroutineSlack = 2*connSlack + 6
	// What one waiting client may cost in memory, generously: it measures about 50 KB.
	const perWaiter = 150 << 10
	// Once they have left, the gateway gives their memory back to the system (returnMemory):
	// what stays is what a Go process keeps of a crowd it served whatever its size (goroutine
	// descriptors, grown maps, heap spans a few live objects pin), about 15 MB here, and it does
	// not grow from one storm to the next.
	const rssSlack, rssGrowth = 20 << 20, 4 << 20
	var rssAfter int64 // after the first storm
	for storm := range storms {
		// A thousand resumers reach the tails and wait there.
		type waiter struct {
			res *http.Response
			s   *sseReader
		}
		waiters := make([]waiter, users*perUser)
		last := strconv.Itoa(10 + storm)
		err := inParallel(len(waiters), 64, func(i int) error {
			u := i % users
			req, _ := http.NewRequestWithContext(t.Context(), "GET", base+"/api/v2/chat/stream/wait-"+strconv.Itoa(u), nil)
			req.Header.Set("Authorization", "Bearer "+tokens[u])
			req.Header.Set("Last-Event-ID", last)
			res, err := client.Do(req)
			if err != nil {
				return err
			}
			if res.StatusCode != http.StatusOK {
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				return fmt.Errorf("resumer %d: status %d: %s", i, res.StatusCode, body)
			}
			waiters[i] = waiter{res, newSSEReader(res.Body)}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		close(gates[storm]) // one more event on every stream: every resumer gets it from the tail
		want := strconv.Itoa(11 + storm)
		err = inParallel(len(waiters), 64, func(i int) error {
			ev, err := waiters[i].s.next()
			if err != nil || ev.ID != want {
				return fmt.Errorf("resumer %d: got %+v, %v; want event %s from the tail", i, ev, err, want)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		fd1, rss1, rc1, gr1 := fds(), gw.rss(t), redisClients(), goroutines()
		t.Logf("storm %d, %d resumers waiting: %d fds, %d goroutines, RSS %.1f MB, %d Redis connections",
			storm+1, len(waiters), fd1, gr1, mb(rss1), rc1)
		if rc1 > rc0+connSlack {
			t.Errorf("with %d resumers waiting the gateway holds %d Redis connections, %d at rest: waiters must share them",
				len(waiters), rc1, rc0)
		}
		if rss1 > rss0+perWaiter*int64(len(waiters)) {
			t.Errorf("with %d resumers waiting the gateway's RSS is %.1f MB, %.1f at rest: more than %d KB a waiter",
				len(waiters), mb(rss1), mb(rss0), perWaiter>>10)
		}

		// All leave at once.
		for _, w := range waiters {
			w.res.Body.Close()
		}
		left := time.Now()
		var fd2, rc2, gr2 int
		var rss2 int64
		back := func() bool {
			fd2, rc2, gr2, rss2 = fds(), redisClients(), goroutines(), gw.rss(t)
			return fd2 <= fd0+4 && rc2 <= rc0+connSlack && gr2 <= gr0+goroutineSlack && rss2 <= rss0+rssSlack
		}
		ok := back()
		for !ok && time.Since(left) < 5*time.Second {
			time.Sleep(50 * time.Millisecond)
			ok = back()
		}
		t.Logf("storm %d, %v after the resumers left: %d fds, %d goroutines, RSS %.1f MB, %d Redis connections", storm+1,
			time.Since(left).Round(time.Millisecond), fd2, gr2, mb(rss2), rc2)
		if !ok {
			t.Errorf("5 s after %d resumers left the gateway holds %d fds (%d at rest), %d goroutines (%d), %d Redis connections (%d) and RSS %.1f MB (%.1f)",
				len(waiters), fd2, fd0, gr2, gr0, rc2, rc0, mb(rss2), mb(rss0))
		}
		if storm == 0 {
			rssAfter = rss2
		} else if rss2 > rssAfter+rssGrowth {
			t.Errorf("after storm %d the gateway's RSS is %.1f MB, %.1f after the first: what a storm leaves behind grows", storm+1, mb(rss2), mb(rssAfter))
		}
	}
}

// stallingClient holds every pipeline until let is closed, and says on held when one is.
type stallingClient struct {
	rueidis.Client
	held chan struct{}
	let  chan struct{}
}

func (c *stallingClient) DoMulti(ctx context.Context, multi ...rueidis.Completed) []rueidis.RedisResult {
	select {
	case c.held <- struct{}{}:
	default:
	}
	<-c.let
	return c.Client.DoMulti(ctx, multi...)
}

// TestReplayStopFinishesTheSendUnderWay: a drained gateway stops its replay log's sender as soon
// as its last stream has ended, which is often while that stream's last events are on their way
// to Redis. They must still get there: a client resuming on another instance is owed them.
func TestReplayStopFinishesTheSendUnderWay(t *testing.T) {
	r := startRedis(t)
	sc := &stallingClient{Client: testClient(t, r), held: make(chan struct{}, 1), let: make(chan struct{})}
	log := sse.NewRedisReplay(sc, sse.RedisReplayOptions{Prefix: "t:", Retention: time.Minute})

	k := sse.StreamKey{Tenant: "acme", User: "u-1", RequestID: "r-last"}
	events := []byte("id: 0\nevent: stream_start\ndata: {}\n\nid: 1\nevent: generation_done\ndata: {}\n\nid: 2\nevent: stream_end\ndata: {}\n\n")
	ended := log.Produce(k)
	log.Append(k, 0, 2, events, true) // queued before Run: the first pipeline carries it
	producing := make(chan struct{})
	go func() {
		defer close(producing)
		ended() // returns once the end has been sent
	}()

	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		log.Run(ctx)
	}()
	<-sc.held // the stream's events are on their way
	stop()    // the gateway's last stream has ended: the sender is told to stop
	close(sc.let)
	<-done
	<-producing

	var got bytes.Buffer
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := log.Replay(rctx, k, -1, func(b []byte) error { got.Write(b); return nil })
	if err != nil || !bytes.Equal(got.Bytes(), events) {
		t.Fatalf("replaying the stream after the sender stopped = %q, %v; want its events %q", got.Bytes(), err, events)
	}
}

// heldReads holds every blocking XREAD until its context ends, as a reader would that Redis
// answers late; every other call goes through.
type heldReads struct{ rueidis.Client }

func (c heldReads) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	if cmd.IsBlock() {
		<-ctx.Done()
		return rueidis.NewErrorResult(ctx.Err())
	}
	return c.Client.Do(ctx, cmd)
}

// eventIDs are the ids of the events in b, joined by commas.
func eventIDs(b []byte) string {
	var ids []string
	for line := range strings.Lines(string(b)) {
		if id, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "id: "); ok {
			ids = append(ids, id)
		}
	}
	return strings.Join(ids, ",")
}

func encodedEvents(from, to int) []byte {
	var b bytes.Buffer
	for i := from; i <= to; i++ {
		fmt.Fprintf(&b, "id: %d\nevent: e\ndata: {}\n\n", i)
	}
	return b.Bytes()
}

// TestReplayEndBeforeProducerGone: a resumer waits at a log's tail; the stream's last events
// and the end of its producer's heartbeat land in one pipeline, and the reader has not read them
// (its XREAD is slow) when the heartbeat's end is noticed. The resumer reads the log once more
// before it says the producer is gone: it gets the end, not UPSTREAM_INCOMPLETE.
func TestReplayEndBeforeProducerGone(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	client := testClient(t, r)
	log := sse.NewRedisReplay(heldReads{client}, sse.RedisReplayOptions{Prefix: "t:", Retention: time.Minute})
	ctx, stop := context.WithCancel(context.Background())
	running := make(chan struct{})
	go func() {
		defer close(running)
		log.Run(ctx)
	}()
	defer func() { stop(); <-running }()

	k := sse.StreamKey{Tenant: "acme", User: "u-1", RequestID: "r-end"}
	ended := log.Produce(k)
	log.Append(k, 0, 2, append([]byte("event: stream_start\ndata: {}\n\n"), encodedEvents(1, 2)...), false)
	var got bytes.Buffer
	replayed := make(chan error, 1)
	waiting := make(chan struct{}, 1)
	go func() {
		replayed <- log.Replay(t.Context(), k, 2, func(b []byte) error {
			if len(b) == 0 {
				waiting <- struct{}{} // the log is there; nothing after 2 yet
			}
			got.Write(b)
			return nil
		})
	}()
	<-waiting
	log.Append(k, 3, 4, encodedEvents(3, 4), true)
	ended() // the last events and the heartbeat's end, in that order
	select {
	case err := <-replayed:
		if err != nil || eventIDs(got.Bytes()) != "3,4" {
			t.Fatalf("the resumer got %q, %v; want 3,4 and the end", eventIDs(got.Bytes()), err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the resumer was not told within 10s")
	}
}

// TestReplayFollowersShareTheReader: resumers of one log, from different places, at its tail
// while it grows: each gets exactly the events after its place, in order, through the end. One
// of them takes nothing for a while (its client is slow): the reader stops handing it events
// and it reads the log itself until it has caught up.
func TestReplayFollowersShareTheReader(t *testing.T) {
	r := startRedis(t)
	client := testClient(t, r)
	log := sse.NewRedisReplay(client, sse.RedisReplayOptions{Prefix: "t:", Retention: time.Minute})
	ctx, stop := context.WithCancel(context.Background())
	running := make(chan struct{})
	go func() {
		defer close(running)
		log.Run(ctx)
	}()
	defer func() { stop(); <-running }()

	const events, followers = 2000, 8
	k := sse.StreamKey{Tenant: "acme", User: "u-1", RequestID: "r-many"}
	ended := log.Produce(k)
	log.Append(k, 0, 0, []byte("event: stream_start\ndata: {}\n\n"), false)
	log.Append(k, 1, 10, encodedEvents(1, 10), false)

	type result struct {
		after int64
		got   string
		err   error
	}
	results := make(chan result, followers)
	slowLet := make(chan struct{})
	atTail := make(chan struct{}, followers)
	for i := range followers {
		after := int64(i) // 0..7: each from its own place
		go func() {
			var got bytes.Buffer
			n := 0
			err := log.Replay(t.Context(), k, after, func(b []byte) error {
				if len(b) == 0 {
					atTail <- struct{}{}
				}
				if after == 0 && n > 0 {
					<-slowLet // the slow client takes nothing more until let go
				}
				n++
				got.Write(b)
				return nil
			})
			results <- result{after, eventIDs(got.Bytes()), err}
		}()
	}
	for range followers {
		<-atTail
	}
	for i := 11; i <= events; i++ {
		log.Append(k, int64(i), int64(i), encodedEvents(i, i), i == events)
	}
	ended()
	close(slowLet)
	for range followers {
		select {
		case res := <-results:
			var want []string
			for i := res.after + 1; i <= events; i++ {
				want = append(want, strconv.FormatInt(i, 10))
			}
			if res.err != nil || res.got != strings.Join(want, ",") {
				t.Errorf("the resumer after %d got %.80q…, %v; want every event after it, through %d", res.after, res.got, res.err, events)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the resumers did not all finish within 20s")
		}
	}
}
