package sse

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"voicegate/proxy"
)

// NewCompletionsHandler returns POST /v1/chat/completions: OpenAI's chat request, sent to the
// algorithm service's /query with the whole conversation, answered as OpenAI's SDKs read it:
// with "stream", chat.completion.chunk events ending in data: [DONE] only when the upstream
// ended cleanly; without, one chat.completion. The stream is the v2 route's in every other
// respect: the same admission, registry (cancel, revocation, drain), pings, write deadlines
// and replay log. Its request ID is its completion ID (CompletionID of the X-Request-ID), so
// POST /api/v2/chat/cancel and a resume (the same request with X-Request-ID and Last-Event-ID,
// or GET /api/v2/chat/stream/{id}) name it. Errors are OpenAI's error document when the route
// is wrapped in proxy.OpenAIErrors.
func NewCompletionsHandler(o HandlerOptions) http.Handler {
	c := newChat(o)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, stream, includeUsage, perr := c.o.parseCompletion(w, r)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		if !stream {
			c.serve(w, r, q, format{single: true,
				newFramer: func(o *HandlerOptions, q *queryRequest, t *tally, first func()) framer {
					return newCollector(o, q, t, first, true)
				}})
			return
		}
		c.serve(w, r, q, format{
			newFramer: func(o *HandlerOptions, q *queryRequest, t *tally, first func()) framer {
				return newCompletionFramer(o, q, t, first, includeUsage)
			}})
	})
}

// NewAnswerHandler returns POST /api/v2/chat: the v2 chat request (as POST
// /api/v2/chat/stream takes it) answered with one JSON document, ChatAnswer, once the
// algorithm service has finished: the origin's non-streaming chat. It is admitted, registered
// (cancellable, revocable, drained) and bounded as a stream is; it is neither logged nor
// resumed.
func NewAnswerHandler(o HandlerOptions) http.Handler {
	c := newChat(o)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, perr := c.o.parse(w, r)
		if perr != nil {
			proxy.WriteError(w, r, perr)
			return
		}
		c.serve(w, r, q, format{single: true,
			newFramer: func(o *HandlerOptions, q *queryRequest, t *tally, first func()) framer {
				return newCollector(o, q, t, first, false)
			}})
	})
}

// Parameters of OpenAI's chat request that the gateway takes; every other one is refused by
// name (unsupported_parameter), never ignored.
var completionParams = [...]string{"model", "messages", "stream", "stream_options", "temperature",
	"max_tokens", "max_completion_tokens", "user", "n"}

// maxMessages bounds a conversation's messages.
const maxMessages = 256

// unsupported is the error for a parameter the gateway does not take.
func unsupported(param, why string) *proxy.Error {
	return &proxy.Error{Status: http.StatusBadRequest, Code: "UNSUPPORTED_PARAMETER",
		Message: "unsupported parameter: '" + param + "' " + why,
		Details: []FieldError{{Field: param, Reason: why}}}
}

// invalidParam is the error for a parameter with a value the gateway refuses.
func invalidParam(param, why string) *proxy.Error {
	return &proxy.Error{Status: http.StatusBadRequest, Code: "INVALID_VALUE",
		Message: "invalid value for '" + param + "': " + why,
		Details: []FieldError{{Field: param, Reason: why}}}
}

