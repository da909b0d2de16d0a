package voice

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/coder/websocket"
)

// TestDownRing: whatever the sizes of the messages, the ring holds the latest ones, numbered
// without a hole, each with its bytes intact, and never more bytes than its arena; a message
// bigger than the arena empties it (a resume that needs what came before then gets RESUME_GAP).
func TestDownRing(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{64, 1000, 4096, 40000} {
		r := newDownRing(size)
		msgs := map[int64][]byte{}
		for seq := int64(1); seq <= 5000; seq++ {
			n := rng.IntN(size/3 + 1)
			if seq%997 == 0 {
				n = size + 1 // too big to keep
			}
			msg := make([]byte, n)
			for i := range msg {
				msg[i] = byte(seq + int64(i))
			}
			typ := websocket.MessageText
			if seq%2 == 0 {
				typ = websocket.MessageBinary
			}
			r.add(seq, typ, msg)
			msgs[seq] = msg
			if r.used > len(r.buf) || len(r.buf) > size {
				t.Fatalf("size %d: %d bytes used of %d", size, r.used, len(r.buf))
			}
			if n > size {
				if r.n != 0 {
					t.Fatalf("size %d: a message over the arena left %d kept", size, r.n)
				}
				continue
			}
			// The newest is always kept; everything kept is consecutive and intact.
			first := r.first()
			if first == 0 || first > seq {
				t.Fatalf("size %d, seq %d: first kept %d", size, seq, first)
			}
			held := 0
			for want := first; want <= seq; want++ {
				got, gtyp, b, ok := r.from(want)
				if !ok || got != want {
					t.Fatalf("size %d: from(%d) = %d %v, want it (first %d, last %d)", size, want, got, ok, first, seq)
				}
				if !bytes.Equal(b, msgs[want]) || (gtyp == websocket.MessageBinary) != (want%2 == 0) {
					t.Fatalf("size %d: message %d corrupted", size, want)
				}
				held += len(b)
			}
			if held > size {
				t.Fatalf("size %d: %d bytes held", size, held)
			}
			if _, _, _, ok := r.from(seq + 1); ok {
				t.Fatalf("size %d: from(%d) found a message not yet sent", size, seq+1)
			}
			// Asking from before the first gives the first: the caller sees the gap.
			if got, _, _, ok := r.from(1); !ok || got != first {
				t.Fatalf("size %d: from(1) = %d, want the first kept %d", size, got, first)
			}
		}
	}
}

// TestConsecutiveTail: a log with holes is replayed only from its last hole on, and not at all
// when it does not reach the seal.
func TestConsecutiveTail(t *testing.T) {
	e := func(seqs ...int64) []logEntry {
		var out []logEntry
		for _, s := range seqs {
			out = append(out, logEntry{seq: s})
		}
		return out
	}
	seqsOf := func(es []logEntry) []int64 {
		var out []int64
		for _, x := range es {
			out = append(out, x.seq)
		}
		return out
	}
	for _, tt := range []struct {
		in   []logEntry
		base int64
		want []int64
	}{
		{e(3, 4, 5), 5, []int64{3, 4, 5}},
		{e(3, 5, 6), 6, []int64{5, 6}},
		{e(3, 4, 5), 7, nil},
		{nil, 4, nil},
	} {
		if got := seqsOf(consecutiveTail(tt.in, tt.base)); !equalInts(got, tt.want) {
			t.Errorf("consecutiveTail(%v, %d) = %v, want %v", seqsOf(tt.in), tt.base, got, tt.want)
		}
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
