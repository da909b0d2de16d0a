package sse_test

import (
	"fmt"
	"io"
	"time"

	"voicegate/sse"
)

func ExampleRewriter() {
	rw := sse.NewRewriter(sse.Options{
		RequestID: "r1",
		Now:       func() time.Time { return time.UnixMilli(1700000000000) },
	})
	// The upstream's bytes go in as they come, cut anywhere; whole events come out.
	io.WriteString(rw, `{"type":"generation_chunk","con`)
	io.WriteString(rw, `tent":"Hello"}`+"\n"+`{"type":"generation_done"}`+"\n")
	fmt.Print(string(rw.Take(nil)))
	// Output:
	// retry: 2000
	// event: stream_start
	// data: {"request_id":"r1","timestamp":1700000000,"timestamp_ms":1700000000000}
	//
	// id: 1
	// event: generation_chunk
	// data: {"type":"generation_chunk","content":"Hello","request_id":"r1","line_number":1,"timestamp":1700000000,"timestamp_ms":1700000000000}
	//
	// id: 2
	// event: generation_done
	// data: {"type":"generation_done","request_id":"r1","line_number":2,"timestamp":1700000000,"timestamp_ms":1700000000000}
	//
	// id: 3
	// event: stream_end
	// data: {"request_id":"r1","lines_processed":2,"lines_skipped":0,"outcome":"completed","duration_ms":0,"timestamp":1700000000,"timestamp_ms":1700000000000}
}
