package voice

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice/audio"
)

// Resuming: a session outlives its client's connection by Options.ResumeWindow, and a client
// that comes back with its resume token and the number of the last message it received gets
// what it missed, exactly once and in order, then the live session, on any instance.
//
// Every message the gateway sends a client after session_initialized (or session_resumed) is
// numbered 1, 2, 3…, text and binary alike; the client counts, so TTS frames need no envelope.
// The owner keeps the recent downlink in memory (downRing); nothing goes to Redis while the
// client is connected. When the client vanishes (no close frame: a network change, a killed
// instance, a drain) the session goes "away": it keeps its upstream, its slot, its metering and
// its token checks, writes its ring to a Redis Stream and appends to it while the client is
// away (flusher), and ends if nobody resumes it within the window.
//
// A resume on the owner takes the session from memory. A resume elsewhere claims the session's
// token in Redis (single use: GETDEL), asks the owner to let go (SPUBLISH on the owner's
// handover channel, whose answer also says whether the owner is alive), and dials the
// algorithm service with resume=1; the service closes the owner's upstream with 4100 after its
// last write to it, and the owner logs what that upstream still sent, seals the log (an entry
// with the last number and the session's counters) and lets go without a usage record. The
// new owner replays the log from last_seq+1 to the seal, then reads its own upstream, which
// the kernel's socket buffers hold meanwhile (bounded: the service's writes wait). An owner that
// is gone (SIGKILL) leaves no seal: what only its memory held is lost, and the client is told
// RESUME_GAP.

// Close codes of resuming.
const (
	// CloseMoved closes a connection whose session moved to a newer one: the algorithm service
	// closes the older upstream with it, and the gateway the older client connection.
	CloseMoved websocket.StatusCode = 4100
)

// Message types and error codes of resuming.
const (
	TypeSessionResumed = "session_resumed"
	CodeResumeGap      = "RESUME_GAP"
	CodeResumeFailed   = "RESUME_FAILED"
)

// handoverWait bounds how long a resume waits for the algorithm service to close the older
// upstream (and the old owner to seal its log), and how long an owner asked to hand a session
// over waits for that close before it ends the session itself.
const handoverWait = 2 * time.Second

// logMaxLen caps a session's downlink log in Redis, in entries (XADD MAXLEN ~).
const logMaxLen = 8192

// resumeInfo is what session_initialized and session_resumed tell the client about resuming.
type resumeInfo struct {
	Token    string `json:"token"`
	WindowMS int64  `json:"window_ms"`
}

type sessionResumed struct {
	Type      string `json:"type"`
	SessionID string `json:"session_id"`
	Replayed  int64  `json:"replayed"`
	// LastSeq is the number of the last message before those that follow: the client's count
	// goes on from it (it is the client's last_seq unless a gap skipped numbers).
	LastSeq int64      `json:"last_seq"`
	Resume  resumeInfo `json:"resume"`
	// The origin's wire: seconds, and milliseconds beside them (as session_initialized).
	ServerTime   int64 `json:"server_time"`
	ServerTimeMS int64 `json:"server_time_ms"`
}

// tokenRecord is a resumable session's entry under its resume token, in Redis (with Redis)
// at {prefix}voice:resume:{tenant}:user:sha256(token). Only the token's hash is stored.
type tokenRecord struct {
	SessionID      string    `json:"session_id"`
	ConversationID string    `json:"conversation_id,omitempty"`
	Language       string    `json:"language,omitempty"`
	StartedAt      time.Time `json:"started_at"`
	Owner          string    `json:"owner"` // the owning instance's identity: its handover channel
	// Seq is the number of the last message sent when the client went away; -1 while a
	// client is connected (then a resume's last_seq is checked against the seal).
	Seq       int64 `json:"seq"`
	DroppedAt int64 `json:"dropped_at,omitempty"` // unix ms the client went away
	// Audio is the format the client agreed (format.go): the resuming instance dials the
	// algorithm service with it and meters the client's audio by it.
	Audio *audio.Format `json:"audio,omitempty"`
}

