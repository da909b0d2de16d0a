package voice_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"

	"voicegate/proxy"
	"voicegate/voice"
)

func TestAlgoServiceEndsSessionNormally(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	if err := fc.conn.Close(websocket.StatusNormalClosure, "done"); err != nil {
		t.Errorf("fake close: %v", err)
	}
	msgs, err := cl.end(t, time.Second)
	if code := websocket.CloseStatus(err); code != websocket.StatusNormalClosure {
		t.Errorf("client saw %v (%v), want close 1000", code, err)
	}
	if codes := errorCodes(t, msgs); len(codes) != 0 {
		t.Errorf("error messages %v on a normal end, want none", codes)
	}
	e.gone(t)
}

func TestHandshakeRefusals(t *testing.T) {
	tests := []struct {
		name   string
		opts   func(o *voice.Options)
		req    func(t *testing.T, e *env) *http.Request
		status int
		code   string
	}{
		{
			name: "not an upgrade",
			req: func(t *testing.T, e *env) *http.Request {
				r, _ := http.NewRequest(http.MethodGet, e.url(""), nil)
				return r
			},
			status: http.StatusUpgradeRequired, code: proxy.CodeValidation,
		},
		{
			name: "origin not allowed",
			opts: func(o *voice.Options) { o.AllowOrigin = func(string) bool { return false } },
			req: func(t *testing.T, e *env) *http.Request {
				return upgradeRequest(t, e, "https://evil.example")
			},
			status: http.StatusForbidden, code: proxy.CodePermission,
		},
		{
			name: "cross origin with no AllowOrigin",
			req: func(t *testing.T, e *env) *http.Request {
				return upgradeRequest(t, e, "https://app.example")
			},
			status: http.StatusForbidden, code: proxy.CodePermission,
		},
		{
			name: "bad language",
			req: func(t *testing.T, e *env) *http.Request {
				r := upgradeRequest(t, e, "")
				r.URL.RawQuery = "language=en%0AUS"
				return r
			},
			status: http.StatusBadRequest, code: proxy.CodeValidation,
		},
		{
			name: "bad conversation_id",
			req: func(t *testing.T, e *env) *http.Request {
				r := upgradeRequest(t, e, "")
				r.URL.RawQuery = "conversation_id=" + strings.Repeat("c", 257)
				return r
			},
			status: http.StatusBadRequest, code: proxy.CodeValidation,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := fast()
			f := newFake(t, loopback{}, nil, false)
			o.AlgoURL = mustURL(t, f.srv.URL)
			if tt.opts != nil {
				tt.opts(&o)
			}
			e := newEnv(t, setup{opts: o})
			r := tt.req(t, e)
			r.Header.Set("X-Request-ID", "req-refused")
			res, err := e.client.Do(r)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			if res.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", res.StatusCode, tt.status)
			}
			body, _ := errorBody(t, res)
			if body["code"] != tt.code || body["request_id"] != "req-refused" || body["error"] == "" {
				t.Errorf("body %v, want code %s and request_id req-refused", body, tt.code)
			}
			if tt.status == http.StatusUpgradeRequired && res.Header.Get("Upgrade") != "websocket" {
				t.Errorf("426 without Upgrade: websocket")
			}
			if n := f.dials.Load(); n != 0 {
				t.Errorf("the algorithm service was dialled %d times for a refused request", n)
			}
		})
	}
}

// upgradeRequest is a valid WebSocket upgrade request to the gateway, with origin when set.
func upgradeRequest(t *testing.T, e *env, origin string) *http.Request {
	r, err := http.NewRequest(http.MethodGet, e.url(""), nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Upgrade", "websocket")
	r.Header.Set("Connection", "Upgrade")
	r.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	r.Header.Set("Sec-WebSocket-Version", "13")
	r.Header.Set("Sec-WebSocket-Protocol", voice.Subprotocol)
	if origin != "" {
		r.Header.Set("Origin", origin)
	}
	return r
}

func TestOriginsAccepted(t *testing.T) {
	allowed := func(o string) bool { return o == "https://app.example" }
	tests := []struct {
		name   string
		origin func(e *env) string
	}{
		{"no origin", func(*env) string { return "" }},
		{"same host", func(e *env) string { return e.gw.URL }},
		{"allowed cross origin", func(*env) string { return "https://app.example" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := fast()
			o.AllowOrigin = allowed
			e := newEnv(t, setup{opts: o})
			var h http.Header
			if origin := tt.origin(e); origin != "" {
				h = http.Header{"Origin": {origin}}
			}
			e.connect(t, "", &websocket.DialOptions{HTTPHeader: h}).initMsg(t)
		})
	}
}

func TestOriginIPv6Allowed(t *testing.T) {
	o := fast()
	o.AllowOrigin = func(origin string) bool { return origin == "http://[::1]:3000" }
	e := newEnv(t, setup{opts: o})
	e.connect(t, "", &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"http://[::1]:3000"}}}).initMsg(t)
}

