package sse

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// lines splits an upstream NDJSON body into complete lines, whatever the chunk boundaries,
// holding at most max bytes of an incomplete line: a longer line is skipped to its end.
type lines struct {
	max      int
	partial  []byte
	dropping bool
}

// feed calls line for each complete line of data and tooLong for each over-long one.
func (l *lines) feed(data []byte, line func([]byte), tooLong func()) {
	for len(data) > 0 {
		nl := bytes.IndexByte(data, '\n')
		if l.dropping {
			if nl < 0 {
				return
			}
			l.dropping = false
			data = data[nl+1:]
			continue
		}
		if nl < 0 {
			if len(l.partial)+len(data) > l.max {
				l.clear()
				l.dropping = true
				tooLong()
				return
			}
			l.partial = append(l.partial, data...)
			return
		}
		one := data[:nl]
		data = data[nl+1:]
		if len(l.partial)+len(one) > l.max {
			l.clear()
			tooLong()
			continue
		}
		if len(l.partial) > 0 {
			l.partial = append(l.partial, one...)
			one = l.partial
		}
		line(one)
		l.clear()
	}
}

// rest is an incomplete last line (an upstream may omit the final newline), or nil.
func (l *lines) rest() []byte {
	if l.dropping || len(l.partial) == 0 {
		return nil
	}
	return l.partial
}

func (l *lines) clear() {
	if cap(l.partial) > 64<<10 {
		l.partial = nil
		return
	}
	l.partial = l.partial[:0]
}

// upstreamLine is what the OpenAI framings read of an upstream line. Lines of other types
// (retrieval_*, generation_start, …) are counted and not shown: OpenAI's chunks have no
// place for them.
type upstreamLine struct {
	Type         string          `json:"type"`
	Content      *string         `json:"content"`
	Text         *string         `json:"text"`
	FinishReason string          `json:"finish_reason"`
	Usage        *upstreamUsage  `json:"usage"`
	Message      string          `json:"message"`
	Error        json.RawMessage `json:"error"`
	Code         json.RawMessage `json:"code"`
}

// upstreamUsage is the token usage an algorithm service may report with generation_done.
type upstreamUsage struct {
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	TotalTokens      int64 `json:"total_tokens"`
}

// text is the line's generated text: "content", else "text".
func (u *upstreamLine) text() string {
	switch {
	case u.Content != nil:
		return *u.Content
	case u.Text != nil:
		return *u.Text
	}
	return ""
}

// finishReason maps the upstream's finish reason onto OpenAI's: stop, length and
// content_filter stand for themselves; anything else, or none, is stop.
func finishReason(s string) string {
	switch s {
	case "length", "max_tokens":
		return "length"
	case "content_filter":
		return "content_filter"
	}
	return "stop"
}

// answer is what an OpenAI framing has learnt of the answer: the parts every framing shares.
type answer struct {
	lines   lines
	scratch []byte // scanObject's stack
	onEvent func(string)
	first   func()
	stats   Stats
	lineNo  int64
	usage   *upstreamUsage
	// raw, if set, takes a generation_chunk's "content" as the raw JSON string it is, when the
	// line needs no decoding (the hot path of a stream); lineEnds says it holds raw U+0085,
	// U+2028 or U+2029.
	raw func(content []byte, lineEnds bool)
}

// feed handles upstream bytes; each usable line goes to use.
func (a *answer) feed(data []byte, use func(*upstreamLine)) {
	a.lines.feed(data, func(l []byte) { a.line(l, use) }, func() {
		a.lineNo++
		a.stats.LinesSkipped++
	})
}

