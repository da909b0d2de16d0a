package main

// Voice resuming end to end: two gateway processes on one redis-server, a fake algorithm service
// that numbers every downlink message and moves a session to a resume=1 dial (closing the older
// connection 4100 after its last write to it), and clients whose TCP connection is cut with an
// RST in the middle of a TTS burst.

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
)

// ---- the numbering algorithm service ------------------------------------------------------------

// numberingAlgo answers "stop" with a burst of numbered messages: text llm_response_chunk
// {"n":k} and binary TTS frames whose first 8 bytes are k, alternately, one every tick. A dial
// with resume=1 moves the session — its numbering and the rest of its burst — to the new
// connection, and closes the older one with 4100 "moved" after its last write to it.
type numberingAlgo struct {
	*httptest.Server
	burst int
	tick  time.Duration

	mu       sync.Mutex
	sessions map[string]*algoSession

	dials, resumeDials atomic.Int64
	failResume         atomic.Bool // refuse resume dials (503)
}

type algoSession struct {
	mu      sync.Mutex // held for each write, so that a move waits for the write in progress
	conn    *websocket.Conn
	next    int           // the next message's number
	bursts  int           // bursts started
	changed chan struct{} // closed and replaced when the session moves
}

func newNumberingAlgo(t testing.TB, burst int, tick time.Duration) *numberingAlgo {
	a := &numberingAlgo{burst: burst, tick: tick, sessions: map[string]*algoSession{}}
	done := t.Context()
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/voice/stream" {
			http.NotFound(w, r)
			return
		}
		id, resume := r.URL.Query().Get("session_id"), r.URL.Query().Get("resume") == "1"
		if resume && a.failResume.Load() {
			http.Error(w, "no", http.StatusServiceUnavailable)
			return
		}
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{voiceSubprotocol}})
		if err != nil {
			return
		}
		a.dials.Add(1)
		a.mu.Lock()
		s := a.sessions[id]
		if s == nil {
			s = &algoSession{next: 1, changed: make(chan struct{})}
			a.sessions[id] = s
		}
		a.mu.Unlock()
		if resume {
			a.resumeDials.Add(1)
		}
		s.mu.Lock()
		old := s.conn
		s.conn = c
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
		if old != nil {
			go old.Close(4100, "moved") // after its last write: the writes hold s.mu
		}
		for {
			_, msg, err := c.Read(done)
			if err != nil {
				c.CloseNow()
				return
			}
			if strings.Contains(string(msg), `"type":"stop"`) {
				s.mu.Lock()
				s.bursts++
				s.mu.Unlock()
				go a.answer(done, s)
			}
		}
	}))
	t.Cleanup(a.Close)
	return a
}

// answer writes one burst to whatever connection the session has, message by message; a write
// that fails waits for the session to move and is tried again there.
func (a *numberingAlgo) answer(ctx context.Context, s *algoSession) {
	tk := time.NewTicker(a.tick)
	defer tk.Stop()
	for range a.burst {
		for {
			s.mu.Lock()
			k, c, changed := s.next, s.conn, s.changed
			typ, msg := websocket.MessageText, []byte(fmt.Sprintf(`{"type":"llm_response_chunk","n":%d}`, k))
			if k%2 == 0 {
				typ, msg = websocket.MessageBinary, make([]byte, 640)
				binary.BigEndian.PutUint64(msg, uint64(k))
			}
			wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := c.Write(wctx, typ, msg)
			cancel()
			if err == nil {
				s.next++
			}
			s.mu.Unlock()
			if err == nil {
				break
			}
			select { // the connection is gone: wait for the session to move
			case <-changed:
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Second):
				return
			}
		}
		select {
		case <-tk.C:
		case <-ctx.Done():
			return
		}
	}
}

func (a *numberingAlgo) sessionCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.sessions)
}

// ---- a client that counts, cuts and resumes -----------------------------------------------------

// resumingClient is a voice client that numbers what it receives as the gateway does, and
// keeps the algorithm service's numbers of what it got.
type resumingClient struct {
	t      testing.TB
	conn   *websocket.Conn
	sock   atomic.Pointer[net.TCPConn]
	token  string // the resume token of the moment
	seq    int64  // messages received since session_initialized or session_resumed's last_seq
	got    []int  // the algorithm service's numbers, in the order received
	id     string
	bearer string
	first  time.Time // when the first message after a session_resumed arrived
	// unpaced says the gateways relay TTS as it comes (VOICE_TTS_PACING=false): then every
	// message arrives in the service's order. With pacing (the default) TTS frames are released
	// at playback rate while text messages go at once, so each kind keeps the service's order.
	unpaced bool
}

