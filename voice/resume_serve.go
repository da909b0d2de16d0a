package voice

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// Outcomes of a resume, for Options.OnResume (voice_resumes_total{outcome}).
const (
	ResumeOK       = "resumed"   // everything missed was replayed
	ResumeGap      = "gap"       // resumed, but some of what was missed was lost (RESUME_GAP)
	ResumeFailed   = "failed"    // the algorithm service or the old owner did not move the session
	ResumeNotFound = "not_found" // no resumable session for that token and caller (404)
)

// serveResume answers GET /api/v2/voice/stream?resume_token=&last_seq=: the session the token
// names, of the caller, resumed here from wherever it ran. Every refusal comes before the
// upgrade.
func (h *Handler) serveResume(w http.ResponseWriter, r *http.Request, user, tenant string) {
	q := r.URL.Query()
	token, seqText := q.Get("resume_token"), q.Get("last_seq")
	var bad []proxy.FieldError
	if !proxy.ValidResumeToken(token) {
		bad = append(bad, proxy.FieldError{Field: "resume_token", Reason: proxy.ResumeTokenReason})
	}
	last, err := strconv.ParseInt(seqText, 10, 64)
	if err != nil || last < 0 {
		bad = append(bad, proxy.FieldError{Field: "last_seq", Reason: "must be the number of the last message received: 0 or more"})
	}
	if len(bad) > 0 {
		proxy.WriteError(w, r, proxy.InvalidFields(bad...))
		return
	}
	notFound := func() {
		h.resumed(ResumeNotFound, 0)
		proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeSessionNotFound, "no resumable voice session for this token")
	}
	beyond := func() {
		proxy.WriteError(w, r, proxy.InvalidFields(proxy.FieldError{Field: "last_seq",
			Reason: "is beyond the last message the session sent"}))
	}
	reg := h.o.Registry
	key := reg.tokenKey(tenant, user, token)
	if s := reg.peekLocal(key); s != nil {
		s.wmu.Lock()
		sent := s.seq
		s.wmu.Unlock()
		if last > sent {
			beyond()
			return
		}
		if reg.claimLocal(key) != s || s.ended.Load() {
			notFound()
			return
		}
		if reg.redis != nil && s.rs.recorded.Load() {
			// Single use everywhere: the record is claimed too. Gone from Redis means a resume
			// elsewhere took it first; a Redis that does not answer leaves the local claim.
			ctx, cancel := context.WithTimeout(r.Context(), 250*time.Millisecond)
			rec, err := reg.getRecord(ctx, key, true)
			cancel()
			if err == nil && rec == nil {
				notFound()
				return
			}
		}
		h.resumeLocal(w, r, s, last)
		return
	}
	if reg.redis == nil {
		notFound()
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Second)
	defer cancel()
	rec, err := reg.getRecord(ctx, key, false)
	if err != nil {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
			Message: "the session store is unavailable", Cause: err})
		return
	}
	if rec == nil {
		notFound()
		return
	}
	if rec.Seq >= 0 && last > rec.Seq {
		beyond()
		return
	}
	release := func() {}
	if h.o.AdmitResume != nil {
		var ok bool
		if release, ok = h.o.AdmitResume(w, r); !ok {
			return
		}
	}
	started := false
	defer func() {
		if !started {
			release()
		}
	}()
	// The claim: of every resume of this token, one takes it.
	if rec, err = reg.getRecord(ctx, key, true); err != nil || rec == nil {
		if err != nil {
			proxy.WriteError(w, r, &proxy.Error{Status: http.StatusServiceUnavailable, Code: proxy.CodeUnavailable,
				Message: "the session store is unavailable", Cause: err})
			return
		}
		notFound()
		return
	}
	client, ok := h.accept(w, r)
	if !ok {
		return
	}
	started = true
	h.resumeRemote(r, client, rec, last, user, tenant, release)
}