// line decodes one line: its type is found without decoding (scanObject), and only the
// types the framing shows are decoded.
func (a *answer) line(l []byte, use func(*upstreamLine)) {
	l = bytes.TrimSuffix(l, []byte{'\r'})
	if len(bytes.Trim(l, " \t\r")) == 0 {
		return
	}
	a.lineNo++
	if a.lineNo == 1 && a.first != nil {
		a.first()
	}
	obj, ok := scanObject(l, a.scratch)
	if !ok {
		a.stats.LinesSkipped++
		return
	}
	a.stats.LinesProcessed++
	typ := knownEvent(obj.typ)
	if obj.slow {
		var probe struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(l, &probe)
		typ = knownEvent([]byte(probe.Type))
	}
	if a.onEvent != nil {
		a.onEvent(typ)
	}
	if typ == "generation_chunk" && a.raw != nil && !obj.slow && obj.content != nil && !obj.contentOdd {
		a.raw(obj.content, obj.lineEnds)
		return
	}
	switch typ {
	case "generation_chunk", "generation_done", "done", EventError:
	default:
		return // retrieval_*, generation_start and other types: not part of OpenAI's answer
	}
	var u upstreamLine
	if err := json.Unmarshal(l, &u); err != nil {
		return
	}
	u.Type = typ
	if u.Usage != nil {
		a.usage = u.Usage
	}
	use(&u)
}

// end handles the end of the upstream: a last line without its newline is still a line.
func (a *answer) end(err error, use func(*upstreamLine)) {
	if rest := a.lines.rest(); rest != nil && errors.Is(err, io.EOF) {
		last := append([]byte(nil), rest...)
		a.lines.clear()
		a.line(last, use)
	}
}

// upstreamError describes an error line of the upstream for the client: its message, or a
// generic one (the upstream's text is the algorithm service's to choose, never its hosts').
func (u *upstreamLine) errorMessage() string {
	if u.Message != "" {
		return u.Message
	}
	var s string
	if json.Unmarshal(u.Error, &s) == nil && s != "" {
		return s
	}
	return "the algorithm service reported an error"
}

// OpenAI error types, as the SDKs' error classes are chosen by status and read "type".
const (
	oaiInvalidRequest = "invalid_request_error"
	oaiServerError    = "server_error"
)

// appendOpenAIError appends an OpenAI error object: {"error":{"message","type","param","code"}}.
func appendOpenAIError(dst []byte, message, typ, code string, extra ...string) []byte {
	dst = append(dst, `{"error":{"message":`...)
	dst = appendJSONString(dst, message)
	dst = append(dst, `,"type":`...)
	dst = appendJSONString(dst, typ)
	dst = append(dst, `,"param":null,"code":`...)
	dst = appendJSONString(dst, code)
	for _, f := range extra {
		dst = append(dst, ',')
		dst = append(dst, f...)
	}
	return append(dst, "}}"...)
}

// appendJSONString appends s as a JSON string that is safe on one SSE data line: encoding/json
// escapes control characters, U+2028 and U+2029 and replaces invalid UTF-8; U+0085 is escaped
// here.
func appendJSONString(dst []byte, s string) []byte {
	b, _ := json.Marshal(s)
	if indexLineEnd(b) >= 0 {
		return appendEscapingLineEnds(dst, b)
	}
	return append(dst, b...)
}

// CompletionID is the OpenAI completion ID of a gateway request ID, also its stream's request
// ID: cancels and resumes name it.
func CompletionID(requestID string) string { return completionPrefix + requestID }

const completionPrefix = "chatcmpl-"

// completionFramer turns the upstream answer into OpenAI's chat.completion.chunk events:
// the assistant role, one content delta per generation_chunk, the finish reason, a usage chunk
// when asked, and data: [DONE] only when the upstream ended cleanly. Anything else that ends
// the answer (an upstream error line, an upstream that stops without generation_done, a
// cancel, a drain, a revocation) is an error object and no [DONE]: an SDK raises it rather
// than mistaking a cut answer for a whole one.
type completionFramer struct {
	a            answer
	includeUsage bool
	prefix       []byte // `{"id":…,"object":"chat.completion.chunk","created":…,"model":…,`
	out          []byte
	id           int64
	finished     bool
	retryAfter   time.Duration
}