// seal is the last entry of a session's log: the owner let go after message Seq.
type seal struct {
	Seq     int64 `json:"seq"`
	Live    Live  `json:"live"`
	Use     int64 `json:"use"`  // ns of audio the quotas count
	Held    int64 `json:"held"` // ns the quotas were charged
	Resumes int64 `json:"resumes"`
	// Audio is the agreed format at the handover, and TTS the format the algorithm service
	// declared for its TTS (nil: none declared): the new instance meters by them.
	Audio *audio.Format `json:"audio,omitempty"`
	TTS   *audio.Format `json:"tts,omitempty"`
}

// resumable is a session's resuming state.
type resumable struct {
	window  time.Duration
	key     string // of the current token (policy.Keys), under the session's tenant and user
	token   string // the current token itself, to hand the client
	resumes atomic.Int64

	awayUntil   atomic.Int64 // unix ns the window of an away session ends; 0 while attached
	droppedAt   atomic.Int64 // unix ns the client went away; 0 while attached
	handingOver atomic.Bool  // another instance asked for the session
	sealed      atomic.Bool  // the log is sealed: the session ends handed over

	flushMu sync.Mutex    // one flush at a time
	flushed int64         // the last message written to the log; under flushMu
	kick    chan struct{} // wakes the flusher; 1-buffered
	flusher atomic.Bool   // a flusher runs
	// recorded says the token record was written (or is being, by a publication that failed
	// and is retried by the next: then the record is set again as a PEXPIRE cannot).
	recorded atomic.Bool
}

// newResumeToken makes a resume token and the key it is stored under: 130 random bits, bound
// to the session's tenant and user by the key, and stored only as a hash.
func (r *Registry) newResumeToken(tenant, user string) (token, key string) {
	token = rand.Text()
	return token, r.tokenKey(tenant, user, token)
}

func (r *Registry) tokenKey(tenant, user, token string) string {
	h := sha256.Sum256([]byte(token))
	return r.keys.Tenant(policy.KindVoiceResume, tenant, user, hex.EncodeToString(h[:]))
}

func (r *Registry) logKey(tenant, session string) string {
	return r.keys.Tenant(policy.KindVoiceLog, tenant, session)
}

func (r *Registry) handoverChannel(instance string) string {
	return r.keys.Key(policy.KindVoiceHandover, instance)
}

// recordTTL is how long a token record outlives its last renewal: the window, and the time an
// instance that died takes to be noticed (its registry entries' orphanKeep TTLs).
func (r *Registry) recordTTL(window time.Duration) time.Duration { return window + orphanKeep*r.ttl }

// keep makes s resumable under its token here, and with Redis (write) in Redis, bounded. A new
// session's record is written by its first publication instead (Registry.add), in the same
// round trip.
func (r *Registry) keep(ctx context.Context, s *session, seq int64, write bool) {
	rs := s.rs
	r.mu.Lock()
	r.tokens[rs.key] = s
	r.mu.Unlock()
	if r.redis == nil || !write {
		return
	}
	r.writeRecord(ctx, s, seq, false)
}

// recordCmd writes s's token record, the last message sent seq (-1 while a client is
// connected); only over one that exists with update, so that a resume's claim, which deletes
// it, is never undone.
func (r *Registry) recordCmd(s *session, seq int64, update bool) rueidis.Completed {
	s.wmu.Lock()
	key := s.rs.key
	s.wmu.Unlock()
	rec := tokenRecord{SessionID: s.info.SessionID, ConversationID: s.info.ConversationID, Language: s.info.Language,
		StartedAt: s.info.StartedAt, Owner: r.id, Seq: seq, DroppedAt: s.rs.droppedAt.Load() / int64(time.Millisecond),
		Audio: s.format.Load()}
	b, _ := json.Marshal(rec)
	if update {
		return r.redis.B().Set().Key(key).Value(string(b)).Xx().Px(r.recordTTL(s.rs.window)).Build()
	}
	return r.redis.B().Set().Key(key).Value(string(b)).Px(r.recordTTL(s.rs.window)).Build()
}

