package sse

import (
	"bytes"
	"context"
	"errors"
	"sort"
	"strconv"
	"sync"
	"time"
)

// StreamKey is a stream's identity: a request ID belongs to its user, so the owner is part of
// it. It keys the registry of running streams, the directory, the replay log, cancels and
// resumes: only the stream's owner (same user, same tenant) can find it, anyone else is told
// there is no such stream, and every user may use any request ID.
type StreamKey struct{ Tenant, User, RequestID string }

// Replay errors callers branch on.
var (
	// ErrNoReplay means no log is kept for the key: the stream never ran with resuming on,
	// its log has expired, or it belongs to someone else.
	ErrNoReplay = errors.New("sse: no replay log for this stream")
)

// GapError means the log does not hold every event after the one a resume asked for: they were
// trimmed, or an append was lost. After is the last id delivered before the gap.
type GapError struct{ After int64 }

func (e *GapError) Error() string {
	return "sse: the replay log lacks the events after id " + strconv.FormatInt(e.After, 10)
}

// GoneError means the instance producing the stream stopped without ending it (it died): the
// log will get no more events. After is the last id delivered.
type GoneError struct{ After int64 }

func (e *GoneError) Error() string {
	return "sse: the stream's producer stopped before the stream ended, after id " + strconv.FormatInt(e.After, 10)
}

// ReplayLog keeps the events of resumable streams, so that a client that lost its connection
// can get, on any instance, exactly the events after the last it saw, then the live tail; and
// so that a request repeated with the same request ID is answered from it, never generated
// twice.
//
// A producer appends each batch of events as it goes to its client, ids first..last (first is
// 0 for the batch that holds stream_start, which has no id); end marks the batch that holds
// stream_end. Append never blocks: a batch the log cannot take is lost, and a resume across it
// is a gap, never a silent hole. Produce brackets a stream's life, so that resumers can tell a
// producer that died from one that is slow. A log has one producer, ever: a stream is produced
// only for a key with no log (Exists, or the admission's claim that needs the log absent), and
// nothing appends to a log once its producer is done.
type ReplayLog interface {
	Append(k StreamKey, first, last int64, data []byte, end bool)
	// Produce marks k as being produced by this instance until the returned function is called,
	// which returns once what was appended is in the log (or it could not be put there).
	Produce(k StreamKey) (done func())
	// Exists reports whether a log is kept for k (being produced, or finished and not expired).
	Exists(ctx context.Context, k StreamKey) (bool, error)
	// Replay calls emit with the events of k after id after (-1: from stream_start on), in
	// order, then with the live tail, until the batch holding stream_end (nil), ctx ends, or emit
	// fails. Its first call of emit, once the log is known to exist, has no events. It returns
	// ErrNoReplay, a *GapError or a *GoneError as they say. While it runs, k counts as watched.
	Replay(ctx context.Context, k StreamKey, after int64, emit func([]byte) error) error
	// Watched reports whether anyone is replaying k now, on any instance.
	Watched(ctx context.Context, k StreamKey) bool
}

// replayEntry is one batch of a stream's events.
type replayEntry struct {
	first, last int64
	end         bool
	data        []byte
}

// maxReplayEntries bounds a stream's log, in batches; older ones are dropped (a resume from
// before them is a gap). Batches are one event each when the client keeps up, so a stream
// keeps at least its last 4,096 events.
const maxReplayEntries = 4096

// after returns the part of an entry's events with ids greater than id: whole events, cut at
// their blank-line boundaries (the gateway writes every event, as "id: N\n…\n\n").
func (e *replayEntry) after(id int64) []byte {
	if e.first > id {
		return e.data
	}
	data := e.data
	for len(data) > 0 {
		end := bytes.Index(data, []byte("\n\n"))
		if end < 0 {
			return nil
		}
		ev := data[:end+2]
		if n, ok := eventID(ev); ok && n > id {
			return data
		}
		data = data[end+2:]
	}
	return nil
}

