package main

import (
	"bytes"
	"context"
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
	ended()

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

	var got bytes.Buffer
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := log.Replay(rctx, k, -1, func(b []byte) error { got.Write(b); return nil })
	if err != nil || !bytes.Equal(got.Bytes(), events) {
		t.Fatalf("replaying the stream after the sender stopped = %q, %v; want its events %q", got.Bytes(), err, events)
	}
}
