package main

// Voice sessions end to end: run() with authentication, the policy and, where instances share
// state, a real redis-server, in front of the fake algorithm service whose /voice/stream accepts
// WebSockets; clients are real coder/websocket peers on loopback (and the README's Python
// client). Refusals before and after the upgrade, sessions across instances, clients that stop
// reading.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestVoiceRefusedBeforeUpgrade: every request the gateway must refuse gets an HTTP error
// instead of a 101, and the algorithm service is never dialed. A last, valid request shows that
// it would have been.
func TestVoiceRefusedBeforeUpgrade(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example.com"})
	w := watchTokens(t, g)
	user := w.token(t, "u-voice", []string{"user"}, nil)
	noPerm := w.token(t, "u-noperm", []string{}, nil)
	now := time.Now()
	forged := w.add(signHS256(t, "not-the-gateway-secret-0123456789abcdef", map[string]any{
		"sub": "u-voice", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "tenant_id": "tenant-a", "roles": []string{"user"}}))
	from := func(origin string) http.Header {
		h := bearer(user)
		h.Set("Origin", origin)
		return h
	}

	for _, tt := range []struct {
		name      string
		query     string
		header    http.Header
		protocols []string
		status    int
		code      string
		mention   string // in the error message
	}{
		{"no token", "", nil, nil, http.StatusUnauthorized, "TOKEN_MISSING", ""},
		{"bad token", "", bearer(forged), nil, http.StatusUnauthorized, "TOKEN_INVALID", ""},
		{"token in the query", "?access_token=" + url.QueryEscape(user), nil, nil, http.StatusUnauthorized, "TOKEN_INVALID", "query"},
		{"token in the header and as a subprotocol", "", bearer(user), []string{voiceSubprotocol, "bearer." + user},
			http.StatusUnauthorized, "TOKEN_INVALID", ""},
		{"no voice:write", "", bearer(noPerm), nil, http.StatusForbidden, "PERMISSION_DENIED", "voice:write"},
		{"disallowed origin", "", from("https://evil.example"), nil, http.StatusForbidden, "PERMISSION_DENIED", "origin"},
		{"allowed origin's host over http", "", from("http://app.example.com"), nil, http.StatusForbidden, "PERMISSION_DENIED", "origin"},
		{"allowed origin as a prefix", "", from("https://app.example.com.evil.example"), nil, http.StatusForbidden, "PERMISSION_DENIED", "origin"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := voiceRefused(t, g, tt.query, tt.header, tt.protocols...)
			doc := wantError(t, res, tt.status, tt.code)
			if tt.mention != "" && !strings.Contains(doc.Error, tt.mention) {
				t.Errorf("error %q, want it to mention %q", doc.Error, tt.mention)
			}
			if tt.status == http.StatusUnauthorized && res.Header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
			if n := len(algo.dials()); n != 0 {
				t.Errorf("the algorithm service was dialed %d times, want never", n)
			}
		})
	}

	// The control: the same gateway and fake do open a session for a valid request.
	v := openVoice(t, g, "?conversation_id=c-control", bearer(user))
	if n := len(algo.dials()); n != 1 {
		t.Errorf("the algorithm service was dialed %d times for one session, want 1", n)
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "")
}

