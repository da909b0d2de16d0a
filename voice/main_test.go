package voice_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/goleak"

	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// TestMain fails the package's tests if any goroutine outlives them: every session's readers,
// writers, pings and timers must end with the session, on both of its connections.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wait bounds every blocking step of a test; it only runs out when something is broken.
const wait = 5 * time.Second

// streamPath is where the gateway is mounted in the tests (the handler ignores the path).
const streamPath = "/api/v2/voice/stream"

// wsMsg is one WebSocket data message.
type wsMsg struct {
	typ  websocket.MessageType
	data []byte
}

// setup describes one test environment.
type setup struct {
	opts  voice.Options // AlgoURL, Registry and OnEnd are filled in when left zero
	serve behaviour     // what the fake algorithm service does; nil means record
	// quiet makes the fake keep no messages and publish no connections, so that nothing but
	// the live sessions holds memory (leak test, benchmarks).
	quiet bool
	// net is where everything listens and dials; nil means loopback. Tests on fake time
	// (testing/synctest) use a memNet.
	net network
	// lease, when set, holds a concurrency slot of this cap for every session, as the policy's
	// middleware does in front of the handler.
	lease *policy.MemoryLeases
}

// env is a gateway (voice.Handler behind proxy.RequestID) in front of a fake algorithm
// service.
type env struct {
	net    network
	fake   *fake
	gw     *server
	h      *voice.Handler
	reg    *voice.Registry
	ends   chan voice.Stats // from OnEnd, dropped when nobody reads them
	client *http.Client

	mu      sync.Mutex
	running int           // sessions started and not yet over
	changed chan struct{} // closed and replaced whenever a session is over
}

func newEnv(tb testing.TB, s setup) *env {
	tb.Helper()
	n := s.net
	if n == nil {
		n = loopback{}
	}
	e := &env{net: n, fake: newFake(tb, n, s.serve, s.quiet), ends: make(chan voice.Stats, 64),
		changed: make(chan struct{})}
	e.client = &http.Client{Transport: clientTransport(tb, n)}
	o := s.opts
	if o.AlgoURL == nil {
		o.AlgoURL = mustURL(tb, e.fake.srv.URL)
	}
	if o.DialContext == nil {
		o.DialContext = n.dial
	}
	if o.Registry == nil {
		o.Registry = voice.NewRegistry(voice.RegistryOptions{Instance: "gw-test"})
	}
	e.reg = o.Registry
	onStart, onEnd := o.OnStart, o.OnEnd
	o.OnStart = func() {
		e.mu.Lock()
		e.running++
		e.mu.Unlock()
		if onStart != nil {
			onStart()
		}
	}
	o.OnEnd = func(st voice.Stats) {
		if onEnd != nil {
			onEnd(st)
		}
		select {
		case e.ends <- st:
		default:
		}
		e.mu.Lock()
		e.running--
		close(e.changed)
		e.changed = make(chan struct{})
		e.mu.Unlock()
	}
	if s.lease != nil {
		o.Admit = leased(s.lease)
	}
	e.h = voice.NewHandler(o)
	e.gw = serve(tb, n, proxy.Chain(e.h, proxy.RequestID()))
	// Runs before the fake's clean-up (LIFO): sessions end first, then the fake goes.
	tb.Cleanup(func() {
		e.gw.srv.Close() // does not wait for hijacked connections: the registry and e.idle do
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		e.reg.CloseAll(ctx, websocket.StatusGoingAway, "", "test over")
		cancel()
		if e.handlers() > 0 {
			e.idle(tb, 10*time.Second)
		}
		e.h.Close()
	})
	return e
}

// testUser is the user whose slot leased takes.
const testUser = "u-lease"

// leased admits a session by taking one slot of leases for testUser, as policy.Admit does.
func leased(leases *policy.MemoryLeases) func(http.ResponseWriter, *http.Request) (func(), bool) {
	return func(w http.ResponseWriter, r *http.Request) (func(), bool) {
		release, err := leases.Acquire(r.Context(), policy.LeaseRequest{Kind: "voice", User: testUser, PerUser: 1})
		if err != nil {
			http.Error(w, err.Error(), http.StatusTooManyRequests)
			return nil, false
		}
		return release, true
	}
}

