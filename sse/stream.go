package sse

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Why a stream ends before its answer is complete. The first reason given wins.
const (
	endCancelled = stopCancelled // POST /api/v2/chat/cancel: stream_cancelled
	endShutdown  = stopShutdown  // the gateway drains: server_shutdown, then stream_end
	endClient    = "client"      // the client left, or stopped reading: nothing more is sent
	endRevoked   = "revoked"     // the token was revoked: an error event TOKEN_REVOKED, stream_end
)

// ending owns "this stream ends now, for this reason": whoever ends it (a cancel, a drain, the
// writer finding the client gone) calls end; the stream's two goroutines watch done, and
// onEnd cancels the upstream request at once.
type ending struct {
	once  sync.Once
	done  chan struct{}
	why   string // set before done closes
	onEnd func()
}

func newEnding(onEnd func()) *ending { return &ending{done: make(chan struct{}), onEnd: onEnd} }

// end ends the stream for why, unless it has ended already; it never blocks.
func (e *ending) end(why string) {
	e.once.Do(func() {
		e.why = why
		close(e.done)
		if e.onEnd != nil {
			e.onEnd()
		}
	})
}

// reason is why the stream ended, or "" while it runs.
func (e *ending) reason() string {
	select {
	case <-e.done:
		return e.why
	default:
		return ""
	}
}

// pipe carries a stream's events to the client. The goroutine that reads the upstream encodes
// each line and writes it to the client itself, as a bare proxy would: no hand-off, no queue.
// The handler's goroutine writes only pings, while the stream is silent. Whoever holds the
// write token writes; no writer ever waits for it: a goroutine that finds it taken
// leaves its events pending, and the holder writes them before it lets go. So nothing blocks
// under a lock: mu guards the Rewriter and the resume state, and is never held across a read,
// a write or a wait.
//
// A resumable stream also appends every batch it takes to its replay log, before it writes it,
// so that whatever a client saw can be resumed. It survives its client: when the client goes
// away or stops reading, or a drain tells it to resume elsewhere, the pipe detaches it
// (clientDone closes, nothing more is written to it) and goes on filling the log, for the
// resume window, and for as long after as someone resumes it.
type pipe struct {
	mu        sync.Mutex
	rw        framer
	cw        *clientWriter // used by the write token's holder only
	headed    bool          // the headers are written; the write token's holder's
	token     chan struct{} // the write token: held while it is full
	failed    atomic.Bool   // a write to the client failed: it is gone, or not reading
	lastWrite atomic.Int64  // unix ns of the last write to the client

	// Resuming; all nil or zero for a stream that is not resumable.
	log        ReplayLog
	key        StreamKey
	watched    func() bool // someone resumes the stream now (asked within the stream's life)
	window     time.Duration
	logged     int64 // the last id appended to the log; -1 before stream_start
	detached   atomic.Bool
	clientDone chan struct{} // closed when the client is detached
	notice     bool          // a drain asked for server_shutdown; the token holder sends it
	timer      *time.Timer   // the resume window, once the client is gone
	over       bool          // production has ended: no window any more
}

func newPipe(rw framer, cw *clientWriter) *pipe {
	return &pipe{rw: rw, cw: cw, logged: -1, clientDone: make(chan struct{}), token: make(chan struct{}, 1)}
}

// resumable makes the stream resumable through log, under key, for window after its client
// goes, and longer while watched says someone resumes it.
func (p *pipe) resumable(log ReplayLog, key StreamKey, window time.Duration, watched func() bool) {
	p.log, p.key, p.window, p.watched = log, key, window, watched
}

// take takes the pending events into buf and, for a resumable stream, appends them to the
// log. The caller holds mu.
func (p *pipe) take(buf []byte) []byte {
	buf = p.rw.Take(buf[:0])
	if p.log != nil && len(buf) > 0 {
		last := p.rw.LastID()
		p.log.Append(p.key, p.logged+1, last, buf, p.rw.Finished())
		p.logged = last
	}
	return buf
}

// flush writes what is pending, with extra (a ping) after it, if it can take the write token;
// else the holder will. A failed write loses the client: the stream ends, or, resumable, goes on
// without it. buf is the caller's own buffer.
func (p *pipe) flush(buf *[]byte, extra []byte, stop *ending) {
	if p.detached.Load() {
		// Nothing goes to the client any more; the log still gets every event.
		p.mu.Lock()
		*buf = p.take(*buf)
		p.mu.Unlock()
		return
	}
	for p.takeToken() {
		p.mu.Lock()
		*buf = p.take(*buf)
		notice := p.notice && !p.detached.Load()
		if notice {
			*buf = p.rw.ShutdownNotice(*buf)
		}
		status := 0
		if !p.headed && (len(*buf) > 0 || extra != nil) {
			p.headed = true
			status = p.rw.Head(p.cw.w.Header())
		}
		p.mu.Unlock()
		if status != 0 {
			p.cw.w.WriteHeader(status)
		}
		out := *buf
		if extra != nil {
			out = append(out, extra...)
			*buf, extra = out, nil
		}
		if len(out) > 0 && !p.failed.Load() && !p.detached.Load() {
			if err := p.cw.write(out); err != nil {
				p.failed.Store(true)
				p.lose(stop)
			} else {
				p.lastWrite.Store(time.Now().UnixNano())
			}
		}
		if notice {
			p.detach()
		}
		<-p.token
		// Events left while the token was taken are this holder's to write.
		p.mu.Lock()
		more := p.rw.Pending() > 0 || (p.notice && !p.detached.Load())
		p.mu.Unlock()
		if !more || p.failed.Load() || p.detached.Load() {
			return
		}
	}
}

