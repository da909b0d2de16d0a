package main

// The load generator of the process benchmarks: this test binary started again as a child
// (role "load"), so that the clients' work neither counts in nor competes inside a process a
// benchmark measures, and the test process itself only drives. It reads commands on stdin and
// answers on stdout, one JSON object a line, and exits when stdin closes.
//
// Every load it offers is fixed (so many sessions, frames, streams or requests a second, at
// spread phases), whatever the server does, so that two servers under the same load can be
// compared by the CPU they spend on it. Latencies are measured here, on the clients' side:
// what a client sees.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// loadRole is the child role of the load generator.
const loadRole = "load"

// loadCmd is one command to the load generator. Which fields count depends on Op.
type loadCmd struct {
	Op  string `json:"op"`
	URL string `json:"url,omitempty"`

	// Who the clients are: user u-<i> of tenant t-<i mod Tenants> (t-<i> with Tenants 0), with
	// Roles, in tokens signed with Secret. Token, when set, is every client's token instead.
	// Users, for the ops that send many requests, is how many users take turns (each request
	// from the next), so that the built-in policy's per-user rates are not what is measured.
	Secret  string   `json:"secret,omitempty"`
	Tenants int      `json:"tenants,omitempty"`
	Roles   []string `json:"roles,omitempty"`
	Token   string   `json:"token,omitempty"`
	Users   int      `json:"users,omitempty"`

	// The sessions, streams or connections [From, From+N).
	From int `json:"from,omitempty"`
	N    int `json:"n,omitempty"`
	// Rate is what is offered a second: sessions opened, requests sent. Width bounds how many
	// are under way at once.
	Rate  float64 `json:"rate,omitempty"`
	Width int     `json:"width,omitempty"`
	// Sources are the local addresses connections are made from, in turn: one address has
	// only so many ports for one server address.
	Sources []string `json:"sources,omitempty"`
	// Init reads each voice session's first message (session_initialized) before it counts as
	// open; the bare proxy's sessions have none.
	Init bool `json:"init,omitempty"`
	// Retries is how many times a session refused with 503 is opened again, after its
	// Retry-After (a second), as a client does; 0 counts the refusal.
	Retries int `json:"retries,omitempty"`
	// Realtime: the voice sessions speak OpenAI's Realtime API (GET /v1/realtime): subprotocol
	// realtime, each frame sent as an input_audio_buffer.append event, each echo read from a
	// response.output_audio.delta.
	Realtime bool `json:"realtime,omitempty"`
	// KeepAlive sends each idle voice session a ping control message this often (spread), as
	// a voice app does, so that the gateway's idle timeout does not end it; 0 none.
	KeepAlive float64 `json:"keep_alive,omitempty"`

	Warm    float64 `json:"warm,omitempty"`    // seconds of load before the measured window
	Seconds float64 `json:"seconds,omitempty"` // the measured window
	Index   int     `json:"index,omitempty"`   // one voice session
	Timeout float64 `json:"timeout,omitempty"` // seconds to wait, for the ops that wait
	Body    string  `json:"body,omitempty"`    // a chat request's body
}

// loadReply is the load generator's answer to a command, or an event on the way ("measuring"
// as a measured window begins, "window_end" as it ends) which the parent reads the server's CPU
// at.
type loadReply struct {
	Event string `json:"event,omitempty"`
	Err   string `json:"err,omitempty"`

	OK       int64            `json:"ok,omitempty"`       // sessions opened, requests or streams answered 200
	Failures map[string]int64 `json:"failures,omitempty"` // by status and error code
	Sent     int64            `json:"sent,omitempty"`     // frames sent, streams started
	Got      int64            `json:"got,omitempty"`      // echoes, events, notices received
	// Latencies in µs, sorted: round trips, one-way times, answer times, times to a first event
	// or to opening a session.
	Lat []int64 `json:"lat,omitempty"`
	// At is a time (unix ns) the op waited for: a session closed, the last notice or close;
	// First the first close.
	At    int64         `json:"at,omitempty"`
	First int64         `json:"first,omitempty"`
	Codes map[int]int64 `json:"codes,omitempty"` // close codes seen
	Took  float64       `json:"took,omitempty"`  // seconds the op took
	// Retried is how many 503s were answered by opening again (Retries).
	Retried int64 `json:"retried,omitempty"`
}

