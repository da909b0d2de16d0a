package sse

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Registry errors callers branch on.
var (
	ErrStreamNotFound = errors.New("sse: no running stream with that request ID")
	ErrStreamExists   = errors.New("sse: a stream with that request ID is already running")
	ErrNotOwner       = errors.New("sse: the stream belongs to another user")
)

// Stream is one running chat stream.
type Stream struct {
	RequestID string
	UserID    string // owner; empty when unauthenticated
	TenantID  string
	Started   time.Time

	ctx      context.Context // done when the stream is cancelled
	cancel   context.CancelFunc
	writer   *PingWriter
	rewriter *Rewriter    // set once the upstream answered
	state    atomic.Int32 // stateWaiting → stateStreaming or stateCancelled, once
}

// Stream states: a cancel before the upstream answers is handled by the handler, after it by
// the Rewriter; the state decides which, exactly once.
const (
	stateWaiting int32 = iota
	stateStreaming
	stateCancelled
)

// Cancelled is done when the stream has been cancelled through the registry.
func (s *Stream) Cancelled() context.Context { return s.ctx }

// Registry holds the streams running on this instance, so that a cancel request can find them.
type Registry struct {
	mu      sync.Mutex
	streams map[string]*Stream
	dir     *Directory // nil: this instance only
}

// NewRegistry returns an empty registry; with a Directory, streams are announced to every
// instance.
func NewRegistry(dir *Directory) *Registry {
	return &Registry{streams: make(map[string]*Stream), dir: dir}
}

// Add registers a stream; the returned function removes it and must be called when it ends.
func (r *Registry) Add(s *Stream) (remove func(), err error) {
	s.ctx, s.cancel = context.WithCancel(context.Background())
	r.mu.Lock()
	if _, dup := r.streams[s.RequestID]; dup {
		r.mu.Unlock()
		s.cancel()
		return nil, ErrStreamExists
	}
	r.streams[s.RequestID] = s
	r.mu.Unlock()
	unannounce := func() {}
	if r.dir != nil {
		unannounce = r.dir.announce(s)
	}
	return func() {
		r.mu.Lock()
		if r.streams[s.RequestID] == s {
			delete(r.streams, s.RequestID)
		}
		r.mu.Unlock()
		s.cancel()
		unannounce()
	}, nil
}

// Cancel cancels the stream with requestID. allowed, when non-nil, decides whether the caller
// may cancel that stream (ownership); a refusal is ErrNotOwner.
func (r *Registry) Cancel(requestID string, allowed func(*Stream) bool) error {
	r.mu.Lock()
	s := r.streams[requestID]
	r.mu.Unlock()
	if s == nil {
		return ErrStreamNotFound
	}
	if allowed != nil && !allowed(s) {
		return ErrNotOwner
	}
	s.cancel()
	return nil
}

// Len reports how many streams are running.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.streams)
}