func (r *Registry) writeRecord(ctx context.Context, s *session, seq int64, update bool) {
	ctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
	defer cancel()
	if err := r.redis.Do(ctx, r.recordCmd(s, seq, update)).Error(); err != nil && !rueidis.IsRedisNil(err) {
		r.log.Warn("storing a voice resume token failed; the session resumes on this instance only until it is stored",
			"session_id", s.info.SessionID, "err", proxy.Describe(err))
	}
}

// forget drops s's token here and, with Redis, its record and log (a session that ended
// cannot be resumed).
func (r *Registry) forget(s *session, handedOver bool) {
	r.mu.Lock()
	if r.tokens[s.rs.key] == s {
		delete(r.tokens, s.rs.key)
	}
	r.mu.Unlock()
	if r.redis == nil || handedOver {
		return // a handed-over session's token and log are the new owner's now
	}
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	for _, res := range r.redis.DoMulti(ctx, r.redis.B().Del().Key(s.rs.key).Build(),
		r.redis.B().Del().Key(r.logKey(s.info.TenantID, s.info.SessionID)).Build()) {
		if err := res.Error(); err != nil {
			// They expire on their own within the window and a few TTLs.
			r.log.Warn("deleting an ended voice session's resume token failed", "err", proxy.Describe(err))
			return
		}
	}
}

// claimLocal takes the token stored under key from this instance's sessions: single use.
func (r *Registry) claimLocal(key string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.tokens[key]
	if s != nil {
		delete(r.tokens, key)
	}
	return s
}

// peekLocal returns the session whose token is stored under key here, without taking it.
func (r *Registry) peekLocal(key string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tokens[key]
}

// getRecord reads the record of the token under key: nil when none.
func (r *Registry) getRecord(ctx context.Context, key string, del bool) (*tokenRecord, error) {
	cmd := r.redis.B().Get().Key(key).Build()
	if del {
		cmd = r.redis.B().Getdel().Key(key).Build()
	}
	b, err := r.redis.Do(ctx, cmd).AsBytes()
	if rueidis.IsRedisNil(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("voice: resume token: %w", err)
	}
	var rec tokenRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("voice: resume token: %w", err)
	}
	return &rec, nil
}

// refreshRecords is added to a publication's commands: the records of ss's resumable sessions
// are written by their first, and live as long as their registry entries.
func (r *Registry) refreshRecords(ss []*session) rueidis.Commands {
	var cmds rueidis.Commands
	for _, s := range ss {
		if s.rs == nil {
			continue
		}
		if !s.rs.recorded.Swap(true) {
			cmds = append(cmds, r.recordCmd(s, -1, false))
			continue
		}
		s.wmu.Lock()
		key := s.rs.key
		s.wmu.Unlock()
		cmds = append(cmds, r.redis.B().Pexpire().Key(key).Milliseconds(r.recordTTL(s.rs.window).Milliseconds()).Build())
	}
	return cmds
}

