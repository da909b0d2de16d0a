package voice_test

import (
	"context"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"

	"voicegate/voice"
)

// owned are fast options whose Owner reads the test's identity headers.
func owned() voice.Options {
	o := fast()
	o.Owner = func(r *http.Request) (string, string) {
		return r.Header.Get("X-Test-User"), r.Header.Get("X-Test-Tenant")
	}
	return o
}

func as(user, tenant string) *websocket.DialOptions {
	return &websocket.DialOptions{HTTPHeader: http.Header{"X-Test-User": {user}, "X-Test-Tenant": {tenant}}}
}

func TestRegistryLenAndList(t *testing.T) {
	synctest.Test(t, testRegistryLenAndList)
}

func testRegistryLenAndList(t *testing.T) {
	e := newEnv(t, setup{opts: owned(), net: newMemNet()})
	ctx := context.Background()
	if n := e.reg.Len(); n != 0 {
		t.Fatalf("Len %d before any session", n)
	}

	type open struct {
		cl *client
		id string
	}
	var sessions []open
	for i, who := range []struct{ user, tenant, query string }{
		{"u-1", "t-1", "conversation_id=c-1&language=en-US"},
		{"u-2", "t-2", "conversation_id=c-2"},
		{"u-3", "", ""},
	} {
		cl := e.connect(t, who.query, as(who.user, who.tenant))
		sessions = append(sessions, open{cl, cl.initMsg(t)["session_id"].(string)})
		if n := e.reg.Len(); n != i+1 {
			t.Errorf("Len %d with %d sessions open", n, i+1)
		}
		time.Sleep(2 * time.Millisecond) // fake time: distinct start times
	}

	list, err := e.reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []voice.Info{
		{SessionID: sessions[0].id, UserID: "u-1", TenantID: "t-1", ConversationID: "c-1", Language: "en-US", Instance: "gw-test"},
		{SessionID: sessions[1].id, UserID: "u-2", TenantID: "t-2", ConversationID: "c-2", Language: "zh-CN", Instance: "gw-test"},
		{SessionID: sessions[2].id, UserID: "u-3", Language: "zh-CN", Instance: "gw-test"},
	}
	if len(list) != len(want) {
		t.Fatalf("List returned %d sessions, want %d: %+v", len(list), len(want), list)
	}
	for i, got := range list {
		if got.StartedAt.IsZero() || time.Since(got.StartedAt) > time.Minute {
			t.Errorf("session %d StartedAt %v", i, got.StartedAt)
		}
		if i > 0 && got.StartedAt.Before(list[i-1].StartedAt) {
			t.Errorf("List is not oldest first")
		}
		got.StartedAt = time.Time{}
		if got != want[i] {
			t.Errorf("List[%d] = %+v, want %+v", i, got, want[i])
		}
	}

	// Sessions leave as they end, however they end.
	sessions[1].cl.c.Close(websocket.StatusNormalClosure, "")
	e.runningAtMost(t, 2, time.Second)
	if n := e.reg.Len(); n != 2 {
		t.Errorf("Len %d after one close, want 2", n)
	}
	sessions[0].cl.c.CloseNow()
	e.runningAtMost(t, 1, time.Second)
	if n := e.reg.Len(); n != 1 {
		t.Errorf("Len %d after a vanished client, want 1", n)
	}
	list, _ = e.reg.List(ctx)
	if len(list) != 1 || list[0].SessionID != sessions[2].id {
		t.Errorf("List %+v, want only %s", list, sessions[2].id)
	}
	e.fake.next(t)
	e.fake.next(t)
	e.fake.next(t).conn.Close(websocket.StatusNormalClosure, "")
	e.gone(t)
	if list, _ := e.reg.List(ctx); len(list) != 0 {
		t.Errorf("List %+v after every session ended", list)
	}
}

