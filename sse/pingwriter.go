package sse

import (
	"bytes"
	"net/http"
	"sync"
)

var pingComment = []byte(": ping\n\n")

// PingWriter is the client side of a stream: it serialises the proxy's writes with the
// rewriter's pings, which arrive from a timer goroutine, and lets a ping through only between
// two events, never inside one. Every event ends with a blank line and none contains one, so
// "the last bytes written were \n\n" is exactly "between events".
type PingWriter struct {
	http.ResponseWriter
	mu     sync.Mutex
	tail   [2]byte // the last two bytes written
	closed bool
}

func (w *PingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n, err := w.ResponseWriter.Write(p)
	switch {
	case n >= 2:
		w.tail = [2]byte{p[n-2], p[n-1]}
	case n == 1:
		w.tail = [2]byte{w.tail[1], p[0]}
	}
	return n, err
}

// FlushError flushes to the client; http.ResponseController prefers it to Flush.
func (w *PingWriter) FlushError() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return http.NewResponseController(w.ResponseWriter).Flush()
}

// Flush implements http.Flusher.
func (w *PingWriter) Flush() { _ = w.FlushError() }

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *PingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Close makes later pings no-ops; call it before the handler returns, after which the
// ResponseWriter must not be touched.
func (w *PingWriter) Close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}

func (w *PingWriter) ping() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || !bytes.Equal(w.tail[:], []byte("\n\n")) {
		return
	}
	if _, err := w.ResponseWriter.Write(pingComment); err == nil {
		_ = http.NewResponseController(w.ResponseWriter).Flush()
	}
}
