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

	stop *ending
}

// newStream returns a stream whose ending (Registry.Cancel, EndAll) goes to stop.
func newStream(requestID, user, tenant string, started time.Time, stop *ending) *Stream {
	return &Stream{RequestID: requestID, UserID: user, TenantID: tenant, Started: started, stop: stop}
}

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
	r.mu.Lock()
	if _, dup := r.streams[s.RequestID]; dup {
		r.mu.Unlock()
		return nil, ErrStreamExists
	}
	r.streams[s.RequestID] = s
	r.mu.Unlock()
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
	s.stop.end(endCancelled)
	return nil
}

// EndAll ends every running stream with server_shutdown, for a drain.
func (r *Registry) EndAll() {
	r.mu.Lock()
	streams := make([]*Stream, 0, len(r.streams))
	for _, s := range r.streams {
		streams = append(streams, s)
	}
	r.mu.Unlock()
	for _, s := range streams {
		s.stop.end(endShutdown)
	}
}

// Len reports how many streams are running.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.streams)
}