// dialCounting dials base's voice route with the query and returns the connection and its
// TCP socket, for cutting.
func (c *resumingClient) dial(ctx context.Context, base, query string) (*websocket.Conn, *http.Response, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			c.sock.Store(nc.(*net.TCPConn))
		}
		return nc, err
	}}
	conn, res, err := websocket.Dial(ctx, "ws://"+strings.TrimPrefix(base, "http://")+"/api/v2/voice/stream"+query,
		&websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}, Subprotocols: []string{voiceSubprotocol},
			HTTPHeader: http.Header{"Authorization": {"Bearer " + c.bearer}}})
	if conn != nil {
		conn.SetReadLimit(1 << 20)
	}
	return conn, res, err
}

func openResuming(t testing.TB, base, bearer string) *resumingClient {
	t.Helper()
	return openResumingWith(t, base, bearer, "?conversation_id=c-resume")
}

// openResumingWith is openResuming with the upgrade's query (an audio format, say).
func openResumingWith(t testing.TB, base, bearer, query string) *resumingClient {
	t.Helper()
	c := &resumingClient{t: t, bearer: bearer}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, _, err := c.dial(ctx, base, query)
	if err != nil {
		t.Fatalf("voice dial: %v", err)
	}
	c.conn = conn
	var init struct {
		Type      string `json:"type"`
		SessionID string `json:"session_id"`
		Resume    struct {
			Token    string `json:"token"`
			WindowMS int64  `json:"window_ms"`
		} `json:"resume"`
	}
	_, msg, err := conn.Read(ctx)
	if err != nil || json.Unmarshal(msg, &init) != nil || init.Type != "session_initialized" || init.Resume.Token == "" {
		t.Fatalf("first message %s (%v), want session_initialized with a resume token", msg, err)
	}
	c.token, c.id = init.Resume.Token, init.SessionID
	return c
}

func (c *resumingClient) send(msg string) error {
	ctx, cancel := context.WithTimeout(c.t.Context(), 5*time.Second)
	defer cancel()
	return c.conn.Write(ctx, websocket.MessageText, []byte(msg))
}

// read reads one message and counts it; it returns the algorithm service's number (0 for one
// of the gateway's own, such as an error) and the message's type field.
func (c *resumingClient) read(ctx context.Context) (int, string, error) {
	typ, msg, err := c.conn.Read(ctx)
	if err != nil {
		return 0, "", err
	}
	c.seq++
	if c.first.IsZero() {
		c.first = time.Now()
	}
	if typ == websocket.MessageBinary {
		k := int(binary.BigEndian.Uint64(msg))
		c.got = append(c.got, k)
		return k, "", nil
	}
	var m struct {
		Type string `json:"type"`
		N    int    `json:"n"`
		Code string `json:"code"`
	}
	_ = json.Unmarshal(msg, &m)
	if m.Code == "RESUME_GAP" {
		c.seq-- // not numbered: it belongs to session_resumed
	}
	if m.N > 0 {
		c.got = append(c.got, m.N)
	}
	return m.N, cmp.Or(m.Code, m.Type), nil
}

// answerUntil asks the numbering service for its burst ("stop") and reads until message n has
// come, failing the test otherwise.
func (c *resumingClient) answerUntil(n int) {
	c.t.Helper()
	if err := c.send(`{"type":"stop"}`); err != nil {
		c.t.Fatal(err)
	}
	if err := c.readUntil(n); err != nil {
		c.t.Fatal(err)
	}
}

// readUntil reads until the algorithm service's number n has arrived.
func (c *resumingClient) readUntil(n int) error {
	ctx, cancel := context.WithTimeout(c.t.Context(), 10*time.Second)
	defer cancel()
	for {
		k, _, err := c.read(ctx)
		if err != nil {
			return fmt.Errorf("after %d messages (last_seq %d): %w", len(c.got), c.seq, err)
		}
		if k >= n {
			return nil
		}
	}
}

// cut ends the TCP connection with an RST, no close frame, as a network change does.
func (c *resumingClient) cut() {
	if s := c.sock.Load(); s != nil {
		_ = s.SetLinger(0)
		_ = s.Close()
	}
	c.conn.CloseNow()
}

// resumed is the session_resumed message.
type resumedMsg struct {
	Type     string `json:"type"`
	Replayed int64  `json:"replayed"`
	LastSeq  int64  `json:"last_seq"`
	Resume   struct {
		Token string `json:"token"`
	} `json:"resume"`
}

