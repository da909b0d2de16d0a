package sse

import (
	"bytes"
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

// readChunk is how much of the upstream body is read at a time. Small, because a stream is
// mostly idle and every open stream holds one.
const readChunk = 4 << 10

// Options configures a Rewriter.
type Options struct {
	// RequestID is set on every event.
	RequestID string
	// MaxLineBytes bounds one upstream line; a longer one is dropped with an error event while
	// memory stays bounded. Zero means DefaultMaxLineBytes.
	MaxLineBytes int
	// PingInterval is how long the upstream may be silent before a ": ping" comment keeps
	// proxies and load balancers from timing the stream out. Zero means DefaultPingInterval;
	// negative disables pings.
	PingInterval time.Duration
	// Now is the clock for timestamps; nil means time.Now.
	Now func() time.Time
	// Cancel, when closed, ends the stream with stream_cancelled.
	Cancel <-chan struct{}
	// Shutdown, when closed, ends the stream with server_shutdown and a retry hint.
	Shutdown <-chan struct{}
	// RetryAfter is the reconnect hint sent with server_shutdown; zero means 5s.
	RetryAfter time.Duration
	// OnEvent, if set, is called with the name of every event written (for metrics).
	OnEvent func(name string)
}

// Stats describes a finished stream.
type Stats struct {
	LinesProcessed int64
	LinesSkipped   int64
	Outcome        string // "completed", "incomplete", "cancelled", "shutdown"
}

// Rewriter turns an upstream NDJSON body into a Server-Sent Events body: stream_start, one event
// per line named by its "type", pings while the upstream is silent, in-stream errors, and
// stream_end. Each Read returns whole events as soon as they are complete, so a proxy that
// flushes after every write delivers them one by one.
//
// A Rewriter reads the upstream in a goroutine of its own, so that it can ping and cancel while
// the upstream is silent. Close stops it.
type Rewriter struct {
	src  io.ReadCloser
	opts Options
	enc  *encoder
	now  func() time.Time

	raw     []byte        // the pump's read buffer, handed over with each chunk
	chunks  chan chunk    // pump → Read
	ack     chan struct{} // Read → pump: raw is free again
	quit    chan struct{} // closed by Close
	closeMu sync.Once

	out      []byte // encoded events not yet returned by Read
	off      int
	partial  []byte // an incomplete line carried between chunks
	dropping bool   // inside an over-long line, skipping to its end

	pinger   *time.Timer
	started  bool
	finished bool
	start    time.Time
	lineNo   int64
	stats    Stats
}

type chunk struct {
	n   int
	err error
}

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
	return &Rewriter{
		src:    src,
		opts:   opts,
		enc:    newEncoder(opts.RequestID),
		now:    now,
		raw:    make([]byte, readChunk),
		chunks: make(chan chunk),
		ack:    make(chan struct{}),
		quit:   make(chan struct{}),
	}
}

// Stats reports the stream's counters; valid once Read has returned io.EOF.
func (rw *Rewriter) Stats() Stats { return rw.stats }

// Read implements io.Reader.
func (rw *Rewriter) Read(p []byte) (int, error) {
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
		var ping <-chan time.Time
		if rw.pinger != nil {
			ping = rw.pinger.C
		}
		select {
		case c := <-rw.chunks:
			rw.consume(rw.raw[:c.n])
			if c.err != nil {
				rw.upstreamEnded(c.err)
				continue
			}
			if !rw.finished {
				rw.ack <- struct{}{}
			}
			rw.resetPing()
		case <-ping:
			rw.out = append(rw.out, ": ping\n\n"...)
			rw.resetPing()
		case <-rw.opts.Cancel:
			rw.event(EventCancelled, field("reason", "cancelled by request"))
			rw.finish("cancelled", false)
		case <-rw.opts.Shutdown:
			rw.event(EventShutdown, field("retry_after_ms", rw.opts.RetryAfter.Milliseconds()))
			rw.finish("shutdown", true)
		case <-rw.quit:
			return 0, io.ErrClosedPipe
		}
	}
}

// Close stops the upstream reader and closes the upstream body, which cancels the upstream
// request if it is still running.
func (rw *Rewriter) Close() error {
	var err error
	rw.closeMu.Do(func() {
		close(rw.quit)
		if rw.pinger != nil {
			rw.pinger.Stop()
		}
		err = rw.src.Close()
	})
	return err
}

func (rw *Rewriter) begin() {
	rw.started = true
	rw.start = rw.now()
	rw.out = rw.enc.appendGatewayEvent(rw.out, EventStart, rw.start.UnixMilli())
	rw.emitted(EventStart)
	if rw.opts.PingInterval > 0 {
		rw.pinger = time.NewTimer(rw.opts.PingInterval)
	}
	go rw.pump()
}

// pump reads the upstream body and hands each chunk to Read, waiting until Read has consumed
// it before reusing the buffer: the one buffer bounds memory and gives backpressure.
func (rw *Rewriter) pump() {
	for {
		n, err := rw.src.Read(rw.raw)
		select {
		case rw.chunks <- chunk{n, err}:
		case <-rw.quit:
			return
		}
		if err != nil {
			return
		}
		select {
		case <-rw.ack:
		case <-rw.quit:
			return
		}
	}
}

func (rw *Rewriter) resetPing() {
	if rw.pinger != nil {
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
		rw.opts.OnEvent(string(eventName(typ)))
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
	if rw.pinger != nil {
		rw.pinger.Stop()
	}
}
