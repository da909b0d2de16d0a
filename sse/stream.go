package sse

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"time"
)

// Why a stream ends before its answer is complete. The first reason given wins.
const (
	endCancelled = stopCancelled // POST /api/v2/chat/cancel: stream_cancelled
	endShutdown  = stopShutdown  // the gateway drains: server_shutdown, then stream_end
	endClient    = "client"      // the client left, or stopped reading: nothing more is sent
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

// maxPending bounds the encoded events that may wait for a writer that is busy (at most its
// write timeout): past it, the reader waits too, and the upstream with it.
const maxPending = 256 << 10

// pipe carries a stream's events from the goroutine that reads the upstream (produce) to the
// one that writes to the client (deliver). The Rewriter is shared under mu, which nothing holds
// while it reads, writes or waits: the two swap buffers, so an event is encoded once and copied
// never.
type pipe struct {
	mu    sync.Mutex
	rw    *Rewriter
	ready chan struct{} // something to take, or the stream finished
	space chan struct{} // the writer took what was pending
}

func newPipe(rw *Rewriter) *pipe {
	return &pipe{rw: rw, ready: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// produce reads the upstream body into the pipe until the answer is complete, the upstream
// ends, or the stream is ended; an interruption becomes the events it calls for. It closes the
// body, which cancels the upstream request if it is still running.
func (p *pipe) produce(body io.ReadCloser, buf []byte, stop *ending) {
	defer body.Close()
	defer signal(p.ready)
	for {
		n, err := body.Read(buf)
		why := stop.reason()
		p.mu.Lock()
		if n > 0 && why == "" {
			p.rw.Write(buf[:n])
		}
		switch {
		case why == endClient:
			// Nobody reads any more; what the answer would have said is dropped.
		case why != "":
			p.rw.Interrupt(why)
		case err != nil:
			p.rw.End(err)
		}
		finished, pending := p.rw.Finished(), p.rw.Pending()
		p.mu.Unlock()
		if why == endClient {
			return
		}
		signal(p.ready)
		if finished {
			return
		}
		for pending > maxPending {
			select {
			case <-p.space:
			case <-stop.done:
			}
			if stop.reason() != "" {
				break
			}
			p.mu.Lock()
			pending = p.rw.Pending()
			p.mu.Unlock()
		}
	}
}

// clientWriter writes a stream to the client, every write and flush bounded by a deadline
// through http.ResponseController. It is used by one goroutine only.
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

// deliver writes the pipe's events to the client as they come, a ping comment whenever the
// stream has been silent for pingEvery (none if zero), until the stream is finished or ended.
// gone is done when the client has gone away. It returns false if the client did not take the
// whole stream.
func (p *pipe) deliver(cw *clientWriter, stop *ending, gone <-chan struct{}, pingEvery time.Duration) bool {
	var ping <-chan time.Time
	var t *time.Timer
	if pingEvery > 0 {
		t = time.NewTimer(pingEvery)
		defer t.Stop()
		ping = t.C
	}
	var buf []byte
	ended := stop.done
	for {
		p.mu.Lock()
		buf = p.rw.Take(buf[:0])
		finished := p.rw.Finished()
		p.mu.Unlock()
		signal(p.space)
		if len(buf) > 0 {
			if err := cw.write(buf); err != nil {
				stop.end(endClient)
				return false
			}
			if t != nil {
				t.Reset(pingEvery)
			}
		}
		if finished {
			return true
		}
		select {
		case <-p.ready:
		case <-ping:
			if err := cw.write(pingComment); err != nil {
				stop.end(endClient)
				return false
			}
			t.Reset(pingEvery)
		case <-gone:
			stop.end(endClient)
			return false
		case <-ended:
			if stop.reason() == endClient {
				return false
			}
			ended = nil // the reader turns the interruption into events: deliver them
		}
	}
}