// resume reconnects to base with the resume token and last_seq, and reads session_resumed (and
// RESUME_GAP, reported); the gateway's numbering goes on from its last_seq.
func (c *resumingClient) resume(base string) (resumedMsg, bool, error) {
	ctx, cancel := context.WithTimeout(c.t.Context(), 10*time.Second)
	defer cancel()
	query := "?resume_token=" + url.QueryEscape(c.token) + "&last_seq=" + strconv.FormatInt(c.seq, 10)
	conn, res, err := c.dial(ctx, base, query)
	// A 503 before the upgrade (a store that did not answer in time, as on a loaded machine
	// with fifty resumes at once) leaves the token unspent: a client tries again, as this one.
	for try := 0; err != nil && res != nil && res.StatusCode == http.StatusServiceUnavailable && try < 20; try++ {
		if !sleepCtx(ctx, 50*time.Millisecond) {
			break
		}
		conn, res, err = c.dial(ctx, base, query)
	}
	if err != nil {
		status, body := 0, ""
		if res != nil {
			status = res.StatusCode
			if res.Body != nil {
				b := make([]byte, 512)
				n, _ := res.Body.Read(b)
				body = string(b[:n])
			}
		}
		return resumedMsg{}, false, fmt.Errorf("resume dial: %v (status %d %s)", err, status, body)
	}
	c.conn = conn
	var r resumedMsg
	_, msg, err := conn.Read(ctx)
	if err != nil || json.Unmarshal(msg, &r) != nil || r.Type != "session_resumed" {
		return r, false, fmt.Errorf("first message after resuming %s (%v), want session_resumed", msg, err)
	}
	if r.LastSeq > c.seq {
		return r, false, fmt.Errorf("session_resumed last_seq %d beyond the %d received", r.LastSeq, c.seq)
	}
	c.seq, c.token, c.first = r.LastSeq, r.Resume.Token, time.Time{}
	return r, false, nil
}

// wantAll fails unless the client got the algorithm service's messages 1..n, each once, in
// order: the service's order itself without pacing, each kind's (text, TTS frames) with it.
func (c *resumingClient) wantAll(t testing.TB, n int) {
	t.Helper()
	want := make([]int, n)
	for i := range want {
		want[i] = i + 1
	}
	got := c.got
	if !c.unpaced {
		got = slices.Clone(c.got)
		if !inServiceOrder(got) {
			t.Fatalf("the client got text or TTS frames out of the service's order: %v", clipInts(c.got))
		}
		slices.Sort(got)
	}
	if !slices.Equal(got, want) {
		lost, dup := lostAndDuplicated(c.got, n)
		t.Fatalf("the client got %d messages, %d lost and %d duplicated (or out of order): %v", len(c.got), lost, dup, clipInts(c.got))
	}
}

// inServiceOrder reports whether got, the numbers of the messages a client received, has each
// kind in the order the numbering service sent it: its text messages (odd numbers), which the
// gateway relays at once, and its TTS frames (even numbers), which a paced gateway releases at
// playback rate, so that text may overtake TTS but neither kind may be reordered.
func inServiceOrder(got []int) bool {
	var text, tts []int
	for _, k := range got {
		if k%2 == 0 {
			tts = append(tts, k)
		} else {
			text = append(text, k)
		}
	}
	return slices.IsSorted(text) && slices.IsSorted(tts)
}

func lostAndDuplicated(got []int, n int) (lost, dup int) {
	seen := map[int]int{}
	for _, k := range got {
		seen[k]++
	}
	for k := 1; k <= n; k++ {
		switch {
		case seen[k] == 0:
			lost++
		case seen[k] > 1:
			dup += seen[k] - 1
		}
	}
	return lost, dup
}

func clipInts(v []int) string {
	if len(v) > 40 {
		return fmt.Sprint(v[:20]) + "…" + fmt.Sprint(v[len(v)-20:])
	}
	return fmt.Sprint(v)
}

// ---- the tests ----------------------------------------------------------------------------------

// resumeEnv is two gateways' environment on r with algo.
func resumeEnv(r *testRedis, algo string, more map[string]string) map[string]string {
	env := map[string]string{"ALGO_URL": algo, "REDIS_URL": r.URL(), "JWT_SECRET": testSecret,
		"POLICY_FILE": "testdata/policy/e2e.json", "VOICE_RESUME_WINDOW": "10s"}
	for k, v := range more {
		env[k] = v
	}
	return env
}