// parseCompletion reads and validates an OpenAI chat request and builds the upstream query.
func (o *HandlerOptions) parseCompletion(w http.ResponseWriter, r *http.Request) (q *queryRequest, stream, includeUsage bool, perr *proxy.Error) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			return nil, false, false, &proxy.Error{Status: http.StatusUnsupportedMediaType, Code: proxy.CodeUnsupportedMedia,
				Message: "the request body must be application/json"}
		}
	}
	if r.ContentLength > o.MaxBodyBytes {
		return nil, false, false, proxy.TooLarge(o.MaxBodyBytes)
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, o.MaxBodyBytes))
	if err != nil {
		if perr := proxy.BodyReadError(err, o.MaxBodyBytes); perr != nil {
			return nil, false, false, perr
		}
		return nil, false, false, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeInvalidJSON,
			Message: "could not read the request body", Cause: err}
	}
	var params map[string]json.RawMessage
	if err := json.Unmarshal(raw, &params); err != nil || params == nil {
		return nil, false, false, &proxy.Error{Status: http.StatusBadRequest, Code: proxy.CodeInvalidJSON,
			Message: "the request body must be a JSON object"}
	}
	// Refused by name, in a stable order: the first unknown parameter in sorted order.
	var names []string
	for k, v := range params {
		if !slices.Contains(completionParams[:], k) && !isNull(v) {
			names = append(names, k)
		}
	}
	if len(names) > 0 {
		slices.Sort(names)
		return nil, false, false, unsupported(names[0], "is not supported by this gateway")
	}
	field := func(name string, dst any) *proxy.Error {
		v, ok := params[name]
		if !ok || isNull(v) {
			return nil
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return invalidParam(name, "has the wrong type")
		}
		return nil
	}
	var (
		model         string
		messages      []json.RawMessage
		temperature   *float64
		maxTokens     *int
		maxCompletion *int
		user          string
		n             *int
		streamOpts    *struct {
			IncludeUsage *bool `json:"include_usage"`
		}
		streamOptsFields map[string]json.RawMessage
	)
	for _, e := range []*proxy.Error{field("model", &model), field("messages", &messages), field("stream", &stream),
		field("temperature", &temperature), field("max_tokens", &maxTokens),
		field("max_completion_tokens", &maxCompletion), field("user", &user), field("n", &n),
		field("stream_options", &streamOpts), field("stream_options", &streamOptsFields)} {
		if e != nil {
			return nil, false, false, e
		}
	}
	q = &queryRequest{Temperature: defaultTemperature, MaxTokens: defaultMaxTokens}
	switch {
	case model == "":
		return nil, false, false, invalidParam("model", "is required")
	case !proxy.ValidLabel(model, maxIDLen):
		return nil, false, false, invalidParam("model", proxy.LabelReason(maxIDLen))
	case len(o.Models) > 0 && !slices.Contains(o.Models, model):
		return nil, false, false, &proxy.Error{Status: http.StatusNotFound, Code: "MODEL_NOT_FOUND",
			Message: "the model '" + model + "' does not exist or you do not have access to it",
			Details: []FieldError{{Field: "model", Reason: "is not one of GET /v1/models"}}}
	}
	q.Model = model
	if n != nil && *n != 1 {
		return nil, false, false, unsupported("n", "must be 1: the gateway generates one choice")
	}
	for k := range streamOptsFields {
		if k != "include_usage" {
			return nil, false, false, unsupported("stream_options."+k, "is not supported by this gateway")
		}
	}
	if streamOpts != nil {
		if !stream {
			return nil, false, false, invalidParam("stream_options", "is only allowed when stream is true")
		}
		includeUsage = streamOpts.IncludeUsage != nil && *streamOpts.IncludeUsage
	}
	if temperature != nil {
		if t := *temperature; t < 0 || t > 2 {
			return nil, false, false, invalidParam("temperature", "must be between 0 and 2")
		}
		q.Temperature = *temperature
	}
	limit := func(name string, v *int) *proxy.Error {
		if v != nil && (*v < 1 || *v > o.MaxTokens) {
			return invalidParam(name, fmt.Sprintf("must be between 1 and %d", o.MaxTokens))
		}
		return nil
	}
	if e := cmpOr(limit("max_tokens", maxTokens), limit("max_completion_tokens", maxCompletion)); e != nil {
		return nil, false, false, e
	}
	switch {
	case maxTokens != nil && maxCompletion != nil && *maxTokens != *maxCompletion:
		return nil, false, false, invalidParam("max_completion_tokens", "differs from max_tokens; send one of them")
	case maxCompletion != nil:
		q.MaxTokens = *maxCompletion
	case maxTokens != nil:
		q.MaxTokens = *maxTokens
	}
	if user != "" && !proxy.ValidLabel(user, maxIDLen) {
		return nil, false, false, invalidParam("user", proxy.LabelReason(maxIDLen))
	}
	q.EndUser = user
	if len(messages) == 0 {
		return nil, false, false, invalidParam("messages", "must hold at least one message")
	}
	if len(messages) > maxMessages {
		return nil, false, false, invalidParam("messages", fmt.Sprintf("must hold at most %d messages", maxMessages))
	}
	for i, m := range messages {
		qm, e := o.parseMessage(i, m)
		if e != nil {
			return nil, false, false, e
		}
		q.Messages = append(q.Messages, qm)
	}
	// The request ID is the completion ID: the edge's X-Request-ID, made when the client sent
	// none, so a client that resumes names its stream with the header.
	id := proxy.RequestIDFrom(r.Context())
	if id == "" || len(id)+len(completionPrefix) > 128 {
		id = proxy.NewRequestID()
	}
	q.RequestID = CompletionID(id)
	return q, stream, includeUsage, nil
}

