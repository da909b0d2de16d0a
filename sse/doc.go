// Package sse owns voicegate's streaming chat: the Rewriter that turns the algorithm service's
// NDJSON answer into Server-Sent Events in the proxy path, the POST /api/v2/chat/stream handler
// that validates a chat request and sends it upstream, and the registry of running streams that
// POST /api/v2/chat/cancel ends.
//
// The event stream is the contract of DESIGN.md: stream_start; one event per upstream line named
// by its "type", with id, request_id, line_number and timestamp; ping comments while the upstream
// is silent; in-stream error events; stream_end. Upstream text is never copied into the framing,
// only into a single data line of valid JSON.
package sse