// usageRecords reads the usage stream's records of session id.
func resumeUsage(t testing.TB, r *testRedis, id string) []map[string]string {
	t.Helper()
	c := testClient(t, r)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	rows, err := c.Do(ctx, c.B().Xrange().Key("voicegate:usage").Start("-").End("+").Build()).AsXRange()
	if err != nil {
		t.Fatalf("reading the usage stream: %v", err)
	}
	var out []map[string]string
	for _, row := range rows {
		if row.FieldValues["session_id"] == id {
			out = append(out, row.FieldValues)
		}
	}
	return out
}

// cutAndResume runs one trial: a burst, a cut after half of it, a resume on to, and the rest.
// It returns the client and the gap: from the cut to the first message after session_resumed.
func cutAndResume(t testing.TB, from, to *child, algo *numberingAlgo, user string, unpaced bool) (*resumingClient, time.Duration) {
	t.Helper()
	c := openResuming(t, from.url, tokenFor(t, user, []string{"user"}, nil))
	c.unpaced = unpaced
	c.answerUntil(algo.burst / 2)
	c.cut()
	cut := time.Now()
	r, _, err := c.resume(to.url)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.readUntil(algo.burst); err != nil {
		t.Fatalf("after resuming (replayed %d): %v", r.Replayed, err)
	}
	c.wantAll(t, algo.burst)
	t.Logf("resumed at last_seq %d, %d replayed", r.LastSeq, r.Replayed)
	return c, c.first.Sub(cut)
}

// TestVoiceResumeNetworkCut: the client's TCP is cut (RST) in the middle of a TTS burst and it
// resumes on the other instance: it gets every message the service sent exactly once and in
// order; the service saw one session and one resume dial; the session has one usage record
// (resumes 1) and holds one slot. Then the same on the same instance.
func TestVoiceResumeNetworkCut(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 200, 2*time.Millisecond)
	env := resumeEnv(r, algo.URL, nil)
	a, b := startChildGateway(t, env), startChildGateway(t, env)

	t.Run("other instance", func(t *testing.T) {
		c, gap := cutAndResume(t, a, b, algo, "u-cut", false)
		if n := algo.resumeDials.Load(); n != 1 {
			t.Errorf("the service saw %d resume dials, want 1", n)
		}
		if n := algo.sessionCount(); n != 1 {
			t.Errorf("the service saw %d sessions, want 1", n)
		}
		t.Logf("gap from the cut to the first replayed message: %v", gap)
		// One slot: the session is listed once, on b, and its lease count is one.
		eventually(t, 5*time.Second, "one voice slot held for the user", func() bool {
			return leaseCount(t, r, "voice", "u-cut") == 1
		})
		// The resume is counted where it happened, with its gap.
		fams := scrape(t, b.url+"/metrics")
		checkFamily(t, fams, "voice_resumes_total", wantMetrics["voice_resumes_total"])
		checkFamily(t, fams, "voice_resume_gap_seconds", wantMetrics["voice_resume_gap_seconds"])
		if n, _ := sample(fams, "voice_resumes_total", map[string]string{"outcome": "resumed"}); n != 1 {
			t.Errorf(`voice_resumes_total{outcome="resumed"} = %v on the resuming instance, want 1`, n)
		}
		c.conn.Close(websocket.StatusNormalClosure, "done")
		eventually(t, 5*time.Second, "one usage record", func() bool { return len(resumeUsage(t, r, c.id)) == 1 })
		u := resumeUsage(t, r, c.id)[0]
		if u["resumes"] != "1" {
			t.Errorf("usage record resumes = %q, want 1: %v", u["resumes"], u)
		}
		settle(t.Context(), 300*time.Millisecond)
		if n := len(resumeUsage(t, r, c.id)); n != 1 {
			t.Errorf("%d usage records, want 1", n)
		}
	})
	t.Run("same instance", func(t *testing.T) {
		before := algo.resumeDials.Load()
		c, _ := cutAndResume(t, a, a, algo, "u-same", false)
		if n := algo.resumeDials.Load() - before; n != 0 {
			t.Errorf("a resume on the same instance dialled the service again (%d resume dials)", n)
		}
		c.conn.Close(websocket.StatusNormalClosure, "done")
		eventually(t, 5*time.Second, "one usage record", func() bool { return len(resumeUsage(t, r, c.id)) == 1 })
		if u := resumeUsage(t, r, c.id)[0]; u["resumes"] != "1" {
			t.Errorf("usage record resumes = %q, want 1", u["resumes"])
		}
	})
	// Without pacing nothing is held back: every message arrives in the service's own order,
	// text and TTS frames interleaved as it sent them.
	t.Run("unpaced", func(t *testing.T) {
		env := resumeEnv(r, algo.URL, map[string]string{"VOICE_TTS_PACING": "false"})
		a, b := startChildGateway(t, env), startChildGateway(t, env)
		cutAndResume(t, a, b, algo, "u-unpaced", true)
	})
}

