package sse

import (
	"bytes"
	"errors"
	"io"
	"strconv"
	"time"
)

// Defaults for Options.
const (
	DefaultMaxLineBytes = 1 << 20
	DefaultPingInterval = 15 * time.Second
	DefaultReconnect    = 2 * time.Second
)

// Options configures a Rewriter.
type Options struct {
	// RequestID is set on every event.
	RequestID string
	// MaxLineBytes bounds one upstream line; a longer one is dropped with an error event while
	// memory stays bounded. Zero means DefaultMaxLineBytes.
	MaxLineBytes int
	// Now is the clock for timestamps; nil means time.Now.
	Now func() time.Time
	// RetryAfter is the reconnect hint sent with server_shutdown; zero means 5s.
	RetryAfter time.Duration
	// Reconnect is the SSE retry: field sent with stream_start, how long an EventSource waits
	// before it reconnects after losing the stream; zero means DefaultReconnect.
	Reconnect time.Duration
	// OnEvent, if set, is called with the name of every event written (for metrics). Upstream
	// types outside the contract's (retrieval_*, generation_*, done, error) are reported as
	// "other", so the names form a small set.
	OnEvent func(name string)
	// OnFirstLine, if set, is called when the first upstream line arrives.
	OnFirstLine func()
}

// Stats describes a finished stream.
type Stats struct {
	LinesProcessed int64
	LinesSkipped   int64
	Outcome        string // "completed", "incomplete", "cancelled", "shutdown"
}

// Rewriter turns an upstream NDJSON body into a Server-Sent Events body: stream_start, one event
// per line named by its "type", in-stream errors, and stream_end. It does no I/O and holds no
// goroutine, timer or lock: the upstream's bytes go in through Write, whatever their chunk
// boundaries, the end of the upstream through End, an interruption through Interrupt, and the
// encoded events come out through Take, as soon as each is complete.
type Rewriter struct {
	opts Options
	enc  *encoder
	now  func() time.Time

	out      []byte // encoded events not yet taken
	partial  []byte // an incomplete line carried between writes
	dropping bool   // inside an over-long line, skipping to its end

	finished bool
	start    time.Time
	lineNo   int64
	tail     int64 // events after the last line (the end's): ids lineNo+1, lineNo+2, …
	stats    Stats
}

// Interruption reasons, also the stream outcomes they lead to.
const (
	stopCancelled = "cancelled"
	stopShutdown  = "shutdown"
)

// NewRewriter returns a Rewriter; it opens the stream (stream_start) at once.
func NewRewriter(opts Options) *Rewriter {
	if opts.MaxLineBytes <= 0 {
		opts.MaxLineBytes = DefaultMaxLineBytes
	}
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = 5 * time.Second
	}
	if opts.Reconnect <= 0 {
		opts.Reconnect = DefaultReconnect
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	rw := &Rewriter{opts: opts, enc: newEncoder(opts.RequestID), now: now}
	rw.start = rw.now()
	rw.out = append(rw.out, "retry: "...)
	rw.out = strconv.AppendInt(rw.out, opts.Reconnect.Milliseconds(), 10)
	rw.out = append(rw.out, '\n')
	rw.out = rw.enc.appendGatewayEvent(rw.out, -1, EventStart, rw.start.UnixMilli())
	rw.emitted(EventStart)
	return rw
}

// LastID is the id of the last event encoded: every event but stream_start has one, increasing
// by one from event to event (an upstream line's is its line number), so a client that resumes
// after an id is owed exactly the events with greater ones. Zero before the first.
func (rw *Rewriter) LastID() int64 { return rw.lineNo + rw.tail }

// Stats reports the stream's counters; final once Finished.
func (rw *Rewriter) Stats() Stats { return rw.stats }

// Finished reports whether the stream has ended: nothing more is accepted.
func (rw *Rewriter) Finished() bool { return rw.finished }

// Pending reports how many encoded bytes wait to be taken.
func (rw *Rewriter) Pending() int { return len(rw.out) }

// Take returns the events encoded so far, appended to dst, and forgets them. Passing the
// previous result back as dst[:0] makes the two sides swap buffers and allocate nothing.
func (rw *Rewriter) Take(dst []byte) []byte {
	if len(rw.out) == 0 {
		return dst
	}
	if len(dst) == 0 {
		// Swap: the caller gets the filled buffer, the rewriter goes on in the caller's.
		out := rw.out
		rw.out = dst[:0]
		if cap(rw.out) > 64<<10 {
			rw.out = nil // let a buffer grown by an over-long event go
		}
		return out
	}
	dst = append(dst, rw.out...)
	rw.out = rw.out[:0]
	return dst
}

// Write consumes upstream bytes. It never fails: what cannot be used becomes error events. Bytes
// after the stream finished are ignored.
func (rw *Rewriter) Write(data []byte) (int, error) {
	n := len(data)
	for len(data) > 0 && !rw.finished {
		nl := bytes.IndexByte(data, '\n')
		if rw.dropping {
			if nl < 0 {
				return n, nil
			}
			rw.dropping = false
			data = data[nl+1:]
			continue
		}
		if nl < 0 {
			if len(rw.partial)+len(data) > rw.opts.MaxLineBytes {
				rw.tooLong()
				return n, nil
			}
			rw.partial = append(rw.partial, data...)
			return n, nil
		}
		line := data[:nl]
		data = data[nl+1:]
		if len(rw.partial) > 0 {
			if len(rw.partial)+len(line) > rw.opts.MaxLineBytes {
				rw.tooLong()
				rw.dropping = false // this line ended here
				continue
			}
			rw.partial = append(rw.partial, line...)
			line = rw.partial
		}
		if len(line) > rw.opts.MaxLineBytes {
			rw.tooLong()
			rw.dropping = false
			continue
		}
		rw.line(line)
		rw.clearPartial()
	}
	return n, nil
}

