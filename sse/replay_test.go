package sse_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"voicegate/sse"
)

// event is one encoded event with id n, as the gateway writes it.
func encoded(n int) string { return fmt.Sprintf("id: %d\nevent: e\ndata: {}\n\n", n) }

// collect replays k after id and returns the ids it got, and the error.
func collect(ctx context.Context, log sse.ReplayLog, k sse.StreamKey, after int64) (string, error) {
	var got strings.Builder
	err := log.Replay(ctx, k, after, func(b []byte) error {
		got.Write(b)
		return nil
	})
	var ids []string
	for _, line := range strings.Split(got.String(), "\n") {
		if id, ok := strings.CutPrefix(line, "id: "); ok {
			ids = append(ids, id)
		}
	}
	return strings.Join(ids, ","), err
}

// TestMemoryReplay: the memory log replays exactly what follows an id, also from inside a
// batch; tells a gap when the oldest batches were dropped, a producer gone before the end, and
// an unknown or expired stream.
func TestMemoryReplay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		log := sse.NewMemoryReplay(time.Minute, nil)
		k := sse.StreamKey{Tenant: "t", User: "u", RequestID: "r"}
		done := log.Produce(k)
		log.Append(k, 0, 0, []byte("event: stream_start\ndata: {}\n\n"), false)
		log.Append(k, 1, 3, []byte(encoded(1)+encoded(2)+encoded(3)), false)
		log.Append(k, 4, 5, []byte(encoded(4)+encoded(5)), true)
		done()
		if got, err := collect(t.Context(), log, k, 2); err != nil || got != "3,4,5" {
			t.Errorf("after 2: %q, %v; want 3,4,5", got, err)
		}
		if got, err := collect(t.Context(), log, k, 5); err != nil || got != "" {
			t.Errorf("after the last: %q, %v; want nothing", got, err)
		}
		if _, err := collect(t.Context(), log, sse.StreamKey{Tenant: "t", User: "someone else", RequestID: "r"}, 0); !errors.Is(err, sse.ErrNoReplay) {
			t.Errorf("another user's stream: %v, want ErrNoReplay", err)
		}

		// A long stream drops its oldest batches: a resume from before them is a gap.
		long := sse.StreamKey{Tenant: "t", User: "u", RequestID: "long"}
		done = log.Produce(long)
		for i := 1; i <= 5000; i++ {
			log.Append(long, int64(i), int64(i), []byte(encoded(i)), false)
		}
		var gap *sse.GapError
		if _, err := collect(t.Context(), log, long, 1); !errors.As(err, &gap) {
			t.Errorf("from before the log's start: %v, want a GapError", err)
		}
		// Production ends without stream_end: the resumer is told, not left waiting.
		done()
		var gone *sse.GoneError
		if got, err := collect(t.Context(), log, long, 4998); !errors.As(err, &gone) || got != "4999,5000" {
			t.Errorf("a producer gone: %q, %v; want 4999,5000 then a GoneError", got, err)
		}

		// A tail: the resumer waits for what comes, and is watched meanwhile.
		live := sse.StreamKey{Tenant: "t", User: "u", RequestID: "live"}
		done = log.Produce(live)
		log.Append(live, 0, 1, []byte("event: stream_start\ndata: {}\n\n"+encoded(1)), false)
		result := make(chan string, 1)
		go func() {
			got, _ := collect(t.Context(), log, live, 1)
			result <- got
		}()
		synctest.Wait()
		if !log.Watched(t.Context(), live) {
			t.Error("a stream being replayed is not watched")
		}
		log.Append(live, 2, 2, []byte(encoded(2)), true)
		done()
		if got := <-result; got != "2" {
			t.Errorf("the tail: %q, want 2", got)
		}
		// Kept for the retention after its last event, then gone.
		time.Sleep(2 * time.Minute)
		if _, err := collect(t.Context(), log, k, 0); !errors.Is(err, sse.ErrNoReplay) {
			t.Errorf("past the retention: %v, want ErrNoReplay", err)
		}
	})
}