// leaseCount is how many slots of kind the user of tenant-a holds in Redis.
func leaseCount(t testing.TB, r *testRedis, kind, user string) int64 {
	c := testClient(t, r)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	n, err := c.Do(ctx, c.B().Zcard().Key("voicegate:lease:{tenant-a}:"+kind+":u:"+user).Build()).AsInt64()
	if err != nil {
		t.Fatalf("lease count: %v", err)
	}
	return n
}

// TestVoiceResumeTrials cuts and resumes VOICEGATE_RESUME_TRIALS (default 6) sessions across the
// two instances, alternately, and reports the messages lost and duplicated (both must be 0) and the gap's p50 and p99.
func TestVoiceResumeTrials(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 60, 2*time.Millisecond)
	env := resumeEnv(r, algo.URL, nil)
	gws := []*child{startChildGateway(t, env), startChildGateway(t, env)}
	n := envInt(t, "VOICEGATE_RESUME_TRIALS", 6)
	var gaps []time.Duration
	lost, dup := 0, 0
	for i := range n {
		c, gap := cutAndResume(t, gws[i%2], gws[(i+1)%2], algo, "u-trial-"+strconv.Itoa(i), false)
		l, d := lostAndDuplicated(c.got, algo.burst)
		lost, dup = lost+l, dup+d
		gaps = append(gaps, gap)
		c.conn.Close(websocket.StatusNormalClosure, "done")
	}
	slices.Sort(gaps)
	t.Logf("%d cut-and-resume trials across instances: %d messages lost, %d duplicated; gap p50 %v, p99 %v, max %v",
		n, lost, dup, percentile(gaps, 0.50), percentile(gaps, 0.99), gaps[len(gaps)-1])
	if lost != 0 || dup != 0 {
		t.Errorf("lost %d, duplicated %d, want 0 and 0", lost, dup)
	}
}

