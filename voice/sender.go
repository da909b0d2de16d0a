package voice

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// Sender errors.
var (
	errSlow   = errors.New("voice: peer is not keeping up") // its queue is full
	errClosed = errors.New("voice: connection closed")      // nothing more is sent
)

// writerLinger is how long a writer goroutine waits for more after draining its queue: during
// a conversation messages come every few tens of milliseconds, and re-using the goroutine beats
// starting one per message; an idle session keeps none.
const writerLinger = time.Second

// outMsg is one queued message, or a close when close is set.
type outMsg struct {
	typ   websocket.MessageType
	data  *[]byte // owned by the sender once queued; released after writing
	close *closeFrame
}

type closeFrame struct {
	code   websocket.StatusCode
	reason string
}

// sender writes to one connection through a bounded queue. Producers never block: a message that
// does not fit means the peer cannot keep up. A writer goroutine runs only while there is
// something to write (and lingers a moment after).
type sender struct {
	conn    *websocket.Conn
	release func(*[]byte) // returns a buffer to its pool
	max     int           // queued bytes allowed
	// writing is when the write in progress began (unix ns), 0 when none: the session's timer
	// drops a peer that takes too long, which costs nothing per write, unlike a deadline.
	writing atomic.Int64

	mu      sync.Mutex
	queue   []outMsg
	queued  int
	running bool
	done    bool            // a close was queued, or the sender was stopped: accept nothing more
	wake    chan struct{}   // nudges a lingering writer
	idle    []chan struct{} // closed when the writer stops
	failed  func(error)     // called once if a write fails
}

func newSender(conn *websocket.Conn, release func(*[]byte), max int, failed func(error)) *sender {
	return &sender{conn: conn, release: release, max: max, failed: failed, wake: make(chan struct{}, 1)}
}

// stuck reports how long the write in progress has taken (0 when none).
func (s *sender) stuck(now time.Time) time.Duration {
	if t := s.writing.Load(); t != 0 {
		return now.Sub(time.Unix(0, t))
	}
	return 0
}

// send queues data, taking ownership of the buffer. It returns errSlow when the queue is full
// and errClosed when the sender is finished; the buffer is released either way.
func (s *sender) send(typ websocket.MessageType, data *[]byte) error {
	return s.enqueue(outMsg{typ: typ, data: data}, false)
}

// sendAnyway queues data even over the limit: for the few messages that explain a close.
func (s *sender) sendAnyway(typ websocket.MessageType, data *[]byte) {
	_ = s.enqueue(outMsg{typ: typ, data: data}, true)
}

func (s *sender) enqueue(m outMsg, force bool) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		s.release(m.data)
		return errClosed
	}
	if !force && s.queued+len(*m.data) > s.max && len(s.queue) > 0 {
		s.mu.Unlock()
		s.release(m.data)
		return errSlow
	}
	s.queue = append(s.queue, m)
	s.queued += len(*m.data)
	s.startLocked()
	s.mu.Unlock()
	return nil
}

// close queues a close frame after whatever is queued; later sends are refused.
func (s *sender) close(code websocket.StatusCode, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.done = true
	s.queue = append(s.queue, outMsg{close: &closeFrame{code, reason}})
	s.startLocked()
}

// stop drops whatever is queued and refuses more (the connection is being torn down).
func (s *sender) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
	s.dropLocked()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *sender) dropLocked() {
	for _, m := range s.queue {
		if m.data != nil {
			s.release(m.data)
		}
	}
	s.queue, s.queued = nil, 0
}

func (s *sender) startLocked() {
	if s.running {
		select {
		case s.wake <- struct{}{}:
		default:
		}
		return
	}
	s.running = true
	go s.run()
}

func (s *sender) run() {
	var linger *time.Timer
	defer func() {
		if linger != nil {
			linger.Stop()
		}
	}()
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			if s.done {
				s.stopLocked()
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			if linger == nil {
				linger = time.NewTimer(writerLinger)
			} else {
				linger.Reset(writerLinger)
			}
			select {
			case <-s.wake:
				continue
			case <-linger.C:
			}
			s.mu.Lock()
			if len(s.queue) == 0 {
				s.stopLocked()
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			continue
		}
		m := s.queue[0]
		s.queue[0] = outMsg{}
		s.queue = s.queue[1:]
		if len(s.queue) == 0 {
			s.queue = nil // let a grown backing array go
		}
		if m.data != nil {
			s.queued -= len(*m.data)
		}
		s.mu.Unlock()

		if m.close != nil {
			// Close waits for the peer's close frame (up to 5 s in the library) and then
			// closes the TCP connection.
			_ = s.conn.Close(m.close.code, m.close.reason)
			continue
		}
		s.writing.Store(time.Now().UnixNano())
		err := s.conn.Write(context.Background(), m.typ, *m.data)
		s.writing.Store(0)
		s.release(m.data)
		if err != nil {
			s.fail(err)
		}
	}
}

// stopLocked marks the writer stopped and tells whoever waits.
func (s *sender) stopLocked() {
	s.running = false
	for _, ch := range s.idle {
		close(ch)
	}
	s.idle = nil
}

// fail drops what is queued and reports the failure once.
func (s *sender) fail(err error) {
	s.mu.Lock()
	s.dropLocked()
	s.done = true
	f := s.failed
	s.failed = nil
	s.mu.Unlock()
	if f != nil {
		f(err)
	}
}

// drained returns a channel closed once the writer has stopped; call it after close or stop.
func (s *sender) drained() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	if !s.running {
		close(ch)
		return ch
	}
	s.idle = append(s.idle, ch)
	return ch
}
