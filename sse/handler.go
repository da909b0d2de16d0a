package sse

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"voicegate/policy"
	"voicegate/proxy"
)

// HandlerOptions configures the streaming chat handler. Zero values pick the defaults named.
type HandlerOptions struct {
	// AlgoURL is the algorithm service's base URL; chat goes to POST {AlgoURL}/query. Required.
	AlgoURL *url.URL
	// Transport carries upstream requests; nil means proxy.NewTransport defaults. A request
	// whose dial failed may be sent again: its body can be.
	Transport http.RoundTripper
	// BufferPool holds the buffers streams read the upstream into; nil means a private pool of
	// 2 KiB buffers. Every open stream holds one for its whole life, and events are small, so
	// big buffers would only cost memory.
	BufferPool httputil.BufferPool
	// Registry records running streams for cancellation and drains; nil means a private one.
	Registry *Registry
	// Directory, if set, makes running streams known to every instance: each stream's entry is
	// a claim of its admission.
	Directory *Directory
	// Replay, if set, makes streams resumable: every event is also appended to it; a client that
	// loses its connection leaves its stream running for ResumeWindow (longer while someone
	// resumes it) and gets the rest with Last-Event-ID, on any instance; a drain tells clients to
	// resume elsewhere and keeps filling the log until the stream ends or the grace is over.
	Replay       ReplayLog
	ResumeWindow time.Duration
	// MaxBodyBytes bounds the request body; zero means 64 KiB.
	MaxBodyBytes int64
	// MaxMessageChars bounds "message" in characters; zero means 4000.
	MaxMessageChars int
	// MaxTokens is the largest "max_tokens" accepted; zero means 8192.
	MaxTokens int
	// DefaultModel is used when the request names none; empty means "default".
	DefaultModel string
	// Models, if set, are the only models POST /v1/chat/completions takes (GET /v1/models
	// lists them); another is refused with 404 model_not_found. Empty: any valid name.
	Models []string
	// MaxLineBytes and RetryAfter are passed to each Rewriter.
	MaxLineBytes int
	RetryAfter   time.Duration
	// PingInterval is how long a stream may be silent before a ping comment goes out; zero
	// means DefaultPingInterval, negative none.
	PingInterval time.Duration
	// WriteTimeout bounds every write to the client: one that does not take it in time ends its
	// stream, and the upstream request with it. Zero means 10 s.
	WriteTimeout time.Duration
	// Admit, if set, charges a valid request to the caller's rates and takes its concurrency
	// slot and its directory entry (claim; nil without a Directory), held until the stream ends
	// (policy.AdmitClaim). It answers a refused request itself (any error), except when the
	// claim is held (policy.ErrClaimed, unanswered): the stream runs, or its log is kept, and
	// the request is answered from the log. claimed reports that the claim was checked and
	// taken, the log's absence with it.
	Admit func(w http.ResponseWriter, r *http.Request, claim *policy.Claim) (release func(), claimed bool, err error)
	// AdmitReplay, if set, admits a request answered from a replay log (a resume, a repeat):
	// the caller's concurrency slot, held while it reads, and the rates every request pays,
	// never a generation's (policy.AdmitReplay). It answers a refused request itself.
	AdmitReplay func(w http.ResponseWriter, r *http.Request) (release func(), ok bool)
	// Resumes, if set, bounds how many requests this instance answers from replay logs at once
	// (SSE_MAX_RESUMES); one over it is refused with 503. Nil: no bound.
	Resumes *ResumeLimit
	// Outbound shapes the upstream request (forwarded-for, request ID, identity).
	Outbound proxy.Outbound
	// Owner, if set, names the user and tenant of a request for the registry.
	Owner func(r *http.Request) (userID, tenantID string)
	// Token, if set, names the token of a request (its ID and when it was issued), so that
	// revoking it ends the stream.
	Token func(r *http.Request) (tokenID string, issuedAt time.Time)
	// OnEvents, if set, is told how many events of each name a stream has sent (for metrics;
	// names as in Options.OnEvent): every 64 events and when the stream ends, since a metric
	// updated per event would cost more than the event.
	OnEvents func(name string, n int64)
	// OnStreamStart and OnStreamEnd, if set, bracket every stream the upstream answered, however
	// it ends.
	OnStreamStart, OnStreamEnd func()
	// OnFirstEvent, if set, is called with the time from the request to its first upstream line.
	OnFirstEvent func(time.Duration)
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Log receives one line per finished stream at debug level (the access log has the rest).
	Log *slog.Logger
}