func TestAlgoServiceDiesMidSession(t *testing.T) {
	tests := []struct {
		name string
		kill func(c *websocket.Conn)
	}{
		{"connection dropped", func(c *websocket.Conn) { c.CloseNow() }},
		{"closed with 1011", func(c *websocket.Conn) { c.Close(websocket.StatusInternalError, "crash") }},
		{"message over the read limit", func(c *websocket.Conn) {
			c.Write(context.Background(), websocket.MessageText, []byte(`"`+strings.Repeat("x", 2<<20)+`"`))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, setup{opts: fast()})
			cl := e.connect(t, "", nil)
			id := cl.initMsg(t)["session_id"]
			fc := e.fake.next(t)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				tt.kill(fc.conn)
			}()
			msgs, err := cl.end(t, time.Second)
			wg.Wait()
			if code := websocket.CloseStatus(err); code != websocket.StatusInternalError {
				t.Errorf("client saw %v (%v), want close 1011", code, err)
			}
			if len(msgs) != 1 {
				t.Fatalf("client got %d messages before the close, want one error message", len(msgs))
			}
			m := decode(t, msgs[0].data)
			if m["type"] != voice.TypeError || m["code"] != voice.CodeAlgoService || m["session_id"] != id {
				t.Errorf("client got %v, want an error ALGO_SERVICE_ERROR for the session", m)
			}
			fc.ended(t, time.Second)
			e.gone(t)
		})
	}
}

func TestClientEnds(t *testing.T) {
	tests := []struct {
		name string
		end  func(t *testing.T, cl *client)
		code websocket.StatusCode // what the algorithm service sees
	}{
		{"close 1000", func(t *testing.T, cl *client) {
			if err := cl.c.Close(websocket.StatusNormalClosure, ""); err != nil {
				t.Errorf("client close: %v", err)
			}
		}, websocket.StatusNormalClosure},
		{"vanishes without a close frame", func(t *testing.T, cl *client) { cl.c.CloseNow() }, websocket.StatusNormalClosure},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, setup{opts: fast()})
			cl := e.connect(t, "", nil)
			cl.initMsg(t)
			fc := e.fake.next(t)
			tt.end(t, cl)
			err := fc.ended(t, time.Second)
			if code := websocket.CloseStatus(err); code != tt.code {
				t.Errorf("the fake saw %v (%v), want close %v", code, err, tt.code)
			}
			e.gone(t)
		})
	}
}

func TestBadControlMessages(t *testing.T) {
	tests := []struct {
		msg, code string
	}{
		{`{not json`, voice.CodeInvalidMessage},
		{`[1,2]`, voice.CodeInvalidMessage},
		{`null`, voice.CodeInvalidMessage},
		{`"start"`, voice.CodeInvalidMessage},
		{`{"type":5}`, voice.CodeInvalidMessage},
		{`{"kind":"start"}`, voice.CodeInvalidMessage},
		{`{"type":""}`, voice.CodeInvalidMessage},
		{`{"type":"start"} trailing`, voice.CodeInvalidMessage},
		{`{"type":"launch_missiles"}`, voice.CodeUnknownType},
		{`{"type":"START"}`, voice.CodeUnknownType},
	}
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	id := cl.initMsg(t)["session_id"]
	fc := e.fake.next(t)
	for _, tt := range tests {
		t.Run(tt.msg, func(t *testing.T) {
			write(t, cl.c, websocket.MessageText, []byte(tt.msg))
			m := cl.nextJSON(t)
			if m["type"] != voice.TypeError || m["code"] != tt.code || m["session_id"] != id || m["message"] == "" {
				t.Errorf("client got %v, want an error %s", m, tt.code)
			}
			// The session goes on, and the bad message was not forwarded.
			write(t, cl.c, websocket.MessageText, []byte(`{"type":"ping","n":1}`))
			if got := fc.recvJSON(t); got["type"] != "ping" {
				t.Errorf("the fake got %v, want the ping after the bad message", got)
			}
		})
	}
	if e.reg.Len() != 1 {
		t.Errorf("registry holds %d sessions, want the one still open", e.reg.Len())
	}
}

func TestOversizedClientMessage(t *testing.T) {
	for _, typ := range []websocket.MessageType{websocket.MessageBinary, websocket.MessageText} {
		t.Run(typ.String(), func(t *testing.T) {
			e := newEnv(t, setup{opts: fast()})
			cl := e.connect(t, "", nil)
			cl.initMsg(t)
			fc := e.fake.next(t)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				cl.c.Write(context.Background(), typ, []byte(strings.Repeat("a", 2<<20))) // may fail: closed
			}()
			_, err := cl.end(t, 2*time.Second)
			wg.Wait()
			if code := websocket.CloseStatus(err); code != websocket.StatusMessageTooBig {
				t.Errorf("client saw %v (%v), want close 1009", code, err)
			}
			fc.ended(t, time.Second)
			if m := len(fc.msgs); m != 0 {
				t.Errorf("the fake got %d messages, want none of the oversized one", m)
			}
		})
	}
}