func cmpOr(es ...*proxy.Error) *proxy.Error {
	for _, e := range es {
		if e != nil {
			return e
		}
	}
	return nil
}

func isNull(v json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(v), []byte("null")) }

// parseMessage validates messages[i]: a system (or developer), user or assistant message whose
// content is a string or text parts. Anything else (tools, images, audio, names) is refused by
// name.
func (o *HandlerOptions) parseMessage(i int, raw json.RawMessage) (queryMessage, *proxy.Error) {
	at := "messages[" + strconv.Itoa(i) + "]"
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return queryMessage{}, invalidParam(at, "must be an object")
	}
	for k, v := range m {
		if k != "role" && k != "content" && !isNull(v) {
			return queryMessage{}, unsupported(at+"."+k, "is not supported by this gateway")
		}
	}
	var role string
	if json.Unmarshal(m["role"], &role) != nil {
		return queryMessage{}, invalidParam(at+".role", "must be a string")
	}
	switch role {
	case "system", "user", "assistant":
	case "developer":
		role = "system" // the newer name of the system role
	case "tool", "function":
		return queryMessage{}, unsupported(at+".role", "'"+role+"': tools are not supported by this gateway")
	default:
		return queryMessage{}, invalidParam(at+".role", "must be system, developer, user or assistant")
	}
	content, e := messageText(at+".content", m["content"])
	if e != nil {
		return queryMessage{}, e
	}
	switch {
	case strings.TrimSpace(content) == "" && role == "user":
		return queryMessage{}, invalidParam(at+".content", "must not be empty")
	case !utf8.ValidString(content):
		return queryMessage{}, invalidParam(at+".content", "must be valid UTF-8")
	case utf8.RuneCountInString(content) > o.MaxMessageChars:
		return queryMessage{}, invalidParam(at+".content", fmt.Sprintf("must be at most %d characters", o.MaxMessageChars))
	}
	return queryMessage{Role: role, Content: content}, nil
}

// messageText is a message's content: a string, or text parts joined.
func messageText(at string, raw json.RawMessage) (string, *proxy.Error) {
	if len(raw) == 0 || isNull(raw) {
		return "", invalidParam(at, "is required")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []map[string]json.RawMessage
	if json.Unmarshal(raw, &parts) != nil {
		return "", invalidParam(at, "must be a string or an array of text parts")
	}
	var b strings.Builder
	for j, p := range parts {
		pat := at + "[" + strconv.Itoa(j) + "]"
		var typ, text string
		if json.Unmarshal(p["type"], &typ) != nil {
			return "", invalidParam(pat+".type", "must be a string")
		}
		if typ != "text" {
			return "", unsupported(pat+".type", "'"+typ+"': only text parts are supported by this gateway")
		}
		for k, v := range p {
			if k != "type" && k != "text" && !isNull(v) {
				return "", unsupported(pat+"."+k, "is not supported by this gateway")
			}
		}
		if json.Unmarshal(p["text"], &text) != nil {
			return "", invalidParam(pat+".text", "must be a string")
		}
		b.WriteString(text)
	}
	return b.String(), nil
}