// eventID reads the id of one encoded event, which the gateway writes first when it has one.
func eventID(ev []byte) (int64, bool) {
	for line := range bytes.Lines(ev) {
		line = bytes.TrimSuffix(line, []byte("\n"))
		if v, ok := bytes.CutPrefix(line, []byte("id: ")); ok {
			n, err := strconv.ParseInt(string(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// replayFrom emits, in order, the events of entries after id (-1: from stream_start on). It
// returns the new last id, whether the end was reached, and a *GapError when an entry does not
// follow on from the one before.
func replayFrom(entries []replayEntry, id int64, emit func([]byte) error) (int64, bool, error) {
	for i := range entries {
		e := &entries[i]
		if e.last <= id {
			if e.end { // the client has seen the end already
				return id, true, nil
			}
			continue
		}
		if e.first > id+1 {
			return id, false, &GapError{After: max(id, 0)}
		}
		data := e.data
		if id >= 0 {
			data = e.after(id)
		}
		if len(data) > 0 {
			if err := emit(data); err != nil {
				return id, false, err
			}
		}
		id = e.last
		if e.end {
			return id, true, nil
		}
	}
	return id, false, nil
}

// MemoryReplay is a ReplayLog in this process: without Redis, resuming works on the instance
// that runs the stream. Logs are kept for the retention after their last append.
type MemoryReplay struct {
	retention time.Duration
	now       func() time.Time

	mu      sync.Mutex
	streams map[StreamKey]*memoryStream
	appends int
}

type memoryStream struct {
	entries   []replayEntry
	changed   chan struct{} // closed and replaced on every append and when production ends
	producing bool
	watchers  int
	touched   time.Time
}

// NewMemoryReplay returns an in-memory log that keeps a stream's events for retention after its
// last append, on the clock now (nil: time.Now).
func NewMemoryReplay(retention time.Duration, now func() time.Time) *MemoryReplay {
	if now == nil {
		now = time.Now
	}
	return &MemoryReplay{retention: retention, now: now, streams: map[StreamKey]*memoryStream{}}
}

func (m *MemoryReplay) stream(k StreamKey) *memoryStream {
	s := m.streams[k]
	if s == nil {
		s = &memoryStream{changed: make(chan struct{})}
		m.streams[k] = s
	}
	return s
}

func (s *memoryStream) signal() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Append implements ReplayLog.
func (m *MemoryReplay) Append(k StreamKey, first, last int64, data []byte, end bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.stream(k)
	if len(s.entries) >= maxReplayEntries { // drop the oldest quarter at once: amortized O(1)
		s.entries = append(s.entries[:0], s.entries[maxReplayEntries/4:]...)
	}
	s.entries = append(s.entries, replayEntry{first: first, last: last, end: end, data: bytes.Clone(data)})
	s.touched = m.now()
	s.signal()
	if m.appends++; m.appends%1024 == 0 {
		m.sweep()
	}
}

// sweep forgets logs past their retention that nobody produces or reads.
func (m *MemoryReplay) sweep() {
	now := m.now()
	for k, s := range m.streams {
		if !s.producing && s.watchers == 0 && now.Sub(s.touched) > m.retention {
			delete(m.streams, k)
		}
	}
}

// Produce implements ReplayLog. A log that is not being produced (one past its retention that
// the sweep has not forgotten yet) is replaced, never appended to: its readers keep the old one.
func (m *MemoryReplay) Produce(k StreamKey) func() {
	m.mu.Lock()
	if s := m.streams[k]; s != nil && !s.producing {
		delete(m.streams, k)
	}
	m.stream(k).producing = true
	m.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			s := m.streams[k]
			if s == nil {
				return
			}
			s.producing = false
			s.touched = m.now()
			s.signal()
		})
	}
}

// Exists implements ReplayLog.
func (m *MemoryReplay) Exists(_ context.Context, k StreamKey) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.kept(m.streams[k]), nil
}

// kept reports whether s is a log a reader may read: being produced, or finished within its
// retention. The caller holds mu.
func (m *MemoryReplay) kept(s *memoryStream) bool {
	return s != nil && (s.producing || len(s.entries) > 0 && m.now().Sub(s.touched) <= m.retention)
}

// Watched implements ReplayLog.
func (m *MemoryReplay) Watched(_ context.Context, k StreamKey) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.streams[k]
	return s != nil && s.watchers > 0
}

// Replay implements ReplayLog.
func (m *MemoryReplay) Replay(ctx context.Context, k StreamKey, after int64, emit func([]byte) error) error {
	m.mu.Lock()
	s := m.streams[k]
	if !m.kept(s) {
		m.mu.Unlock()
		return ErrNoReplay
	}
	s.watchers++
	m.mu.Unlock()
	if err := emit(nil); err != nil {
		m.mu.Lock()
		s.watchers--
		m.mu.Unlock()
		return err
	}
	defer func() {
		m.mu.Lock()
		s.watchers--
		m.mu.Unlock()
	}()
	id := after
	for {
		m.mu.Lock()
		// The entries still to emit, copied: emit is I/O, not done under the lock. (The one
		// before them, if it ends the stream, says that nothing is left.)
		i := max(sort.Search(len(s.entries), func(i int) bool { return s.entries[i].last > id })-1, 0)
		entries := append([]replayEntry(nil), s.entries[i:]...)
		producing, changed := s.producing, s.changed
		m.mu.Unlock()
		var ended bool
		var err error
		if id, ended, err = replayFrom(entries, id, emit); err != nil || ended {
			return err
		}
		if !producing {
			return &GoneError{After: max(id, 0)}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}
