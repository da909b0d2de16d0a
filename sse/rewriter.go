package sse

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"time"
)

// Defaults for Options.
const (
	DefaultMaxLineBytes = 1 << 20
	DefaultPingInterval = 15 * time.Second
)

// Options configures a Rewriter.
type Options struct {
	// RequestID is set on every event.
	RequestID string
	// MaxLineBytes bounds one upstream line; a longer one is dropped with an error event while
	// memory stays bounded. Zero means DefaultMaxLineBytes.
	MaxLineBytes int
	// PingInterval is how long the upstream may be silent before Ping is called. Zero means
	// DefaultPingInterval; negative disables pings.
	PingInterval time.Duration
	// Ping, if set, is called from a timer goroutine each time the upstream has been silent for
	// PingInterval. It writes a ping comment straight to the client (see PingWriter): the reading
	// goroutine is then blocked on the upstream, and keeping a second goroutine per stream just
	// to wake it would cost every open stream a stack.
	Ping func()
	// Now is the clock for timestamps; nil means time.Now.
	Now func() time.Time
	// Cancel, when done, ends the stream with stream_cancelled.
	Cancel context.Context
	// Shutdown, when done, ends the stream with server_shutdown and a retry hint.
	Shutdown context.Context
	// RetryAfter is the reconnect hint sent with server_shutdown; zero means 5s.
	RetryAfter time.Duration
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
// per line named by its "type", in-stream errors, and stream_end. Each Read returns whole events
// as soon as they are complete, so a proxy that flushes after every write delivers them one by
// one.
//
// Read blocks on the upstream in the caller's goroutine. Cancellation and shutdown close the
// upstream body from their own callbacks to wake it; pings go out of band through
// Options.Ping. An idle stream therefore holds no goroutine or buffer of its own.
type Rewriter struct {
	src  io.ReadCloser
	opts Options
	enc  *encoder
	now  func() time.Time

	mu         sync.Mutex // guards stop, closed, quiet and the ping timer's rearming
	stop       string     // why the stream was interrupted: "cancelled" or "shutdown"
	closed     bool
	quiet      bool // the stream has ended: no more pings
	pinger     *time.Timer
	unCancel   func() bool
	unShutdown func() bool

	out      []byte // encoded events not yet returned by Read
	off      int
	partial  []byte // an incomplete line carried between reads
	dropping bool   // inside an over-long line, skipping to its end

	started  bool
	finished bool
	start    time.Time
	lineNo   int64
	stats    Stats
}

// Interruption reasons, also the stream outcomes they lead to.
const (
	stopCancelled = "cancelled"
	stopShutdown  = "shutdown"
)

// NewRewriter returns a Rewriter reading NDJSON from src.
func NewRewriter(src io.ReadCloser, opts Options) *Rewriter {
	if opts.MaxLineBytes <= 0 {
		opts.MaxLineBytes = DefaultMaxLineBytes
	}
	if opts.PingInterval == 0 {
		opts.PingInterval = DefaultPingInterval
	}
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = 5 * time.Second
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	return &Rewriter{src: src, opts: opts, enc: newEncoder(opts.RequestID), now: now}
}

// Stats reports the stream's counters; valid once Read has returned io.EOF.
func (rw *Rewriter) Stats() Stats { return rw.stats }

// Read implements io.Reader. It uses p as its upstream read buffer, so it needs no buffer of
// its own while it waits.
func (rw *Rewriter) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if rw.off < len(rw.out) {
			n := copy(p, rw.out[rw.off:])
			rw.off += n
			if rw.off == len(rw.out) {
				rw.resetOut()
			}
			return n, nil
		}
		if rw.finished {
			return 0, io.EOF
		}
		if !rw.started {
			rw.begin()
			continue
		}
		if why, closed := rw.interrupted(); closed {
			return 0, io.ErrClosedPipe
		} else if why != "" {
			rw.interrupt(why)
			continue
		}
		n, err := rw.src.Read(p)
		if _, closed := rw.interrupted(); closed {
			return 0, io.ErrClosedPipe
		}
		if n > 0 {
			rw.consume(p[:n])
			rw.resetPing()
		}
		if err != nil && !rw.finished {
			if why, _ := rw.interrupted(); why != "" {
				continue // we closed the upstream ourselves; report why
			}
			rw.upstreamEnded(err)
		}
	}
}