// runLoad is the load generator's main; it never returns.
func runLoad() {
	l := &loader{out: json.NewEncoder(os.Stdout)}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 16<<20)
	for in.Scan() {
		var cmd loadCmd
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			l.reply(loadReply{Err: err.Error()})
			continue
		}
		rep, err := l.do(cmd)
		if err != nil {
			rep.Err = err.Error()
		}
		l.reply(rep)
	}
	os.Exit(0)
}

// loader is the load generator's state: the voice sessions it holds open.
type loader struct {
	outMu sync.Mutex
	out   *json.Encoder

	voice []*loadSession // by index; nil where none was opened

	tokenMu sync.Mutex
	tokens  map[string]string
}

func (l *loader) reply(r loadReply) {
	l.outMu.Lock()
	defer l.outMu.Unlock()
	_ = l.out.Encode(r)
}

func (l *loader) do(cmd loadCmd) (loadReply, error) {
	switch cmd.Op {
	case "voice-open":
		return l.voiceOpen(cmd)
	case "voice-talk":
		return l.voiceTalk(cmd)
	case "voice-closed":
		return l.voiceClosed(cmd)
	case "voice-notices":
		return l.voiceNotices(cmd)
	case "voice-drained":
		return l.voiceDrained(cmd)
	case "voice-close":
		return l.voiceClose(), nil
	case "get":
		return l.gets(cmd)
	case "sse":
		return l.streams(cmd)
	case "first-event":
		return l.firstEvents(cmd)
	}
	return loadReply{}, fmt.Errorf("unknown op %q", cmd.Op)
}

// token is client i's token for cmd: the same one each time it is asked for again, as a
// client keeps its token, so that what the gateway caches about a token is used as it would be.
func (l *loader) token(cmd *loadCmd, i int) string {
	if cmd.Token != "" {
		return cmd.Token
	}
	tenant := i
	if cmd.Tenants > 0 {
		tenant = i % cmd.Tenants
	}
	roles := rolesOr(cmd.Roles, "user")
	key := fmt.Sprint(i, tenant, roles)
	l.tokenMu.Lock()
	defer l.tokenMu.Unlock()
	if tok, ok := l.tokens[key]; ok {
		return tok
	}
	now := time.Now()
	tok := signToken(cmd.Secret, map[string]any{"sub": "u-" + strconv.Itoa(i), "jti": rand.Text(),
		"iat": now.Unix(), "exp": now.Add(2 * time.Hour).Unix(), "tenant_id": "t-" + strconv.Itoa(tenant),
		"roles": roles})
	if l.tokens == nil {
		l.tokens = map[string]string{}
	}
	l.tokens[key] = tok
	return tok
}

func rolesOr(roles []string, def string) []string {
	if len(roles) == 0 {
		return []string{def}
	}
	return roles
}

// signToken is an HS256 JWT of claims.
func signToken(secret string, claims map[string]any) string {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	payload, _ := json.Marshal(claims)
	in := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(in))
	return in + "." + enc.EncodeToString(mac.Sum(nil))
}

// transport is an HTTP transport that makes its connections from sources in turn.
func transport(sources []string, conns int) *http.Transport {
	var next atomic.Int64
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := net.Dialer{}
		if len(sources) > 0 {
			src := sources[int(next.Add(1))%len(sources)]
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
		}
		return d.DialContext(ctx, network, addr)
	}
	return &http.Transport{DialContext: dial, MaxIdleConnsPerHost: max(conns, 2), MaxConnsPerHost: conns,
		ReadBufferSize: 4 << 10, WriteBufferSize: 4 << 10}
}