// TestVoiceResumeRefusals: a resume is refused before the upgrade for another user's token
// with a valid resume token (404), an unknown token (404), a malformed or long token and a bad
// last_seq (400), a last_seq beyond what was sent (400), a token replayed after a successful
// resume (404: single use), an expired window (404), and a session whose token was revoked.
func TestVoiceResumeRefusals(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 10, time.Millisecond)
	env := resumeEnv(r, algo.URL, map[string]string{"VOICE_RESUME_WINDOW": "1s"})
	a, b := startChildGateway(t, env), startChildGateway(t, env)
	refused := func(t *testing.T, g *child, bearer, query string, status int, code string) {
		t.Helper()
		c := &resumingClient{t: t, bearer: bearer}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		conn, res, err := c.dial(ctx, g.url, query)
		if err == nil {
			conn.CloseNow()
			t.Fatalf("%s: the resume opened, want %d %s", query, status, code)
		}
		if res == nil || res.StatusCode != status {
			t.Fatalf("%s: %v, want %d %s", query, describeResult(res, err), status, code)
		}
	}
	owner := tokenFor(t, "u-ref", []string{"user"}, nil)
	c := openResuming(t, a.url, owner)
	c.answerUntil(10)
	q := func(token string, seq any) string {
		return fmt.Sprintf("?resume_token=%s&last_seq=%v", url.QueryEscape(token), seq)
	}
	other := tokenFor(t, "u-other", []string{"user"}, nil)
	for _, g := range []*child{a, b} {
		refused(t, g, other, q(c.token, 0), http.StatusNotFound, "SESSION_NOT_FOUND")
		refused(t, g, owner, q(strings.Repeat("A", 26), 0), http.StatusNotFound, "SESSION_NOT_FOUND")
		refused(t, g, owner, q("a:b\x01", 0), http.StatusBadRequest, "VALIDATION_ERROR")
		refused(t, g, owner, q(strings.Repeat("A", 300), 0), http.StatusBadRequest, "VALIDATION_ERROR")
		refused(t, g, owner, q(c.token, "x"), http.StatusBadRequest, "VALIDATION_ERROR")
		refused(t, g, owner, q(c.token, -1), http.StatusBadRequest, "VALIDATION_ERROR")
	}
	c.cut()
	// The client went away after 10 messages: more is beyond what was sent.
	eventually(t, 5*time.Second, "the owner noticed the cut", func() bool {
		return strings.Contains(a.stderr.String(), "voice client away")
	})
	refused(t, b, owner, q(c.token, c.seq+5), http.StatusBadRequest, "VALIDATION_ERROR")
	spent := c.token
	if _, _, err := c.resume(b.url); err != nil {
		t.Fatal(err)
	}
	refused(t, a, owner, q(spent, 0), http.StatusNotFound, "SESSION_NOT_FOUND")
	refused(t, b, owner, q(spent, 0), http.StatusNotFound, "SESSION_NOT_FOUND")
	// An expired window: cut, and wait past it.
	c.cut()
	eventually(t, 10*time.Second, "the window ended the session", func() bool {
		return len(resumeUsage(t, r, c.id)) == 1
	})
	refused(t, a, owner, q(c.token, 0), http.StatusNotFound, "SESSION_NOT_FOUND")
	refused(t, b, owner, q(c.token, 0), http.StatusNotFound, "SESSION_NOT_FOUND")

	// A revoked token ends the session while its client is away: its resume token goes with it.
	d := openResuming(t, a.url, owner)
	d.cut()
	eventually(t, 5*time.Second, "the owner noticed the cut", func() bool {
		return strings.Count(a.stderr.String(), "voice client away") >= 2
	})
	super := tokenFor(t, "u-super", []string{"super_admin"}, nil)
	req, _ := http.NewRequestWithContext(t.Context(), "POST", b.url+"/api/v2/auth/revoke", strings.NewReader(`{"user_id":"u-ref","tenant_id":"tenant-a"}`))
	req.Header.Set("Authorization", "Bearer "+super)
	req.Header.Set("Content-Type", "application/json")
	res, err := b.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %d", res.StatusCode)
	}
	eventually(t, 5*time.Second, "the revocation ended the away session", func() bool {
		return len(resumeUsage(t, r, d.id)) == 1
	})
	// The revoked token itself is refused (401); a new token of the same user finds no session
	// (404): the resume token went with it.
	refused(t, b, owner, q(d.token, 0), http.StatusUnauthorized, "TOKEN_REVOKED")
	eventually(t, 5*time.Second, "a token issued after the revocation to get 404", func() bool {
		fresh := tokenFor(t, "u-ref", []string{"user"}, nil)
		c := &resumingClient{t: t, bearer: fresh}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		conn, res, err := c.dial(ctx, b.url, q(d.token, 0))
		if err == nil {
			conn.CloseNow()
			t.Fatal("a resume of a session whose token was revoked opened")
		}
		return res != nil && res.StatusCode == http.StatusNotFound
	})
	// Its resume token is gone from the store with it.
	rc := testClient(t, r)
	kctx, kcancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer kcancel()
	keys, err := rc.Do(kctx, rc.B().Keys().Pattern("voicegate:voice:resume:{tenant-a}:u-ref:*").Build()).AsStrSlice()
	if err != nil || len(keys) != 0 {
		t.Errorf("resume tokens of u-ref left after its sessions ended: %v %v", keys, err)
	}
}

// TestVoiceResumeSIGKILL: the owner dies (SIGKILL) in the middle of a burst; a resume on the
// other instance gets RESUME_GAP for what only the dead instance's memory held, then the live
// session, within the bound, never hanging.
func TestVoiceResumeSIGKILL(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 100, 3*time.Millisecond)
	env := resumeEnv(r, algo.URL, nil)
	a, b := startChildGateway(t, env), startChildGateway(t, env)
	c := openResuming(t, a.url, tokenFor(t, "u-kill", []string{"user"}, nil))
	c.answerUntil(30)
	a.kill()
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	resumed, _, err := c.resume(b.url)
	if err != nil {
		t.Fatal(err)
	}
	_, code, err := c.read(ctx)
	if err != nil || code != "RESUME_GAP" {
		t.Fatalf("after session_resumed %+v: %q %v, want an error RESUME_GAP", resumed, code, err)
	}
	if err := c.readUntil(algo.burst); err != nil {
		t.Fatalf("the live session after the gap: %v", err)
	}
	t.Logf("resumed after SIGKILL of the owner within %v; %d of %d messages arrived", time.Since(start), len(c.got), algo.burst)
	// Nothing twice, in order (each kind: TTS is paced); what is lost is only what the dead
	// instance held.
	sorted := slices.Clone(c.got)
	slices.Sort(sorted)
	if !inServiceOrder(c.got) || len(slices.Compact(sorted)) != len(c.got) {
		t.Errorf("messages out of order or duplicated: %v", clipInts(c.got))
	}
}