// Close stops the timers and closes the upstream body, which cancels the upstream request if
// it is still running.
func (rw *Rewriter) Close() error {
	rw.mu.Lock()
	if rw.closed {
		rw.mu.Unlock()
		return nil
	}
	rw.closed = true
	if rw.pinger != nil {
		rw.pinger.Stop()
	}
	rw.mu.Unlock()
	rw.stopWatching()
	return rw.src.Close()
}

func (rw *Rewriter) stopWatching() {
	if rw.unCancel != nil {
		rw.unCancel()
	}
	if rw.unShutdown != nil {
		rw.unShutdown()
	}
}

func (rw *Rewriter) begin() {
	rw.started = true
	rw.start = rw.now()
	rw.out = rw.enc.appendGatewayEvent(rw.out, EventStart, rw.start.UnixMilli())
	rw.emitted(EventStart)
	if rw.opts.Ping != nil && rw.opts.PingInterval > 0 {
		rw.pinger = time.AfterFunc(rw.opts.PingInterval, rw.ping)
	}
	if rw.opts.Cancel != nil {
		rw.unCancel = context.AfterFunc(rw.opts.Cancel, func() { rw.wake(stopCancelled) })
	}
	if rw.opts.Shutdown != nil {
		rw.unShutdown = context.AfterFunc(rw.opts.Shutdown, func() { rw.wake(stopShutdown) })
	}
}

// wake records why the stream must end and closes the upstream body, so that a Read blocked on
// it returns.
func (rw *Rewriter) wake(why string) {
	rw.mu.Lock()
	if rw.stop == "" {
		rw.stop = why
	}
	closed := rw.closed
	rw.mu.Unlock()
	if !closed {
		_ = rw.src.Close()
	}
}

func (rw *Rewriter) interrupted() (why string, closed bool) {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.stop, rw.closed
}

// interrupt ends the stream for a cancel or a shutdown.
func (rw *Rewriter) interrupt(why string) {
	if why == stopCancelled {
		rw.event(EventCancelled, field("reason", "cancelled by request"))
		rw.finish(stopCancelled, false)
		return
	}
	rw.event(EventShutdown, field("retry_after_ms", rw.opts.RetryAfter.Milliseconds()))
	rw.finish(stopShutdown, true)
}

// ping runs on the timer's goroutine.
func (rw *Rewriter) ping() {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	if rw.closed || rw.quiet {
		return
	}
	rw.opts.Ping()
	rw.pinger.Reset(rw.opts.PingInterval)
}

func (rw *Rewriter) resetPing() {
	if rw.pinger != nil && !rw.finished {
		rw.pinger.Reset(rw.opts.PingInterval)
	}
}

// resetOut empties the output buffer, letting go of it if an over-long event grew it.
func (rw *Rewriter) resetOut() {
	rw.off = 0
	if cap(rw.out) > 64<<10 {
		rw.out = nil
		return
	}
	rw.out = rw.out[:0]
}

// consume splits data into lines, carrying an incomplete last line over to the next chunk.
func (rw *Rewriter) consume(data []byte) {
	for len(data) > 0 && !rw.finished {
		nl := bytes.IndexByte(data, '\n')
		if rw.dropping {
			if nl < 0 {
				return
			}
			rw.dropping = false
			data = data[nl+1:]
			continue
		}
		if nl < 0 {
			if len(rw.partial)+len(data) > rw.opts.MaxLineBytes {
				rw.tooLong()
				return
			}
			rw.partial = append(rw.partial, data...)
			return
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
	rw.event(EventError,
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
		rw.event(EventError,
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

// upstreamEnded handles the end of the upstream body: a clean end after a terminal event never
// reaches here (the stream finished first); anything else is an incomplete answer.
func (rw *Rewriter) upstreamEnded(err error) {
	if rw.finished {
		return
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
	rw.event(EventError,
		field("code", CodeUpstreamIncomplete),
		field("message", msg),
		field("fatal", true))
	rw.finish("incomplete", true)
}

func (rw *Rewriter) event(name string, fields ...string) {
	rw.out = rw.enc.appendGatewayEvent(rw.out, name, rw.now().UnixMilli(), fields...)
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
	rw.mu.Lock()
	rw.quiet = true
	if rw.pinger != nil {
		rw.pinger.Stop()
	}
	rw.mu.Unlock()
	rw.stopWatching()
}