// RunHandovers hands this instance's sessions over to the instances that resume them, until
// ctx ends, resubscribing after connection trouble. Without Redis it returns at once.
func (r *Registry) RunHandovers(ctx context.Context) {
	if r.redis == nil {
		return
	}
	for ctx.Err() == nil {
		err := r.redis.Receive(ctx, r.redis.B().Ssubscribe().Channel(r.handoverChannel(r.id)).Build(), func(m rueidis.PubSubMessage) {
			r.mu.Lock()
			s := r.sessions[m.Message]
			r.mu.Unlock()
			if s != nil && s.rs != nil {
				s.handOver()
			}
		})
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("voice handover subscription lost; resubscribing", "err", proxy.Describe(err))
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// ---- the session's side ------------------------------------------------------------------------

// clientNow is the client connection of the moment: resuming replaces it. It takes no lock,
// so that dropping a stuck client never waits for the write it is stuck in (which holds wmu).
func (s *session) clientNow() side { return *s.cur.Load() }

// setClient makes c the client connection; wmu is held.
func (s *session) setClient(c side) {
	s.client = c
	s.cur.Store(&c)
}

// isAway reports whether the session waits for its client to come back.
func (s *session) isAway() bool { return s.rs != nil && s.rs.awayUntil.Load() != 0 }

// down sends the client one message of the downlink: numbered, kept for a resume, and written
// to the client if one is attached and not being replayed to (then the replay sends it). The
// number, the ring and the write are one step under wmu, so that numbers and the order on the
// wire agree; the write is bounded by the socket's deadline (conn), and wmu only extends the
// library's own write lock, which every writer waits on anyway. It returns the client a write
// failed on, if any.
func (s *session) down(typ websocket.MessageType, msg []byte) (failed *side, err error) {
	s.wmu.Lock()
	s.seq++
	if s.ring != nil {
		s.ring.add(s.seq, typ, msg)
	}
	if s.rs != nil && (s.away || s.replaying) {
		away := s.away // read under wmu: a resume clears it
		s.wmu.Unlock()
		if away {
			s.kickFlusher()
		}
		return nil, nil
	}
	c := s.client
	err = c.ws.Write(unbounded(), typ, msg)
	s.wmu.Unlock()
	if err != nil {
		failed := c // a copy of its own, so that c stays on the stack: a frame allocates nothing
		return &failed, err
	}
	return nil, nil
}

// detach makes the session away after its client c vanished, if it is resumable; false when
// it is not, and the session must end.
func (s *session) detach(c side, why string) bool {
	if !s.markAway(c, why, false) {
		return false
	}
	c.conn.drop()
	return true
}

// markAway is detach without closing c's socket. With delivered, everything sent so far is known
// to reach the client (it is followed by a close the client reads to: see Drain), and the away log
// starts after it instead of with the whole ring.
func (s *session) markAway(c side, why string, delivered bool) bool {
	rs := s.rs
	if rs == nil || s.ended.Load() {
		return false
	}
	s.wmu.Lock()
	if s.client.conn != c.conn || s.away {
		s.wmu.Unlock()
		return true // replaced by a resume already, or away already
	}
	now := time.Now()
	s.away = true
	s.attached = make(chan struct{})
	seq := s.seq
	rs.droppedAt.Store(now.UnixNano())
	rs.awayUntil.Store(now.Add(rs.window).UnixNano())
	s.wmu.Unlock()
	s.h.o.Log.Info("voice client away; the session waits for it to resume", "session_id", s.info.SessionID,
		"why", why, "last_seq", seq, "window", rs.window)
	if r := s.h.o.Registry; r.redis != nil {
		// The bound a resume's last_seq is checked against, before its upgrade. Over the record
		// its publication wrote; or, if that failed, written now: the client needs it now.
		// Not under any lock; bounded.
		if rs.recorded.Swap(true) {
			go r.writeRecord(context.Background(), s, seq, true)
		} else {
			r.writeRecord(context.Background(), s, seq, false) // before the client can come back
		}
		if delivered {
			rs.flushMu.Lock()
			rs.flushed = max(rs.flushed, seq)
			rs.flushMu.Unlock()
		}
		s.startFlusher()
	}
	return true
}

// awaitClient waits, after the client's reader returned, for a resumed client: true when one
// is attached, false when the session ended.
func (s *session) awaitClient() bool {
	if s.rs == nil {
		return false
	}
	s.wmu.Lock()
	if !s.away {
		s.wmu.Unlock()
		return !s.ended.Load()
	}
	ch := s.attached
	s.wmu.Unlock()
	select {
	case <-ch:
		return !s.ended.Load()
	case <-s.ending:
		return false
	}
}

// windowOver ends an away session whose window has passed (the clock's tick).
func (s *session) windowOver(now time.Time) bool {
	if s.rs == nil {
		return false
	}
	until := s.rs.awayUntil.Load()
	if until == 0 || now.UnixNano() < until {
		return false
	}
	s.end(ending{code: websocket.StatusGoingAway, reason: "the client did not resume within " + s.rs.window.String(),
		dropClient: true})
	return true
}

// ---- the away log (Redis) ----------------------------------------------------------------------

func (s *session) kickFlusher() {
	select {
	case s.rs.kick <- struct{}{}:
	default:
	}
}

// startFlusher writes the ring to the session's log, and then what the downlink adds, until
// the session ends or its client comes back.
func (s *session) startFlusher() {
	if !s.rs.flusher.CompareAndSwap(false, true) {
		s.kickFlusher()
		return
	}
	s.kickFlusher()
	go func() {
		defer s.rs.flusher.Store(false)
		for {
			select {
			case <-s.rs.kick:
			case <-s.ending:
				return
			}
			// Back (a resume here), or handing over: the seal writes what is left at once.
			if !s.isAway() || s.rs.handingOver.Load() {
				return
			}
			if err := s.flush(context.Background()); err != nil {
				s.h.o.Log.Warn("logging a voice session's downlink failed; a resume elsewhere may miss some of it",
					"session_id", s.info.SessionID, "err", proxy.Describe(err))
			}
			// What arrives meanwhile goes in the next batch: a round trip per flushEvery, not
			// per message (the seal writes whatever is left at once).
			t := time.NewTimer(flushEvery)
			select {
			case <-t.C:
			case <-s.ending:
				t.Stop()
				return
			}
		}
	}()
}

// flushEvery spaces an away session's writes to its log. The log is what a resume elsewhere
// reads when the owner died while its client was away; at a handover the seal writes whatever is
// left at once, so the spacing delays no resume.
const flushEvery = 100 * time.Millisecond

// flush writes the messages the log does not have yet, from the ring, in one round trip,
// bounded. Messages the ring no longer holds are not in the log: a resume finds the gap.
func (s *session) flush(ctx context.Context) error {
	_, err := s.flushBatch(ctx, false)
	return err
}

// flushBatch writes one batch of what the log does not have yet; with sealing, the batch that
// reaches the end of the ring carries the seal too, in the same round trip, and sealed says so.
func (s *session) flushBatch(ctx context.Context, sealing bool) (sealed bool, err error) {
	rs := s.rs
	rs.flushMu.Lock()
	defer rs.flushMu.Unlock()
	r := s.h.o.Registry
	key := r.logKey(s.info.TenantID, s.info.SessionID)
	var cmds rueidis.Commands
	next := rs.flushed + 1
	s.wmu.Lock()
	for len(cmds) < 512 {
		seq, typ, msg, ok := s.ring.from(next)
		if !ok {
			break
		}
		t := "t"
		if typ == websocket.MessageBinary {
			t = "b"
		}
		cmds = append(cmds, r.redis.B().Xadd().Key(key).Maxlen().Almost().Threshold(strconv.Itoa(logMaxLen)).Id("*").
			FieldValue().FieldValue("s", strconv.FormatInt(seq, 10)).FieldValue("t", t).FieldValue("d", string(msg)).Build())
		next = seq + 1
	}
	more := false
	if _, _, _, ok := s.ring.from(next); ok {
		more = true
	}
	last := s.seq
	s.wmu.Unlock()
	sealing = sealing && !more
	if sealing {
		// The upstream has closed: nothing more is relayed, and last is the log's end.
		sl := seal{Seq: last, Live: s.live(), Use: s.gov.use.Load(), Held: s.gov.held.Load(), Resumes: rs.resumes.Load(),
			Audio: s.format.Load()}
		if s.m.declared.Load() {
			sl.TTS = s.m.declaredFmt.Load()
		}
		b, _ := json.Marshal(sl)
		cmds = append(cmds, r.redis.B().Xadd().Key(key).Id("*").FieldValue().FieldValue("seal", string(b)).Build())
	}
	if len(cmds) == 0 {
		return false, nil
	}
	cmds = append(cmds, r.redis.B().Pexpire().Key(key).Milliseconds(r.recordTTL(rs.window).Milliseconds()).Build())
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for _, res := range r.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return false, err
		}
	}
	rs.flushed = next - 1
	if more && !sealing {
		s.kickFlusher()
	}
	return sealing, nil
}

