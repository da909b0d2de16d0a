package sse

import "net/http"

// framer turns the algorithm service's NDJSON answer into what one kind of client reads: the
// Rewriter into voicegate's event stream, completionFramer into OpenAI's chat.completion.chunk
// events or one chat.completion, answerFramer into one JSON answer of voicegate's. Like the
// Rewriter, a framer does no I/O and holds no goroutine, timer or lock: the pipe feeds it
// under its lock and writes what Take returns.
type framer interface {
	// Write consumes upstream bytes, whatever their chunk boundaries; it never fails.
	Write(data []byte) (int, error)
	// End handles the end of the upstream body; err is what ended it (io.EOF: a clean end).
	End(err error)
	// Interrupt ends the answer early: stopCancelled or stopShutdown.
	Interrupt(why string)
	// Fail ends the answer with a fatal in-stream error.
	Fail(code, message, outcome string)
	// Take returns the encoded output so far appended to dst, and forgets it.
	Take(dst []byte) []byte
	Pending() int
	// LastID is the id of the last event encoded, for the replay log; zero before the first.
	LastID() int64
	Finished() bool
	Stats() Stats
	// ShutdownNotice appends a notice that the stream goes on without this client: it should
	// resume elsewhere.
	ShutdownNotice(dst []byte) []byte
	// Head sets the response's headers and returns its status, before the first write: a
	// stream's are known at once, a single answer's only once it is complete.
	Head(h http.Header) int
}

// Head sets the event stream's headers: the status is 200 as soon as the upstream answered.
func (rw *Rewriter) Head(h http.Header) int {
	setStreamHeaders(h)
	return http.StatusOK
}

// format is one kind of answer a chat route gives: how its framer is made, and whether it is
// a stream (pinged while silent, resumable) or a single answer.
type format struct {
	// newFramer makes the framer of the query q; events are counted into t (nil: not), and
	// firstLine, if set, is called when the first upstream line arrives.
	newFramer func(o *HandlerOptions, q *queryRequest, t *tally, firstLine func()) framer
	// single means one answer written once complete: no pings, no replay log, no resume.
	single bool
}

// v2Stream is POST /api/v2/chat/stream's format: DESIGN.md's event stream.
func v2Stream() format {
	return format{newFramer: func(o *HandlerOptions, q *queryRequest, t *tally, firstLine func()) framer {
		ro := o.rewriterOptions(q.RequestID, t)
		ro.OnFirstLine = firstLine
		return NewRewriter(ro)
	}}
}

// v2GapEnd ends a resumed v2 stream the log cannot complete: a fatal error event of code,
// then stream_end, numbered after last.
func v2GapEnd(requestID string, last int64, code, msg, outcome string, now int64) []byte {
	enc := newEncoder(requestID)
	b := enc.appendGatewayEvent(nil, last+1, EventError, now, field("code", code), field("message", msg), field("fatal", true))
	return enc.appendGatewayEvent(b, last+2, EventEnd, now, field("outcome", outcome))
}
