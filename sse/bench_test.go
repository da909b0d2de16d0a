package sse_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"strconv"
	"testing"

	"voicegate/sse"
)

// benchLine is a typical 200-byte generation chunk (199 bytes plus its newline).
var benchLine = func() []byte {
	l := []byte(`{"type":"generation_chunk","content":"A token or two of the answer, padded to look like a real chunk with metadata","index":12345,"model":"voice-llm-large","finish_reason":null,"pad":"`)
	for len(l) < 197 {
		l = append(l, 'x')
	}
	l = append(l, `"}`...)
	return append(l, '\n')
}()

// lineSource yields n copies of a line, then a generation_done line, in reads of whatever size
// the caller asks for, without holding n lines in memory.
type lineSource struct {
	block []byte // many whole copies of the line
	per   int    // lines per block
	left  int    // lines still to send
	off   int
	tail  []byte
}

func newLineSource(line []byte, n int) *lineSource {
	per := (64 << 10) / len(line)
	return &lineSource{block: bytes.Repeat(line, per), per: per, left: n,
		tail: []byte(`{"type":"generation_done"}` + "\n")}
}

func (s *lineSource) Read(p []byte) (int, error) {
	if s.left == 0 {
		if len(s.tail) == 0 {
			return 0, io.EOF
		}
		n := copy(p, s.tail)
		s.tail = s.tail[n:]
		return n, nil
	}
	lineLen := len(s.block) / s.per
	avail := s.block[s.off:]
	if max := s.left*lineLen - s.off%lineLen; len(avail) > max {
		avail = avail[:max]
	}
	n := copy(p, avail)
	// Count the lines completed by this read.
	s.left -= (s.off%lineLen + n) / lineLen
	s.off += n
	if s.off == len(s.block) {
		s.off = 0
	}
	return n, nil
}

// BenchmarkRewriter compares the Rewriter with the obvious standard-library way of doing the
// same job (bufio.Scanner, decode to a map, add the members, encode) on 200-byte lines. One op is
// one line. Run with -cpu 1 for the one-core figure.
func BenchmarkRewriter(b *testing.B) {
	b.Run("voicegate", func(b *testing.B) {
		b.SetBytes(int64(len(benchLine)))
		b.ReportAllocs()
		src := newLineSource(benchLine, b.N)
		rw := sse.NewRewriter(sse.Options{RequestID: "bench-request-0001"})
		buf := make([]byte, 2<<10) // the stream's upstream read buffer, as in production
		var out []byte
		b.ResetTimer()
		for !rw.Finished() {
			n, err := src.Read(buf)
			rw.Write(buf[:n])
			if err != nil {
				rw.End(err)
			}
			out = rw.Take(out[:0])
		}
		b.StopTimer()
		if got := rw.Stats().LinesProcessed; got != int64(b.N)+1 {
			b.Fatalf("processed %d lines, want %d", got, b.N+1)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "lines/s")
	})
	b.Run("stdlib", func(b *testing.B) {
		b.SetBytes(int64(len(benchLine)))
		b.ReportAllocs()
		sc := bufio.NewScanner(newLineSource(benchLine, b.N))
		sc.Buffer(make([]byte, 2<<10), 1<<20)
		w := bufio.NewWriter(io.Discard)
		n := 0
		b.ResetTimer()
		for sc.Scan() {
			var m map[string]any
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				b.Fatal(err)
			}
			n++
			m["request_id"], m["line_number"], m["timestamp"] = "bench-request-0001", n, 1700000000000
			data, _ := json.Marshal(m)
			typ, _ := m["type"].(string)
			w.WriteString("id: " + strconv.Itoa(n) + "\nevent: " + typ + "\ndata: ")
			w.Write(data)
			w.WriteString("\n\n")
		}
		w.Flush()
		b.StopTimer()
		if n != b.N+1 {
			b.Fatalf("processed %d lines, want %d", n, b.N+1)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "lines/s")
	})
}
