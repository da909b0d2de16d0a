package voice

import "github.com/coder/websocket"

// downRing is a session's recent downlink: the last messages sent (or meant) for its client,
// numbered, in one byte arena used as a circular buffer, so that keeping them costs a copy per
// message and no allocation. It is bounded in bytes: a message evicts the oldest until it fits,
// and one bigger than the whole arena is not kept (a resume that needs it gets RESUME_GAP). The
// arena starts small and doubles up to its bound as messages need room, so that an idle session
// holds a few KiB, not the bound. The session's wmu guards it.
type downRing struct {
	max  int // the arena's bound
	buf  []byte
	ents []ringEntry // circular, oldest at head
	head int         // index of the oldest entry in ents
	n    int         // entries held
	used int         // bytes of buf held
	end  int         // where the next message's bytes go in buf
}

type ringEntry struct {
	seq  int64
	typ  websocket.MessageType
	off  int // in buf; a message that would wrap starts again at 0
	size int
	skip int // bytes left unused at the end of buf before this entry (it wrapped)
}

// ringStart is the arena a session's ring starts with.
const ringStart = 8 << 10

func newDownRing(bytes int) *downRing {
	return &downRing{max: bytes, buf: make([]byte, min(ringStart, bytes)), ents: make([]ringEntry, 16)}
}

// add keeps message seq.
func (r *downRing) add(seq int64, typ websocket.MessageType, msg []byte) {
	if len(msg) > r.max {
		r.clear() // kept entries and this one would not be contiguous in numbering: drop all
		return
	}
	for len(r.buf) < r.max && r.used+len(msg) > len(r.buf)/2 {
		r.enlarge()
	}
	off, skip := r.end, 0
	if off+len(msg) > len(r.buf) {
		skip, off = len(r.buf)-off, 0
	}
	for r.n > 0 && r.used+skip+len(msg) > len(r.buf) {
		r.evict()
	}
	if r.n == 0 {
		// Empty: start at 0, nothing to skip.
		off, skip, r.used = 0, 0, 0
	}
	if r.n == len(r.ents) {
		r.grow()
	}
	copy(r.buf[off:], msg)
	r.ents[(r.head+r.n)%len(r.ents)] = ringEntry{seq: seq, typ: typ, off: off, size: len(msg), skip: skip}
	r.n++
	r.used += skip + len(msg)
	r.end = off + len(msg)
}

func (r *downRing) evict() {
	e := r.ents[r.head]
	r.used -= e.skip + e.size
	r.head = (r.head + 1) % len(r.ents)
	r.n--
	if r.n == 0 {
		r.used, r.end = 0, 0
	}
}

func (r *downRing) grow() {
	ents := make([]ringEntry, 2*len(r.ents))
	for i := range r.n {
		ents[i] = r.ents[(r.head+i)%len(r.ents)]
	}
	r.ents, r.head = ents, 0
}

// enlarge doubles the arena (up to its bound), the entries kept moved to its start in order.
func (r *downRing) enlarge() {
	buf := make([]byte, min(2*len(r.buf), r.max))
	off := 0
	for i := range r.n {
		e := &r.ents[(r.head+i)%len(r.ents)]
		copy(buf[off:], r.buf[e.off:e.off+e.size])
		e.off, e.skip = off, 0
		off += e.size
	}
	r.buf, r.used, r.end = buf, off, off
}

func (r *downRing) clear() { r.head, r.n, r.used, r.end = 0, 0, 0, 0 }

// first is the number of the oldest message kept; 0 when none is.
func (r *downRing) first() int64 {
	if r.n == 0 {
		return 0
	}
	return r.ents[r.head].seq
}

// from returns the oldest message numbered seq or more: its type and bytes (in the arena:
// valid until the next add), and ok false when there is none.
func (r *downRing) from(seq int64) (got int64, typ websocket.MessageType, msg []byte, ok bool) {
	if r.n == 0 {
		return 0, 0, nil, false
	}
	first := r.ents[r.head].seq
	i := 0
	if seq > first {
		i = int(seq - first) // numbers are consecutive within the ring
	}
	if i >= r.n {
		return 0, 0, nil, false
	}
	e := r.ents[(r.head+i)%len(r.ents)]
	return e.seq, e.typ, r.buf[e.off : e.off+e.size], true
}