// runningAtMost waits until at most n sessions run: a session counts from its start until it
// has ended and let go of its registry entry and its concurrency slot.
func (e *env) runningAtMost(tb testing.TB, n int, within time.Duration) {
	tb.Helper()
	deadline := time.After(within)
	for {
		e.mu.Lock()
		running, ch := e.running, e.changed
		e.mu.Unlock()
		if running <= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			tb.Fatalf("%d sessions still running after %v, want at most %d", running, within, n)
		}
	}
}

// idle waits until no session runs.
func (e *env) idle(tb testing.TB, within time.Duration) {
	tb.Helper()
	e.runningAtMost(tb, 0, within)
}

// gone waits until every session is over, and checks that the registry has let go of them.
func (e *env) gone(tb testing.TB) {
	tb.Helper()
	e.idle(tb, wait)
	if n := e.reg.Len(); n != 0 {
		tb.Errorf("the registry holds %d sessions after every session ended", n)
	}
}

// handlers reports how many sessions run.
func (e *env) handlers() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.running
}

// url returns the gateway's voice URL with query.
func (e *env) url(query string) string {
	u := e.gw.URL + streamPath
	if query != "" {
		u += "?" + query
	}
	return u
}

// dial opens a WebSocket to the gateway; opts may be nil (subprotocol voice-protocol-v2).
func (e *env) dial(ctx context.Context, query string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response, error) {
	var o websocket.DialOptions
	if opts != nil {
		o = *opts
	}
	if o.Subprotocols == nil {
		o.Subprotocols = []string{voice.Subprotocol}
	}
	if o.HTTPClient == nil {
		o.HTTPClient = e.client
	}
	c, res, err := websocket.Dial(ctx, e.url(query), &o)
	if c != nil {
		c.SetReadLimit(8 << 20)
	}
	return c, res, err
}

// connect dials the gateway and starts reading in the background, so pings are answered.
func (e *env) connect(tb testing.TB, query string, opts *websocket.DialOptions) *client {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, res, err := e.dial(ctx, query, opts)
	if err != nil {
		tb.Fatalf("dial gateway: %v (response %v)", err, status(res))
	}
	return startClient(tb, c, res)
}

// client is a test's voice app: a connection read in the background.
type client struct {
	c    *websocket.Conn
	res  *http.Response
	msgs chan wsMsg
	done chan struct{}
	err  error // why reading stopped; set before done closes
}

func startClient(tb testing.TB, c *websocket.Conn, res *http.Response) *client {
	cl := &client{c: c, res: res, msgs: make(chan wsMsg, 1024), done: make(chan struct{})}
	go func() {
		defer close(cl.done)
		for {
			typ, b, err := c.Read(context.Background())
			if err != nil {
				cl.err = err
				return
			}
			cl.msgs <- wsMsg{typ, b}
		}
	}()
	tb.Cleanup(func() {
		c.CloseNow()
		<-cl.done
	})
	return cl
}

// next returns the next message, failing the test if none comes.
func (cl *client) next(tb testing.TB) wsMsg {
	tb.Helper()
	select {
	case m := <-cl.msgs:
		return m
	case <-time.After(wait):
		tb.Fatalf("client: no message within %v", wait)
	}
	return wsMsg{}
}

// nextJSON returns the next message, which must be a JSON text message.
func (cl *client) nextJSON(tb testing.TB) map[string]any {
	tb.Helper()
	m := cl.next(tb)
	if m.typ != websocket.MessageText {
		tb.Fatalf("client: got a %v message, want text", m.typ)
	}
	return decode(tb, m.data)
}

// initMsg reads session_initialized and returns it.
func (cl *client) initMsg(tb testing.TB) map[string]any {
	tb.Helper()
	m := cl.nextJSON(tb)
	if m["type"] != voice.TypeSessionInitialized {
		tb.Fatalf("first message is %v, want session_initialized", m)
	}
	return m
}

