package sse

import (
	"errors"
	"sync"
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

	cancel   chan struct{}
	cancelMu sync.Once
}

// Cancelled is closed when the stream is cancelled.
func (s *Stream) Cancelled() <-chan struct{} { return s.cancel }

func (s *Stream) doCancel() { s.cancelMu.Do(func() { close(s.cancel) }) }

// Registry holds the streams running on this instance, so that a cancel request can find them.
type Registry struct {
	mu      sync.Mutex
	streams map[string]*Stream
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{streams: make(map[string]*Stream)}
}

// Add registers a stream; the returned function removes it and must be called when it ends.
func (r *Registry) Add(s *Stream) (remove func(), err error) {
	s.cancel = make(chan struct{})
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.streams[s.RequestID]; dup {
		return nil, ErrStreamExists
	}
	r.streams[s.RequestID] = s
	return func() {
		r.mu.Lock()
		if r.streams[s.RequestID] == s {
			delete(r.streams, s.RequestID)
		}
		r.mu.Unlock()
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
	s.doCancel()
	return nil
}

// Len reports how many streams are running.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.streams)
}