// paced calls f(i) for i in [0, n) at rate a second (as fast as width allows with rate 0), at
// most width at once, and waits for them all.
func paced(n int, rate float64, width int, f func(i int)) {
	width = max(width, 1)
	sem := make(chan struct{}, width)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		if rate > 0 {
			if wait := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); wait > 0 {
				time.Sleep(wait)
			}
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			f(i)
		})
	}
	wg.Wait()
}

// failure names what a refused request was: its status and the error code in its body.
func failure(status int, body []byte) string {
	var doc struct {
		Code string `json:"code"`
	}
	_ = json.Unmarshal(body, &doc)
	return strings.TrimSpace(strconv.Itoa(status) + " " + doc.Code)
}

// tally counts failures under a lock.
type tally struct {
	mu sync.Mutex
	m  map[string]int64
}

func (t *tally) add(what string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[string]int64{}
	}
	t.m[what]++
}

// latencies collects durations from many goroutines.
type latencies struct {
	mu  sync.Mutex
	lat []int64
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.lat = append(l.lat, d.Microseconds())
	l.mu.Unlock()
}

func (l *latencies) sorted() []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	slices.Sort(l.lat)
	return l.lat
}

// ---- voice -----------------------------------------------------------------------------------

// loadSession is one voice session the load generator holds: its reader runs until the
// session closes, timing echoes while the session talks and noting notices.
type loadSession struct {
	c        *websocket.Conn
	realtime bool         // OpenAI's Realtime API (loadCmd.Realtime)
	closedAt atomic.Int64 // unix ns; 0 while open
	code     atomic.Int64 // the close code, once closed
	noticeAt atomic.Int64 // unix ns of the first notice; 0 none
	rtts     atomic.Pointer[latencies]
	echoes   atomic.Int64
	done     chan struct{}
}

func (s *loadSession) read() {
	defer close(s.done)
	buf := make([]byte, 4<<10)
	notice := []byte(`"type":"notice"`)
	delta, key := []byte(`"response.output_audio.delta"`), []byte(`"delta":"`)
	var stamp [9]byte
	for {
		typ, rd, err := s.c.Reader(context.Background())
		if err != nil {
			s.code.Store(int64(websocket.CloseStatus(err)))
			s.closedAt.Store(time.Now().UnixNano())
			return
		}
		n, _ := io.ReadFull(rd, buf)
		_, _ = io.Copy(io.Discard, rd)
		switch {
		case typ == websocket.MessageBinary && n >= 8:
			if rec := s.rtts.Load(); rec != nil {
				rec.add(time.Duration(time.Now().UnixNano() - int64(binary.LittleEndian.Uint64(buf))))
				s.echoes.Add(1)
			}
		case s.realtime && typ == websocket.MessageText && bytes.Contains(buf[:n], delta):
			// The echo's first 8 bytes, the send time, are the delta's first 12 base64 characters.
			if i := bytes.Index(buf[:n], key); i >= 0 && n-i-len(key) >= 12 {
				if rec := s.rtts.Load(); rec != nil {
					if _, err := base64.StdEncoding.Decode(stamp[:], buf[i+len(key):i+len(key)+12]); err == nil {
						rec.add(time.Duration(time.Now().UnixNano() - int64(binary.LittleEndian.Uint64(stamp[:]))))
						s.echoes.Add(1)
					}
				}
			}
		case typ == websocket.MessageText && bytes.Contains(buf[:n], notice):
			s.noticeAt.CompareAndSwap(0, time.Now().UnixNano())
		}
	}
}

