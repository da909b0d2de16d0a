package proxy

import (
	"errors"
	"net/http"
	"time"
)

// deadlineWriter bounds every write of a proxied response in time. Before each write, flush or
// header (an interim 1xx goes out at once) it moves the connection's write deadline to timeout
// from now, so that a client that stops reading is dropped within it: the write fails,
// ReverseProxy closes the upstream's body unread (which closes the upstream connection rather
// than return it to the pool half read) and aborts the response, which closes the client's
// connection. The server lifts the deadline once a response is finished, before it reads the
// connection's next request.
//
// It passes Flush and Unwrap through, so streamed bodies are still flushed per write and
// http.ResponseController still reaches the connection behind it.
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	by      time.Time // the deadline last set
}

func newDeadlineWriter(w http.ResponseWriter, timeout time.Duration) *deadlineWriter {
	return &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), timeout: timeout}
}

// arm moves the deadline, only when it would otherwise fall less than 7/8 of the timeout away:
// every write is bounded by between 7/8 of the timeout and all of it, and a body copied in
// many small writes does not pay for a deadline each.
func (w *deadlineWriter) arm() error {
	now := time.Now()
	if w.by.Sub(now) >= w.timeout-w.timeout/8 {
		return nil
	}
	w.by = now.Add(w.timeout)
	if err := w.rc.SetWriteDeadline(w.by); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}

func (w *deadlineWriter) WriteHeader(code int) {
	_ = w.arm() // a failure shows in the write that follows
	w.ResponseWriter.WriteHeader(code)
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	if err := w.arm(); err != nil {
		return 0, err
	}
	return w.ResponseWriter.Write(p)
}

// FlushError is what http.ResponseController.Flush calls: a flush that fails is reported.
func (w *deadlineWriter) FlushError() error {
	if err := w.arm(); err != nil {
		return err
	}
	return w.rc.Flush()
}

func (w *deadlineWriter) Flush() { _ = w.FlushError() }

func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
