package sse_test

import (
	"fmt"
	"io"
	"strings"
	"time"

	"voicegate/sse"
)

func ExampleRewriter() {
	upstream := io.NopCloser(strings.NewReader(
		`{"type":"generation_chunk","content":"Hello"}` + "\n" +
			`{"type":"generation_done"}` + "\n"))
	rw := sse.NewRewriter(upstream, sse.Options{
		RequestID: "r1",
		Now:       func() time.Time { return time.UnixMilli(1700000000000) },
	})
	defer rw.Close()
	out, _ := io.ReadAll(rw)
	fmt.Print(string(out))
	// Output:
	// event: stream_start
	// data: {"request_id":"r1","timestamp":1700000000000}
	//
	// id: 1
	// event: generation_chunk
	// data: {"type":"generation_chunk","content":"Hello","request_id":"r1","line_number":1,"timestamp":1700000000000}
	//
	// id: 2
	// event: generation_done
	// data: {"type":"generation_done","request_id":"r1","line_number":2,"timestamp":1700000000000}
	//
	// event: stream_end
	// data: {"request_id":"r1","lines_processed":2,"lines_skipped":0,"outcome":"completed","duration_ms":0,"timestamp":1700000000000}
}