// TestVoiceBrowserAuth: a browser, which cannot set headers on a WebSocket, sends its token as a
// "bearer.<token>" subprotocol from an allowed origin. The session opens with exactly
// voice-protocol-v2 (the token is never echoed), and the algorithm service gets the caller's
// identity headers and the request ID, never the token.
func TestVoiceBrowserAuth(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example.com"})
	w := watchTokens(t, g)
	tok := w.token(t, "u-browser", []string{"user"}, map[string]any{"tenant_id": "tenant-b", "session_id": "login-7"})
	sig := tok[strings.LastIndexByte(tok, '.')+1:]

	v := openVoice(t, g, "?conversation_id=c-browser&language=en-US",
		http.Header{"Origin": {"https://app.example.com"}}, voiceSubprotocol, "bearer."+tok)
	// Failure messages clip what they show: a token echoed back must not be printed whole.
	if got := v.res.Header.Values("Sec-WebSocket-Protocol"); !slices.Equal(got, []string{voiceSubprotocol}) {
		t.Errorf("Sec-WebSocket-Protocol of the 101 = %.20q…, want exactly [%s]", got, voiceSubprotocol)
	}
	if p := v.conn.Subprotocol(); p != voiceSubprotocol {
		t.Errorf("negotiated subprotocol %.20q…, want %s", p, voiceSubprotocol)
	}
	for k, vals := range v.res.Header {
		for _, val := range vals {
			if strings.Contains(val, sig) {
				t.Errorf("the 101 carries the token in %s", k)
			}
		}
	}
	if got := v.res.Header.Get("Access-Control-Allow-Origin"); got != "https://app.example.com" {
		t.Errorf("Access-Control-Allow-Origin = %q, want the allowed origin", got)
	}
	cfg, _ := v.init["config"].(map[string]any)
	if cfg["sample_rate"] != 16000.0 || cfg["channels"] != 1.0 || cfg["format"] != "pcm" || cfg["language"] != "en-US" {
		t.Errorf("session_initialized config = %v, want 16000 Hz, 1 channel, pcm, en-US", cfg)
	}
	if _, ok := v.init["capabilities"].(map[string]any); !ok {
		t.Errorf("session_initialized without capabilities: %v", v.init)
	}
	if _, ok := v.init["server_time"].(float64); !ok {
		t.Errorf("session_initialized without server_time: %v", v.init)
	}

	dials := algo.dials()
	if len(dials) != 1 {
		t.Fatalf("the algorithm service was dialed %d times, want once", len(dials))
	}
	d := dials[0]
	for k, want := range map[string]string{
		"X-User-Id":              "u-browser",
		"X-Username":             "u-browser-name",
		"X-Tenant-Id":            "tenant-b",
		"X-User-Roles":           "user",
		"X-Session-Id":           "login-7",
		"Sec-Websocket-Protocol": voiceSubprotocol,
	} {
		if got := d.Header.Values(k); !slices.Equal(got, []string{want}) {
			t.Errorf("the dial's %s = %q, want [%s]", k, got, want)
		}
	}
	if rid, own := d.Header.Get("X-Request-Id"), v.res.Header.Get("X-Request-Id"); rid == "" || rid != own {
		t.Errorf("the dial's X-Request-ID %q, want the one the client got, %q", rid, own)
	}
	if got := d.Header.Get("Authorization"); got != "" {
		t.Errorf("the dial carries Authorization %q", got)
	}
	for k, vals := range d.Header {
		for _, val := range vals {
			if strings.Contains(val, sig) || strings.Contains(val, "bearer.") {
				t.Errorf("the dial carries the token in %s", k)
			}
		}
	}
	q, _ := url.ParseQuery(d.RawQuery)
	if q.Get("session_id") != v.id || q.Get("conversation_id") != "c-browser" || q.Get("language") != "en-US" {
		t.Errorf("the dial's query %q, want session_id %s, conversation_id c-browser, language en-US", d.RawQuery, v.id)
	}

	eventually(t, 2*time.Second, "the upstream session is open", func() bool { return algo.voiceOpen.Load() == 1 })
	if err := v.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("closing the session: %v", err)
	}
	eventually(t, 2*time.Second, "the upstream session closed after the client closed", func() bool {
		return algo.voiceOpen.Load() == 0
	})
}

// TestVoiceRevokedAcrossInstances: two gateways on one Redis; a session open on B is closed with
// an error message TOKEN_INVALID and close code 4401 within a second of A's 200 to a logout
// with its token, and its upstream connection is closed too.
func TestVoiceRevokedAcrossInstances(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	env := redisEnv(r, algo, okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	tok := w.token(t, "u-revoke", []string{"user"}, nil)

	v := openVoice(t, b, "?conversation_id=c-revoke", bearer(tok))
	ended := v.readToClose(t.Context())
	// Rechecks of a valid token leave the session alone.
	select {
	case e := <-ended:
		t.Fatalf("the session ended (%d, %v) before its token was revoked", e.code, e.err)
	case <-time.After(700 * time.Millisecond):
	}

	res := call(t, a, "POST", "/api/v2/auth/revoke", tok, "")
	revoked := time.Now()
	wantStatus(t, res, http.StatusOK)
	e := waitEnding(t, ended, 3*time.Second)
	took := e.at.Sub(revoked)
	t.Logf("closed %v after the revocation", took)
	if e.code != 4401 {
		t.Errorf("close code %d (%v), want 4401", e.code, e.err)
	}
	// TOKEN_REVOKED when the revocation's message arrives first (it is published at once),
	// TOKEN_INVALID when the periodic recheck does.
	if codes := e.errorCodes(); !slices.Contains(codes, "TOKEN_REVOKED") && !slices.Contains(codes, "TOKEN_INVALID") {
		t.Errorf("error messages %q before the close, want TOKEN_REVOKED", codes)
	}
	if took > time.Second {
		t.Errorf("the session closed %v after A's 200, want within 1s", took)
	}
	eventually(t, 2*time.Second, "the upstream session closed", func() bool { return algo.voiceOpen.Load() == 0 })
}

// TestVoiceTokenExpiresDuringSession: with JWT_LEEWAY=0s, a session whose token expires ~2 s
// after it opened is closed with TOKEN_INVALID and 4401 within a second of exp, not before.
func TestVoiceTokenExpiresDuringSession(t *testing.T) {
	t.Parallel()
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "JWT_LEEWAY": "0s"})
	w := watchTokens(t, g)
	exp := time.Now().Add(2 * time.Second).Unix() // whole seconds: between 1 and 2 s ahead
	if time.Until(time.Unix(exp, 0)) < 1500*time.Millisecond {
		exp++
	}
	expAt := time.Unix(exp, 0)
	tok := w.token(t, "u-expiring", []string{"user"}, map[string]any{"exp": exp})

	v := openVoice(t, g, "?conversation_id=c-exp", bearer(tok))
	e := waitEnding(t, v.readToClose(t.Context()), time.Until(expAt)+3*time.Second)
	late := e.at.Sub(expAt)
	t.Logf("closed %v after exp", late)
	if e.code != 4401 {
		t.Errorf("close code %d (%v), want 4401", e.code, e.err)
	}
	// TOKEN_REVOKED when the revocation's message arrives first (it is published at once),
	// TOKEN_INVALID when the periodic recheck does.
	if codes := e.errorCodes(); !slices.Contains(codes, "TOKEN_REVOKED") && !slices.Contains(codes, "TOKEN_INVALID") {
		t.Errorf("error messages %q before the close, want TOKEN_REVOKED", codes)
	}
	if late < 0 {
		t.Errorf("the session closed %v before its token expired", -late)
	}
	if late > time.Second {
		t.Errorf("the session closed %v after exp, want within 1s", late)
	}
}

