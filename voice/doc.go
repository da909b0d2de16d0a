// Package voice owns voicegate's voice sessions: a WebSocket from the voice app bridged to a
// WebSocket to the algorithm service (github.com/coder/websocket on both sides), with the
// session protocol of DESIGN.md — session_initialized, audio in as audio_chunk messages,
// control messages validated and forwarded, recognition, answer and speech events and TTS
// audio relayed back — keepalive, meaningful close codes, and the registry of live sessions.
//
// The files follow the life of a session: handler.go (the handshake and the dial), conn.go
// (the sockets and their deadlines), relay.go (the two directions), timers.go (the clock all
// sessions share), session.go (how a session ends), close.go (close codes), protocol.go (the
// messages), registry.go (live sessions, across instances with Redis), refusal.go (telling a
// browser why its upgrade was refused: an error message and close 4000 + the HTTP status), and
// governance: meter.go (audio seconds, latencies, barge-ins), govern.go (quotas and the maximum
// session length), usage.go (live counters and usage records), broadcast.go (notices to many
// sessions).
//
// The rules a reader must know:
//
//   - Who reads, who writes. A session has two goroutines, no more: the handler's own, which
//     reads the client and writes each message it read to the algorithm service, and one that
//     reads the algorithm service and writes each message to the client. A message is written
//     by the goroutine that read it; there is no queue and no writer goroutine. Other writes to
//     a connection (an error message, a ping, a close, a broadcast notice) may come from other
//     goroutines: coder/websocket serialises them.
//   - What bounds each in time. Every read and write the library makes on a socket, its
//     control frames included (the pongs it writes from the reader too), gets a deadline from
//     the conn under it: a write must be taken within the write timeout (VOICE_WRITE_TIMEOUT),
//     and a side that sends nothing at all, not even a pong, is dead after two ping intervals
//     plus a write timeout. The kernel queues at most 16 KiB for a side beyond its receive
//     window (conn.go), so a side that stops reading blocks the next write as soon as its
//     window is full, however small the writes. A side that does not take a write in time is a
//     slow consumer: it is dropped, and the session ends 1013 (with an error message
//     SLOW_CONSUMER to the client when it is the algorithm service that stalled; a client that
//     stopped reading cannot be told).
//   - One clock. A single goroutine per Handler, running only while there are sessions, ticks
//     every recheck interval for all of them: idle timeouts, keepalive pings (each sent from a
//     short-lived goroutine, since the library's Ping waits for the pong) and token rechecks.
//     The same tick holds sessions to their quotas and maximum length, and charges those due
//     in one batch. Nothing on it blocks but the charges and the rechecks, which share one
//     deadline per tick.
//   - How a session ends. end records the first reason and returns at once, whoever calls it;
//     a goroutine of the ending then tells each side that can still hear (an error message, a
//     close frame), drops the sockets of those that cannot, and after a second drops whatever
//     has not finished its close handshake. ServeHTTP returns once both readers and the ending
//     are done — within the write timeout and a second of a side stalling, whatever the
//     session was doing — and its return releases the registry entry and what the middleware
//     in front holds (the concurrency lease).
//   - Memory. A message is read into a pooled buffer taken once its first frame has arrived and
//     put back once it is written, so an idle session holds no message buffer; only the
//     library's small read and write buffers on each socket.
package voice
