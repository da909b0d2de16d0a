package voice

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// errSlow means a peer does not read fast enough: its queue is full.
var errSlow = errors.New("voice: peer is not keeping up")

// outMsg is one queued message, or a close when close is set.
type outMsg struct {
	typ   websocket.MessageType
	data  *[]byte // owned by the sender once queued; returned to the pool after writing
	close *closeFrame
}

type closeFrame struct {
	code   websocket.StatusCode
	reason string
}

// sender writes to one connection through a bounded queue. Producers never block: a message that
// does not fit means the peer cannot keep up. A writer goroutine runs only while the queue has
// something in it, so an idle session holds none.
type sender struct {
	conn    *websocket.Conn
	release func(*[]byte) // returns a written buffer to its pool
	timeout time.Duration // per write
	max     int           // queued bytes allowed

	mu      sync.Mutex
	queue   []outMsg
	queued  int
	running bool
	done    bool          // a close was queued, or a write failed: accept nothing more
	idle    chan struct{} // closed when the writer finishes after done; nil until asked for
	failed  func(error)   // called once if a write fails
}

func newSender(conn *websocket.Conn, release func(*[]byte), timeout time.Duration, max int, failed func(error)) *sender {
	return &sender{conn: conn, release: release, timeout: timeout, max: max, failed: failed}
}

// send queues data (taking ownership of the pooled buffer). It returns errSlow when the queue is
// full; the buffer is then released.
func (s *sender) send(typ websocket.MessageType, data *[]byte) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		s.release(data)
		return errClosed
	}
	if s.queued+len(*data) > s.max && len(s.queue) > 0 {
		s.mu.Unlock()
		s.release(data)
		return errSlow
	}
	s.queue = append(s.queue, outMsg{typ: typ, data: data})
	s.queued += len(*data)
	s.startLocked()
	s.mu.Unlock()
	return nil
}

// errClosed is returned by send once the connection is finished.
var errClosed = errors.New("voice: connection closed")

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

func (s *sender) startLocked() {
	if !s.running {
		s.running = true
		go s.run()
	}
}

func (s *sender) run() {
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			s.running = false
			if s.done && s.idle != nil {
				close(s.idle)
				s.idle = nil
			}
			s.mu.Unlock()
			return
		}
		m := s.queue[0]
		s.queue[0] = outMsg{}
		s.queue = s.queue[1:]
		if len(s.queue) == 0 {
			s.queue = s.queue[:0:0] // let a grown backing array go
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
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		err := s.conn.Write(ctx, m.typ, *m.data)
		cancel()
		s.release(m.data)
		if err != nil {
			s.fail(err)
		}
	}
}

// fail drops what is queued and reports the failure once.
func (s *sender) fail(err error) {
	s.mu.Lock()
	for _, m := range s.queue {
		if m.data != nil {
			s.release(m.data)
		}
	}
	s.queue, s.queued = nil, 0
	first := !s.done || s.failed != nil
	s.done = true
	f := s.failed
	s.failed = nil
	s.mu.Unlock()
	if first && f != nil {
		f(err)
	}
}

// drained returns a channel closed once the sender has finished (after close or failure) and
// its writer has stopped.
func (s *sender) drained() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	if !s.running {
		close(ch)
		return ch
	}
	s.idle = ch
	return ch
}
