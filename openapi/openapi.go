// Package openapi holds voicegate's machine-readable API description: openapi.json, an OpenAPI
// 3.1 document of every HTTP route (request and response schemas, the error object and its
// codes, bearer JWT security, the rate-limit headers, the SSE events of the chat stream, the
// voice upgrade and its subprotocols) and, under components.schemas, a JSON Schema for every
// voice protocol message in both directions. It is the one home of that description: the
// gateway serves it at GET /openapi.json, and the tests hold the route table, the SSE golden
// files, the voice messages and real responses to it.
package openapi

import (
	_ "embed"
	"net/http"
)

//go:embed openapi.json
var document []byte

// Document returns the OpenAPI document (JSON). The slice is a copy.
func Document() []byte { return append([]byte(nil), document...) }

// Handler serves the document.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(document)
		}
	})
}
