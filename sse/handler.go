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

	"voicegate/proxy"
)

// HandlerOptions configures the streaming chat handler. Zero values pick the defaults named.
type HandlerOptions struct {
	// AlgoURL is the algorithm service's base URL; chat goes to POST {AlgoURL}/query. Required.
	AlgoURL *url.URL
	// Transport carries upstream requests; nil means proxy.NewTransport defaults.
	Transport http.RoundTripper
	// BufferPool holds the proxy's copy buffers; nil means a private pool of 2 KiB buffers.
	// Every open stream holds one for its whole life, and events are small, so big buffers
	// would only cost memory.
	BufferPool httputil.BufferPool
	// Registry records running streams for cancellation; nil means a private one.
	Registry *Registry
	// TrustedProxies decides whether X-Forwarded-For is passed on.
	TrustedProxies proxy.Prefixes
	// MaxBodyBytes bounds the request body; zero means 64 KiB.
	MaxBodyBytes int64
	// MaxMessageChars bounds "message" in characters; zero means 4000.
	MaxMessageChars int
	// MaxTokens is the largest "max_tokens" accepted; zero means 8192.
	MaxTokens int
	// DefaultModel is used when the request names none; empty means "default".
	DefaultModel string
	// MaxLineBytes, PingInterval and RetryAfter are passed to each Rewriter.
	MaxLineBytes int
	PingInterval time.Duration
	RetryAfter   time.Duration
	// Shutdown, when done, ends running streams with server_shutdown.
	Shutdown context.Context
	// UpstreamHeaders, if set, adds headers to the upstream request (identity, trace context).
	UpstreamHeaders func(in *http.Request, out http.Header)
	// Owner, if set, names the user and tenant of a request for the registry.
	Owner func(r *http.Request) (userID, tenantID string)
	// OnEvent, if set, is called for every event written (for metrics); see Options.OnEvent.
	OnEvent func(name string)
	// OnStreamStart and OnStreamEnd, if set, bracket every stream the upstream answered.
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

type streamKey struct{}

// errCancelledEarly is the cause of a stream cancelled before the upstream answered.
var errCancelledEarly = errors.New("sse: stream cancelled before the upstream answered")

// setStreamHeaders sets the headers of an event stream: no caching, and no buffering by nginx
// or other proxies in front of the gateway.
func setStreamHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
}

