package sse

import (
	"errors"
	"sync"
	"time"

	"voicegate/policy"
)

// Registry errors callers branch on.
var (
	ErrStreamNotFound = errors.New("sse: no running stream with that request ID")
	ErrStreamExists   = errors.New("sse: a stream with that request ID is already running")
)

// Stream is one running chat stream.
type Stream struct {
	RequestID string
	UserID    string // owner; empty when unauthenticated
	TenantID  string
	Started   time.Time
	// The token it was opened with, so that a revocation ends it.
	TokenID  string
	IssuedAt time.Time

	stop  *ending
	drain func() // a drain's part (see pipe.drain); nil until the upstream answered
}

// newStream returns a stream whose ending (Registry.Cancel, EndAll) goes to stop.
func newStream(requestID, user, tenant string, started time.Time, stop *ending) *Stream {
	return &Stream{RequestID: requestID, UserID: user, TenantID: tenant, Started: started, stop: stop}
}

// Registry holds the streams running on this instance, so that a cancel request can find them.
// A request ID belongs to its user: streams are known by tenant, user and request ID, so two
// users never see, or stop, each other's, and each may use any ID.
type Registry struct {
	mu      sync.Mutex
	streams map[StreamKey]*Stream
}

func keyOf(s *Stream) StreamKey {
	return StreamKey{Tenant: s.TenantID, User: s.UserID, RequestID: s.RequestID}
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{streams: make(map[StreamKey]*Stream)}
}

// Add registers a stream; the returned function removes it and must be called when it ends.
func (r *Registry) Add(s *Stream) (remove func(), err error) {
	k := keyOf(s)
	r.mu.Lock()
	if _, dup := r.streams[k]; dup {
		r.mu.Unlock()
		return nil, ErrStreamExists
	}
	r.streams[k] = s
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		if r.streams[k] == s {
			delete(r.streams, k)
		}
		r.mu.Unlock()
	}, nil
}

// Cancel cancels the stream k names (its owner's tenant, user and request ID). Whether the
// caller may is decided before: by the key, which names the owner.
func (r *Registry) Cancel(k StreamKey) error {
	r.mu.Lock()
	s := r.streams[k]
	r.mu.Unlock()
	if s == nil {
		return ErrStreamNotFound
	}
	s.stop.end(endCancelled)
	return nil
}

// setDrain records what a drain does to s.
func (r *Registry) setDrain(s *Stream, drain func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s.drain = drain
}

// Drain tells the clients of resumable streams to resume elsewhere (server_shutdown) and lets
// them go; the streams go on filling their logs until they end, or EndAll. Other streams are
// left to finish.
func (r *Registry) Drain() {
	for _, s := range r.all() {
		r.mu.Lock()
		drain := s.drain
		r.mu.Unlock()
		if drain != nil {
			drain()
		}
	}
}

// Revoke ends, with an error event TOKEN_REVOKED, every stream opened with a token v
// revokes: of v's tenant only (policy.Revocation.Covers). It returns how many.
func (r *Registry) Revoke(v policy.Revocation) int {
	n := 0
	for _, s := range r.all() {
		if v.Covers(s.TenantID, s.UserID, s.TokenID, s.IssuedAt) {
			s.stop.end(endRevoked)
			n++
		}
	}
	return n
}

// EndAll ends every running stream for a shutdown: server_shutdown for a client still
// attached, and, in the log of a resumable one, the error that says it was cut short.
func (r *Registry) EndAll() {
	for _, s := range r.all() {
		s.stop.end(endShutdown)
	}
}

func (r *Registry) all() []*Stream {
	r.mu.Lock()
	defer r.mu.Unlock()
	streams := make([]*Stream, 0, len(r.streams))
	for _, s := range r.streams {
		streams = append(streams, s)
	}
	return streams
}

// Len reports how many streams are running.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.streams)
}