// accept upgrades r (its checks passed), with the session's socket wrapped in its deadlines.
func (h *Handler) accept(w http.ResponseWriter, r *http.Request) (side, bool) {
	hj := &hijacker{ResponseWriter: w, read: h.o.readTimeout(), write: h.o.WriteTimeout}
	client, err := websocket.Accept(hj, r, &websocket.AcceptOptions{
		Subprotocols:    []string{Subprotocol},
		OriginPatterns:  originPatterns(r),
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil || hj.conn == nil {
		if err == nil {
			client.CloseNow()
		}
		return side{}, false
	}
	client.SetReadLimit(h.o.ReadLimit)
	return side{ws: client, conn: hj.conn}, true
}

// resumed reports a resume's outcome.
func (h *Handler) resumed(outcome string, gap time.Duration) {
	if h.o.OnResume != nil {
		h.o.OnResume(outcome, gap)
	}
}

// writeHeader writes session_resumed (and RESUME_GAP after it) to c: not numbered.
func (s *session) writeResumed(c side, replayed, lastSeq int64, gap bool) error {
	now := time.Now()
	msg, _ := json.Marshal(sessionResumed{Type: TypeSessionResumed, SessionID: s.info.SessionID, Replayed: replayed,
		LastSeq: lastSeq, Resume: resumeInfo{Token: s.rs.token, WindowMS: s.rs.window.Milliseconds()},
		ServerTime: now.Unix(), ServerTimeMS: now.UnixMilli()})
	if err := c.ws.Write(unbounded(), websocket.MessageText, msg); err != nil {
		return err
	}
	if gap {
		return c.ws.Write(unbounded(), websocket.MessageText, encodeError(s.info.SessionID, CodeResumeGap,
			"some of the messages sent while the client was away are lost; the session goes on"))
	}
	return nil
}

// resumeLocal resumes s, which runs here, for the client of r after message last.
func (h *Handler) resumeLocal(w http.ResponseWriter, r *http.Request, s *session, last int64) {
	c, ok := h.accept(w, r)
	if !ok {
		// The token is spent and the session goes on without a client: it still has its
		// window, but no token. Give it one back.
		s.newToken()
		return
	}
	got := time.Now()
	s.newToken()
	s.wmu.Lock()
	old, wasAway := s.client, s.away
	s.setClient(c)
	s.away, s.replaying = false, true
	dropped := s.rs.droppedAt.Swap(0)
	s.rs.awayUntil.Store(0)
	attached := s.attached
	first, sent := s.ring.first(), s.seq
	s.wmu.Unlock()
	s.lastIn.Store(got.UnixNano())
	if !wasAway {
		go closeMoved(old)
	}
	gap := last < sent && (first == 0 || first > last+1)
	replayed := sent - last
	if err := s.writeResumed(c, replayed, last, gap); err != nil {
		s.replayDone()
		s.detach(c, "client gone while resuming")
	} else {
		s.replay(c, last+1)
	}
	s.rs.resumes.Add(1)
	if wasAway && attached != nil {
		close(attached)
	}
	d := time.Duration(0)
	if dropped != 0 {
		d = time.Since(time.Unix(0, dropped))
	}
	outcome := ResumeOK
	if gap {
		outcome = ResumeGap
	}
	h.resumed(outcome, d)
	h.o.Log.Info("voice session resumed", "session_id", s.info.SessionID, "last_seq", last, "replayed", replayed,
		"gap", gap, "moved_from", "this instance")
}

// replay writes the ring's messages from seq on to c, then lets the live downlink through.
// Each write holds wmu (see down): new messages wait in the ring meanwhile and are replayed
// too, so the client gets every number once, in order.
func (s *session) replay(c side, seq int64) {
	for {
		s.wmu.Lock()
		if s.client.conn != c.conn {
			s.replaying = false // another resume took over; it replays
			s.wmu.Unlock()
			return
		}
		got, typ, msg, ok := s.ring.from(seq)
		if !ok || got > s.seq {
			s.replaying = false
			s.wmu.Unlock()
			return
		}
		err := c.ws.Write(unbounded(), typ, msg)
		s.wmu.Unlock()
		if err != nil {
			s.replayDone()
			s.detach(c, "client gone while resuming")
			return
		}
		seq = got + 1
	}
}

func (s *session) replayDone() {
	s.wmu.Lock()
	s.replaying = false
	s.wmu.Unlock()
}

// newToken gives s a fresh resume token: the last one was spent.
func (s *session) newToken() {
	reg := s.h.o.Registry
	token, key := reg.newResumeToken(s.info.TenantID, s.info.UserID)
	s.wmu.Lock()
	s.rs.token, s.rs.key = token, key
	s.wmu.Unlock()
	reg.keep(context.Background(), s, -1, true)
}

// resumeRemote takes over the session rec names from the instance that ran it, for client,
// which has been upgraded: the upstream moves (resume=1), the old owner's log is replayed up
// to its seal, then the session runs here.
func (h *Handler) resumeRemote(r *http.Request, client side, rec *tokenRecord, last int64, user, tenant string,
	release func()) {
	reg := h.o.Registry
	got := time.Now()
	info := Info{SessionID: rec.SessionID, ConversationID: rec.ConversationID, Language: rec.Language,
		Instance: reg.instance, StartedAt: rec.StartedAt, UserID: user, TenantID: tenant}
	if h.o.Token != nil {
		info.TokenID, info.IssuedAt = h.o.Token(r)
	}
	fail := func(why string, err error) {
		release()
		h.resumed(ResumeFailed, 0)
		h.o.Log.Warn("resuming a voice session failed", "session_id", info.SessionID, "why", why, "err", proxy.Describe(err))
		_ = client.ws.Write(unbounded(), websocket.MessageText, encodeError(info.SessionID, CodeResumeFailed, why))
		t := time.AfterFunc(closeWait, client.conn.drop)
		_ = client.ws.Close(websocket.StatusInternalError, "resume failed")
		t.Stop()
		client.conn.drop()
	}
	// Ask the owner to let go; its answer count says whether it is alive.
	pctx, pcancel := context.WithTimeout(context.Background(), time.Second)
	defer pcancel()
	alive, err := reg.redis.Do(pctx, reg.redis.B().Spublish().Channel(reg.handoverChannel(rec.Owner)).
		Message(rec.SessionID).Build()).AsInt64()
	if err != nil {
		fail("the session store is unavailable", err)
		return
	}
	cfg := h.o.Audio
	if rec.Language != "" {
		cfg.Language = rec.Language
	}
	if rec.Audio != nil {
		cfg = cfg.withFormat(*rec.Audio)
	}
	up, upConn, err := h.dial(r, info, cfg, true)
	if err != nil {
		fail("the algorithm service refused to resume the session", err)
		return
	}
	up.SetReadLimit(h.o.ReadLimit)
	// The old owner's log, to its seal (or, when the owner is gone, what it holds): the service
	// has handoverWait from its answer to close the older connection, and the old owner to seal.
	ctx, cancel := context.WithTimeout(context.Background(), handoverWait)
	defer cancel()
	entries, sl, err := h.readLog(ctx, reg.logKey(tenant, rec.SessionID), last, alive > 0)
	if err != nil {
		upConn.drop()
		up.CloseNow()
		fail("the session's previous instance did not hand it over in time", err)
		return
	}
	if sl != nil && sl.Audio != nil {
		cfg = cfg.withFormat(*sl.Audio) // the format as it was at the handover
	}
	s := newSession(h, info, cfg, client, side{ws: up, conn: upConn})
	s.release = release
	s.start = rec.StartedAt
	var lim policy.VoiceLimits
	if h.o.Limits != nil {
		lim = h.o.Limits(tenant)
	}
	s.gov.limits, s.gov.size = lim, h.o.Reservation
	s.gov.metered = h.o.Meter != nil && lim.Metered()
	base := max(last, rec.Seq)
	if len(entries) > 0 {
		base = max(base, entries[len(entries)-1].seq)
	}
	if sl != nil {
		base = sl.Seq
		s.restore(sl)
	}
	// The client counts: what it gets must be numbered without a hole from where it resumes
	// counting. So only the run of the log that ends at base without a hole is replayed.
	entries = consecutiveTail(entries, base)
	gap := sl == nil || (base > last && (len(entries) == 0 || entries[0].seq > last+1))
	s.rs = &resumable{window: h.o.ResumeWindow, kick: make(chan struct{}, 1)}
	s.rs.resumes.Store(1)
	if sl != nil {
		s.rs.resumes.Store(sl.Resumes + 1)
	}
	s.ring = newDownRing(h.o.ResumeBuffer)
	s.rs.token, s.rs.key = reg.newResumeToken(tenant, user)
	if h.o.Recheck != nil {
		s.recheck = h.o.Recheck(r)
	}
	if h.o.Expiry != nil {
		s.expiry = h.o.Expiry(r)
	}
	// The replay, numbered as the old owner numbered it; then this upstream's messages follow.
	s.wmu.Lock()
	s.seq = base
	for _, e := range entries {
		s.ring.add(e.seq, e.typ, e.msg)
	}
	s.replaying = true
	s.wmu.Unlock()
	// The log is spent; this owner writes its own if its client goes away.
	dctx, dcancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	_ = reg.redis.Do(dctx, reg.redis.B().Del().Key(reg.logKey(tenant, rec.SessionID)).Build()).Error()
	dcancel()
	s.rs.recorded.Store(true)
	reg.keep(context.Background(), s, -1, true)
	if s.gov.metered {
		s.reserve(0)
	}
	reg.add(r.Context(), s)
	if h.o.OnStart != nil {
		h.o.OnStart()
	}
	if err := s.writeResumed(client, int64(len(entries)), base-int64(len(entries)), gap); err != nil {
		s.replayDone()
		s.detach(client, "client gone while resuming")
	} else if len(entries) > 0 {
		s.replay(client, entries[0].seq)
	} else {
		s.replayDone()
	}
	d := time.Since(got)
	if rec.DroppedAt > 0 {
		d = time.Since(time.UnixMilli(rec.DroppedAt))
	}
	outcome := ResumeOK
	if gap {
		outcome = ResumeGap
	}
	h.resumed(outcome, d)
	h.o.Log.Info("voice session resumed", "session_id", info.SessionID, "last_seq", last, "replayed", len(entries),
		"gap", gap, "moved_from", rec.Owner, "owner_alive", alive > 0)
	go s.run()
}

// logEntry is one message of a session's log.
type logEntry struct {
	seq int64
	typ websocket.MessageType
	msg []byte
}

// readLog reads a session's log: the messages after last, in order, and its seal. With the
// owner alive it waits, within ctx, for the seal, reading as the log grows; without, it reads
// what there is.
func (h *Handler) readLog(ctx context.Context, key string, last int64, alive bool) ([]logEntry, *seal, error) {
	reg := h.o.Registry
	var out []logEntry
	from := "-"
	wait := 2 * time.Millisecond
	for {
		rows, err := reg.redis.Do(ctx, reg.redis.B().Xrange().Key(key).Start(from).End("+").Count(512).Build()).AsXRange()
		if err != nil && !rueidis.IsRedisNil(err) {
			return nil, nil, err
		}
		for _, row := range rows {
			from = "(" + row.ID
			if v, ok := row.FieldValues["seal"]; ok {
				var sl seal
				if json.Unmarshal([]byte(v), &sl) == nil {
					return out, &sl, nil
				}
				continue
			}
			seq, _ := strconv.ParseInt(row.FieldValues["s"], 10, 64)
			if seq <= last || len(out) > 0 && seq <= out[len(out)-1].seq {
				continue
			}
			typ := websocket.MessageText
			if row.FieldValues["t"] == "b" {
				typ = websocket.MessageBinary
			}
			out = append(out, logEntry{seq: seq, typ: typ, msg: []byte(row.FieldValues["d"])})
		}
		if len(rows) == 512 {
			continue
		}
		if !alive {
			return out, nil, nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, errNoSeal
		case <-t.C:
		}
		wait = min(2*wait, 25*time.Millisecond)
	}
}

// restore carries the counters of the session's previous instance on: one session, one usage
// record, one quota account.
func (s *session) restore(sl *seal) {
	l := sl.Live
	s.n.packetsIn.Store(l.PacketsIn)
	s.n.bytesIn.Store(l.BytesIn)
	s.n.packetsOut.Store(l.PacketsOut)
	s.n.bytesOut.Store(l.BytesOut)
	s.n.asrPartial.Store(l.ASRPartial)
	s.n.asrFinal.Store(l.ASRFinal)
	s.n.llmChunks.Store(l.LLMChunks)
	s.n.ttsChunks.Store(l.TTSChunks)
	s.n.errors.Store(l.Errors)
	s.n.invalidAudio.Store(l.InvalidAudio)
	s.m.in.Store(int64(l.AudioSecondsIn * float64(time.Second)))
	s.m.out.Store(int64(l.AudioSecondsOut * float64(time.Second)))
	s.m.bargeIns.Store(l.BargeIns)
	s.gov.use.Store(sl.Use)
	s.gov.held.Store(sl.Held)
	if sl.TTS != nil {
		f := *sl.TTS
		s.m.declaredFmt.Store(&f)
		s.m.declared.Store(true)
		s.m.tts.Store(&f)
	}
}

// consecutiveTail is the longest run at the end of entries numbered without a hole up to base;
// none when the last entry is not base.
func consecutiveTail(entries []logEntry, base int64) []logEntry {
	if len(entries) == 0 || entries[len(entries)-1].seq != base {
		return nil
	}
	i := len(entries) - 1
	for i > 0 && entries[i-1].seq == entries[i].seq-1 {
		i--
	}
	return entries[i:]
}