// Request limits and defaults from DESIGN.md.
const (
	defaultTemperature = 0.7
	defaultMaxTokens   = 2048
	maxIDLen           = 256
)

// chatRequest is the client's body. Pointers tell "absent" from zero.
type chatRequest struct {
	Message        *string  `json:"message"`
	ConversationID string   `json:"conversation_id"`
	StreamID       string   `json:"stream_id"`
	RequestID      string   `json:"request_id"`
	Model          string   `json:"model"`
	Temperature    *float64 `json:"temperature"`
	MaxTokens      *int     `json:"max_tokens"`
}

type queryMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// queryRequest is the body of POST {ALGO_URL}/query.
type queryRequest struct {
	Messages       []queryMessage `json:"messages"`
	ConversationID string         `json:"conversation_id,omitempty"`
	StreamID       string         `json:"stream_id,omitempty"`
	RequestID      string         `json:"request_id"`
	Model          string         `json:"model"`
	Temperature    float64        `json:"temperature"`
	MaxTokens      int            `json:"max_tokens"`
	// EndUser is OpenAI's "user", the client's label for its own end user, passed on; the
	// caller's identity is in the identity headers.
	EndUser string `json:"end_user,omitempty"`
}

// FieldError names one invalid field in a VALIDATION_ERROR's details.
type FieldError struct {
	Field  string `json:"field"`
	Reason string `json:"reason"`
}

// setStreamHeaders sets the headers of an event stream: no caching, and no buffering by nginx
// or other proxies in front of the gateway.
func setStreamHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
}

// logCheckBound bounds asking whether a replay log is kept, when no admission asked already.
const logCheckBound = 250 * time.Millisecond

// errEnded is the cause of an upstream request cancelled because its stream was ended.
var errEnded = errors.New("sse: the stream was ended")

// NewHandler returns the POST /api/v2/chat/stream handler: it validates the request, sends it
// to the algorithm service, and rewrites the NDJSON answer into SSE. Failures before the
// upstream answers 200 are plain JSON errors; after that, in-stream events.
//
// A stream has two goroutines: one that reads the upstream, encodes its lines and writes them
// to the client, and the handler's, which pings a silent stream and notices a client gone (see
// pipe). Every write to the client has a deadline;
// however the stream ends — done, cancelled, drained, the client gone or not reading — the
// upstream request is cancelled and everything the stream held is released.
func NewHandler(o HandlerOptions) http.Handler {
	c := newChat(o)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, perr := c.o.parse(w, r)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		c.serve(w, r, q, v2Stream())
	})
}

// chat is a chat route's handler, whatever the format of its answer.
type chat struct {
	o        HandlerOptions
	queryURL *url.URL
	mapper   proxy.ErrorMapper
}

