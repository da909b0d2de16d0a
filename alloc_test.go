package main

import (
	"bufio"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"
)

// TestStreamAllocationsPerEvent streams answers of 100 and of 2,100 lines through the whole
// gateway (middleware, metrics, access log) and counts the process's allocations: the fake
// algorithm service and the client allocate nothing per line, so the difference is what the
// gateway allocates per event. It must be none.
func TestStreamAllocationsPerEvent(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	var lines int
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		startNDJSON(w)
		rc := http.NewResponseController(w)
		chunk := []byte(`{"type":"generation_chunk","content":"some tokens of the answer"}` + "\n")
		done := []byte(`{"type":"generation_done"}` + "\n")
		for i := range lines {
			if i == lines-1 {
				w.Write(done)
			} else {
				w.Write(chunk)
			}
			rc.Flush()
		}
	})
	srv, _ := benchGateway(t, map[string]string{"ALGO_URL": algo.URL})
	client := benchClient(t)
	run := func(n int) uint64 {
		lines = n
		var a, b runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&a)
		res, err := client.Post(srv.URL+"/api/v2/chat/stream", "application/json", strings.NewReader(`{"message":"hi"}`))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, bufio.NewReader(res.Body))
		res.Body.Close()
		runtime.ReadMemStats(&b)
		return b.Mallocs - a.Mallocs
	}
	run(10)
	// The least of a few runs: the process's background work (the policy watcher, the metric
	// readers) allocates now and then too.
	small, big := run(100), run(2100)
	for range 2 {
		small, big = min(small, run(100)), min(big, run(2100))
	}
	perEvent := float64(big-small) / 2000
	t.Logf("about %d allocations per stream; %.3f per event", small, perEvent)
	if perEvent > 0.05 {
		t.Errorf("%.3f allocations per event, want none", perEvent)
	}
}