func (l *loader) voiceOpen(cmd loadCmd) (loadReply, error) {
	if need := cmd.From + cmd.N; need > len(l.voice) {
		l.voice = append(l.voice, make([]*loadSession, need-len(l.voice))...)
	}
	client := &http.Client{Transport: transport(cmd.Sources, 0)}
	var fails tally
	var opens latencies
	var ok, retried atomic.Int64
	start := time.Now()
	paced(cmd.N, cmd.Rate, cmd.Width, func(k int) {
		i := cmd.From + k
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		t0 := time.Now()
		var c *websocket.Conn
		var res *http.Response
		var err error
		for try := 0; ; try++ {
			proto := "voice-protocol-v2"
			if cmd.Realtime {
				proto = "realtime"
			}
			c, res, err = websocket.Dial(ctx, cmd.URL, &websocket.DialOptions{HTTPClient: client,
				Subprotocols: []string{proto}, CompressionMode: websocket.CompressionDisabled,
				HTTPHeader: http.Header{"Authorization": {"Bearer " + l.token(&cmd, i)}}})
			if err == nil || res == nil || res.StatusCode != http.StatusServiceUnavailable || try >= cmd.Retries {
				break
			}
			res.Body.Close()
			retried.Add(1)
			time.Sleep(time.Second) // the gateway's Retry-After
		}
		if err != nil {
			if res != nil {
				body, _ := io.ReadAll(io.LimitReader(res.Body, 1<<10))
				fails.add(failure(res.StatusCode, body))
			} else {
				fails.add("dial: " + clipErr(err))
			}
			return
		}
		c.SetReadLimit(1 << 20)
		if cmd.Init {
			if _, _, err := c.Read(ctx); err != nil {
				fails.add("session_initialized: " + clipErr(err))
				c.CloseNow()
				return
			}
		}
		opens.add(time.Since(t0))
		s := &loadSession{c: c, realtime: cmd.Realtime, done: make(chan struct{})}
		l.voice[i] = s
		go s.read()
		if cmd.KeepAlive > 0 {
			go s.keepAlive(time.Duration(cmd.KeepAlive * float64(time.Second)))
		}
		ok.Add(1)
	})
	return loadReply{OK: ok.Load(), Failures: fails.m, Lat: opens.sorted(), Took: time.Since(start).Seconds(),
		Retried: retried.Load()}, nil
}

// clipErr is an error's text without what differs from one connection to the next.
func clipErr(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return s
}

// keepAlive sends a ping control message every period, at a random phase, until the session
// closes.
func (s *loadSession) keepAlive(period time.Duration) {
	first := time.Duration(binary.LittleEndian.Uint64([]byte(rand.Text()[:8])) % uint64(period))
	t := time.NewTimer(first)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := s.c.Write(ctx, websocket.MessageText, []byte(`{"type":"ping"}`))
		cancel()
		if err != nil {
			return
		}
		t.Reset(period)
	}
}

// voiceTalk makes sessions [From, From+N) send a 640-byte frame (20 ms of 16 kHz mono PCM)
// every 20 ms, each at its own phase, for Warm and then Seconds, timing the echoes of the
// measured window.
func (l *loader) voiceTalk(cmd loadCmd) (loadReply, error) {
	ss := l.voice[cmd.From : cmd.From+cmd.N]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var sent atomic.Int64
	var measuring atomic.Bool
	var wg sync.WaitGroup
	for k, s := range ss {
		if s == nil {
			return loadReply{}, fmt.Errorf("session %d is not open", cmd.From+k)
		}
		wg.Go(func() {
			frame := make([]byte, 640)
			var event []byte
			const appendPrefix = `{"type":"input_audio_buffer.append","audio":"`
			phase := time.Duration(k) * 20 * time.Millisecond / time.Duration(len(ss))
			select {
			case <-time.After(phase):
			case <-ctx.Done():
				return
			}
			t := time.NewTicker(20 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				binary.LittleEndian.PutUint64(frame, uint64(time.Now().UnixNano()))
				if s.realtime {
					event = append(base64.StdEncoding.AppendEncode(append(event[:0], appendPrefix...), frame), `"}`...)
					if s.c.Write(context.Background(), websocket.MessageText, event) != nil {
						return
					}
				} else if s.c.Write(context.Background(), websocket.MessageBinary, frame) != nil {
					return
				}
				if measuring.Load() {
					sent.Add(1)
				}
			}
		})
	}
	time.Sleep(time.Duration(cmd.Warm * float64(time.Second)))
	rec := &latencies{}
	for _, s := range ss {
		s.echoes.Store(0)
		s.rtts.Store(rec)
	}
	measuring.Store(true)
	l.reply(loadReply{Event: "measuring"})
	time.Sleep(time.Duration(cmd.Seconds * float64(time.Second)))
	measuring.Store(false)
	var echoes int64
	for _, s := range ss {
		s.rtts.Store(nil)
		echoes += s.echoes.Load()
	}
	l.reply(loadReply{Event: "window_end"})
	cancel()
	wg.Wait()
	return loadReply{Sent: sent.Load(), Got: echoes, Lat: rec.sorted()}, nil
}