// takeToken takes the write token if it is free.
func (p *pipe) takeToken() bool {
	select {
	case p.token <- struct{}{}:
		return true
	default:
		return false
	}
}

// letGo is the handler's last word on a stream that goes on without its client: it waits for a
// write under way to end (bounded by the write deadline) and keeps the write token, so that no
// write to the client starts after the handler has returned.
func (p *pipe) letGo() { p.token <- struct{}{} }

// detach lets go of the client: nothing more is written to it, and the handler returns. Called
// by the holder of the write token, or once the client is gone.
func (p *pipe) detach() {
	if p.detached.CompareAndSwap(false, true) {
		close(p.clientDone)
	}
}

// lose handles a client that went away or stopped reading: the end of a stream that is not
// resumable; for one that is, its window starts.
func (p *pipe) lose(stop *ending) {
	if p.log == nil {
		stop.end(endClient)
		return
	}
	p.detach()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.timer == nil && !p.over {
		p.timer = time.AfterFunc(p.window, func() { p.windowOver(stop) })
	}
}

// windowOver ends a stream nobody resumed within the window; one being resumed gets another
// look a second later.
func (p *pipe) windowOver(stop *ending) {
	p.mu.Lock()
	over := p.over
	p.mu.Unlock()
	if over {
		return
	}
	if p.watched() {
		p.mu.Lock()
		if !p.over {
			p.timer.Reset(time.Second)
		}
		p.mu.Unlock()
		return
	}
	stop.end(endClient)
}

// stopWindow stops the window once production is over.
func (p *pipe) stopWindow() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.over = true
	if p.timer != nil {
		p.timer.Stop()
	}
}

// drain is a drain's part: a resumable stream tells its client to resume elsewhere
// (server_shutdown) and goes on without it; any other is ended with server_shutdown.
func (p *pipe) drain(stop *ending) {
	if p.log == nil {
		stop.end(endShutdown)
		return
	}
	p.mu.Lock()
	p.notice = true
	p.mu.Unlock()
	var buf []byte
	p.flush(&buf, nil, stop)
}

// produce reads the upstream body and writes its events to the client until the answer is
// complete, the upstream ends, or the stream is ended; an interruption becomes the events it
// calls for. It closes the body, which cancels the upstream request if it is still running.
func (p *pipe) produce(body io.ReadCloser, buf []byte, stop *ending) {
	defer body.Close()
	var out []byte
	p.flush(&out, nil, stop) // stream_start
	for {
		n, err := body.Read(buf)
		why := stop.reason()
		p.mu.Lock()
		if n > 0 && why == "" {
			p.rw.Write(buf[:n])
		}
		switch {
		case why == endClient && p.log == nil:
			// Nobody reads any more; what the answer would have said is dropped.
		case why == endClient:
			p.rw.Fail(CodeUpstreamIncomplete, "nobody resumed the stream within the resume window; the rest of the answer was abandoned", "abandoned")
		case why == endRevoked:
			p.rw.Fail(CodeTokenRevoked, "the token this stream was opened with has been revoked", "revoked")
		case why == endShutdown && p.log != nil:
			p.rw.Fail(CodeUpstreamIncomplete, "the gateway instance shut down before the answer was complete", stopShutdown)
		case why != "":
			p.rw.Interrupt(why)
		case err != nil:
			p.rw.End(err)
		}
		finished := p.rw.Finished()
		p.mu.Unlock()
		if why == endClient && p.log == nil || p.failed.Load() && p.log == nil {
			return
		}
		p.flush(&out, nil, stop)
		if finished {
			return
		}
	}
}

// clientWriter writes a stream to the client, every write and flush bounded by a deadline
// through http.ResponseController. Only the holder of its pipe's write token uses it.
type clientWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	by      time.Time // the deadline last set
}

var pingComment = []byte(": ping\n\n")

// write sends b and flushes it. The deadline is moved only when it would otherwise fall less
// than 7/8 of the timeout away: a write is bounded by between 7/8 of the timeout and all of it.
func (cw *clientWriter) write(b []byte) error {
	if now := time.Now(); cw.by.Sub(now) < cw.timeout-cw.timeout/8 {
		cw.by = now.Add(cw.timeout)
		if err := cw.rc.SetWriteDeadline(cw.by); err != nil && !errors.Is(err, http.ErrNotSupported) {
			return err
		}
	}
	if _, err := cw.w.Write(b); err != nil {
		return err
	}
	return cw.rc.Flush()
}

// done lifts the deadline, so that a keep-alive connection's next response is not cut by it.
func (cw *clientWriter) done() {
	if !cw.by.IsZero() {
		_ = cw.rc.SetWriteDeadline(time.Time{})
	}
}

// watch is the handler's part of a stream while produce runs: a ping comment whenever nothing
// has been written for pingEvery (none if zero), and the loss of the client when it goes away.
// It returns when the stream is over, or goes on without this client.
func (p *pipe) watch(stop *ending, produced, gone <-chan struct{}, pingEvery time.Duration) {
	var ping <-chan time.Time
	var t *time.Timer
	if pingEvery > 0 {
		t = time.NewTimer(pingEvery)
		defer t.Stop()
		ping = t.C
	}
	var buf []byte
	for {
		select {
		case <-produced:
			return
		case <-p.clientDone:
			return
		case <-gone:
			p.lose(stop)
			gone = nil
		case now := <-ping:
			if quiet := now.Sub(time.Unix(0, p.lastWrite.Load())); quiet < pingEvery {
				t.Reset(pingEvery - quiet)
				continue
			}
			p.flush(&buf, pingComment, stop)
			t.Reset(pingEvery)
		}
	}
}