// TestVoiceSessionsAcrossInstances: each of two gateways on one Redis holds a session; either
// lists both, with instance, user and conversation, to an admin; a plain user is refused; a
// closed session leaves both listings.
func TestVoiceSessionsAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	env := redisEnv(r, algo, okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	admin := w.token(t, "u-admin-voice", []string{"admin"}, nil)
	user := w.token(t, "u-plain", []string{"user"}, nil)

	alice := openVoice(t, a, "?conversation_id=c-alice&language=en-US", bearer(w.token(t, "u-alice", []string{"user"}, nil)))
	bob := openVoice(t, b, "?conversation_id=c-bob", bearer(w.token(t, "u-bob", []string{"user"}, nil)))
	want := map[string]struct{ instance, user, conversation, language string }{
		alice.id: {"a", "u-alice", "c-alice", "en-US"},
		bob.id:   {"b", "u-bob", "c-bob", "zh-CN"},
	}
	for _, g := range []*testGateway{a, b} {
		l := listVoice(t, g, admin)
		if l.Count != 2 {
			t.Errorf("%s lists %d sessions, want 2: %+v", g.Addr, l.Count, l.Sessions)
		}
		for _, s := range l.Sessions {
			wt, ok := want[s.SessionID]
			if !ok {
				t.Errorf("%s lists an unknown session %+v", g.Addr, s)
				continue
			}
			if s.Instance != wt.instance || s.UserID != wt.user || s.ConversationID != wt.conversation ||
				s.Language != wt.language || s.TenantID != "tenant-a" || s.StartedAt.IsZero() {
				t.Errorf("%s lists %+v, want instance %s, user %s, conversation %s, language %s, tenant-a, a start time",
					g.Addr, s, wt.instance, wt.user, wt.conversation, wt.language)
			}
		}
		wantError(t, call(t, g, "GET", "/api/v2/voice/sessions", user, ""), http.StatusForbidden, "PERMISSION_DENIED")
	}

	if err := alice.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("closing alice's session: %v", err)
	}
	for _, g := range []*testGateway{b, a} {
		eventually(t, 2*time.Second, "the closed session leaves the listing of "+g.Addr, func() bool {
			return !listVoice(t, g, admin).hasSession(alice.id)
		})
		if l := listVoice(t, g, admin); !l.hasSession(bob.id) || l.Count != 1 {
			t.Errorf("%s lists %+v after alice's session closed, want bob's only", g.Addr, l.Sessions)
		}
	}
	_ = bob.conn.Close(websocket.StatusNormalClosure, "bye")
}

