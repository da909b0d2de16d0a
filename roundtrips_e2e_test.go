package main

// What a chat stream costs Redis: one round trip to admit it (rates, quota, concurrency slot and
// its stream-directory entry) and one to release it, counted with Redis's MONITOR.

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// redisMonitor reads a Redis MONITOR feed. Commands that scripts run are left out (MONITOR
// shows them as "lua"), so what remains is one line per command a client sent.
type redisMonitor struct {
	t     *testing.T
	r     *testRedis
	conn  net.Conn
	lines chan string
	done  sync.WaitGroup
	n     int // markers sent
}

func monitorRedis(t *testing.T, r *testRedis) *redisMonitor {
	t.Helper()
	c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The whole test is bounded by this; a feed that stops fails it instead of hanging.
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := c.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	if line, err := br.ReadString('\n'); err != nil || line != "+OK\r\n" {
		t.Fatalf("MONITOR answered %q, %v", line, err)
	}
	m := &redisMonitor{t: t, r: r, conn: c, lines: make(chan string, 1024)}
	m.done.Add(1)
	go func() {
		defer m.done.Done()
		defer close(m.lines)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			m.lines <- strings.TrimSpace(line)
		}
	}()
	t.Cleanup(func() {
		c.Close()
		for range m.lines { // let the reader finish
		}
		m.done.Wait()
	})
	return m
}

// since returns the commands clients sent since the previous call (or since MONITOR began),
// each as its name and first argument, in lower case: it sends a marker of its own and collects every line
// before it.
func (m *redisMonitor) since() []string {
	m.t.Helper()
	m.n++
	marker := fmt.Sprintf("round-trip-marker-%d", m.n)
	m.r.Do(m.t, "ECHO", marker)
	var cmds []string
	for line := range m.lines {
		// 1764687000.123456 [0 127.0.0.1:54321] "evalsha" "ab12…" "2" …
		_, rest, ok := strings.Cut(line, "] ")
		if !ok || strings.Contains(line, " lua] ") {
			continue
		}
		if strings.Contains(rest, `"`+marker+`"`) {
			return cmds
		}
		if strings.HasPrefix(rest, `"echo" "round-trip-marker-`) {
			continue
		}
		f := strings.Fields(rest)
		cmds = append(cmds, strings.ToLower(strings.Join(f[:min(len(f), 2)], " ")))
	}
	m.t.Fatal("the MONITOR feed ended before the marker came back")
	return nil
}

// TestChatRedisRoundTrips: with rates, a quota, a class rate and a concurrency cap all in force
// and the stream announced to other instances, a chat stream sends Redis one command before the
// upstream is called (the admission script) and one after the stream ends (the release
// script), and the release is done before the client sees the end of the response.
func TestChatRedisRoundTrips(t *testing.T) {
	r := startRedis(t)
	release := make(chan struct{})
	algo := holdAlgo(t, release)
	// A long lease TTL keeps the renewer's periodic round out of the counted window.
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-full.json", "LEASE_TTL": "1h"})))
	w := watchTokens(t, g)
	tok := w.token(t, "u-rt", []string{"user"}, nil)
	mon := monitorRedis(t, r)

	// The first stream loads the scripts and fills the revocation cache, which later requests
	// of the token are served from.
	res, s := openStream(t, g, tok, "hello")
	readEvents(t, s)
	res.Body.Close()
	t.Logf("first stream: %q", mon.since())

	res, s = openStream(t, g, tok, "hold") // returns at stream_start: the upstream answered
	defer res.Body.Close()
	before := mon.since()
	if len(before) != 1 || !strings.HasPrefix(before[0], `"evalsha"`) {
		t.Errorf("before the upstream call the gateway sent Redis %q, want exactly one script", before)
	}
	entries := r.Do(t, "KEYS", "voicegate:stream:*")
	if keys, _ := entries.([]any); len(keys) != 1 || !strings.HasPrefix(fmt.Sprint(keys[0]), "voicegate:stream:{tenant-a}:") {
		t.Errorf("stream directory while the stream runs = %#v, want one entry under the tenant's tag", entries)
	}
	if n := r.Do(t, "ZCARD", "voicegate:lease:{tenant-a}:chat:u:u-rt"); n != int64(1) {
		t.Errorf("ZCARD of the user's chat slots = %#v while the stream runs, want 1", n)
	}
	mon.since() // the test's own commands

	close(release)
	if names := eventNames(readEvents(t, s)); len(names) == 0 || names[len(names)-1] != "stream_end" {
		t.Fatalf("events %v, want them to end with stream_end", names)
	}
	after := mon.since()
	if len(after) != 1 || !strings.HasPrefix(after[0], `"evalsha"`) {
		t.Errorf("after the stream the gateway sent Redis %q, want exactly one script", after)
	}
	// Read at EOF, before anything else is asked of the gateway: the release is done by now.
	if n := r.Do(t, "ZCARD", "voicegate:lease:{tenant-a}:chat:u:u-rt"); n != int64(0) {
		t.Errorf("ZCARD of the user's chat slots = %#v once the response ended, want 0", n)
	}
	if keys, _ := r.Do(t, "KEYS", "voicegate:stream:*").([]any); len(keys) != 0 {
		t.Errorf("stream directory once the response ended = %v, want empty", keys)
	}
}