func (rw *Rewriter) clearPartial() {
	if cap(rw.partial) > 64<<10 {
		rw.partial = nil
		return
	}
	rw.partial = rw.partial[:0]
}

// tooLong reports an over-long line and skips the rest of it.
func (rw *Rewriter) tooLong() {
	rw.lineNo++
	rw.stats.LinesSkipped++
	rw.clearPartial()
	rw.dropping = true
	rw.lineEvent(EventError,
		field("code", CodeLineTooLong),
		field("message", "an upstream line exceeded the line limit and was skipped"),
		field("line_number", rw.lineNo),
		field("fatal", false))
}

// line turns one complete upstream line into an event.
func (rw *Rewriter) line(line []byte) {
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if len(bytes.Trim(line, " \t\r")) == 0 {
		return // blank lines separate nothing in NDJSON; ignore them
	}
	rw.lineNo++
	if rw.lineNo == 1 && rw.opts.OnFirstLine != nil {
		rw.opts.OnFirstLine()
	}
	out, typ, ok := rw.enc.appendLine(rw.out, line, rw.lineNo, rw.now().UnixMilli())
	if !ok {
		rw.stats.LinesSkipped++
		rw.lineEvent(EventError,
			field("code", CodeInvalidLine),
			field("message", "an upstream line was not a JSON object and was skipped"),
			field("line_number", rw.lineNo),
			field("fatal", false))
		return
	}
	rw.out = out
	rw.stats.LinesProcessed++
	if rw.opts.OnEvent != nil {
		rw.opts.OnEvent(knownEvent(typ))
	}
	if isTerminal(typ) {
		rw.finish("completed", true)
	}
}

// End handles the end of the upstream body, err being what ended it (io.EOF for a clean end):
// a clean end after a terminal event changes nothing (the stream finished first); anything
// else is an incomplete answer.
func (rw *Rewriter) End(err error) {
	if rw.finished {
		return
	}
	if err == nil {
		err = io.EOF
	}
	if len(rw.partial) > 0 && !rw.dropping && errors.Is(err, io.EOF) {
		// The last line may lack its newline.
		last := rw.partial
		rw.line(last)
		rw.clearPartial()
		if rw.finished {
			return
		}
	}
	msg := "the algorithm service ended the stream without finishing the answer"
	if !errors.Is(err, io.EOF) {
		msg = "the connection to the algorithm service broke off mid-answer"
	}
	rw.Fail(CodeUpstreamIncomplete, msg, "incomplete")
}

// Interrupt ends the stream early: "cancelled" (stream_cancelled) or "shutdown"
// (server_shutdown with a retry hint, then stream_end).
func (rw *Rewriter) Interrupt(why string) {
	if rw.finished {
		return
	}
	if why == stopCancelled {
		rw.event(EventCancelled, field("reason", "cancelled by request"))
		rw.finish(stopCancelled, false)
		return
	}
	rw.event(EventShutdown, field("retry_after_ms", rw.opts.RetryAfter.Milliseconds()))
	rw.finish(stopShutdown, true)
}

// Fail ends the stream with a fatal error event of code, then stream_end with outcome.
func (rw *Rewriter) Fail(code, message, outcome string) {
	if rw.finished {
		return
	}
	rw.event(EventError, field("code", code), field("message", message), field("fatal", true))
	rw.finish(outcome, true)
}

// ShutdownNotice is the server_shutdown event for a stream that goes on without this client: it
// tells the client to resume elsewhere. It has no id and is not part of the stream: a client
// that resumes is not told again.
func (rw *Rewriter) ShutdownNotice(dst []byte) []byte {
	rw.emitted(EventShutdown)
	return rw.enc.appendGatewayEvent(dst, -1, EventShutdown, rw.now().UnixMilli(),
		field("retry_after_ms", rw.opts.RetryAfter.Milliseconds()), field("resume", true))
}

// event appends a stream-level event, after the last line: it takes the next id.
func (rw *Rewriter) event(name string, fields ...string) {
	rw.tail++
	rw.out = rw.enc.appendGatewayEvent(rw.out, rw.LastID(), name, rw.now().UnixMilli(), fields...)
	rw.emitted(name)
}

// lineEvent appends the event standing for the current line (an error about it): the line's id.
func (rw *Rewriter) lineEvent(name string, fields ...string) {
	rw.out = rw.enc.appendGatewayEvent(rw.out, rw.lineNo, name, rw.now().UnixMilli(), fields...)
	rw.emitted(name)
}

func (rw *Rewriter) emitted(name string) {
	if rw.opts.OnEvent != nil {
		rw.opts.OnEvent(name)
	}
}

// finish ends the stream, with stream_end when withEnd.
func (rw *Rewriter) finish(outcome string, withEnd bool) {
	rw.stats.Outcome = outcome
	if withEnd {
		now := rw.now()
		rw.event(EventEnd,
			field("lines_processed", rw.stats.LinesProcessed),
			field("lines_skipped", rw.stats.LinesSkipped),
			field("outcome", outcome),
			field("duration_ms", now.Sub(rw.start).Milliseconds()))
	}
	rw.finished = true
	rw.clearPartial()
}
