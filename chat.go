package main

import (
	"context"
	"log/slog"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/sse"
)

// chatStreams are this instance's running chat streams and what makes them reachable and
// resumable from every instance.
type chatStreams struct {
	running *sse.Registry // cancelled, revoked, drained and ended here
	// directory says which instance runs a stream, so a cancel or a revocation sent to any
	// instance reaches it; nil without Redis. Its subscription runs while serving.
	directory *sse.Directory
	replay    sse.ReplayLog // the replay log resumers read; nil with resuming off
	// redisReplay is replay when Redis keeps it: its appender and its resumers' reader run
	// until the drain is over; nil otherwise.
	redisReplay *sse.RedisReplay
}

// newChatStreams makes the registry of running streams and, with Redis, their directory; with
// SSE_RESUME_WINDOW, their replay log (a Redis Stream per stream on Redis's bulk connection, or
// memory).
func newChatStreams(cfg *config, redis sharedRedis, tel *telemetry, log *slog.Logger) *chatStreams {
	c := &chatStreams{running: sse.NewRegistry()}
	if redis.client != nil {
		c.directory = sse.NewDirectory(redis.client, cfg.RedisPrefix, cfg.InstanceID, log)
	}
	switch {
	case cfg.SSEResumeWindow <= 0:
	case redis.bulk != nil:
		c.redisReplay = sse.NewRedisReplay(redis.bulk, sse.RedisReplayOptions{Prefix: cfg.RedisPrefix,
			Retention: cfg.SSEResumeRetention, Log: log,
			OnSend: func(batches int) {
				tel.replayPipelines.Add(context.Background(), 1)
				tel.replayBatches.Add(context.Background(), int64(batches))
			}})
		c.replay = c.redisReplay
	default:
		c.replay = sse.NewMemoryReplay(cfg.SSEResumeRetention, nil)
	}
	return c
}

// chatHandlers are the chat routes' handlers, on the algorithm service's replicas.
type chatHandlers struct {
	stream, resume http.Handler // POST /api/v2/chat/stream, GET /api/v2/chat/stream/{request_id}
	answer         http.Handler // POST /api/v2/chat
	completions    http.Handler // POST /v1/chat/completions
}

// newChatHandlers are the chat routes' handlers; they share the registry of running streams,
// the directory, the replay log and the options.
func newChatHandlers(cfg *config, streams *chatStreams, algo *proxy.Pool, outbound proxy.Outbound,
	tel *telemetry, log *slog.Logger) chatHandlers {
	o := sse.HandlerOptions{
		AlgoURL:         algo.Primary(),
		Transport:       algo,
		Registry:        streams.running,
		Directory:       streams.directory,
		Replay:          streams.replay,
		ResumeWindow:    cfg.SSEResumeWindow,
		Outbound:        outbound,
		MaxBodyBytes:    cfg.ChatMaxBodyBytes,
		MaxMessageChars: cfg.ChatMaxMessage,
		MaxTokens:       cfg.ChatMaxTokens,
		DefaultModel:    cfg.ChatDefaultModel,
		Models:          cfg.OpenAIModels,
		MaxLineBytes:    cfg.SSEMaxLineBytes,
		PingInterval:    cfg.SSEPingInterval,
		WriteTimeout:    cfg.SSEWriteTimeout,
		Admit:           policy.AdmitClaim,
		AdmitReplay:     policy.AdmitReplay,
		Resumes:         sse.NewResumeLimit(cfg.SSEMaxResumes, returnMemory()),
		Owner:           auth.Owner,
		Token:           auth.Token,
		OnEvents:        func(name string, n int64) { tel.sseEvents.Add(context.Background(), n, tel.add1("event", name)...) },
		OnStreamStart:   func() { tel.sseActive.Add(context.Background(), 1) },
		OnStreamEnd:     func() { tel.sseActive.Add(context.Background(), -1) },
		OnFirstEvent:    func(d time.Duration) { tel.firstEvent.Record(context.Background(), d.Seconds()) },
		Log:             log,
	}
	return chatHandlers{stream: sse.NewHandler(o), resume: sse.NewResumeHandler(o),
		answer: sse.NewAnswerHandler(o), completions: sse.NewCompletionsHandler(o)}
}

// newModelsHandler is GET /v1/models: the models of OPENAI_MODELS, in OpenAI's list.
func newModelsHandler(models []string, started time.Time) http.Handler {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	list := struct {
		Object string  `json:"object"`
		Data   []model `json:"data"`
	}{Object: "list", Data: []model{}}
	for _, m := range models {
		list.Data = append(list.Data, model{ID: m, Object: "model", Created: started.Unix(), OwnedBy: "voicegate"})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proxy.WriteJSON(w, http.StatusOK, list)
	})
}

// newCancelHandler is POST /api/v2/chat/cancel: the caller's own streams, or with chat:admin
// (can) another user's of the tenant it addresses, on this instance or, through the directory,
// on any other.
func newCancelHandler(streams *chatStreams, can func(*http.Request, string) bool) http.Handler {
	o := sse.CancelOptions{
		Registry: streams.running,
		Owner:    auth.Owner,
		Tenant:   addressedTenant,
		Admin:    func(r *http.Request) bool { return can(r, "chat:admin") },
	}
	if dir := streams.directory; dir != nil {
		o.Remote = func(ctx context.Context, k sse.StreamKey) error {
			// Bounded like a revocation: a frozen Redis must not hold the request.
			ctx, stop := context.WithTimeout(ctx, remoteCancelBudget)
			defer stop()
			return dir.Cancel(ctx, k)
		}
	}
	return sse.NewCancelHandler(o)
}

// remoteCancelBudget bounds the Redis calls of a cancel for a stream on another instance (the
// lookup of its owner and the publication).
const remoteCancelBudget = 500 * time.Millisecond

// returnMemory gives what a storm of resumers held back to the operating system soon after the
// last of them has left, rather than at the runtime's next collection (up to two minutes away on
// an idle instance) and at its scavenger's pace: RSS is what an operator watches for leaks, and a
// thousand waiting clients' stacks and buffers are tens of megabytes. It collects settle after
// the last resumer's handler returned, once net/http has finished with its connection and let go
// of its buffers too. Crowds smaller than stormSize are left to the runtime, and it runs at most
// once every stormGap: a storm that ends sooner after the last collection is collected once the
// gap is over, not skipped.
func returnMemory() func(peak int64) {
	const stormSize, stormGap, settle = 64, time.Second, 500 * time.Millisecond
	var (
		mu   sync.Mutex
		last time.Time // when the last collection ran
		due  time.Time // when the scheduled collection runs; zero when none is scheduled
	)
	var collect func()
	collect = func() {
		mu.Lock()
		if wait := time.Until(due); wait > 0 { // a storm ended since it was scheduled
			time.AfterFunc(wait, collect)
			mu.Unlock()
			return
		}
		due, last = time.Time{}, time.Now()
		mu.Unlock()
		// Two collections: a buffer put back in a sync.Pool survives the first in the pool's
		// victim cache, and is freed by the second.
		runtime.GC()
		debug.FreeOSMemory()
	}
	return func(peak int64) {
		if peak < stormSize {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		scheduled := !due.IsZero()
		due = time.Now().Add(max(settle, stormGap-time.Since(last)))
		if !scheduled {
			time.AfterFunc(time.Until(due), collect)
		}
	}
}
