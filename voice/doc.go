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
// governance: meter.go (audio seconds, latencies, barge-ins), govern.go (quotas, charged as
// audio arrives against reservations, and the maximum session length), pace.go (how much faster
// than real time a client may send), usage.go (live counters and usage records), broadcast.go
// (notices to many sessions); and the audio itself: format.go (the format a client agrees, and
// invalid frames; the formats and their exact lengths are package audio's) and tts.go (TTS paced
// to playback, and barge-in).
//
// The rules a reader must know:
//
//   - Who reads, who writes. A session has two goroutines that live as long as it does, no
//     more, both started by the handler once the upgrade is done: one reads the client and
//     writes each message it read to the algorithm service, the other reads the algorithm
//     service and writes each message to the client. A message is written by the goroutine that
//     read it; there is no queue and no writer goroutine, but one: with TTS pacing, TTS audio
//     waits in a bounded queue, and a writer goroutine, running only while the queue holds
//     something, releases it to the client at playback rate (tts.go). Other writes to a
//     connection (an error message, a ping, a close, a broadcast notice) may come from other
//     goroutines:
//     coder/websocket serialises them. Short-lived goroutines do what must not hold up a relay:
//     a ping (the library's Ping waits for the pong), a reservation from the quota's meter, the
//     ending.
//   - Who charges. Each relay goroutine charges the audio frames it relays to the session's
//     quota as it reads them, against seconds the session reserved ahead (govern.go): a few
//     atomic operations a frame, no allocation, no call to Redis; the next reservation is asked
//     for, in its own goroutine, while half of one is still left. The client's reader also
//     keeps the client to its pace (pace.go).
//   - What bounds each in time. Every read and write the library makes on a socket, its
//     control frames included (the pongs it writes from the reader too), gets a deadline from
//     the conn under it: a write must be taken within the write timeout (VOICE_WRITE_TIMEOUT),
//     and a side that sends nothing at all, not even a pong, is dead after two ping intervals
//     plus a write timeout. The kernel queues at most 16 KiB for a side beyond its receive
//     window (conn.go), so a side that stops reading blocks the next write as soon as its
//     window is full, however small the writes. A side that does not take a write in time is a
//     slow consumer: it is dropped, and the session ends 1013 (with an error message
//     SLOW_CONSUMER to the client when it is the algorithm service that stalled; a client that
//     stopped reading cannot be told). A relay waits for the quota's meter only for a frame its
//     reservation does not cover (at the quota, or audio faster than reservations come), within
//     the meter's budget (LIMIT_BUDGET), after which the frame goes through (fair use fails
//     open). The client's reader stops reading while the client is ahead of its pace, for as
//     long as the last frame put it ahead (its length over the pace, beyond the burst), and no
//     longer than the session lasts: its end wakes it.
//   - One clock. A single goroutine per Handler, running only while there are sessions, looks
//     at each session once every recheck interval: maximum lengths, idle timeouts, token
//     expiry, keepalive pings (both sides' from one short-lived goroutine, since the library's
//     Ping waits for the pong) and token rechecks. It spreads the work over the interval, a
//     sixteenth of the sessions a tick, and paces the rechecks (RecheckRate a second in all:
//     revocations arrive by pub/sub, the recheck is their fallback), which run in a goroutine
//     of their own under one deadline per batch. Nothing on the clock blocks. Quotas are not on
//     it: audio is charged as it arrives.
//   - How a session ends. end records the first reason and returns at once, whoever calls it;
//     a goroutine of the ending then tells each side that can still hear (an error message, a
//     close frame), drops the sockets of those that cannot, and after a second drops whatever
//     has not finished its close handshake. The session is over once both readers and the
//     ending are done — within the write timeout and a second of a side stalling, whatever the
//     session was doing — and then (finish) it settles its quota (bounded by the meter's
//     budget, after the reservation in flight), releases the registry entry and what the
//     middleware in front took for it (the concurrency lease), and reports its end
//     (Options.OnEnd, with its Stats).
//   - ServeHTTP does not wait for the session. It returns as soon as the session runs (after
//     the dial, the upgrade and session_initialized), so that net/http drops what it kept for
//     the request; what times the request (an access log, http_request_duration_seconds)
//     times the handshake and the dial only, and a session's length is Stats.Duration.
//   - Memory. A message is read into a pooled buffer taken once its first frame has arrived and
//     put back once it is written, so an idle session holds no message buffer; only the
//     library's small read and write buffers on each socket.
package voice