// writeCancelled answers with a stream that opens and is cancelled at once.
func writeCancelled(w http.ResponseWriter, requestID string, now func() time.Time) {
	if now == nil {
		now = time.Now
	}
	ms := now().UnixMilli()
	enc := newEncoder(requestID)
	b := enc.appendGatewayEvent(nil, EventStart, ms)
	b = enc.appendGatewayEvent(b, EventCancelled, ms, field("reason", "cancelled by request"))
	setStreamHeaders(w.Header())
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

// NewHandler returns the POST /api/v2/chat/stream handler: it validates the request, sends it
// to the algorithm service through a ReverseProxy, and rewrites the NDJSON answer into SSE.
// Failures before the upstream answers 200 are plain JSON errors; after that, in-stream events.
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
	if o.Registry == nil {
		o.Registry = NewRegistry(nil)
	}
	if o.BufferPool == nil {
		o.BufferPool = proxy.NewBufferPool(2 << 10)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	queryURL := o.AlgoURL.JoinPath("query")
	queryURL.RawQuery, queryURL.Fragment = "", ""
	if !strings.HasPrefix(queryURL.Path, "/") {
		queryURL.Path = "/" + queryURL.Path
	}

	rp := proxy.New(proxy.Options{
		Transport:       o.Transport,
		BufferPool:      o.BufferPool,
		TrustedProxies:  o.TrustedProxies,
		Code:            proxy.CodeAlgoService,
		Name:            "algorithm service",
		UpstreamHeaders: o.UpstreamHeaders,
		Rewrite: func(pr *httputil.ProxyRequest) {
			// The handler built the request's headers from scratch, so the algorithm service
			// sees only what the gateway decided to send: no client cookies or tokens.
			pr.Out.URL = cloneURL(queryURL)
			pr.Out.Host = ""
		},
		ModifyResponse: func(res *http.Response) error {
			if res.StatusCode != http.StatusOK {
				return &proxy.UpstreamStatusError{Status: res.StatusCode,
					RetryAfter: proxy.ParseRetryAfter(res.Header.Get("Retry-After"))}
			}
			st := res.Request.Context().Value(streamKey{}).(*Stream)
			if !st.state.CompareAndSwap(stateWaiting, stateStreaming) {
				return errCancelledEarly
			}
			res.Header = http.Header{}
			setStreamHeaders(res.Header)
			if o.OnStreamStart != nil {
				o.OnStreamStart()
			}
			var firstLine func()
			if o.OnFirstEvent != nil {
				firstLine = func() { o.OnFirstEvent(time.Since(st.Started)) }
			}
			res.ContentLength = -1
			res.TransferEncoding = nil
			st.rewriter = NewRewriter(res.Body, Options{
				RequestID:    st.RequestID,
				MaxLineBytes: o.MaxLineBytes,
				PingInterval: o.PingInterval,
				Ping:         st.writer.ping,
				Now:          o.Now,
				Cancel:       st.Cancelled(),
				Shutdown:     o.Shutdown,
				RetryAfter:   o.RetryAfter,
				OnEvent:      o.OnEvent,
				OnFirstLine:  firstLine,
			})
			res.Body = st.rewriter
			return nil
		},
	})

	mapError := rp.ErrorHandler
	rp.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
		if errors.Is(err, errCancelledEarly) || errors.Is(context.Cause(r.Context()), errCancelledEarly) {
			// Cancelled before the upstream answered: the client still gets the stream it
			// asked for, opened and cancelled, as if the cancel had come a moment later.
			st := r.Context().Value(streamKey{}).(*Stream)
			writeCancelled(w, st.RequestID, o.Now)
			return
		}
		mapError(w, r, err)
	}

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, perr := o.parse(w, r)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		st := &Stream{RequestID: q.RequestID, Started: time.Now()}
		if o.Owner != nil {
			st.UserID, st.TenantID = o.Owner(r)
		}
		remove, err := o.Registry.Add(st)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusConflict, Code: proxy.CodeConflict,
				Message: "a stream with this request_id is already running"})
			return
		}
		defer remove()

		body, err := json.Marshal(q)
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Cause: fmt.Errorf("sse: encode query: %w", err)})
			return
		}
		ctx, cancel := context.WithCancelCause(context.WithValue(r.Context(), streamKey{}, st))
		defer cancel(nil)
		// Until the upstream answers there is no Rewriter to watch for a cancel; this does.
		defer context.AfterFunc(st.ctx, func() {
			if st.state.CompareAndSwap(stateWaiting, stateCancelled) {
				cancel(errCancelledEarly)
			}
		})()
		out := r.WithContext(ctx)
		out.Method = http.MethodPost
		out.Body = io.NopCloser(bytes.NewReader(body))
		out.ContentLength = int64(len(body))
		out.GetBody = nil
		h := http.Header{}
		if proxy.PeerTrusted(r, o.TrustedProxies) {
			if v := r.Header["X-Forwarded-For"]; v != nil {
				h["X-Forwarded-For"] = v
			}
		}
		out.Header = h
		h.Set("Content-Type", "application/json")
		h.Set("Accept", "application/x-ndjson")
		h.Set("X-Request-ID", q.RequestID)
		// All writes to the client, the proxy's and the pings, go through one writer.
		st.writer = &PingWriter{ResponseWriter: w}
		defer st.writer.Close()
		rp.ServeHTTP(st.writer, out)
		if st.state.Load() == stateStreaming {
			if o.OnStreamEnd != nil {
				o.OnStreamEnd()
			}
			stats := st.rewriter.Stats()
			o.Log.DebugContext(r.Context(), "stream ended", "request_id", st.RequestID, "outcome", stats.Outcome,
				"lines_processed", stats.LinesProcessed, "lines_skipped", stats.LinesSkipped,
				"duration", time.Since(st.Started))
		}
	})
}

func cloneURL(u *url.URL) *url.URL {
	c := *u
	return &c
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
		if proxy.IsTooLarge(err) {
			return nil, proxy.TooLarge(o.MaxBodyBytes)
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
