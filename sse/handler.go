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
	// MaxBodyBytes bounds the request body; zero means 64 KiB.
	MaxBodyBytes int64
	// MaxMessageChars bounds "message" in characters; zero means 4000.
	MaxMessageChars int
	// MaxTokens is the largest "max_tokens" accepted; zero means 8192.
	MaxTokens int
	// DefaultModel is used when the request names none; empty means "default".
	DefaultModel string
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
	// (policy.Admit). It answers a refused request itself.
	Admit func(w http.ResponseWriter, r *http.Request, claim *policy.Claim) (release func(), ok bool)
	// Outbound shapes the upstream request (forwarded-for, request ID, identity).
	Outbound proxy.Outbound
	// Owner, if set, names the user and tenant of a request for the registry.
	Owner func(r *http.Request) (userID, tenantID string)
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
	mapper := proxy.ErrorMapper{Code: proxy.CodeAlgoService, Name: "algorithm service"}

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, perr := o.parse(w, r)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		var user, tenant string
		if o.Owner != nil {
			user, tenant = o.Owner(r)
		}
		if o.Admit != nil {
			// Released after everything else the stream holds, and before the client sees the
			// end of the response: a client that starts its next stream at once finds its slot
			// free on every instance.
			release, ok := o.Admit(w, r, o.Directory.claim(q.RequestID, user, tenant))
			if !ok {
				return
			}
			defer release()
		}
		ctx, cancelUp := context.WithCancelCause(r.Context())
		defer cancelUp(nil)
		stop := newEnding(func() { cancelUp(errEnded) })
		started := o.Now()
		remove, err := o.Registry.Add(newStream(q.RequestID, user, tenant, started, stop))
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusConflict, Code: proxy.CodeConflict,
				Message: "a stream with this request_id is already running"})
			return
		}
		defer remove()

		req, err := o.upstreamRequest(ctx, r, queryURL, q)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Cause: err})
			return
		}
		res, err := o.Transport.RoundTrip(req)
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
				writeInterrupted(w, o.rewriterOptions(q.RequestID, t), why)
				t.flush()
				return
			}
			proxy.WriteError(w, r, mapper.Map(r, err))
			return
		}

		if o.OnStreamStart != nil {
			o.OnStreamStart()
		}
		if o.OnStreamEnd != nil {
			defer o.OnStreamEnd() // however the stream ends
		}
		events := newTally(o.OnEvents)
		defer events.flush() // after produce has returned: the tally is the handler's again
		ro := o.rewriterOptions(q.RequestID, events)
		if o.OnFirstEvent != nil {
			ro.OnFirstLine = func() { o.OnFirstEvent(o.Now().Sub(started)) }
		}
		rw := NewRewriter(ro)
		setStreamHeaders(w.Header())
		w.WriteHeader(http.StatusOK)
		cw := &clientWriter{w: w, rc: http.NewResponseController(w), timeout: o.WriteTimeout}
		p := newPipe(rw, cw)
		buf := o.BufferPool.Get()
		produced := make(chan struct{})
		go func() {
			defer close(produced)
			p.produce(res.Body, buf, stop)
		}()
		p.watch(stop, produced, r.Context().Done(), o.PingInterval)
		o.BufferPool.Put(buf)
		cw.done()
		delivered := !p.failed.Load() && stop.reason() != endClient

		p.mu.Lock()
		stats := rw.Stats()
		p.mu.Unlock()
		outcome := stats.Outcome
		if !delivered {
			outcome = "disconnected"
		}
		o.Log.DebugContext(r.Context(), "stream ended", "request_id", q.RequestID, "outcome", outcome,
			"lines_processed", stats.LinesProcessed, "lines_skipped", stats.LinesSkipped,
			"duration", o.Now().Sub(started))
	})
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

// writeInterrupted answers with a stream that opens and is ended at once, for why.
func writeInterrupted(w http.ResponseWriter, o Options, why string) {
	rw := NewRewriter(o)
	rw.Interrupt(why)
	setStreamHeaders(w.Header())
	w.WriteHeader(http.StatusOK)
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
	} else if !validID(q.Model) {
		bad = append(bad, FieldError{"model", "must be at most 256 printable characters"})
	}
	if q.ConversationID != "" && !validID(q.ConversationID) {
		bad = append(bad, FieldError{"conversation_id", "must be at most 256 printable characters"})
	}
	if q.StreamID != "" && !validID(q.StreamID) {
		bad = append(bad, FieldError{"stream_id", "must be at most 256 printable characters"})
	}
	if q.RequestID == "" {
		q.RequestID = proxy.RequestIDFrom(r.Context())
		if q.RequestID == "" {
			q.RequestID = proxy.NewRequestID()
		}
	} else if !proxy.ValidRequestID(q.RequestID) {
		bad = append(bad, FieldError{"request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -"})
	}
	if len(bad) > 0 {
		return nil, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
			Message: "invalid request: " + bad[0].Field + " " + bad[0].Reason, Details: bad}
	}
	return q, nil
}

// validID accepts identifiers that are safe to log and forward: printable, no control
// characters, bounded.
func validID(s string) bool {
	if len(s) > maxIDLen || !utf8.ValidString(s) {
		return false
	}
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
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

// CancelOptions configures the cancel handler.
type CancelOptions struct {
	Registry *Registry
	// Allowed, if set, decides whether the caller of r may cancel s (ownership).
	Allowed func(r *http.Request, s *Stream) bool
	// Remote, if set, is asked to cancel a stream this instance does not run; it reports
	// ErrStreamNotFound when no instance runs it.
	Remote func(ctx context.Context, r *http.Request, requestID string) error
}

// NewCancelHandler returns POST /api/v2/chat/cancel: {"request_id": "..."} ends that stream
// with stream_cancelled.
func NewCancelHandler(o CancelOptions) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RequestID string `json:"request_id"`
		}
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
		if err := dec.Decode(&req); err != nil {
			if proxy.IsTooLarge(err) {
				proxy.WriteError(w, r, proxy.TooLarge(4<<10))
				return
			}
			proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeInvalidJSON, "the request body must be a JSON object with request_id")
			return
		}
		if !proxy.ValidRequestID(req.RequestID) {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "request_id is required", Details: []FieldError{{"request_id", "required"}}})
			return
		}
		var allowed func(*Stream) bool
		if o.Allowed != nil {
			allowed = func(s *Stream) bool { return o.Allowed(r, s) }
		}
		err := o.Registry.Cancel(req.RequestID, allowed)
		if errors.Is(err, ErrStreamNotFound) && o.Remote != nil {
			err = o.Remote(r.Context(), r, req.RequestID)
		}
		switch {
		case errors.Is(err, ErrStreamNotFound):
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "no running stream has this request_id")
		case errors.Is(err, ErrNotOwner):
			proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "this stream belongs to another user")
		case err != nil:
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "could not reach the other gateway instances", Cause: err})
		default:
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			_ = json.NewEncoder(w).Encode(map[string]string{"request_id": req.RequestID, "status": "cancelled"})
		}
	})
}