func TestRegistrySharedByHandlers(t *testing.T) {
	reg := voice.NewRegistry(voice.RegistryOptions{Instance: "shared"})
	o := owned()
	o.Registry = reg
	a := newEnv(t, setup{opts: o})
	b := newEnv(t, setup{opts: o})
	a.connect(t, "", as("u-a", "")).initMsg(t)
	b.connect(t, "", as("u-b", "")).initMsg(t)
	if n := reg.Len(); n != 2 {
		t.Errorf("Len %d, want the sessions of both handlers", n)
	}
}

func TestRegistryCloseAll(t *testing.T) {
	e := newEnv(t, setup{opts: owned()})
	var clients []*client
	var fakes []*fakeConn
	for range 3 {
		cl := e.connect(t, "", nil)
		cl.initMsg(t)
		clients = append(clients, cl)
		fakes = append(fakes, e.fake.next(t))
	}

	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	start := time.Now()
	e.reg.CloseAll(ctx, websocket.StatusServiceRestart, voice.CodeShutdown, "the server is restarting; reconnect")
	t.Logf("CloseAll returned after %v", time.Since(start))
	if ctx.Err() != nil {
		t.Error("CloseAll used up its deadline with well-behaved peers")
	}
	if n := e.reg.Len(); n != 0 {
		t.Errorf("Len %d after CloseAll returned", n)
	}
	for i, cl := range clients {
		msgs, err := cl.end(t, time.Second)
		if code := websocket.CloseStatus(err); code != websocket.StatusServiceRestart {
			t.Errorf("client %d saw %v (%v), want close 1012", i, code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 1 || codes[0] != voice.CodeShutdown {
			t.Errorf("client %d error messages %v, want [SERVER_SHUTDOWN]", i, codes)
		}
	}
	for i, fc := range fakes {
		if code := websocket.CloseStatus(fc.ended(t, time.Second)); code != websocket.StatusGoingAway {
			t.Errorf("fake connection %d saw %v, want close 1001", i, code)
		}
	}
}

// TestNoLeaks opens and closes 1,000 sessions and checks that nothing stays behind: once they
// are over, no goroutine of the package is left, and the heap is back where it was.
func TestNoLeaks(t *testing.T) {
	synctest.Test(t, testNoLeaks)
}

func testNoLeaks(t *testing.T) {
	const sessions, workers = 1000, 4
	e := newEnv(t, setup{opts: fast(), serve: echo, quiet: true, net: newMemNet()})

	one := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, _, err := e.dial(ctx, "conversation_id=leak", nil)
		if err != nil {
			return err
		}
		defer c.CloseNow()
		if _, _, err := c.Read(ctx); err != nil { // session_initialized
			return err
		}
		if err := c.Write(ctx, websocket.MessageBinary, frame(7)); err != nil {
			return err
		}
		if _, _, err := c.Read(ctx); err != nil { // the echoed audio_chunk
			return err
		}
		return c.Close(websocket.StatusNormalClosure, "")
	}
	settle := func() uint64 {
		e.gone(t)
		synctest.Wait() // every goroutine of the bubble has exited or is blocked for good
		if n := voiceGoroutines(); n != 0 {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines of the voice package are left:\n%s", n, buf[:runtime.Stack(buf, true)])
		}
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}

	for range 20 { // warm pools and transports up
		if err := one(); err != nil {
			t.Fatal(err)
		}
	}
	h0 := settle()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for range sessions / workers {
				if err := one(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	h1 := settle()
	t.Logf("heap %d KiB → %d KiB over %d sessions", h0>>10, h1>>10, sessions)
	if h1 > h0 && h1-h0 > 512<<10 {
		t.Errorf("heap grew by %d KiB over %d sessions", (h1-h0)>>10, sessions)
	}
	if d := e.fake.dials.Load(); d != sessions+20 {
		t.Errorf("the fake was dialled %d times, want %d", d, sessions+20)
	}
}

// voiceGoroutines counts the goroutines running code of package voice (the gateway's side):
// after the sessions ended there must be none.
func voiceGoroutines() int {
	n := 0
	for _, g := range goroutineStacks() {
		if strings.Contains(g, "voicegate/voice.") {
			n++
		}
	}
	return n
}
