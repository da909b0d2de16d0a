package main

// End-to-end tests of voice sessions that need the whole gateway: run() with authentication,
// the policy and, where instances share state, a real redis-server (redis_test.go), in front of
// a fake algorithm service whose /voice/stream accepts WebSockets. Clients are real
// coder/websocket peers on loopback.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net"
	"net/http"
	"net/url"
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

// ---- helpers -------------------------------------------------------------------------------

// bearer is a header carrying token the usual way.
func bearer(token string) http.Header { return http.Header{"Authorization": {"Bearer " + token}} }

// voiceDial dials a voice session on g (query is "" or starts with "?") with header and the
// subprotocols (voice-protocol-v2 when none are given), over a transport of its own that is
// closed at cleanup. A connection that opens is closed at cleanup at the latest; a refused dial
// returns the response, whose body holds the first KiB of the gateway's answer.
func voiceDial(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	if len(protocols) == 0 {
		protocols = []string{voiceSubprotocol}
	}
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, "ws://"+g.Addr+"/api/v2/voice/stream"+query, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: tr},
		HTTPHeader:   header,
		Subprotocols: protocols,
	})
	if conn != nil {
		t.Cleanup(func() { conn.CloseNow() })
	}
	return conn, res, err
}

// voiceRefused dials like voiceDial and fails the test unless the gateway answers with an HTTP
// error instead of upgrading; it returns that answer.
func voiceRefused(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) *http.Response {
	t.Helper()
	conn, res, err := voiceDial(t, g, query, header, protocols...)
	if err == nil {
		t.Fatalf("the voice session opened (subprotocol %q), want it refused before the upgrade", conn.Subprotocol())
	}
	if res == nil {
		t.Fatalf("voice dial failed without an HTTP answer: %v", err)
	}
	if res.StatusCode == http.StatusSwitchingProtocols {
		t.Fatalf("the gateway answered 101 and then failed the handshake (%v), want an HTTP error", err)
	}
	return res
}

// voiceClient is an open voice session through the gateway.
type voiceClient struct {
	conn *websocket.Conn
	res  *http.Response // the 101
	init map[string]any // the session_initialized message
	id   string         // its session_id
}

// openVoice dials like voiceDial, fails the test unless the session opens, and reads its
// session_initialized message.
func openVoice(t *testing.T, g *testGateway, query string, header http.Header, protocols ...string) *voiceClient {
	t.Helper()
	conn, res, err := voiceDial(t, g, query, header, protocols...)
	if err != nil {
		status, body := 0, ""
		if res != nil {
			status = res.StatusCode
			var b strings.Builder
			if res.Body != nil {
				buf := make([]byte, 1024)
				n, _ := res.Body.Read(buf)
				b.Write(buf[:n])
			}
			body = b.String()
		}
		t.Fatalf("voice dial: %v (status %d, body %s)", err, status, body)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	typ, msg, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("reading session_initialized: %v", err)
	}
	v := &voiceClient{conn: conn, res: res}
	if err := json.Unmarshal(msg, &v.init); typ != websocket.MessageText || err != nil || v.init["type"] != "session_initialized" {
		t.Fatalf("first message = %s, want session_initialized", msg)
	}
	v.id, _ = v.init["session_id"].(string)
	if v.id == "" {
		t.Fatalf("session_initialized without a session_id: %s", msg)
	}
	return v
}

// dialVoice opens a voice session on g as user u-voice, with the token in the Authorization
// header (unless header sets its own) and conversation c-1, and fails the test unless the
// session speaks voice-protocol-v2.
func dialVoice(t *testing.T, g *testGateway, header http.Header) *voiceClient {
	t.Helper()
	h := bearer(tokenFor(t, "u-voice", []string{"user"}, nil))
	maps.Copy(h, header)
	v := openVoice(t, g, "?conversation_id=c-1", h)
	if p := v.conn.Subprotocol(); p != voiceSubprotocol {
		t.Fatalf("subprotocol = %q, want %s", p, voiceSubprotocol)
	}
	return v
}

// answerStop is a voiceReplier maker for the fake algorithm service: the end of an utterance
// (stop) is answered with an asr_partial and 20 ms of TTS audio.
func answerStop() voiceReplier {
	return func(_ websocket.MessageType, msg []byte) []voiceFrame {
		if bytes.Contains(msg, []byte(`"type":"stop"`)) {
			return []voiceFrame{{Text: `{"type":"asr_partial","text":"hi"}`}, {Audio: 640}}
		}
		return nil
	}
}

// turn ends an utterance on v (after audio) and waits for the TTS audio that answers it, so
// that the latency histograms have a sample.
func (v *voiceClient) turn(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := v.conn.Write(ctx, websocket.MessageText, []byte(`{"type":"stop"}`)); err != nil {
		t.Fatal(err)
	}
	for {
		typ, _, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("waiting for the TTS audio: %v", err)
		}
		if typ == websocket.MessageBinary {
			return
		}
	}
}

