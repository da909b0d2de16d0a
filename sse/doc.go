// Package sse owns voicegate's streaming chat: the Rewriter that turns the algorithm service's
// NDJSON answer into Server-Sent Events in the proxy path, the POST /api/v2/chat/stream handler
// that validates a chat request and sends it upstream, the registry of running streams that
// POST /api/v2/chat/cancel ends, and resuming: the replay log, the directory of running streams
// across instances, and the reader that serves resumers waiting at a log's tail.
//
// The event stream is the contract of DESIGN.md: stream_start; one event per upstream line named
// by its "type", with id, request_id, line_number and timestamp; ping comments while the upstream
// is silent; in-stream error events; stream_end. Upstream text is never copied into the framing,
// only into a single data line of valid JSON.
//
// # Identity
//
// A request ID belongs to its user. A stream is known by its StreamKey (tenant, user, request
// ID) in the Registry, the Directory, the replay log, cancels and resumes; Redis key names are
// made from it by policy.Keys, every part escaped. Another user finds nothing of a stream, not
// even that it exists (404), and may use the same request ID for a stream of their own.
//
// # A stream
//
// Two goroutines per stream: the producer, which reads the upstream, encodes each line and
// writes it to the client (and, resumable, appends it to the replay log first), and the
// handler's, which pings a silent stream (PingInterval) and notices the client gone (pipe).
// Every write to the client has a deadline (WriteTimeout). A client gone ends the stream at
// once, or, resumable, after ResumeWindow unless a resumer watches it. Whatever the stream
// holds (its admission's slot and claim, its registry entry, its log's production) is released
// by whichever of the two ends last, on every path; the claim last of all, once the log holds
// the stream's end.
//
// # Registry
//
// This instance's running streams, by StreamKey. Written by the handler only: an entry is added
// before the upstream is called and removed when the stream ends. Read by cancels (local, and
// those Run delivers from other instances), revocations, and shutdown (Drain, EndAll, Len). Its
// lock guards the map alone: ending a stream is done after the lock is released, and nothing
// under it blocks.
//
// # Replay log
//
// Written by a stream's producer only, batch by batch; nothing else appends to it, and nothing
// appends to a log whose producer is done: a stream is produced only for a key with no log (the
// admission's claim needs the log absent, in the same Redis script; in memory, the handler asks
// after taking the registry entry, which a producer holds until its log is complete). A request
// repeated with the same request ID is answered from the log, from its start, while it runs or
// after it ended, as long as the log is kept: generated and charged once. Read by resumers: GET
// /api/v2/chat/stream/{request_id}, the same POST with Last-Event-ID, or a repeat.
//
// In memory (MemoryReplay) the log is this process's: appends, reads and waits are a mutex and
// a channel, bounded to 4,096 batches a stream, kept for the retention after the last append.
// In Redis (RedisReplay) it is a Redis Stream per stream, trimmed to about 4,096 batches and
// expiring the retention after its last append. Appends go through one goroutine that pipelines
// them (Run), each call bounded by replayCallBound, from a bounded queue: a producer never waits
// for Redis, and a batch that finds the queue full (Redis not keeping up) is left out of the
// log, and a resume across it is told so (RESUME_GAP). A stream's end waits at most
// replayCallBound for its last batch to be sent. The producer marks the log every replayBeat
// (replayhb) so a resumer learns within replayBeatTTL that it died. A resumer reads replayRange
// entries a call, each call bounded by replayCallBound; a log not there yet gets replayAppear to
// appear. A stream counts as watched (it outlives its client's window) while a resumer reads it,
// from the resumer's first read of the log: in memory a counter, in Redis a key (replayw) set
// then and renewed every replayBeat while any resumer on the instance reads the log.
//
// # The waiters' reader
//
// A resumer reads what a Redis log holds itself, with XRANGE on the client's shared connections.
// At the tail it waits for the instance's one reader (tails), never on a Redis connection of its
// own: one goroutine reads every waited-on log in one blocking XREAD (replayBlock at most,
// CLIENT UNBLOCKed when the set of logs changes) and hands what it reads to each resumer, up to
// followerEntries entries or followerBytes bytes not yet taken (a slow client reads the log
// itself until it has caught up). On Redis Cluster, where one XREAD names keys of one slot, the
// reader polls the slots' logs in one pipeline every replayPoll instead. A second goroutine
// renews the watcher keys and asks whether producers still beat, every replayBeat; a resumer
// whose producer stopped reads the log once more before it reports UPSTREAM_INCOMPLETE, since
// the last events and the end of the heartbeat land together. A resumer that leaves is forgotten
// at once. Resumers hold a chat concurrency slot of their user while they read (AdmitReplay),
// and an instance serves at most SSE_MAX_RESUMES of them (ResumeLimit).
//
// # Directory
//
// With Redis, a running stream's entry names its instance, so a cancel sent to any instance
// reaches it over sharded pub/sub; written by the admission (claim), renewed with the stream's
// concurrency slot by the gateway's renewer, deleted by the stream's release: an instance that
// dies leaves entries that expire a lease TTL (LEASE_TTL) after their last renewal, and a
// cancel that finds nobody listening on its instance's channel deletes the entry at once. Read
// by Cancel, one GET and one publication bounded by the caller's context. Run is one goroutine
// per instance holding one subscription for cancels and revocations; it resubscribes a second
// after losing it.
package sse