// handOver is the owner's side of a resume elsewhere: the client connection, if any, is closed
// 4100 and the downlink goes to the log until the algorithm service closes this upstream with
// 4100 (upReadFailed seals the log then); if it does not within handoverWait, the session ends.
func (s *session) handOver() {
	rs := s.rs
	if s.ended.Load() || !rs.handingOver.CompareAndSwap(false, true) {
		return
	}
	s.wmu.Lock()
	key := rs.key
	s.wmu.Unlock()
	s.h.o.Registry.claimLocal(key) // spent: another instance claimed it
	s.wmu.Lock()
	var old *side
	if !s.away {
		c := s.client
		old = &c
		s.away = true
		s.attached = make(chan struct{})
		rs.awayUntil.Store(time.Now().Add(rs.window).UnixNano())
	}
	s.wmu.Unlock()
	if old != nil {
		go closeMoved(*old)
	}
	// The resuming instance dials the service (DialTimeout), which then has handoverWait to
	// close this upstream; past both and a margin, the resume failed.
	time.AfterFunc(s.h.o.DialTimeout+handoverWait+time.Second, func() {
		if !rs.sealed.Load() {
			s.end(ending{code: websocket.StatusInternalError, errCode: CodeResumeFailed,
				reason: "the algorithm service did not move the session", dropClient: true})
		}
	})
}