// TestVoiceResumeDrain: SIGTERM of the instance holding VOICEGATE_DRAIN_SESSIONS (default 50)
// sessions while each is mid-answer (a burst of 120 messages at 50 a second, as TTS frames of
// 20 ms come): every client gets SERVER_SHUTDOWN with "resume": true and close 1012, resumes on the other
// instance, and gets every message exactly once, before SHUTDOWN_GRACE ends.
func TestVoiceResumeDrain(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 120, 20*time.Millisecond) // TTS at 50 frames a second
	n := envInt(t, "VOICEGATE_DRAIN_SESSIONS", 50)
	env := resumeEnv(r, algo.URL, map[string]string{"SHUTDOWN_GRACE": "10s"})
	a, b := startChildGateway(t, env), startChildGateway(t, env)
	clients := make([]*resumingClient, n)
	for i := range clients {
		clients[i] = openResuming(t, a.url, tokenFor(t, "u-drain-"+strconv.Itoa(i), []string{"user"}, nil))
	}
	for _, c := range clients {
		if err := c.send(`{"type":"stop"}`); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range clients {
		if err := c.readUntil(10); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	signalled := time.Now()
	var last atomic.Int64
	var resumedN atomic.Int64
	err := inParallel(n, n, func(i int) error {
		c := clients[i]
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		shutdown := false
		for {
			_, code, err := c.read(ctx)
			if err != nil {
				if websocket.CloseStatus(err) != websocket.StatusServiceRestart || !shutdown {
					return fmt.Errorf("client %d: ended %v (SERVER_SHUTDOWN seen %v), want SERVER_SHUTDOWN then 1012", i, err, shutdown)
				}
				break
			}
			if code == "SERVER_SHUTDOWN" {
				shutdown = true
			}
		}
		if _, _, err := c.resume(b.url); err != nil {
			return fmt.Errorf("client %d: %w", i, err)
		}
		d := time.Since(signalled)
		for {
			old := last.Load()
			if int64(d) <= old || last.CompareAndSwap(old, int64(d)) {
				break
			}
		}
		resumedN.Add(1)
		if err := c.readUntil(algo.burst); err != nil {
			return fmt.Errorf("client %d: %w", i, err)
		}
		return nil
	})
	if err != nil {
		for _, g := range []*child{a, b} {
			for _, line := range strings.Split(g.stderr.String(), "\n") {
				if strings.Contains(line, "WARN") || strings.Contains(line, "ERROR") {
					t.Logf("%s: %s", g.addr, clipText(line))
				}
			}
		}
		t.Fatal(err)
	}
	lost, dup := 0, 0
	for _, c := range clients {
		l, d := lostAndDuplicated(c.got, algo.burst)
		lost, dup = lost+l, dup+d
	}
	t.Logf("drain of %d sessions: %d resumed on the other instance, the last %v after SIGTERM; %d messages lost, %d duplicated",
		n, resumedN.Load(), time.Duration(last.Load()), lost, dup)
	if lost != 0 || dup != 0 || int(resumedN.Load()) != n {
		t.Errorf("resumed %d of %d, lost %d, duplicated %d; want all, 0, 0", resumedN.Load(), n, lost, dup)
	}
	if d := time.Duration(last.Load()); d > 10*time.Second {
		t.Errorf("the last session resumed %v after SIGTERM, beyond SHUTDOWN_GRACE", d)
	}
}

// TestVoiceResumeFailed: an algorithm service that refuses the resume dial fails the resume:
// the client gets RESUME_FAILED and close 1011, the older instance ends the session (its
// upstream closed), and nothing is left held: no slot, one usage record.
func TestVoiceResumeFailed(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 20, time.Millisecond)
	env := resumeEnv(r, algo.URL, nil)
	a, b := startChildGateway(t, env), startChildGateway(t, env)
	c := openResuming(t, a.url, tokenFor(t, "u-fail", []string{"user"}, nil))
	c.answerUntil(20)
	c.cut()
	eventually(t, 5*time.Second, "the owner noticed the cut", func() bool {
		return strings.Contains(a.stderr.String(), "voice client away")
	})
	algo.failResume.Store(true)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, _, err := c.dial(ctx, b.url, "?resume_token="+c.token+"&last_seq="+strconv.FormatInt(c.seq, 10))
	if err != nil {
		t.Fatalf("resume dial: %v", err)
	}
	_, msg, err := conn.Read(ctx)
	if err != nil || !strings.Contains(string(msg), `"code":"RESUME_FAILED"`) {
		t.Fatalf("first message %s (%v), want an error RESUME_FAILED", msg, err)
	}
	if _, _, err := conn.Read(ctx); websocket.CloseStatus(err) != websocket.StatusInternalError {
		t.Fatalf("then %v, want close 1011", err)
	}
	eventually(t, 10*time.Second, "the older instance to end the session, and its slot to go", func() bool {
		return len(resumeUsage(t, r, c.id)) == 1 && leaseCount(t, r, "voice", "u-fail") == 0
	})
	if u := resumeUsage(t, r, c.id)[0]; u["close_code"] != "1011" {
		t.Errorf("usage record close_code %q, want 1011: %v", u["close_code"], u)
	}
}

