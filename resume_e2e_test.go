package main

// Resumable chat streams: a client cut off mid-answer resumes with Last-Event-ID on any
// instance and gets exactly the rest, from a replay log in Redis (or memory, on one instance).

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"voicegate/sse"
)

// resumeAlgo is an algorithm service whose answers are 30 lines: the first 10 at once, the
// rest once release is closed (or at once, for a message other than "gated"). It counts the
// requests it got and reports each one whose client went away before the answer was over.
type resumeAlgo struct {
	*fakeBackend
	calls     atomic.Int64
	release   chan struct{}
	cancelled chan struct{}
}

const resumeLines = 30

func newResumeAlgo(t *testing.T) *resumeAlgo {
	a := &resumeAlgo{release: make(chan struct{}), cancelled: make(chan struct{}, 16)}
	a.fakeBackend = newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		a.calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		gated := strings.Contains(string(body), `"gated"`)
		startNDJSON(w)
		for i := 1; i <= resumeLines; i++ {
			if i == 11 && gated {
				select {
				case <-a.release:
				case <-r.Context().Done():
					a.cancelled <- struct{}{}
					return
				}
			}
			typ := "generation_chunk"
			if i == resumeLines {
				typ = "generation_done"
			}
			ndjson(w, fmt.Sprintf(`{"type":%q,"content":"part %d"}`, typ, i))
		}
	})
	return a
}

// chatRequest sends a chat for token with request_id id; lastID, when not empty, resumes.
func chatRequest(t *testing.T, c *http.Client, base, token, id, message, lastID string) *http.Response {
	t.Helper()
	h := map[string]string{"Authorization": "Bearer " + token, "Content-Type": "application/json"}
	if lastID != "" {
		h["Last-Event-ID"] = lastID
	}
	return doRequest(t, c, "POST", base+"/api/v2/chat/stream",
		strings.NewReader(`{"message":"`+message+`","request_id":"`+id+`"}`), h)
}

// wantRest reads a resumed stream and checks that it holds exactly the events after after,
// each id one more than the last, through the answer's end and stream_end.
func wantRest(t *testing.T, s *sseReader, after int) {
	t.Helper()
	evs := readEvents(t, s)
	want := after + 1
	for _, ev := range evs {
		if ev.ID != strconv.Itoa(want) {
			t.Fatalf("resumed events %v: got id %q, want %d (raw:\n%s)", eventNames(evs), ev.ID, want, clipText(s.raw.String()))
		}
		want++
	}
	if names := eventNames(evs); len(names) < 2 || names[len(names)-2] != "generation_done" || names[len(names)-1] != "stream_end" {
		t.Fatalf("resumed events %v, want the rest of the answer through generation_done, then stream_end (raw:\n%s)", names, clipText(s.raw.String()))
	}
	if want != resumeLines+2 { // the lines, then stream_end
		t.Fatalf("resumed %d events after id %d, want the %d after it", len(evs), after, resumeLines+1-after)
	}
}

// readN reads n events of a stream after stream_start.
func readN(t *testing.T, s *sseReader, n int) {
	t.Helper()
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("first event %q, want stream_start", ev.Event)
	}
	for i := 1; i <= n; i++ {
		if ev := nextEvent(t, s); ev.ID != strconv.Itoa(i) {
			t.Fatalf("event %d has id %q", i, ev.ID)
		}
	}
}

// TestResumeAcrossInstances runs the resume cases on two instances sharing a real redis-server.
func TestResumeAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := newResumeAlgo(t)
	env := redisEnv(r, algo.fakeBackend, okBackend(t), with(roomyBudgets, map[string]string{
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
	r := startRedis(t)
	algo := newResumeAlgo(t)
	env := redisEnv(r, algo.fakeBackend, okBackend(t), with(roomyBudgets, map[string]string{
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