// closeMoved closes a client connection whose session moved to a newer one.
func closeMoved(c side) {
	t := time.AfterFunc(closeWait, c.conn.drop)
	defer t.Stop()
	_ = c.ws.Close(CloseMoved, "moved")
}

// sealLog writes what is left of the downlink to the log, then the seal; it reports whether
// the seal was written. The upstream has closed: nothing more comes.
func (s *session) sealLog() bool {
	r := s.h.o.Registry
	if r.redis == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), handoverWait)
	defer cancel()
	for {
		sealed, err := s.flushBatch(ctx, true)
		if err != nil {
			s.h.o.Log.Warn("sealing a voice session's log at its handover failed", "session_id", s.info.SessionID,
				"err", proxy.Describe(err))
			return false
		}
		if sealed {
			s.rs.sealed.Store(true)
			return true
		}
	}
}

// errNoSeal means the old owner did not seal the log in time.
var errNoSeal = errors.New("voice: the session's previous instance did not hand it over in time")

// resumeInfo is what session_initialized says of resuming; nil when it is off.
func (s *session) resumeInfo() *resumeInfo {
	if s.rs == nil {
		return nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return &resumeInfo{Token: s.rs.token, WindowMS: s.rs.window.Milliseconds()}
}

func (s *session) resumes() int64 {
	if s.rs == nil {
		return 0
	}
	return s.rs.resumes.Load()
}

// Drain tells the clients of this instance's resumable sessions to resume elsewhere (an error
// SERVER_SHUTDOWN with "resume": true, then close 1012) and keeps each session, upstream and
// all, until another instance takes it over, its window ends, or CloseAll ends it. Sessions
// that cannot resume are left to CloseAll, and so is every session without Redis: no other
// instance could take it over.
func (r *Registry) Drain() int {
	if r.redis == nil {
		return 0
	}
	n := 0
	for _, s := range r.local() {
		if s.rs == nil || s.ended.Load() {
			continue
		}
		n++
		go s.drain()
	}
	return n
}

func (s *session) drain() {
	s.wmu.Lock()
	if s.away {
		s.wmu.Unlock()
		return
	}
	c := s.client
	s.wmu.Unlock()
	s.n.errors.Add(1)
	_, _ = s.down(websocket.MessageText, encodeResumeError(s.info.SessionID, CodeShutdown,
		"the server is restarting; resume on another instance"))
	// Away before the close, so that the reader's end is not taken for the session's. What was
	// written to the client until now reaches it before the close, which it reads to: the away
	// log starts after it (not with the whole ring, for every session at the same moment).
	if !s.markAway(c, "drained", true) {
		return
	}
	t := time.AfterFunc(closeWait, c.conn.drop)
	defer t.Stop()
	_ = c.ws.Close(websocket.StatusServiceRestart, "the server is restarting; resume")
}

// writeLock orders the downlink (session.wmu). It is a channel, not a sync.Mutex, because it is
// held across a write to the client: such a write is bounded by the socket's deadline, and one
// waiting for it waits as it would for the library's own write lock, which is a channel too (so
// that a test's fake clock sees the waiter blocked, and moves on to the deadline).
type writeLock chan struct{}

func (l writeLock) Lock()   { l <- struct{}{} }
func (l writeLock) Unlock() { <-l }
