package sse

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"voicegate/proxy"
)

// maxAnswerBytes bounds the text a single answer collects: an upstream that never stops
// cannot grow the gateway's memory without bound.
const maxAnswerBytes = 4 << 20

// collector assembles the upstream answer into one JSON document, written once complete:
// POST /v1/chat/completions without "stream" (a chat.completion) and POST /api/v2/chat
// (voicegate's answer). Its status is known only at the end: 200 with the answer, or the error
// that ended it (an upstream error line or an incomplete answer 502, a cancel 409, a drain
// 503, a revocation 401).
type collector struct {
	a        answer
	q        *queryRequest
	created  time.Time
	now      func() time.Time
	text     strings.Builder
	finish   string
	finished bool
	// The error that ended the answer, when it did not complete.
	status  int
	code    string // voicegate's code (UPSTREAM_INCOMPLETE, …)
	message string
	body    []byte // the document, once finished; taken once
	taken   bool
	openAI  bool
	// retryAfter is sent with a drain's 503.
	retryAfter time.Duration
}

func newCollector(o *HandlerOptions, q *queryRequest, t *tally, first func(), openAI bool) *collector {
	c := &collector{q: q, now: o.Now, created: o.Now(), openAI: openAI, retryAfter: o.RetryAfter}
	if c.retryAfter <= 0 {
		c.retryAfter = 5 * time.Second
	}
	c.a = answer{lines: lines{max: maxLine(o.MaxLineBytes)}, scratch: make([]byte, 0, 16), first: first}
	if t != nil {
		c.a.onEvent = t.add
	}
	return c
}

func (c *collector) use(u *upstreamLine) {
	if c.finished {
		return
	}
	switch u.Type {
	case "generation_chunk":
		s := u.text()
		if c.text.Len()+len(s) > maxAnswerBytes {
			c.fail(http.StatusBadGateway, proxy.CodeAlgoService, "the algorithm service's answer exceeded the gateway's limit", "failed")
			return
		}
		c.text.WriteString(s)
	case "generation_done", "done":
		c.finish = finishReason(u.FinishReason)
		c.done("completed")
	case EventError:
		c.fail(http.StatusBadGateway, proxy.CodeUpstream, u.errorMessage(), "failed")
	}
}

func (c *collector) fail(status int, code, message, outcome string) {
	if c.finished {
		return
	}
	c.status, c.code, c.message = status, code, message
	c.done(outcome)
}

func (c *collector) done(outcome string) {
	c.a.stats.Outcome = outcome
	c.finished = true
	c.a.lines.clear()
	if c.openAI {
		c.body = c.renderOpenAI()
	} else {
		c.body = c.renderV2()
	}
}

func (c *collector) Write(data []byte) (int, error) {
	if !c.finished {
		c.a.feed(data, c.use)
	}
	return len(data), nil
}

func (c *collector) End(err error) {
	if c.finished {
		return
	}
	if err == nil {
		err = io.EOF
	}
	c.a.end(err, c.use)
	msg := "the algorithm service ended the answer without finishing it"
	if !errors.Is(err, io.EOF) {
		msg = "the connection to the algorithm service broke off mid-answer"
	}
	c.fail(http.StatusBadGateway, CodeUpstreamIncomplete, msg, "incomplete")
}

func (c *collector) Interrupt(why string) {
	if why == stopCancelled {
		c.fail(http.StatusConflict, proxy.CodeConflict, "the request was cancelled", stopCancelled)
		return
	}
	c.fail(http.StatusServiceUnavailable, proxy.CodeUnavailable, "the gateway instance is shutting down; retry", stopShutdown)
}

func (c *collector) Fail(code, message, outcome string) {
	status := http.StatusBadGateway
	if code == CodeTokenRevoked {
		status = http.StatusUnauthorized
	}
	c.fail(status, code, message, outcome)
}

func (c *collector) Take(dst []byte) []byte {
	if !c.finished || c.taken {
		return dst
	}
	c.taken = true
	return append(dst, c.body...)
}