func TestMessageAtReadLimitPasses(t *testing.T) {
	o := fast()
	o.ReadLimit = 64 << 10
	o.RawAudio = true
	e := newEnv(t, setup{opts: o})
	cl := e.connect(t, "", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	write(t, cl.c, websocket.MessageBinary, make([]byte, 64<<10))
	if m := fc.recv(t); len(m.data) != 64<<10 {
		t.Errorf("the fake got %d bytes, want %d", len(m.data), 64<<10)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		cl.c.Write(context.Background(), websocket.MessageBinary, make([]byte, 64<<10+1))
	}()
	_, err := cl.end(t, 2*time.Second)
	wg.Wait()
	if code := websocket.CloseStatus(err); code != websocket.StatusMessageTooBig {
		t.Errorf("one byte over ReadLimit: client saw %v, want close 1009", code)
	}
}

func TestInvalidUTF8(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	write(t, cl.c, websocket.MessageText, []byte("{\"type\":\"text\",\"text\":\"\xff\xfe\"}"))
	msgs, err := cl.end(t, time.Second)
	if code := websocket.CloseStatus(err); code != websocket.StatusInvalidFramePayloadData {
		t.Errorf("client saw %v (%v), want close 1007", code, err)
	}
	if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeInvalidMessage {
		t.Errorf("error messages %v, want [INVALID_MESSAGE]", codes)
	}
	fc.ended(t, time.Second)
	if len(fc.msgs) != 0 {
		t.Error("the invalid message reached the algorithm service")
	}
}

func TestAlgoServiceCloseCodesPassedOn(t *testing.T) {
	tests := []struct {
		name   string
		code   websocket.StatusCode // what the algorithm service closes with
		want   websocket.StatusCode // what the client sees
		errMsg bool                 // an error message first
	}{
		{"normal", websocket.StatusNormalClosure, websocket.StatusNormalClosure, false},
		{"restarting", websocket.StatusServiceRestart, websocket.StatusServiceRestart, true},
		{"overloaded", websocket.StatusTryAgainLater, websocket.StatusTryAgainLater, true},
		{"policy violation", websocket.StatusPolicyViolation, websocket.StatusInternalError, true},
		{"internal error", websocket.StatusInternalError, websocket.StatusInternalError, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, setup{opts: fast()})
			cl := e.connect(t, "", nil)
			cl.initMsg(t)
			fc := e.fake.next(t)
			if err := fc.conn.Close(tt.code, "bye"); err != nil {
				t.Errorf("fake close: %v", err)
			}
			msgs, err := cl.end(t, wait)
			if code := websocket.CloseStatus(err); code != tt.want {
				t.Errorf("client saw %v (%v), want close %v", code, err, tt.want)
			}
			codes := errorCodes(t, msgs)
			if tt.errMsg && (len(codes) != 1 || codes[0] != voice.CodeAlgoService) {
				t.Errorf("error messages %v, want [ALGO_SERVICE_ERROR]", codes)
			}
			if !tt.errMsg && len(codes) != 0 {
				t.Errorf("error messages %v, want none", codes)
			}
			e.gone(t)
		})
	}
}

func TestCloseReasonClippedOnCharacters(t *testing.T) {
	// 60 three-byte characters: with the gateway's prefix, far over a close frame's 123 bytes.
	reason := strings.Repeat("语", 40)
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	if err := fc.conn.Close(websocket.StatusInternalError, reason); err != nil {
		t.Errorf("fake close: %v", err)
	}
	_, err := cl.end(t, wait)
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("client saw %v, want a close frame", err)
	}
	if len(ce.Reason) > 123 || !utf8.ValidString(ce.Reason) || !strings.HasSuffix(ce.Reason, "语") {
		t.Errorf("close reason %q (%d bytes): want at most 123 bytes of whole characters", ce.Reason, len(ce.Reason))
	}
}

func TestFramesRightAfterTheUpgradeKept(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	u := mustURL(t, e.gw.URL)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	conn, err := e.net.dial(ctx, "tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The upgrade request and a first frame in one write: the frame reaches the gateway with the
	// request, before the 101.
	var b bytes.Buffer
	b.WriteString("GET " + streamPath + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Protocol: " + voice.Subprotocol + "\r\n\r\n")
	payload := []byte(`{"type":"start","early":true}`)
	key := [4]byte{9, 8, 7, 6}
	b.Write([]byte{0x81, 0x80 | byte(len(payload))})
	b.Write(key[:])
	for i, c := range payload {
		b.WriteByte(c ^ key[i%4])
	}
	if _, err := conn.Write(b.Bytes()); err != nil {
		t.Fatal(err)
	}
	fc := e.fake.next(t)
	if m := fc.recvJSON(t); m["type"] != "start" || m["early"] != true {
		t.Errorf("the fake got %v, want the early start", m)
	}
}