func newCompletionFramer(o *HandlerOptions, q *queryRequest, t *tally, first func(), includeUsage bool) *completionFramer {
	f := &completionFramer{includeUsage: includeUsage, retryAfter: o.RetryAfter}
	if f.retryAfter <= 0 {
		f.retryAfter = 5 * time.Second
	}
	f.a = answer{lines: lines{max: maxLine(o.MaxLineBytes)}, scratch: make([]byte, 0, 16), first: first}
	if t != nil {
		f.a.onEvent = t.add
	}
	f.a.raw = f.rawContent
	f.prefix = append(f.prefix, `{"id":`...)
	f.prefix = appendJSONString(f.prefix, q.RequestID)
	f.prefix = append(f.prefix, `,"object":"chat.completion.chunk","created":`...)
	f.prefix = strconv.AppendInt(f.prefix, o.Now().Unix(), 10)
	f.prefix = append(f.prefix, `,"model":`...)
	f.prefix = appendJSONString(f.prefix, q.Model)
	f.prefix = append(f.prefix, `,"system_fingerprint":null,`...)
	// The role comes first, as soon as the upstream has answered.
	f.chunk(`{"role":"assistant","content":""}`, "", "")
	return f
}

func maxLine(n int) int {
	if n <= 0 {
		return DefaultMaxLineBytes
	}
	return n
}

// chunk appends one chat.completion.chunk with the delta given (raw JSON), and finish reason
// when not empty.
func (f *completionFramer) chunk(delta, content, finish string) {
	f.open()
	f.out = append(f.out, `"choices":[{"index":0,"delta":`...)
	if content != "" {
		f.out = append(f.out, `{"content":`...)
		f.out = appendJSONString(f.out, content)
		f.out = append(f.out, '}')
	} else {
		f.out = append(f.out, delta...)
	}
	f.out = append(f.out, `,"logprobs":null,"finish_reason":`...)
	if finish == "" {
		f.out = append(f.out, "null"...)
	} else {
		f.out = appendJSONString(f.out, finish)
	}
	f.out = append(f.out, "}]"...)
	if f.includeUsage {
		f.out = append(f.out, `,"usage":null`...)
	}
	f.out = append(f.out, "}\n\n"...)
}

// open starts the next event: its id, and the chunk's fixed members.
func (f *completionFramer) open() {
	f.id++
	f.out = append(f.out, "id: "...)
	f.out = strconv.AppendInt(f.out, f.id, 10)
	f.out = append(f.out, "\ndata: "...)
	f.out = append(f.out, f.prefix...)
}

// rawContent appends a content chunk whose text is content, a raw JSON string from a line
// scanObject validated: copied as it is, its line ends escaped.
func (f *completionFramer) rawContent(content []byte, lineEnds bool) {
	if f.finished || len(content) <= 2 {
		return // nothing to say, as for an empty string decoded
	}
	f.open()
	f.out = append(f.out, `"choices":[{"index":0,"delta":{"content":`...)
	if lineEnds {
		f.out = appendEscapingLineEnds(f.out, content)
	} else {
		f.out = append(f.out, content...)
	}
	f.out = append(f.out, `},"logprobs":null,"finish_reason":null}]`...)
	if f.includeUsage {
		f.out = append(f.out, `,"usage":null`...)
	}
	f.out = append(f.out, "}\n\n"...)
}

func (f *completionFramer) use(u *upstreamLine) {
	if f.finished {
		return
	}
	switch u.Type {
	case "generation_chunk":
		if s := u.text(); s != "" {
			f.chunk("", s, "")
		}
	case "generation_done", "done":
		f.chunk("{}", "", finishReason(u.FinishReason))
		if f.includeUsage {
			f.open()
			f.out = append(f.out, `"choices":[],"usage":`...)
			f.out = appendUsage(f.out, f.a.usage)
			f.out = append(f.out, "}\n\n"...)
		}
		f.id++
		f.out = append(f.out, "id: "...)
		f.out = strconv.AppendInt(f.out, f.id, 10)
		f.out = append(f.out, "\ndata: [DONE]\n\n"...)
		f.finish("completed")
	case EventError:
		f.fail(u.errorMessage(), oaiServerError, "upstream_error", "failed")
	}
}

// appendUsage appends OpenAI's usage object from what the upstream reported (zeros when it
// reported nothing).
func appendUsage(dst []byte, u *upstreamUsage) []byte {
	var p, c, t int64
	if u != nil {
		p, c, t = u.PromptTokens, u.CompletionTokens, u.TotalTokens
		if t == 0 {
			t = p + c
		}
	}
	dst = append(dst, `{"prompt_tokens":`...)
	dst = strconv.AppendInt(dst, p, 10)
	dst = append(dst, `,"completion_tokens":`...)
	dst = strconv.AppendInt(dst, c, 10)
	dst = append(dst, `,"total_tokens":`...)
	dst = strconv.AppendInt(dst, t, 10)
	return append(dst, '}')
}