func (c *collector) Pending() int {
	if c.finished && !c.taken {
		return len(c.body)
	}
	return 0
}

// LastID: a single answer is not logged.
func (c *collector) LastID() int64  { return 0 }
func (c *collector) Finished() bool { return c.finished }
func (c *collector) Stats() Stats   { return c.a.stats }

// ShutdownNotice is never asked of a single answer (it is not resumable).
func (c *collector) ShutdownNotice(dst []byte) []byte { return dst }

func (c *collector) Head(h http.Header) int {
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	if c.status == 0 {
		return http.StatusOK
	}
	if c.status == http.StatusServiceUnavailable {
		h.Set("Retry-After", strconv.Itoa(int((c.retryAfter+time.Second-1)/time.Second)))
	}
	if c.status == http.StatusUnauthorized {
		h.Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	}
	return c.status
}

// completionMessage is the assistant's message of a chat.completion.
type completionMessage struct {
	Role    string  `json:"role"`
	Content string  `json:"content"`
	Refusal *string `json:"refusal"`
}

type completionChoice struct {
	Index        int               `json:"index"`
	Message      completionMessage `json:"message"`
	Logprobs     *struct{}         `json:"logprobs"`
	FinishReason string            `json:"finish_reason"`
}

type completionUsage struct {
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	TotalTokens      int64 `json:"total_tokens"`
}

// completion is OpenAI's chat.completion object.
type completion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"`
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	SystemFingerprint *string            `json:"system_fingerprint"`
	Choices           []completionChoice `json:"choices"`
	Usage             completionUsage    `json:"usage"`
}

func (c *collector) usage() completionUsage {
	var u completionUsage
	if c.a.usage != nil {
		u = completionUsage{c.a.usage.PromptTokens, c.a.usage.CompletionTokens, c.a.usage.TotalTokens}
		if u.TotalTokens == 0 {
			u.TotalTokens = u.PromptTokens + u.CompletionTokens
		}
	}
	return u
}

func (c *collector) renderOpenAI() []byte {
	if c.status != 0 {
		typ := oaiServerError
		switch c.status {
		case http.StatusUnauthorized:
			typ = "authentication_error"
		case http.StatusConflict:
			typ = oaiInvalidRequest
		}
		return append(appendOpenAIError(nil, c.message, typ, strings.ToLower(c.code)), '\n')
	}
	b, _ := json.Marshal(completion{
		ID: c.q.RequestID, Object: "chat.completion", Created: c.created.Unix(), Model: c.q.Model,
		Choices: []completionChoice{{Message: completionMessage{Role: "assistant", Content: c.text.String()},
			FinishReason: c.finish}},
		Usage: c.usage(),
	})
	return append(b, '\n')
}

// ChatAnswer is POST /api/v2/chat's answer: the whole of what the stream would have said.
type ChatAnswer struct {
	RequestID      string          `json:"request_id"`
	ConversationID string          `json:"conversation_id,omitempty"`
	Model          string          `json:"model"`
	Content        string          `json:"content"`
	FinishReason   string          `json:"finish_reason"`
	Usage          completionUsage `json:"usage"`
	LinesProcessed int64           `json:"lines_processed"`
	DurationMS     int64           `json:"duration_ms"`
	Timestamp      int64           `json:"timestamp"`
}

func (c *collector) renderV2() []byte {
	if c.status != 0 {
		// DESIGN.md's error document, as proxy.WriteError writes it.
		b, _ := json.Marshal(map[string]string{"error": c.message, "code": c.code, "request_id": c.q.RequestID})
		return append(b, '\n')
	}
	now := c.now()
	b, _ := json.Marshal(ChatAnswer{RequestID: c.q.RequestID, ConversationID: c.q.ConversationID, Model: c.q.Model,
		Content: c.text.String(), FinishReason: c.finish, Usage: c.usage(),
		LinesProcessed: c.a.stats.LinesProcessed, DurationMS: now.Sub(c.created).Milliseconds(), Timestamp: now.Unix()})
	return append(b, '\n')
}