// TestVoiceConcurrencyAcrossInstances: with one voice session per user (policy
// e2e-voice-cap.json), a session on A refuses the same user's second on B before the upgrade
// (429, no dial), lets another user through, and B admits the user once A's session is closed.
func TestVoiceConcurrencyAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-voice-cap.json"}))
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	tok := w.token(t, "u-cap", []string{"user"}, nil)
	other := w.token(t, "u-cap-other", []string{"user"}, nil)

	first := openVoice(t, a, "?conversation_id=c-1", bearer(tok))
	res := voiceRefused(t, b, "?conversation_id=c-2", bearer(tok))
	doc := wantError(t, res, http.StatusTooManyRequests, "RATE_LIMITED")
	if !strings.Contains(doc.Error, "concurrency") {
		t.Errorf("429 = %s, want it to name the concurrency cap", doc.raw)
	}
	if ra, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || ra < 1 {
		t.Errorf("Retry-After = %q, want ≥ 1", res.Header.Get("Retry-After"))
	}
	if n := len(algo.dials()); n != 1 {
		t.Errorf("the algorithm service was dialed %d times, want once (the refused session never)", n)
	}

	o := openVoice(t, b, "?conversation_id=c-other", bearer(other))
	_ = o.conn.Close(websocket.StatusNormalClosure, "bye")

	if err := first.conn.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Errorf("closing the first session: %v", err)
	}
	closed := time.Now()
	var again *websocket.Conn
	eventually(t, 2*time.Second, "B admits the user once A's session closed", func() bool {
		conn, res, err := voiceDial(t, b, "?conversation_id=c-3", bearer(tok))
		if err == nil {
			again = conn
			return true
		}
		if res == nil || res.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("dial after the first session closed: %v (%s)", err, describeResult(res, nil))
		}
		return false
	})
	t.Logf("B admitted %v after the first session closed", time.Since(closed))
	_ = again.Close(websocket.StatusNormalClosure, "bye")
}

// TestVoiceAlgoDown: with nothing listening at ALGO_URL the client gets 502 ALGO_SERVICE_ERROR
// instead of a socket that opens and dies, and the answer does not name the upstream.
func TestVoiceAlgoDown(t *testing.T) {
	dead := deadAddr(t)
	g := startRun(t, nil, map[string]string{"ALGO_URL": "http://" + dead})
	w := watchTokens(t, g)
	tok := w.token(t, "u-voice", []string{"user"}, nil)

	res := voiceRefused(t, g, "?conversation_id=c-down", bearer(tok))
	doc := wantError(t, res, http.StatusBadGateway, "ALGO_SERVICE_ERROR")
	if strings.Contains(doc.raw, dead) {
		t.Errorf("the 502 names the upstream address: %s", doc.raw)
	}
	if l := listVoice(t, g, w.token(t, "u-admin-voice", []string{"admin"}, nil)); l.Count != 0 {
		t.Errorf("%d sessions listed after a refused dial, want 0", l.Count)
	}
}

// TestVoiceDemoSession: the token -demo prints opens a session; start, a second of audio and
// stop bring recognition, an answer, speech and tts_complete; the client's close 1000 ends it,
// and the gateway logs the session's counters.
func TestVoiceDemoSession(t *testing.T) {
	t.Parallel()
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": "127.0.0.1:0"})
	tokenLine := regexp.MustCompile(`TOKEN=(\S+)`)
	var tok string
	eventually(t, 2*time.Second, "stdout shows TOKEN=", func() bool {
		if m := tokenLine.FindStringSubmatch(g.Stdout.String()); m != nil {
			tok = m[1]
			return true
		}
		return false
	})
	w := watchTokens(t, g)
	w.add(tok)

	v := openVoice(t, g, "?conversation_id=c-demo", bearer(tok))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	send := func(typ websocket.MessageType, msg []byte) {
		t.Helper()
		if err := v.conn.Write(ctx, typ, msg); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	send(websocket.MessageText, []byte(`{"type":"start"}`))
	frame := make([]byte, 640) // 20 ms of 16 kHz mono pcm_s16le
	for i := range 20 {
		frame[0] = byte(i)
		send(websocket.MessageBinary, frame)
	}
	send(websocket.MessageText, []byte(`{"type":"stop"}`))

	var seq []string // message types in order; "binary" for audio frames
	for !slices.Contains(seq, "tts_complete") {
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("read after %q: %v", seq, err)
		}
		if typ == websocket.MessageBinary {
			seq = append(seq, "binary")
			continue
		}
		var m struct {
			Type      string `json:"type"`
			SessionID string `json:"session_id"`
		}
		if err := json.Unmarshal(msg, &m); err != nil {
			t.Fatalf("text message is not JSON: %s", msg)
		}
		if m.Type == "error" {
			t.Fatalf("error message: %s", msg)
		}
		seq = append(seq, m.Type)
	}
	first := func(typ string) int { return slices.Index(seq, typ) }
	order := []string{"asr_partial", "asr_final", "llm_response_chunk", "binary", "tts_complete"}
	for i, typ := range order {
		if first(typ) < 0 {
			t.Fatalf("no %s among %q", typ, seq)
		}
		if i > 0 && first(typ) < first(order[i-1]) {
			t.Errorf("the first %s came before the first %s: %q", typ, order[i-1], seq)
		}
	}
	if err := v.conn.Close(websocket.StatusNormalClosure, "done"); err != nil {
		t.Errorf("close 1000: %v", err)
	}

	var rec map[string]any
	eventually(t, 2*time.Second, `the gateway logs "voice session ended"`, func() bool {
		var n int
		n, rec = logCount(t, g, "voice session ended")
		return n == 1
	})
	for k, want := range map[string]float64{"asr_final": 1, "close_code": 1000, "packets_in": 22} {
		if rec[k] != want {
			t.Errorf("%s = %v, want %v in %v", k, rec[k], want, rec)
		}
	}
	if n, _ := rec["tts_chunks"].(float64); n <= 0 {
		t.Errorf("tts_chunks = %v, want > 0 in %v", rec["tts_chunks"], rec)
	}
	if n, _ := rec["asr_partial"].(float64); n <= 0 {
		t.Errorf("asr_partial = %v, want > 0 in %v", rec["asr_partial"], rec)
	}
	if rec["session_id"] != v.id || rec["user_id"] != "demo-user" {
		t.Errorf("the line names session %v of %v, want %s of demo-user", rec["session_id"], rec["user_id"], v.id)
	}
}