// end waits until the connection is finished and returns the messages read before it and the
// error that ended it.
func (cl *client) end(tb testing.TB, within time.Duration) ([]wsMsg, error) {
	tb.Helper()
	var got []wsMsg
	deadline := time.After(within)
	for {
		select {
		case m := <-cl.msgs:
			got = append(got, m)
		case <-cl.done:
			for {
				select {
				case m := <-cl.msgs:
					got = append(got, m)
				default:
					return got, cl.err
				}
			}
		case <-deadline:
			tb.Fatalf("client connection still open after %v (read %d messages)", within, len(got))
		}
	}
}

// errorCodes returns the codes of the error messages among msgs, in order.
func errorCodes(tb testing.TB, msgs []wsMsg) []string {
	tb.Helper()
	var codes []string
	for _, m := range msgs {
		if m.typ != websocket.MessageText {
			continue
		}
		if j := decode(tb, m.data); j["type"] == voice.TypeError {
			codes = append(codes, j["code"].(string))
		}
	}
	return codes
}

// behaviour is what the fake algorithm service does with one connection. It returns when it
// is done with the connection, which is then closed without a handshake.
type behaviour func(fc *fakeConn)

// fake is the algorithm service: it accepts voice-protocol-v2 WebSockets on any path.
type fake struct {
	srv   *server
	serve behaviour
	quiet bool
	dials atomic.Int64
	conns chan *fakeConn // every accepted connection, in order (unless quiet)
	stop  chan struct{}  // closed at clean-up: releases behaviours that wait
	wg    sync.WaitGroup

	mu   sync.Mutex
	live map[*fakeConn]bool
}

// fakeConn is one connection the fake accepted.
type fakeConn struct {
	f      *fake
	conn   *websocket.Conn
	header http.Header // of the upgrade request
	url    url.URL
	msgs   chan wsMsg // what record read (nil when quiet)
	done   chan struct{}
	err    error // why the connection ended (the read error); set before done closes
	sent   atomic.Int64
}

func newFake(tb testing.TB, n network, b behaviour, quiet bool) *fake {
	if b == nil {
		b = record
	}
	f := &fake{serve: b, quiet: quiet, conns: make(chan *fakeConn, 8192), stop: make(chan struct{}),
		live: map[*fakeConn]bool{}}
	tb.Cleanup(func() {
		close(f.stop)
		f.mu.Lock()
		for fc := range f.live {
			fc.conn.CloseNow()
		}
		f.mu.Unlock()
		waitGroup(tb, &f.wg, 10*time.Second, "fake handlers")
	})
	f.srv = serve(tb, n, http.HandlerFunc(f.handle)) // stopped first: clean-ups run last in, first out
	return f
}

func (f *fake) handle(w http.ResponseWriter, r *http.Request) {
	f.dials.Add(1)
	f.wg.Add(1)
	defer f.wg.Done()
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{voice.Subprotocol}})
	if err != nil {
		return
	}
	c.SetReadLimit(8 << 20)
	fc := &fakeConn{f: f, conn: c, header: r.Header.Clone(), url: *r.URL, done: make(chan struct{})}
	if !f.quiet {
		fc.msgs = make(chan wsMsg, 256)
	}
	f.mu.Lock()
	f.live[fc] = true
	f.mu.Unlock()
	defer func() {
		c.CloseNow()
		f.mu.Lock()
		delete(f.live, fc)
		f.mu.Unlock()
		close(fc.done)
	}()
	if !f.quiet {
		f.conns <- fc
	}
	f.serve(fc)
}

// open reports how many connections the fake holds.
func (f *fake) open() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.live)
}

// next returns the next connection the fake accepted.
func (f *fake) next(tb testing.TB) *fakeConn {
	tb.Helper()
	select {
	case fc := <-f.conns:
		return fc
	case <-time.After(wait):
		tb.Fatalf("the fake algorithm service got no connection within %v", wait)
	}
	return nil
}

