package main

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"voicegate/sse"
)

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