// TestVoiceClientThatNeverReads: the algorithm service streams TTS audio to a client that has
// stopped reading. Once the gateway's writes stall past VOICE_WRITE_TIMEOUT the session is
// dropped: its Redis registry entry is gone, and its concurrency slot with it (the policy
// allows one session per user, and the user opens another).
func TestVoiceClientThatNeverReads(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	testDone := t.Context()
	algo := newAlgo(t, algoOptions{Voice: func(w http.ResponseWriter, req *http.Request) {
		c, err := websocket.Accept(w, req, &websocket.AcceptOptions{Subprotocols: []string{voiceSubprotocol}})
		if err != nil {
			return
		}
		defer c.CloseNow()
		go func() { // answers pings and the close
			for {
				if _, _, err := c.Read(testDone); err != nil {
					return
				}
			}
		}()
		frame := make([]byte, 64<<10)
		for c.Write(testDone, websocket.MessageBinary, frame) == nil {
		}
	}})
	// Unpaced, the flood reaches the client's socket at once. Paced, it would reach it at
	// playback rate, and the socket's buffers take seconds to fill before a write stalls
	// (voice.TestPacedClientThatNeverReads has that path).
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-voice-cap.json", "VOICE_WRITE_TIMEOUT": "300ms",
		"VOICE_TTS_PACING": "false"}))
	g := startRun(t, nil, env)
	w := watchTokens(t, g)
	tok := w.token(t, "u-stall", []string{"user"}, nil)
	v := openVoice(t, g, "?conversation_id=c-stall", bearer(tok)) // then reads nothing
	key := "voicegate:voice:session:" + v.id
	if n := r.Do(t, "EXISTS", key); n != int64(1) {
		t.Fatalf("EXISTS %s = %v while the session runs, want 1", key, n)
	}
	took := eventually(t, 5*time.Second, "the stalled session leaves Redis", func() bool {
		return r.Do(t, "EXISTS", key) == int64(0) && r.Do(t, "ZSCORE", "voicegate:voice:sessions", v.id) == nil
	})
	t.Logf("the session left Redis %v after the client stopped reading (VOICE_WRITE_TIMEOUT 300ms)", took)
	again := openVoice(t, g, "?conversation_id=c-after", bearer(tok)) // the user's one slot is free
	_ = again.conn.Close(websocket.StatusNormalClosure, "bye")
}

// TestVoicePingFloodNeverRead: a client floods the gateway with pings and never reads a pong
// (its socket's receive buffer is small, as a client that reads nothing leaves it). A pong is a
// write like any other: once the client's window is full, the gateway queues little more (16
// KiB), a pong the client does not take within VOICE_WRITE_TIMEOUT drops it, and the session
// ends as a slow consumer (1013). The pings come at a fixed rate, 2,000 a second with the largest
// payload a ping may carry, so that how soon the queue is full does not depend on how busy the
// machine is: a tenth of a second here; the kernel left to itself queued megabytes of pongs
// first, which took ten times the write timeout.
func TestVoicePingFloodNeverRead(t *testing.T) {
	t.Parallel()
	const writeTimeout = time.Second
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "VOICE_WRITE_TIMEOUT": writeTimeout.String()})
	w := watchTokens(t, g)
	tok := w.token(t, "u-pings", []string{"user"}, nil)

	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	conn, err := d.DialContext(t.Context(), "tcp", g.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req := "GET /api/v2/voice/stream HTTP/1.1\r\nHost: " + g.Addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Protocol: " + voiceSubprotocol + "\r\nAuthorization: Bearer " + tok + "\r\n\r\n"
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil) // the last read of this client
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", res, err)
	}
	eventually(t, 5*time.Second, "the session reaches the algorithm service", func() bool { return algo.voiceOpen.Load() == 1 })

	// 20 pings every 10 ms, each with 125 bytes of payload, masked with a zero key: each asks
	// the gateway for a pong of 127 bytes.
	ping := append([]byte{0x89, 0x80 | 125, 0, 0, 0, 0}, make([]byte, 125)...)
	batch := bytes.Repeat(ping, 20)
	start := time.Now()
	var sent atomic.Int64
	flooding := make(chan error, 1)
	go func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for time.Since(start) < writeTimeout+10*time.Second {
			<-tick.C
			_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
			n, err := conn.Write(batch)
			sent.Add(int64(n / len(ping)))
			var ne net.Error
			if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
				flooding <- err // dropped
				return
			}
		}
		flooding <- nil
	}()
	took := eventually(t, writeTimeout+10*time.Second, "the session ends", func() bool { return algo.voiceOpen.Load() == 0 })
	_ = conn.Close()
	t.Logf("the session ended %v into the flood (VOICE_WRITE_TIMEOUT %v), after %d pings; the client's writes: %v",
		took, writeTimeout, sent.Load(), <-flooding)
	if took > writeTimeout+2*time.Second {
		t.Errorf("the client was dropped %v into the flood, want within VOICE_WRITE_TIMEOUT (%v) of its window filling",
			took, writeTimeout)
	}
	var ended map[string]any
	eventually(t, 5*time.Second, "the session's end is logged", func() bool {
		for _, rec := range logRecords(t, g) {
			if rec["msg"] == "voice session ended" && rec["user_id"] == "u-pings" {
				ended = rec
				return true
			}
		}
		return false
	})
	if code, _ := ended["close_code"].(float64); int(code) != int(websocket.StatusTryAgainLater) {
		t.Errorf("the session ended %v (%v), want 1013: a client that does not take its writes", ended["close_code"], ended["close_reason"])
	}
}