// readAll reads messages until the connection ends and returns the text messages (decoded) and
// the close status.
func (v *voiceClient) readAll(ctx context.Context) ([]map[string]any, websocket.StatusCode, error) {
	var msgs []map[string]any
	for {
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			return msgs, websocket.CloseStatus(err), err
		}
		if typ == websocket.MessageText {
			var m map[string]any
			_ = json.Unmarshal(msg, &m)
			msgs = append(msgs, m)
		}
	}
}

// voiceEnding is how a session ended for its client.
type voiceEnding struct {
	msgs   []map[string]any // text messages, decoded
	binary int              // binary messages
	code   websocket.StatusCode
	err    error
	at     time.Time
}

// errorCodes are the codes of the error messages among e.msgs.
func (e voiceEnding) errorCodes() []string {
	var codes []string
	for _, m := range e.msgs {
		if m["type"] == "error" {
			c, _ := m["code"].(string)
			codes = append(codes, c)
		}
	}
	return codes
}

// readToClose reads v in a goroutine until its connection ends, and then sends how.
func (v *voiceClient) readToClose(ctx context.Context) <-chan voiceEnding {
	done := make(chan voiceEnding, 1)
	go func() {
		var e voiceEnding
		for {
			typ, msg, err := v.conn.Read(ctx)
			if err != nil {
				e.code, e.err, e.at = websocket.CloseStatus(err), err, time.Now()
				done <- e
				return
			}
			if typ == websocket.MessageBinary {
				e.binary++
				continue
			}
			var m map[string]any
			_ = json.Unmarshal(msg, &m)
			e.msgs = append(e.msgs, m)
		}
	}()
	return done
}

// waitEnding waits up to within for the session's end.
func waitEnding(t *testing.T, ended <-chan voiceEnding, within time.Duration) voiceEnding {
	t.Helper()
	select {
	case e := <-ended:
		return e
	case <-time.After(within):
		t.Fatalf("the voice session did not end within %v", within)
		return voiceEnding{}
	}
}

// voiceListing is the body of GET /api/v2/voice/sessions.
type voiceListing struct {
	Sessions []voiceListed `json:"sessions"`
	Count    int           `json:"count"`
}

// voiceListed is one session in a listing.
type voiceListed struct {
	SessionID      string    `json:"session_id"`
	UserID         string    `json:"user_id"`
	TenantID       string    `json:"tenant_id"`
	ConversationID string    `json:"conversation_id"`
	Language       string    `json:"language"`
	Instance       string    `json:"instance"`
	StartedAt      time.Time `json:"started_at"`
}

// listVoice lists the live sessions through g.
func listVoice(t *testing.T, g *testGateway, token string) voiceListing {
	t.Helper()
	res := call(t, g, "GET", "/api/v2/voice/sessions", token, "")
	wantStatus(t, res, http.StatusOK)
	var l voiceListing
	if err := json.NewDecoder(res.Body).Decode(&l); err != nil {
		t.Fatalf("decode the session listing: %v", err)
	}
	if l.Count != len(l.Sessions) {
		t.Errorf("listing count %d for %d sessions", l.Count, len(l.Sessions))
	}
	return l
}

// hasSession reports whether l lists the session id.
func (l voiceListing) hasSession(id string) bool {
	return slices.ContainsFunc(l.Sessions, func(s voiceListed) bool { return s.SessionID == id })
}

// ---- 1. refused before the upgrade ---------------------------------------------------------

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

// ---- 2. browser-style authentication -------------------------------------------------------

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

// ---- 3. a token revoked or expiring during a session ---------------------------------------

// TestVoiceRevokedAcrossInstances: two gateways on one Redis; a session open on B is closed with
// an error message TOKEN_INVALID and close code 4401 within a second of A's 200 to a logout
// with its token, and its upstream connection is closed too.
func TestVoiceRevokedAcrossInstances(t *testing.T) {
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

// ---- 4. sessions across instances ----------------------------------------------------------

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

// ---- 5. the voice concurrency cap across instances -----------------------------------------

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

// ---- 6. the algorithm service down ---------------------------------------------------------

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

// ---- 7. a whole session against -demo ------------------------------------------------------

// TestVoiceDemoSession: the token -demo prints opens a session; start, a second of audio and
// stop bring recognition, an answer, speech and tts_complete; the client's close 1000 ends it,
// and the gateway logs the session's counters.
func TestVoiceDemoSession(t *testing.T) {
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

// ---- 7. a client that never reads ----------------------------------------------------------

// TestVoiceClientThatNeverReads: the algorithm service streams TTS audio to a client that has
// stopped reading. Once the gateway's writes stall past VOICE_WRITE_TIMEOUT the session is
// dropped: its Redis registry entry is gone, and its concurrency slot with it (the policy
// allows one session per user, and the user opens another).
func TestVoiceClientThatNeverReads(t *testing.T) {
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
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": "testdata/policy/e2e-voice-cap.json", "VOICE_WRITE_TIMEOUT": "300ms"}))
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