// voiceClosed waits for session Index to close and says when it did, and with what code.
func (l *loader) voiceClosed(cmd loadCmd) (loadReply, error) {
	s := l.voice[cmd.Index]
	select {
	case <-s.done:
	case <-time.After(time.Duration(cmd.Timeout * float64(time.Second))):
		return loadReply{}, fmt.Errorf("session %d still open after %vs", cmd.Index, cmd.Timeout)
	}
	return loadReply{At: s.closedAt.Load(), Codes: map[int]int64{int(s.code.Load()): 1}}, nil
}

// voiceNotices waits until every open session has had a notice, and says when the last
// arrived (At) and when each did (Lat: µs after the first command's time, sorted).
func (l *loader) voiceNotices(cmd loadCmd) (loadReply, error) {
	deadline := time.Now().Add(time.Duration(cmd.Timeout * float64(time.Second)))
	for {
		var open, got, last int64
		var at []int64
		for _, s := range l.voice {
			if s == nil || s.closedAt.Load() != 0 {
				continue
			}
			open++
			if n := s.noticeAt.Load(); n != 0 {
				got++
				last = max(last, n)
				at = append(at, n)
			}
		}
		if got == open || time.Now().After(deadline) {
			slices.Sort(at)
			return loadReply{OK: open, Got: got, At: last, Lat: at}, nil
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// voiceDrained waits until every session open when it is asked has closed, and says when the
// first and the last did, and the close codes.
func (l *loader) voiceDrained(cmd loadCmd) (loadReply, error) {
	deadline := time.After(time.Duration(cmd.Timeout * float64(time.Second)))
	rep := loadReply{Codes: map[int]int64{}}
	var open []*loadSession
	for _, s := range l.voice {
		if s != nil && s.closedAt.Load() == 0 {
			open = append(open, s)
		}
	}
	for _, s := range open {
		select {
		case <-s.done:
		case <-deadline:
			return rep, errors.New("sessions still open at the deadline")
		}
		rep.OK++
		at := s.closedAt.Load()
		rep.At = max(rep.At, at)
		if rep.First == 0 || at < rep.First {
			rep.First = at
		}
		rep.Codes[int(s.code.Load())]++
	}
	return rep, nil
}

// voiceClose drops every session and forgets them.
func (l *loader) voiceClose() loadReply {
	for _, s := range l.voice {
		if s != nil {
			s.c.CloseNow()
			<-s.done
		}
	}
	l.voice = nil
	return loadReply{}
}

// ---- HTTP ------------------------------------------------------------------------------------

// gets offers Rate GETs a second to URL over N keep-alive connections (each at its own phase),
// Users users (N at least) taking turns, for Warm and then Seconds.
func (l *loader) gets(cmd loadCmd) (loadReply, error) {
	tr := transport(cmd.Sources, cmd.N)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	tokens := make([]string, max(cmd.Users, cmd.N))
	for i := range tokens {
		tokens[i] = l.token(&cmd, cmd.From+i)
	}
	var ok atomic.Int64
	var fails tally
	var measuring atomic.Bool
	rec := &latencies{}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	period := time.Duration(float64(cmd.N) / cmd.Rate * float64(time.Second))
	for i := range cmd.N {
		wg.Go(func() {
			select {
			case <-time.After(period * time.Duration(i) / time.Duration(cmd.N)):
			case <-ctx.Done():
				return
			}
			t := time.NewTicker(period)
			defer t.Stop()
			req, _ := http.NewRequest(http.MethodGet, cmd.URL, nil)
			for k := i; ; k += cmd.N {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				req.Header.Set("Authorization", "Bearer "+tokens[k%len(tokens)])
				start := time.Now()
				res, err := client.Do(req)
				if err != nil {
					if measuring.Load() {
						fails.add("error: " + clipErr(err))
					}
					continue
				}
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if !measuring.Load() {
					continue
				}
				if res.StatusCode == http.StatusOK {
					ok.Add(1)
					rec.add(time.Since(start))
				} else {
					fails.add(failure(res.StatusCode, body))
				}
			}
		})
	}
	time.Sleep(time.Duration(cmd.Warm * float64(time.Second)))
	measuring.Store(true)
	l.reply(loadReply{Event: "measuring"})
	time.Sleep(time.Duration(cmd.Seconds * float64(time.Second)))
	measuring.Store(false)
	l.reply(loadReply{Event: "window_end"})
	cancel()
	wg.Wait()
	return loadReply{OK: ok.Load(), Failures: fails.m, Lat: rec.sorted()}, nil
}

// streams runs N concurrent chat streams to URL (client i with its own token), their starts
// spread over a second, and reads every event; Lat is each upstream line's one-way time, from
// the sent_ns it carries. The measured window is the whole round.
func (l *loader) streams(cmd loadCmd) (loadReply, error) {
	tr := transport(cmd.Sources, cmd.N)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	tokens := make([]string, cmd.N)
	for i := range tokens {
		tokens[i] = l.token(&cmd, cmd.From+i)
	}
	var ok, events atomic.Int64
	var fails tally
	rec := &latencies{}
	l.reply(loadReply{Event: "measuring"})
	paced(cmd.N, float64(cmd.N), cmd.N, func(i int) {
		req, _ := http.NewRequest(http.MethodPost, cmd.URL, strings.NewReader(cmd.Body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tokens[i])
		res, err := client.Do(req)
		if err != nil {
			fails.add("error: " + clipErr(err))
			return
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(io.LimitReader(res.Body, 1<<10))
			fails.add(failure(res.StatusCode, body))
			return
		}
		n, err := sentTimes(res.Body, rec)
		events.Add(n)
		if err != nil {
			fails.add("stream: " + clipErr(err))
			return
		}
		ok.Add(1)
	})
	l.reply(loadReply{Event: "window_end"})
	return loadReply{OK: ok.Load(), Got: events.Load(), Failures: fails.m, Lat: rec.sorted()}, nil
}

// sentTimes reads a body of lines and records, for every line with a sent_ns, how long after
// it the line arrived.
func sentTimes(body io.Reader, rec *latencies) (int64, error) {
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 4096), 1<<20)
	// A sent_ns member, or (where only the text reaches the client, as in OpenAI's chunks)
	// "sent_ns=" inside the text.
	key, inText := []byte(`"sent_ns":`), []byte(`sent_ns=`)
	var n int64
	for sc.Scan() {
		line := sc.Bytes()
		i, k := bytes.Index(line, key), len(key)
		if i < 0 {
			i, k = bytes.Index(line, inText), len(inText)
		}
		if i < 0 {
			continue
		}
		now := time.Now().UnixNano()
		rest := line[i+k:]
		end := bytes.IndexAny(rest, ",}\" ")
		if end < 0 {
			return n, fmt.Errorf("a sent_ns without its end: %q", line)
		}
		sent, err := strconv.ParseInt(string(rest[:end]), 10, 64)
		if err != nil {
			return n, err
		}
		rec.add(time.Duration(now - sent))
		n++
	}
	return n, sc.Err()
}

// firstEvents sends N chats to URL one after another (Rate a second at most), Users users
// (one at least) taking turns, and records the time from sending each to its first upstream
// line.
func (l *loader) firstEvents(cmd loadCmd) (loadReply, error) {
	tr := transport(cmd.Sources, 4)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	tokens := make([]string, max(cmd.Users, 1))
	for i := range tokens {
		tokens[i] = l.token(&cmd, cmd.From+i)
	}
	rec := &latencies{}
	var fails tally
	var ok atomic.Int64
	key := []byte(`"sent_ns":`)
	paced(cmd.N, cmd.Rate, 1, func(i int) {
		req, _ := http.NewRequest(http.MethodPost, cmd.URL, strings.NewReader(cmd.Body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+tokens[i%len(tokens)])
		start := time.Now()
		res, err := client.Do(req)
		if err != nil {
			fails.add("error: " + clipErr(err))
			return
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(io.LimitReader(res.Body, 1<<10))
			fails.add(failure(res.StatusCode, body))
			return
		}
		sc := bufio.NewScanner(res.Body)
		for sc.Scan() {
			if bytes.Contains(sc.Bytes(), key) {
				rec.add(time.Since(start))
				ok.Add(1)
				break
			}
		}
		_, _ = io.Copy(io.Discard, res.Body) // to the end: the stream's release is part of its cost
	})
	return loadReply{OK: ok.Load(), Failures: fails.m, Lat: rec.sorted()}, nil
}

// ---- the parent's side -----------------------------------------------------------------------

// loadGen is the load generator as a benchmark drives it.
type loadGen struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	done  chan struct{}
}

// startLoad starts the load generator; it exits at cleanup.
func startLoad(tb testing.TB) *loadGen {
	tb.Helper()
	cmd := childCommand(tb, loadRole, nil)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	g := &loadGen{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout), done: make(chan struct{})}
	g.out.Buffer(make([]byte, 64<<10), 64<<20)
	go func() {
		_ = cmd.Wait()
		close(g.done)
	}()
	tb.Cleanup(func() {
		stdin.Close()
		select {
		case <-g.done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-g.done
		}
	})
	return g
}

// do sends cmd and returns its answer; on is told each event on the way (nil: none).
func (g *loadGen) do(tb testing.TB, cmd loadCmd, on func(event string)) loadReply {
	tb.Helper()
	b, _ := json.Marshal(cmd)
	if _, err := g.stdin.Write(append(b, '\n')); err != nil {
		tb.Fatalf("load generator: %v", err)
	}
	for g.out.Scan() {
		var r loadReply
		if err := json.Unmarshal(g.out.Bytes(), &r); err != nil {
			tb.Fatalf("load generator: %v: %q", err, g.out.Text())
		}
		if r.Event != "" {
			if on != nil {
				on(r.Event)
			}
			continue
		}
		if r.Err != "" {
			tb.Fatalf("load generator, %s: %s", cmd.Op, r.Err)
		}
		return r
	}
	tb.Fatalf("load generator gone during %s: %v", cmd.Op, g.out.Err())
	return loadReply{}
}

// measured runs cmd and reads c's CPU time (its profile named for label) at the events that bound its measured window.
func (g *loadGen) measured(tb testing.TB, c *child, label string, cmd loadCmd) (loadReply, time.Duration, time.Duration) {
	tb.Helper()
	var cpu0, cpu1 time.Duration
	var start time.Time
	var elapsed time.Duration
	stopProfile := func() {}
	rep := g.do(tb, cmd, func(ev string) {
		switch ev {
		case "measuring":
			cpu0, start = c.cpu(tb), time.Now()
			stopProfile = c.profileAs(tb, label, time.Duration(cmd.Seconds*float64(time.Second)))
		case "window_end":
			cpu1, elapsed = c.cpu(tb), time.Since(start)
		}
	})
	stopProfile()
	return rep, cpu1 - cpu0, elapsed
}

// quantile is the q quantile of sorted µs latencies, as a duration.
func quantile(lat []int64, q float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	return time.Duration(lat[min(int(float64(len(lat))*q), len(lat)-1)]) * time.Microsecond
}