func TestVoiceRefusesIDAttacks(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-voice-ids", []string{"user"}, nil)
	for _, a := range idAttacks(t) {
		for _, field := range []string{"conversation_id", "language"} {
			t.Run(field+"/"+a.Name, func(t *testing.T) {
				res := voiceRefused(t, g, "?"+field+"="+url.QueryEscape(a.Value), bearer(tok))
				wantFieldError(t, res, field)
			})
		}
	}
	if n := len(algo.dials()); n != 0 {
		t.Errorf("the algorithm service was dialled %d times, want never", n)
	}
}

// TestVoiceNoticeEscapesLineEnds: a broadcast's message is re-encoded for the sessions it
// reaches; a raw U+2028 or U+2029 in it arrives escaped, as in every JSON the gateway writes,
// so a client that reads messages as lines (or logs them) sees one line.
func TestVoiceNoticeEscapesLineEnds(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	v := openVoice(t, g, "", bearer(tokenFor(t, "u-notice", []string{"user"}, nil)))
	admin := tokenFor(t, "u-notice-admin", []string{"admin"}, nil)
	// Written by hand: encoding/json would escape them in the request already.
	body := `{"message":{"text":"maintenance` + "\u2028" + `at noon` + "\u2029" + `"}}`
	wantStatus(t, call(t, g, "POST", "/api/v2/voice/broadcast", admin, body), http.StatusOK)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for {
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("no notice arrived: %v", err)
		}
		if typ != websocket.MessageText || !strings.Contains(string(msg), `"type":"notice"`) {
			continue
		}
		if strings.ContainsAny(string(msg), "\u2028\u2029") || !strings.Contains(string(msg), `maintenance\u2028at noon\u2029`) {
			t.Errorf("the notice %q does not escape U+2028 and U+2029", msg)
		}
		return
	}
}

// refusalMsg is the error message of an in-band refusal.
type refusalMsg struct {
	Type       string `json:"type"`
	Code       string `json:"code"`
	Message    string `json:"message"`
	Status     int    `json:"status"`
	RequestID  string `json:"request_id"`
	RetryAfter int    `json:"retry_after"`
}

// browserRefused dials g as a browser from origin (with the token, if any, as a subprotocol),
// and fails the test unless the gateway accepts only to send one error message and close
// with 4000 + its status. It returns the message.
func browserRefused(t *testing.T, g *testGateway, origin, token string) refusalMsg {
	t.Helper()
	protos := []string{voiceSubprotocol}
	if token != "" {
		protos = append(protos, "bearer."+token)
	}
	conn, res, err := voiceDial(t, g, "?conversation_id=c-refused", http.Header{"Origin": {origin}}, protos...)
	if err != nil {
		t.Fatalf("the browser-style upgrade was not accepted: %v (%s)", err, describeResult(res, err))
	}
	if got := res.Header.Values("Sec-WebSocket-Protocol"); !slices.Equal(got, []string{voiceSubprotocol}) {
		t.Errorf("the refusal's 101 selects %.30q, want exactly [%s]", got, voiceSubprotocol)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	typ, raw, err := conn.Read(ctx)
	if err != nil || typ != websocket.MessageText {
		t.Fatalf("no error message before the close: %v", err)
	}
	var m refusalMsg
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("the refusal is not JSON: %s", raw)
	}
	if m.Type != "error" || m.Status < 400 || m.Code == "" || m.Message == "" {
		t.Errorf("refusal message %s, want type error with status, code and message", raw)
	}
	if own := res.Header.Get("X-Request-ID"); m.RequestID == "" || m.RequestID != own {
		t.Errorf("refusal request_id %q, want the 101's X-Request-ID %q", m.RequestID, own)
	}
	_, _, err = conn.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("after the error message: %v, want a close frame", err)
	}
	if want := websocket.StatusCode(4000 + m.Status); ce.Code != want || ce.Reason != m.Code {
		t.Errorf("closed %d %q, want %d %q", ce.Code, ce.Reason, want, m.Code)
	}
	return m
}

