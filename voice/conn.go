package voice

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"
)

// conn is one side's socket under its coder/websocket connection. Every Read and Write the
// library makes, its own control frames included, passes through here and gets a deadline, so
// no socket operation of a session is ever unbounded.
//
// Deadlines are refreshed lazily: a call moves the deadline only when it would otherwise fall
// less than 7/8 of the timeout away, so a busy connection pays a clock read per call and a
// deadline update now and then, not one per frame. A write is therefore bounded by somewhere
// between 7/8 of the write timeout and all of it.
type conn struct {
	net.Conn
	readTimeout, writeTimeout time.Duration
	readBy, writeBy           atomic.Int64 // unix ns of the deadline last set; 0 none
	writeTimedOut             atomic.Bool  // a write missed its deadline: the peer is not reading
}

func newConn(c net.Conn, read, write time.Duration) *conn {
	limitUnsent(c)
	return &conn{Conn: c, readTimeout: read, writeTimeout: write}
}

// unsentLimit is how much a socket queues in the kernel beyond what its peer's receive window
// has taken: a write waits, and its deadline runs, once this much is queued and not yet sent.
// Left to itself, Linux grows a fast connection's send buffer to megabytes, all of which a peer
// that stopped reading lets the gateway fill before a write waits at all; with writes of a few
// bytes (pongs to a ping flood, a control message) that took many times the write timeout, so
// the timeout bounded nothing. It does not slow a peer that reads: the bytes in flight are not
// limited, only those waiting behind them, and 16 KiB is half a second of 16 kHz audio. It also
// keeps TTS that a barge-in drops out of the kernel, where it could no longer be dropped.
const unsentLimit = 16 << 10

func (c *conn) Read(p []byte) (int, error) {
	if c.readTimeout > 0 {
		refresh(&c.readBy, c.readTimeout, c.Conn.SetReadDeadline)
	}
	return c.Conn.Read(p)
}

func (c *conn) Write(p []byte) (int, error) {
	if c.writeTimeout > 0 {
		refresh(&c.writeBy, c.writeTimeout, c.Conn.SetWriteDeadline)
	}
	n, err := c.Conn.Write(p)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		c.writeTimedOut.Store(true)
	}
	return n, err
}

// refresh moves a deadline to now+timeout unless it is still at least 7/8 of that away.
func refresh(by *atomic.Int64, timeout time.Duration, set func(time.Time) error) {
	now := time.Now()
	if by.Load()-now.UnixNano() >= int64(timeout-timeout/8) {
		return
	}
	d := now.Add(timeout)
	by.Store(d.UnixNano())
	_ = set(d)
}

// slow reports whether a write to this side missed its deadline.
func (c *conn) slow() bool { return c.writeTimedOut.Load() }

// drop closes the socket under the WebSocket, at once: every goroutine reading or writing it
// returns. The library's own CloseNow would wait for a close handshake already under way.
func (c *conn) drop() { _ = c.Conn.Close() }

// The read and write buffers on the client's socket. A session holds both for its whole life,
// idle or not, so they are smaller than the 4 KiB net/http made for the request. What the
// client sends is mostly audio: 1 KiB takes a frame of up to 30 ms of 16 kHz PCM (and its
// header) in one system call. What it receives is events and TTS chunks: 2 KiB takes a chunk of
// up to 60 ms in one. Longer messages take a system call per buffer's worth.
const (
	clientReadBuf  = 1 << 10
	clientWriteBuf = 2 << 10
)

// hijacker hands coder/websocket's Accept the client's socket wrapped in a conn, with buffers
// of its own around it (net/http's go with the request), so that every byte of the session
// goes through the deadlines. The handler keeps the conn to drop a dead client.
type hijacker struct {
	http.ResponseWriter
	read, write time.Duration
	conn        *conn
}

func (h *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if err := brw.Writer.Flush(); err != nil { // nothing is buffered after the 101; be sure
		nc.Close()
		return nil, nil, err
	}
	h.conn = newConn(nc, h.read, h.write)
	br := bufio.NewReaderSize(h.conn, clientReadBuf)
	// What the client sent right after its upgrade request may be buffered already: it moves
	// into the new buffer, where Accept looks for it.
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		br = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(early)), h.conn), max(n, clientReadBuf))
		if _, err := br.Peek(n); err != nil {
			nc.Close()
			return nil, nil, err
		}
	}
	return h.conn, bufio.NewReadWriter(br, bufio.NewWriterSize(h.conn, clientWriteBuf)), nil
}

func (h *hijacker) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// Dialer dials the algorithm service's sockets, wrapping each in a conn. It is the
// DialContext of the transport voice dials go through (see Options.Transport).
type Dialer struct {
	// DialContext makes the TCP (or TLS) connection; nil means a net.Dialer with a 5 s timeout.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// ReadTimeout and WriteTimeout bound every read and write on the socket.
	ReadTimeout, WriteTimeout time.Duration
}

// Dial implements the Transport's DialContext.
func (d *Dialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	dial := d.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	c, err := dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return newConn(c, d.ReadTimeout, d.WriteTimeout), nil
}

// unbounded is the context of every WebSocket read and write of a session. Their bound is the
// socket's deadline (see conn), not a context: one with a deadline would cost an allocation
// and a timer per frame.
func unbounded() context.Context { return context.Background() }