// fail ends the stream with an error object and no [DONE].
func (f *completionFramer) fail(message, typ, code, outcome string, extra ...string) {
	if f.finished {
		return
	}
	f.id++
	f.out = append(f.out, "id: "...)
	f.out = strconv.AppendInt(f.out, f.id, 10)
	f.out = append(f.out, "\ndata: "...)
	f.out = appendOpenAIError(f.out, message, typ, code, extra...)
	f.out = append(f.out, "\n\n"...)
	f.finish(outcome)
}

func (f *completionFramer) finish(outcome string) {
	f.a.stats.Outcome = outcome
	f.finished = true
	f.a.lines.clear()
}

func (f *completionFramer) Write(data []byte) (int, error) {
	if !f.finished {
		f.a.feed(data, f.use)
	}
	return len(data), nil
}

func (f *completionFramer) End(err error) {
	if f.finished {
		return
	}
	if err == nil {
		err = io.EOF
	}
	f.a.end(err, f.use)
	if f.finished {
		return
	}
	msg := "the algorithm service ended the stream without finishing the answer"
	if !errors.Is(err, io.EOF) {
		msg = "the connection to the algorithm service broke off mid-answer"
	}
	f.fail(msg, oaiServerError, strings.ToLower(CodeUpstreamIncomplete), "incomplete")
}

func (f *completionFramer) Interrupt(why string) {
	if why == stopCancelled {
		f.fail("the stream was cancelled by request", oaiInvalidRequest, "stream_cancelled", stopCancelled)
		return
	}
	f.fail("the gateway instance is shutting down; retry", oaiServerError, "server_shutdown", stopShutdown,
		`"retry_after_ms":`+strconv.FormatInt(f.retryAfter.Milliseconds(), 10))
}

func (f *completionFramer) Fail(code, message, outcome string) {
	f.fail(message, oaiServerError, strings.ToLower(code), outcome)
}

func (f *completionFramer) Take(dst []byte) []byte {
	if len(f.out) == 0 {
		return dst
	}
	if len(dst) == 0 {
		out := f.out
		f.out = dst[:0]
		return out
	}
	dst = append(dst, f.out...)
	f.out = f.out[:0]
	return dst
}

func (f *completionFramer) Pending() int   { return len(f.out) }
func (f *completionFramer) LastID() int64  { return f.id }
func (f *completionFramer) Finished() bool { return f.finished }
func (f *completionFramer) Stats() Stats   { return f.a.stats }

// ShutdownNotice tells a client of a resumable stream to resume elsewhere: an error object
// (the SDK stops there) saying so, outside the stream's ids.
func (f *completionFramer) ShutdownNotice(dst []byte) []byte {
	dst = append(dst, "data: "...)
	dst = appendOpenAIError(dst, "the gateway instance is shutting down; resume the stream with Last-Event-ID and X-Request-ID",
		oaiServerError, "server_shutdown", `"resume":true`,
		`"retry_after_ms":`+strconv.FormatInt(f.retryAfter.Milliseconds(), 10))
	return append(dst, "\n\n"...)
}

func (f *completionFramer) Head(h http.Header) int {
	setStreamHeaders(h)
	return http.StatusOK
}

// completionGapEnd ends a resumed OpenAI stream the log cannot complete: an error object.
func completionGapEnd(_ string, last int64, code, msg, _ string, _ int64) []byte {
	b := append([]byte("id: "), strconv.FormatInt(last+1, 10)...)
	b = append(b, "\ndata: "...)
	b = appendOpenAIError(b, msg, oaiServerError, strings.ToLower(code))
	return append(b, "\n\n"...)
}

// gapEnder is the gap ending of the stream of requestID, in the format it was opened in: an
// OpenAI stream's request ID is its completion ID.
func gapEnder(requestID string) func(string, int64, string, string, string, int64) []byte {
	if strings.HasPrefix(requestID, completionPrefix) {
		return completionGapEnd
	}
	return v2GapEnd
}