func TestVoiceBrowserRefusals(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example.com",
		"POLICY_FILE": "testdata/policy/e2e-voice-cap.json"})
	w := watchTokens(t, g)
	user := w.token(t, "u-refused", []string{"user"}, nil)
	noPerm := w.token(t, "u-refused-noperm", []string{}, nil)
	now := time.Now()
	forged := w.add(signHS256(t, "not-the-gateway-secret-0123456789abcdef", map[string]any{
		"sub": "u-refused", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "roles": []string{"user"}}))
	const app = "https://app.example.com"

	for _, tt := range []struct {
		name, origin, token string
		status              int
		code, mention       string
	}{
		{"no token", app, "", 401, "TOKEN_MISSING", ""},
		{"bad token", app, forged, 401, "TOKEN_INVALID", ""},
		{"no voice:write", app, noPerm, 403, "PERMISSION_DENIED", "voice:write"},
		{"disallowed origin", "https://evil.example", user, 403, "PERMISSION_DENIED", "origin"},
		// Only the origin's reason, whatever else is wrong: a page elsewhere learns nothing about
		// the token it sent.
		{"disallowed origin, bad token", "https://evil.example", forged, 403, "PERMISSION_DENIED", "origin"},
		{"disallowed origin, no token", "https://evil.example", "", 403, "PERMISSION_DENIED", "origin"},
		{"localhost is not 127.0.0.1", "http://localhost:" + strings.Split(g.Addr, ":")[1], user, 403, "PERMISSION_DENIED", "origin"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := browserRefused(t, g, tt.origin, tt.token)
			if m.Status != tt.status || m.Code != tt.code || !strings.Contains(m.Message, tt.mention) {
				t.Errorf("refused %d %s %q, want %d %s mentioning %q", m.Status, m.Code, m.Message, tt.status, tt.code, tt.mention)
			}
			if n := len(algo.dials()); n != 0 {
				t.Errorf("the algorithm service was dialed %d times, want never", n)
			}
		})
	}

	t.Run("a non-browser client keeps the HTTP status", func(t *testing.T) {
		wantError(t, voiceRefused(t, g, "", nil, voiceSubprotocol), http.StatusUnauthorized, "TOKEN_MISSING")
		// A client that sends Authorization is no browser, whatever its Origin says.
		h := bearer(noPerm)
		h.Set("Origin", app)
		wantError(t, voiceRefused(t, g, "", h, voiceSubprotocol), http.StatusForbidden, "PERMISSION_DENIED")
	})

	t.Run("the access log counts the refusal's status", func(t *testing.T) {
		m := browserRefused(t, g, "https://logged.example", user)
		eventually(t, 2*time.Second, "the refusal's access log line", func() bool {
			for _, rec := range logRecords(t, g) {
				if rec["msg"] == "request" && rec["request_id"] == m.RequestID {
					if rec["status"] != float64(403) || rec["code"] != "PERMISSION_DENIED" || rec["origin"] != "https://logged.example" {
						t.Fatalf("access log line %v, want status 403, code PERMISSION_DENIED and the origin", rec)
					}
					return true
				}
			}
			return false
		})
	})

	t.Run("over the concurrency cap", func(t *testing.T) {
		first := openVoice(t, g, "", http.Header{"Origin": {app}}, voiceSubprotocol, "bearer."+user)
		m := browserRefused(t, g, app, user)
		if m.Status != http.StatusTooManyRequests || m.Code != "RATE_LIMITED" {
			t.Errorf("second session refused %d %s, want 429 RATE_LIMITED", m.Status, m.Code)
		}
		if m.RetryAfter <= 0 {
			t.Errorf("the 429 refusal carries retry_after %d, want the Retry-After seconds", m.RetryAfter)
		}
		if n := len(listVoice(t, g, tokenFor(t, "u-admin", []string{"admin"}, nil)).Sessions); n != 1 {
			t.Errorf("%d sessions listed, want only the first", n)
		}
		_ = first.conn.Close(websocket.StatusNormalClosure, "")
	})

	t.Run("algorithm service down", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		down := "http://" + ln.Addr().String()
		ln.Close()
		gd := startRun(t, nil, map[string]string{"ALGO_URL": down})
		m := browserRefused(t, gd, gd.URL, tokenFor(t, "u-down", []string{"user"}, nil))
		if m.Status != http.StatusBadGateway || m.Code != "ALGO_SERVICE_ERROR" {
			t.Errorf("refused %d %s, want 502 ALGO_SERVICE_ERROR", m.Status, m.Code)
		}
	})
}