// TestVoiceResumeOneWins: twenty resumes with one token at once, on both instances: exactly one
// opens, the others are 404 (the token is single use, claimed atomically), and the one that
// opened gets the whole session.
func TestVoiceResumeOneWins(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 40, time.Millisecond)
	env := resumeEnv(r, algo.URL, nil)
	gws := []*child{startChildGateway(t, env), startChildGateway(t, env)}
	bearer := tokenFor(t, "u-race", []string{"user"}, nil)
	c := openResuming(t, gws[0].url, bearer)
	c.answerUntil(20)
	c.cut()
	eventually(t, 5*time.Second, "the owner noticed the cut", func() bool {
		return strings.Contains(gws[0].stderr.String(), "voice client away")
	})
	const n = 20
	var opened atomic.Int64
	var winner atomic.Pointer[websocket.Conn]
	statuses := make([]int, n)
	err := inParallel(n, n, func(i int) error {
		rc := &resumingClient{t: t, bearer: bearer}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		conn, res, err := rc.dial(ctx, gws[i%2].url, "?resume_token="+c.token+"&last_seq="+strconv.FormatInt(c.seq, 10))
		if err == nil {
			opened.Add(1)
			winner.Store(conn)
			statuses[i] = http.StatusSwitchingProtocols
			return nil
		}
		if res != nil {
			statuses[i] = res.StatusCode
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range statuses {
		if s != http.StatusSwitchingProtocols && s != http.StatusNotFound {
			t.Errorf("statuses %v, want one 101 and 404s", statuses)
			break
		}
	}
	if opened.Load() != 1 {
		t.Fatalf("%d resumes opened, want exactly 1 (statuses %v)", opened.Load(), statuses)
	}
	c.conn = winner.Load()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, msg, err := c.conn.Read(ctx)
	if err != nil || !strings.Contains(string(msg), `"type":"session_resumed"`) {
		t.Fatalf("the winner's first message %s (%v), want session_resumed", msg, err)
	}
	if err := c.readUntil(algo.burst); err != nil {
		t.Fatal(err)
	}
	c.wantAll(t, algo.burst)
}

// TestVoiceResumeAtTheCap: a user at the voice concurrency cap (1) whose connection is cut
// resumes on the other instance, although the instance the session leaves holds its slot until
// the handover ends; once moved, the session holds one slot, and the cap still refuses the
// user a second session on either instance.
func TestVoiceResumeAtTheCap(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newNumberingAlgo(t, 200, 2*time.Millisecond)
	f := e2ePolicy(t)
	f.Limits.Concurrency["voice"] = policy.Concurrency{PerUser: 1, PerTenant: 100}
	file := filepath.Join(t.TempDir(), "policy.json")
	writePolicy(t, file, f)
	env := resumeEnv(r, algo.URL, map[string]string{"POLICY_FILE": file})
	a, b := startChildGateway(t, env), startChildGateway(t, env)

	c, _ := cutAndResume(t, a, b, algo, "u-cap", false)
	eventually(t, 5*time.Second, "one voice slot held for the user", func() bool {
		return leaseCount(t, r, "voice", "u-cap") == 1
	})
	for _, g := range []*child{a, b} {
		second := &resumingClient{t: t, bearer: tokenFor(t, "u-cap", []string{"user"}, nil)}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		conn, res, err := second.dial(ctx, g.url, "?conversation_id=c-second")
		cancel()
		if err == nil {
			conn.CloseNow()
			t.Fatalf("a second session at the cap opened on %s", g.url)
		}
		if res == nil || res.StatusCode != http.StatusTooManyRequests {
			t.Errorf("a second session at the cap: %v (%v), want 429", res, err)
		}
	}
	c.conn.Close(websocket.StatusNormalClosure, "done")
	eventually(t, 5*time.Second, "the slot given back", func() bool {
		return leaseCount(t, r, "voice", "u-cap") == 0
	})
}