// record reads until the connection ends, keeping every message.
func record(fc *fakeConn) {
	for {
		typ, b, err := fc.conn.Read(context.Background())
		if err != nil {
			fc.err = err
			return
		}
		if fc.msgs != nil {
			fc.msgs <- wsMsg{typ, b}
		}
	}
}

// echo sends every message back as it came.
func echo(fc *fakeConn) {
	for {
		typ, b, err := fc.conn.Read(context.Background())
		if err != nil {
			fc.err = err
			return
		}
		if err := fc.conn.Write(context.Background(), typ, b); err != nil {
			fc.err = err
			return
		}
	}
}

// neverRead holds the connection open without ever reading it (so it answers no ping and
// reads no close frame) until the test ends.
func neverRead(fc *fakeConn) {
	<-fc.f.stop
}

// flood sends binary frames of size bytes (TTS audio) as fast as the connection takes them,
// while recording what arrives.
func flood(size int) behaviour {
	return func(fc *fakeConn) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			frame := make([]byte, size)
			for {
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				err := fc.conn.Write(ctx, websocket.MessageBinary, frame)
				cancel()
				if err != nil {
					return
				}
				fc.sent.Add(1)
			}
		}()
		record(fc)
		fc.conn.CloseNow()
		<-done
	}
}

// recv returns the next message the fake read on fc.
func (fc *fakeConn) recv(tb testing.TB) wsMsg {
	tb.Helper()
	select {
	case m := <-fc.msgs:
		return m
	case <-fc.done:
		tb.Fatalf("the fake's connection ended (%v) while a message was expected", fc.err)
	case <-time.After(wait):
		tb.Fatalf("the fake got no message within %v", wait)
	}
	return wsMsg{}
}

// recvJSON returns the next message the fake read, which must be a JSON text message.
func (fc *fakeConn) recvJSON(tb testing.TB) map[string]any {
	tb.Helper()
	m := fc.recv(tb)
	if m.typ != websocket.MessageText {
		tb.Fatalf("fake: got a %v message, want text", m.typ)
	}
	return decode(tb, m.data)
}

// ended waits for the fake's connection to end and returns why.
func (fc *fakeConn) ended(tb testing.TB, within time.Duration) error {
	tb.Helper()
	select {
	case <-fc.done:
		return fc.err
	case <-time.After(within):
		tb.Fatalf("the fake's connection is still open after %v", within)
	}
	return nil
}

// rawUpgrade completes a WebSocket handshake with the gateway over plain TCP and returns the
// connection, which the caller then never reads: a peer that answers no ping.
func rawUpgrade(tb testing.TB, e *env) net.Conn {
	tb.Helper()
	u := mustURL(tb, e.gw.URL)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	conn, err := e.net.dial(ctx, "tcp", u.Host)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	req := "GET " + streamPath + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Protocol: " + voice.Subprotocol + "\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		tb.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(wait))
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		tb.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		tb.Fatalf("raw upgrade: status %d", res.StatusCode)
	}
	return conn
}

func decode(tb testing.TB, b []byte) map[string]any {
	tb.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		tb.Fatalf("not a JSON object: %q: %v", b, err)
	}
	return m
}

func mustURL(tb testing.TB, s string) *url.URL {
	tb.Helper()
	u, err := url.Parse(s)
	if err != nil {
		tb.Fatal(err)
	}
	return u
}

func status(res *http.Response) string {
	if res == nil {
		return "none"
	}
	return res.Status
}

func waitGroup(tb testing.TB, wg *sync.WaitGroup, within time.Duration, what string) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(within):
		tb.Errorf("%s still running after %v", what, within)
	}
}

// errorBody decodes the gateway's JSON error document; raw is the body as sent.
func errorBody(tb testing.TB, res *http.Response) (doc map[string]any, raw string) {
	tb.Helper()
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		tb.Fatalf("error Content-Type %q, want JSON", ct)
	}
	b, err := io.ReadAll(res.Body)
	if err != nil {
		tb.Fatalf("error body: %v", err)
	}
	return decode(tb, b), string(b)
}