// newChat applies o's defaults.
func newChat(o HandlerOptions) *chat {
	if o.AlgoURL == nil {
		panic("sse: HandlerOptions.AlgoURL is required")
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = 64 << 10
	}
	if o.MaxMessageChars <= 0 {
		o.MaxMessageChars = 4000
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = 8192
	}
	if o.DefaultModel == "" {
		o.DefaultModel = "default"
	}
	if o.PingInterval == 0 {
		o.PingInterval = DefaultPingInterval
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.Registry == nil {
		o.Registry = NewRegistry()
	}
	if o.Transport == nil {
		o.Transport = proxy.NewTransport(proxy.TransportOptions{})
	}
	if o.BufferPool == nil {
		o.BufferPool = proxy.NewBufferPool(2 << 10)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	queryURL := o.AlgoURL.JoinPath("query")
	queryURL.RawQuery, queryURL.Fragment = "", ""
	if !strings.HasPrefix(queryURL.Path, "/") {
		queryURL.Path = "/" + queryURL.Path
	}
	return &chat{o: o, queryURL: queryURL, mapper: proxy.ErrorMapper{Code: proxy.CodeAlgoService, Name: "algorithm service"}}

}

// serve sends the validated query q to the algorithm service and answers r in format f.
func (c *chat) serve(w http.ResponseWriter, r *http.Request, q *queryRequest, f format) {
	o := &c.o
	// A single answer is neither logged nor resumed.
	replay := o.Replay
	if f.single {
		replay = nil
	}
	var user, tenant string
	if o.Owner != nil {
		user, tenant = o.Owner(r)
	}
	k := StreamKey{Tenant: tenant, User: user, RequestID: q.RequestID}
	if replay != nil && r.Header.Get("Last-Event-ID") != "" {
		// The same request again after a lost connection: the rest of the stream, never
		// a second generation.
		o.resume(w, r, k, notFound)
		return
	}
	// A repeat of a request whose log is kept is answered from that log, from its start:
	// never generated, nor charged, a second time. Without a directory the log is this
	// process's and asking costs nothing, so it is asked before anything is charged; with
	// one, the admission's claim asks, in the same step as it claims.
	if replay != nil && o.Directory == nil {
		if kept, _ := replay.Exists(r.Context(), k); kept {
			o.serveLog(w, r, k, -1, running)
			return
		}
	}
	// What the stream holds is released by whoever ends it last: this handler, or, once
	// the upstream answered, the goroutine that produces the stream (which may outlive the
	// handler when the stream is resumable).
	var held []func()
	handedOff := false
	defer func() {
		if !handedOff {
			runReverse(held)
		}
	}()
	// answerFromLog lets go of what was taken for a generation and answers from the log.
	answerFromLog := func() {
		runReverse(held)
		held = nil
		if replay == nil {
			proxy.WriteError(w, r, running)
			return
		}
		o.serveLog(w, r, k, -1, running)
	}
	claimed := false
	if o.Admit != nil {
		// Released after everything else the stream holds, and before the client sees the
		// end of the response: a client that starts its next stream at once finds its slot
		// free on every instance.
		release, ok, err := o.Admit(w, r, o.Directory.claim(k, logKey(replay, k)))
		if errors.Is(err, policy.ErrClaimed) {
			answerFromLog()
			return
		}
		if err != nil {
			return
		}
		claimed = ok
		held = append(held, release)
	}
	// The upstream request outlives the handler's context when the stream goes on without
	// its client (resuming); the stream's ending cancels it on every path.
	ctx, cancelUp := context.WithCancelCause(context.WithoutCancel(r.Context()))
	held = append(held, func() { cancelUp(nil) })
	stop := newEnding(func() { cancelUp(errEnded) })
	started := o.Now()
	st := newStream(q.RequestID, user, tenant, started, stop)
	if o.Token != nil {
		st.TokenID, st.IssuedAt = o.Token(r)
	}
	remove, err := o.Registry.Add(st)
	if err != nil {
		answerFromLog()
		return
	}
	held = append(held, remove)
	if replay != nil && !claimed {
		// No claim asked for the log (in memory, or the store did not answer the
		// admission): ask now, after Registry.Add, which a producer holds until its log is
		// complete. A log that cannot be asked in time is taken to be absent, as fair use
		// fails open.
		lctx, cancel := context.WithTimeout(r.Context(), logCheckBound)
		kept, _ := replay.Exists(lctx, k)
		cancel()
		if kept {
			answerFromLog()
			return
		}
	}
	// Until the upstream answers, a client that goes away ends the stream; after that, watch
	// decides (a resumable stream goes on without it).
	early := context.AfterFunc(r.Context(), func() { stop.end(endClient) })

	req, err := o.upstreamRequest(ctx, r, c.queryURL, q)
	if err != nil {
		early()
		proxy.WriteError(w, r, &proxy.Error{Cause: err})
		return
	}
	res, err := o.Transport.RoundTrip(req)
	early()
	if err == nil && res.StatusCode != http.StatusOK {
		err = &proxy.UpstreamStatusError{Status: res.StatusCode,
			RetryAfter: proxy.ParseRetryAfter(res.Header.Get("Retry-After"))}
		res.Body.Close()
	}
	if err != nil {
		if why := stop.reason(); why == endCancelled || why == endShutdown {
			// Ended before the upstream answered: the client still gets the stream it asked
			// for, opened and ended, as if the end had come a moment later.
			t := newTally(o.OnEvents)
			writeInterrupted(w, f.newFramer(o, q, t, nil), why)
			t.flush()
			return
		}
		proxy.WriteError(w, r, c.mapper.Map(r, err))
		return
	}

	if o.OnStreamStart != nil {
		o.OnStreamStart()
	}
	if o.OnStreamEnd != nil {
		held = append(held, o.OnStreamEnd) // however the stream ends
	}
	events := newTally(o.OnEvents)
	var firstLine func()
	if o.OnFirstEvent != nil {
		firstLine = func() { o.OnFirstEvent(o.Now().Sub(started)) }
	}
	// The headers go with the first write (pipe.flush): a stream's at once, a single answer's
	// once it is complete, when its status is known.
	rw := f.newFramer(o, q, events, firstLine)
	cw := &clientWriter{w: w, rc: http.NewResponseController(w), timeout: o.WriteTimeout}
	p := newPipe(rw, cw)
	if replay != nil {
		// Asked on the stream's own context, which ends with the stream.
		p.resumable(replay, k, o.ResumeWindow, func() bool { return replay.Watched(ctx, k) })
		held = append(held, replay.Produce(k))
	}
	if replay != nil {
		o.Registry.setDrain(st, func() { p.drain(stop) })
	}
	buf := o.BufferPool.Get()
	finished := make(chan struct{})
	handedOff = true
	go func() {
		defer close(finished)
		p.produce(res.Body, buf, stop)
		o.BufferPool.Put(buf)
		p.stopWindow()
		events.flush() // produce has returned: the tally is this goroutine's
		p.mu.Lock()
		stats := rw.Stats()
		p.mu.Unlock()
		outcome := stats.Outcome
		if p.failed.Load() || stop.reason() == endClient {
			outcome = "disconnected"
		}
		o.Log.Debug("stream ended", "request_id", q.RequestID, "outcome", outcome,
			"lines_processed", stats.LinesProcessed, "lines_skipped", stats.LinesSkipped,
			"duration", o.Now().Sub(started))
		runReverse(held)
	}()
	pingEvery := o.PingInterval
	if f.single {
		pingEvery = -1 // a ping would be part of the answer
	}
	p.watch(stop, finished, r.Context().Done(), pingEvery)
	select {
	case <-finished: // over and released; nothing writes to the client any more
	default:
		// It goes on without this client (resuming): nothing may write to the response once
		// the handler has returned.
		p.letGo()
	}
	cw.done()
}

// runReverse calls fs last first, as deferred calls would be.
func runReverse(fs []func()) {
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// rewriterOptions are a stream's Rewriter options; events are counted into t (nil: not).
func (o *HandlerOptions) rewriterOptions(requestID string, t *tally) Options {
	ro := Options{RequestID: requestID, MaxLineBytes: o.MaxLineBytes, Now: o.Now, RetryAfter: o.RetryAfter}
	if t != nil {
		ro.OnEvent = t.add
	}
	return ro
}

// tally counts a stream's events by name and reports them now and then. It is used by one
// goroutine at a time (the Rewriter's caller).
type tally struct {
	counts  map[string]int64
	pending int
	report  func(name string, n int64)
}

func newTally(report func(string, int64)) *tally {
	if report == nil {
		return nil
	}
	return &tally{counts: make(map[string]int64, 8), report: report}
}

func (t *tally) add(name string) {
	t.counts[name]++
	if t.pending++; t.pending >= 64 {
		t.flush()
	}
}

func (t *tally) flush() {
	if t == nil {
		return
	}
	for name, n := range t.counts {
		if n > 0 {
			t.report(name, n)
			t.counts[name] = 0
		}
	}
	t.pending = 0
}

// writeInterrupted answers with a stream that opens and is ended at once, for why (a single
// answer: the error it is).
func writeInterrupted(w http.ResponseWriter, rw framer, why string) {
	rw.Interrupt(why)
	w.WriteHeader(rw.Head(w.Header()))
	_, _ = w.Write(rw.Take(nil))
}

// upstreamRequest builds the request to the algorithm service from scratch, so that it carries
// only what the gateway decided to send: no client cookies or tokens.
func (o *HandlerOptions) upstreamRequest(ctx context.Context, in *http.Request, u *url.URL, q *queryRequest) (*http.Request, error) {
	body, err := json.Marshal(q)
	if err != nil {
		return nil, fmt.Errorf("sse: encode query: %w", err)
	}
	out, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("sse: upstream request: %w", err)
	}
	// A dial that failed sent nothing: the pool may try another replica with the same body.
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	h := out.Header
	o.Outbound.Shape(in, h)
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/x-ndjson")
	h.Set("X-Request-ID", q.RequestID) // the stream's, which the client may have chosen
	return out, nil
}

// parse reads and validates the chat request and builds the upstream query.
func (o *HandlerOptions) parse(w http.ResponseWriter, r *http.Request) (*queryRequest, *proxy.Error) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			return nil, &proxy.Error{Status: http.StatusUnsupportedMediaType, Code: proxy.CodeUnsupportedMedia,
				Message: "the request body must be application/json"}
		}
	}
	if r.ContentLength > o.MaxBodyBytes {
		return nil, proxy.TooLarge(o.MaxBodyBytes)
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, o.MaxBodyBytes))
	if err != nil {
		if perr := proxy.BodyReadError(err, o.MaxBodyBytes); perr != nil {
			return nil, perr
		}
		return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeInvalidJSON,
			Message: "could not read the request body", Cause: err}
	}
	var req chatRequest
	if err := json.Unmarshal(raw, &req); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			f := te.Field
			if f == "" {
				return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeInvalidJSON,
					Message: "the request body must be a JSON object"}
			}
			return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "invalid request", Details: []FieldError{{Field: f, Reason: "must be a " + jsonType(te.Type.Kind().String())}}}
		}
		return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeInvalidJSON,
			Message: "the request body is not valid JSON"}
	}

	var bad []FieldError
	q := &queryRequest{
		ConversationID: req.ConversationID,
		StreamID:       req.StreamID,
		RequestID:      req.RequestID,
		Model:          req.Model,
		Temperature:    defaultTemperature,
		MaxTokens:      defaultMaxTokens,
	}
	switch {
	case req.Message == nil:
		bad = append(bad, FieldError{"message", "required"})
	case strings.TrimSpace(*req.Message) == "":
		bad = append(bad, FieldError{"message", "must not be empty"})
	case !utf8.ValidString(*req.Message):
		bad = append(bad, FieldError{"message", "must be valid UTF-8"})
	case utf8.RuneCountInString(*req.Message) > o.MaxMessageChars:
		bad = append(bad, FieldError{"message", fmt.Sprintf("must be at most %d characters", o.MaxMessageChars)})
	default:
		q.Messages = []queryMessage{{Role: "user", Content: *req.Message}}
	}
	if req.Temperature != nil {
		if t := *req.Temperature; t < 0 || t > 2 {
			bad = append(bad, FieldError{"temperature", "must be between 0 and 2"})
		}
		q.Temperature = *req.Temperature
	}
	if req.MaxTokens != nil {
		if n := *req.MaxTokens; n < 1 || n > o.MaxTokens {
			bad = append(bad, FieldError{"max_tokens", fmt.Sprintf("must be between 1 and %d", o.MaxTokens)})
		}
		q.MaxTokens = *req.MaxTokens
	}
	if q.Model == "" {
		q.Model = o.DefaultModel
	} else if !proxy.ValidLabel(q.Model, maxIDLen) {
		bad = append(bad, FieldError{"model", proxy.LabelReason(maxIDLen)})
	}
	if q.ConversationID != "" && !proxy.ValidLabel(q.ConversationID, maxIDLen) {
		bad = append(bad, FieldError{"conversation_id", proxy.LabelReason(maxIDLen)})
	}
	if q.StreamID != "" && !proxy.ValidLabel(q.StreamID, maxIDLen) {
		bad = append(bad, FieldError{"stream_id", proxy.LabelReason(maxIDLen)})
	}
	if q.RequestID == "" {
		q.RequestID = proxy.RequestIDFrom(r.Context())
		if q.RequestID == "" {
			q.RequestID = proxy.NewRequestID()
		}
	} else if !proxy.ValidRequestID(q.RequestID) {
		bad = append(bad, FieldError{"request_id", proxy.RequestIDReason})
	}
	if len(bad) > 0 {
		return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
			Message: "invalid request: " + bad[0].Field + " " + bad[0].Reason, Details: bad}
	}
	return q, nil
}

func jsonType(kind string) string {
	switch kind {
	case "string":
		return "string"
	case "float32", "float64":
		return "number"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		return "whole number within range"
	}
	return kind
}