// TestVoiceBrowserRefusalClientStalls: a browser-style client that is refused and then never
// reads nor answers the close loses its socket within the refusal's bounds.
func TestVoiceBrowserRefusalClientStalls(t *testing.T) {
	t.Parallel()
	g := startRun(t, nil, map[string]string{"ALGO_URL": newAlgo(t, algoOptions{}).URL})
	c, err := net.DialTimeout("tcp", g.Addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /api/v2/voice/stream HTTP/1.1\r\nHost: " + g.Addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
		"Sec-WebSocket-Protocol: " + voiceSubprotocol + "\r\nOrigin: " + g.URL + "\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101 for an in-band refusal", res.StatusCode)
	}
	// The client now reads nothing more and never sends its close frame; the gateway must
	// give up on the close handshake and drop the socket by itself.
	start := time.Now()
	_, err = io.Copy(io.Discard, br)
	if err != nil {
		t.Fatalf("the gateway did not close the socket: %v after %v", err, time.Since(start))
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the socket closed %v after the 101, want within the refusal's 2 s bound and a margin", took)
	}
}

// pythonWithWebsockets returns a Python that has the websockets library (Debian's
// python3-websockets installs it for /usr/bin/python3, which may not be the python3 on PATH).
func pythonWithWebsockets(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		bin, err := exec.LookPath(p)
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		err = exec.CommandContext(ctx, bin, "-c", "import websockets").Run()
		cancel()
		if err == nil {
			return bin
		}
	}
	missingTool(t, "python3 with the websockets library", "python3-websockets")
	return ""
}

// TestREADMEVoiceClient: the Python voice client of README.md, run as a newcomer would, holds a
// session with -demo: start and stop bring the answer, its audio and tts_complete.
func TestREADMEVoiceClient(t *testing.T) {
	t.Parallel()
	py := pythonWithWebsockets(t)
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)### Voice from a terminal\n.*?```python\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no python block under ### Voice from a terminal")
	}
	script := filepath.Join(t.TempDir(), "voice.py")
	if err := os.WriteFile(script, m[1], 0o644); err != nil {
		t.Fatal(err)
	}
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": "127.0.0.1:0"})
	var token string
	eventually(t, 2*time.Second, "-demo prints a token", func() bool {
		tm := regexp.MustCompile(`TOKEN=(\S+)`).FindStringSubmatch(g.Stdout.String())
		if tm != nil {
			token = tm[1]
		}
		return tm != nil
	})
	w := watchTokens(t, g)
	w.add(token)

	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, script, "ws://"+g.Addr+"/api/v2/voice/stream")
	cmd.Env = append(os.Environ(), "TOKEN="+token)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(stdin, "{\"type\":\"start\"}\n{\"type\":\"stop\"}\n"); err != nil {
		t.Fatal(err)
	}
	var seen []string
	audio := 0
	sc := bufio.NewScanner(stdout)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "<") && strings.HasSuffix(line, "bytes of audio>") {
			audio++
			continue
		}
		if tm := regexp.MustCompile(`"type":"([a-z_]+)"`).FindStringSubmatch(line); tm != nil {
			seen = append(seen, tm[1])
			if tm[1] == "tts_complete" {
				break
			}
		}
	}
	stdin.Close() // the client closes the session and ends
	_, _ = io.Copy(io.Discard, stdout)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the client ended with %v\n%s", err, stderr.String())
	}
	for _, want := range []string{"session_initialized", "ack", "asr_final", "llm_response_chunk", "tts_start", "tts_complete"} {
		if !strings.Contains(strings.Join(seen, " "), want) {
			t.Errorf("the client printed no %s message (got %v)\n%s", want, seen, stderr.String())
		}
	}
	if audio == 0 {
		t.Error("the client printed no audio frames")
	}
}

// usageRecords reads the whole usage stream, each entry's fields as a map.
func usageRecords(t *testing.T, r *testRedis) []map[string]string {
	t.Helper()
	res, ok := r.Do(t, "XRANGE", "voicegate:usage", "-", "+").([]any)
	if !ok {
		t.Fatalf("XRANGE voicegate:usage answered %v", res)
	}
	var out []map[string]string
	for _, e := range res {
		kv := e.([]any)[1].([]any)
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i].(string)] = kv[i+1].(string)
		}
		out = append(out, m)
	}
	return out
}

func recordOf(recs []map[string]string, session string) map[string]string {
	for _, r := range recs {
		if r["session_id"] == session {
			return r
		}
	}
	return nil
}
