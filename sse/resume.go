package sse

import (
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"voicegate/proxy"
)

// ResumeLimit bounds how many requests one instance answers from replay logs at once: resumes
// and repeats. Each holds a goroutine, a client connection and its buffers while it reads, and
// per-user caps do not bound an instance's share of them; this does.
type ResumeLimit struct {
	max    int64
	n      atomic.Int64
	peak   atomic.Int64 // the most answered at once since the last time none were
	onIdle func(peak int64)
}

// NewResumeLimit returns a bound of max resumes at once; max ≤ 0 means none. onIdle, if set,
// is called (on a goroutine of its own) each time the last of them ends, with the most there
// were at once since the previous time: after a storm of resumers, what they held can be given
// back at once.
func NewResumeLimit(max int, onIdle func(peak int64)) *ResumeLimit {
	return &ResumeLimit{max: int64(max), onIdle: onIdle}
}

// take takes a place, or reports that none is left.
func (l *ResumeLimit) take() bool {
	if l == nil || l.max <= 0 {
		return true
	}
	n := l.n.Add(1)
	if n > l.max {
		l.n.Add(-1)
		return false
	}
	for p := l.peak.Load(); n > p && !l.peak.CompareAndSwap(p, n); p = l.peak.Load() {
	}
	return true
}

func (l *ResumeLimit) give() {
	if l == nil || l.max <= 0 {
		return
	}
	if l.n.Add(-1) == 0 && l.onIdle != nil {
		if peak := l.peak.Swap(0); peak > 0 {
			go l.onIdle(peak)
		}
	}
}

// Len reports how many resumes are being answered.
func (l *ResumeLimit) Len() int {
	if l == nil {
		return 0
	}
	return int(l.n.Load())
}

// What a request answered from a log is told when there is no log to answer from.
var (
	// notFound: a resume. The stream is not the caller's, never ran, or its log expired; which
	// one is not said, so a request ID tells nobody else anything.
	notFound = &proxy.Error{Status: http.StatusNotFound, Code: proxy.CodeNotFound,
		Message: "no stream with this request_id to resume: it is not yours, never ran, or its log has expired"}
	// running: a repeat of a request whose stream runs but has no log yet (its upstream has not
	// answered), or whose stream is not resumable (SSE_RESUME_WINDOW is 0).
	running = &proxy.Error{Status: http.StatusConflict, Code: proxy.CodeConflict,
		Message: "a stream with this request_id is already running"}
)

// NewResumeHandler returns GET /api/v2/chat/stream/{request_id}: the caller's stream of that
// request ID, after the event Last-Event-ID names (from its start without one), then its live
// tail, on any instance. It uses the Replay, Owner, AdmitReplay, Resumes, WriteTimeout, Now and
// Log of o; without a Replay every stream is unknown to it (404).
func NewResumeHandler(o HandlerOptions) http.Handler {
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("request_id")
		if !proxy.ValidRequestID(id) {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "invalid request_id", Details: []FieldError{{"request_id", proxy.RequestIDReason}}})
			return
		}
		var user, tenant string
		if o.Owner != nil {
			user, tenant = o.Owner(r)
		}
		o.resume(w, r, StreamKey{Tenant: tenant, User: user, RequestID: id}, notFound)
	})
}

// resume answers with the rest of stream k after the event Last-Event-ID names (from the start
// without one); missing is the answer when no log is kept for k.
func (o *HandlerOptions) resume(w http.ResponseWriter, r *http.Request, k StreamKey, missing *proxy.Error) {
	after := int64(-1)
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n < 0 {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeValidation,
				Message: "Last-Event-ID must be the id of an event of the stream",
				Details: []FieldError{{"Last-Event-ID", "must be a whole number"}}})
			return
		}
		after = n
	}
	if o.Replay == nil {
		proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeNotFound, "streams cannot be resumed here (SSE_RESUME_WINDOW is 0)")
		return
	}
	o.serveLog(w, r, k, after, missing)
}

// serveLog answers r from stream k's replay log: the events after after (-1: from
// stream_start), then the live tail until stream_end. It takes a place under the instance's
// bound and the caller's concurrency slot first, and gives both back the moment it returns
// (the client gone included). What the log cannot give ends the answer honestly: an error
// event RESUME_GAP when events are missing, UPSTREAM_INCOMPLETE when the instance that produced
// the stream died, each followed by stream_end; missing when there is no log.
func (o *HandlerOptions) serveLog(w http.ResponseWriter, r *http.Request, k StreamKey, after int64, missing *proxy.Error) {
	if !o.Resumes.take() {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
			Message: "this instance answers as many resumed streams as it may (SSE_MAX_RESUMES); retry", RetryAfter: 1})
		return
	}
	defer o.Resumes.give()
	if o.AdmitReplay != nil {
		release, ok := o.AdmitReplay(w, r)
		if !ok {
			return
		}
		defer release()
	}
	cw := &clientWriter{w: w, rc: http.NewResponseController(w), timeout: o.WriteTimeout}
	defer cw.done()
	// The headers go out once the log is known to exist (Replay's first call has no events),
	// so that a client resuming a silent stream is answered at once; the retry field goes with
	// the first event (stream_start carries it when replaying from the start).
	started, retry := false, after >= 0
	start := func(b []byte) []byte {
		if !started {
			started = true
			setStreamHeaders(w.Header())
			w.WriteHeader(http.StatusOK)
		}
		if retry && len(b) > 0 {
			retry = false
			return append(strconv.AppendInt([]byte("retry: "), DefaultReconnect.Milliseconds(), 10), append([]byte("\n"), b...)...)
		}
		return b
	}
	emit := func(b []byte) error {
		if b = start(b); len(b) == 0 {
			return cw.rc.Flush()
		}
		return cw.write(b)
	}
	err := o.Replay.Replay(r.Context(), k, after, emit)
	o.Log.DebugContext(r.Context(), "resume ended", "request_id", k.RequestID, "after", after, "err", err)
	if err == nil || r.Context().Err() != nil {
		return
	}
	var gap *GapError
	var gone *GoneError
	end := func(last int64, code, msg, outcome string) {
		// In the format the stream was opened in.
		_ = cw.write(start(gapEnder(k.RequestID)(k.RequestID, last, code, msg, outcome, o.Now().UnixMilli())))
	}
	switch {
	case errors.Is(err, ErrNoReplay) && !started:
		proxy.WriteError(w, r, missing)
	case errors.As(err, &gap):
		end(gap.After, CodeResumeGap, "the replay log no longer holds the events after Last-Event-ID; the stream cannot be resumed from there", "incomplete")
	case errors.As(err, &gone):
		end(gone.After, CodeUpstreamIncomplete, "the gateway instance producing the stream stopped before it ended", "incomplete")
	case errors.Is(err, errReaderStopped):
		// This instance is stopping: the response ends, and the client resumes elsewhere.
	case !started:
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
			Message: "the replay log cannot be read", Cause: err})
	default:
		o.Log.Warn("resuming a stream failed", "request_id", k.RequestID, "err", proxy.Describe(err))
	}
}

// logKey is the Redis key of k's log when log keeps it in Redis, for an admission's claim to
// need absent; "" otherwise (in memory, the handler asks the log itself).
func logKey(log ReplayLog, k StreamKey) string {
	if rl, ok := log.(*RedisReplay); ok {
		return rl.key(k)
	}
	return ""
}
