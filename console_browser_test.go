package main

// Browser tests of the console: Debian's Chromium, driven over the DevTools protocol
// (chromedp), against the gateway started through run with -demo. The microphone is the
// console's real capture code (getUserMedia, the AudioWorklet) fed by Chromium's fake audio
// device. Chromium is real: without it the tests skip with an install hint, unless
// VOICEGATE_REQUIRE_TOOLS=1 (as in CI), where they fail instead. A failing test leaves a
// screenshot of its page behind and names its path.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	cdppage "github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/coder/websocket"

	"voicegate/console"
)

// browser is one Chromium for a test; each page gets a tab of its own.
type browser struct {
	ctx context.Context // the browser's: tabs derive from it
}

// startBrowser starts headless Chromium with a fake microphone, for the test's lifetime.
func startBrowser(t *testing.T) *browser {
	t.Helper()
	bin := requireTool(t, "chromium", "/usr/bin/chromium", "chromium")
	// The fake microphone plays a 440 Hz tone, so that what arrives can be checked for it: 30 s
	// of it, which the tabs share, so that every test that talks hears it (the voice-activity
	// detection too, after the others).
	wav := filepath.Join(t.TempDir(), "tone.wav")
	if err := os.WriteFile(wav, toneWAV(48000, 440, 30*time.Second), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := append(slices.Clone(chromedp.DefaultExecAllocatorOptions[:]),
		chromedp.ExecPath(bin),
		chromedp.NoSandbox, // CI runs as root, where Chromium's sandbox cannot start
		chromedp.Flag("use-fake-device-for-media-stream", true),
		chromedp.Flag("use-fake-ui-for-media-stream", true),
		chromedp.Flag("use-file-for-fake-audio-capture", wav),
		chromedp.Flag("autoplay-policy", "no-user-gesture-required"),
		chromedp.WindowSize(1280, 1100),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	// The first action on a context starts the browser, which lives as long as the context
	// it was started with: this one, not one with a deadline. So the start is bounded here.
	started := make(chan error, 1)
	go func() { started <- chromedp.Do(ctx) }()
	var err error
	select {
	case err = <-started:
	case <-time.After(30 * time.Second):
		cancel()
		err = fmt.Errorf("not started within 30s (then: %v)", <-started)
	}
	if err != nil {
		cancel()
		cancelAlloc()
		t.Fatalf("starting Chromium: %v", err)
	}
	t.Cleanup(func() {
		_ = chromedp.Cancel(ctx) // closes the browser and waits for it
		cancel()
		cancelAlloc()
	})
	return &browser{ctx: ctx}
}

// toneWAV is a WAV file of a sine tone: mono, 16-bit PCM at rate.
func toneWAV(rate, freq int, d time.Duration) []byte {
	n := int(int64(rate) * int64(d) / int64(time.Second))
	le := func(b []byte, v uint32, size int) []byte {
		for i := range size {
			b = append(b, byte(v>>(8*i)))
		}
		return b
	}
	b := []byte("RIFF")
	b = le(b, uint32(36+2*n), 4)
	b = append(b, "WAVEfmt "...)
	b = le(b, 16, 4)
	b = le(b, 1, 2) // PCM
	b = le(b, 1, 2) // mono
	b = le(b, uint32(rate), 4)
	b = le(b, uint32(2*rate), 4)
	b = le(b, 2, 2)
	b = le(b, 16, 2)
	b = append(b, "data"...)
	b = le(b, uint32(2*n), 4)
	for i := range n {
		v := int16(12000 * math.Sin(2*math.Pi*float64(freq)*float64(i)/float64(rate)))
		b = le(b, uint32(uint16(v)), 2)
	}
	return b
}

// page is one tab, with what its console reported.
type page struct {
	t   *testing.T
	ctx context.Context // bounded: no test waits on a page for long

	mu     sync.Mutex
	errors []string // console errors, uncaught exceptions, failed loads
}

// open opens url in a new tab that closes at the end of the test, and waits until the console
// has wired itself up. A failing test gets a screenshot of the tab.
func (b *browser) open(t *testing.T, url string) *page {
	t.Helper()
	tab, cancelTab := chromedp.NewContext(b.ctx)
	ctx, cancel := context.WithTimeout(tab, 60*time.Second)
	p := &page{t: t, ctx: ctx}
	listening, stopListening := context.WithCancel(ctx)
	msgs := chromedp.Console(listening)
	var reading sync.WaitGroup
	reading.Go(func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.Type == chromedp.ConsoleException {
				p.mu.Lock()
				p.errors = append(p.errors, m.String()+" "+m.URL)
				p.mu.Unlock()
			}
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			p.screenshot()
		}
		stopListening()
		reading.Wait()
		cancel()
		_ = chromedp.Cancel(tab)
		cancelTab()
	})
	// The tab lives as long as the context of its first action: p.ctx. Loading gets less.
	p.do("opening a tab")
	load, cancelLoad := context.WithTimeout(ctx, 20*time.Second)
	defer cancelLoad()
	shown, _, _ := strings.Cut(url, "#") // the fragment holds a token
	if err := chromedp.Do(load, chromedp.Navigate(url), chromedp.WaitVisible(chromedp.CSS(`body[data-ready="true"]`))); err != nil {
		t.Fatalf("loading %s: %v\nconsole errors: %q", shown, err, p.consoleErrors())
	}
	return p
}

// screenshot writes the page as a PNG to a directory of its own under the temporary directory,
// which outlives the test, and logs its path.
func (p *page) screenshot() {
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		p.t.Logf("no screenshot: %v", err)
		return
	}
	dir, err := os.MkdirTemp("", "voicegate-browser-")
	if err != nil {
		p.t.Logf("no screenshot: %v", err)
		return
	}
	file := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(p.t.Name())+".png")
	if err := os.WriteFile(file, png, 0o644); err != nil {
		p.t.Logf("no screenshot: %v", err)
		return
	}
	p.t.Logf("screenshot of the page: %s", file)
}

func (p *page) consoleErrors() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.errors)
}

// do runs actions on the page, failing the test on error.
func (p *page) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	if err := chromedp.Do(p.ctx, actions...); err != nil {
		p.t.Fatalf("%s: %v\nconsole errors: %q", what, err, p.consoleErrors())
	}
}

func (p *page) click(sel string) {
	p.t.Helper()
	p.do("clicking "+sel, chromedp.Click(chromedp.CSS(sel)))
}

// eval evaluates a JavaScript expression into out, through JSON.
func (p *page) eval(expr string, out any) {
	p.t.Helper()
	s, err := chromedp.Run(p.ctx, chromedp.Evaluate[string]("JSON.stringify("+expr+")"))
	if err != nil {
		p.t.Fatalf("evaluating %s: %v", expr, err)
	}
	if err := json.Unmarshal([]byte(s), out); err != nil {
		p.t.Fatalf("evaluating %s: %v: %s", expr, err, s)
	}
}

// waitFor polls a JavaScript condition until it holds.
func (p *page) waitFor(what, cond string) {
	p.t.Helper()
	err := chromedp.Do(p.ctx, chromedp.Poll[chromedp.Void](cond,
		chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(30*time.Second)))
	if err != nil {
		state, _ := chromedp.Run(p.ctx, chromedp.Evaluate[string](`JSON.stringify(window.voicegate)`))
		p.t.Fatalf("waiting for %s (%s): %v\npage state: %s\nconsole errors: %q", what, cond, err, clipText(state), p.consoleErrors())
	}
}

func (p *page) text(sel string) string {
	p.t.Helper()
	s, err := chromedp.Run(p.ctx, chromedp.TextContent(chromedp.CSS(sel)))
	if err != nil {
		p.t.Fatalf("reading %s: %v", sel, err)
	}
	return s
}

// shots is where a test keeps a screenshot of each state it looks at: a directory of its own
// under the temporary directory, named in the test's log, which outlives the test.
type shots struct {
	t   *testing.T
	dir string
}

func newShots(t *testing.T) *shots {
	t.Helper()
	dir, err := os.MkdirTemp("", "voicegate-console-")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots of the console's states: %s", dir)
	return &shots{t: t, dir: dir}
}

// take writes the whole page as it looks now, beyond the viewport too, to name.png.
func (s *shots) take(p *page, name string) {
	p.t.Helper()
	png, err := chromedp.Run(p.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(s.dir, name+".png"), png, 0o644); err != nil {
		p.t.Fatal(err)
	}
}

// phone makes the tab a phone's: 390 CSS pixels wide, portrait, at a phone's pixel density.
func (p *page) phone() {
	p.t.Helper()
	p.do("emulating a phone", chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile, chromedp.EmulateTouch,
		chromedp.EmulatePortrait, chromedp.EmulateScale(2)))
}

// fits fails the test if the page scrolls sideways: wider content than the viewport.
func (p *page) fits(state string) {
	p.t.Helper()
	var w struct{ Scroll, Client, Viewport float64 }
	p.eval(`({Scroll: document.documentElement.scrollWidth, Client: document.documentElement.clientWidth, Viewport: innerWidth})`, &w)
	if w.Client != 390 {
		p.t.Fatalf("%s: the page is %v px wide, want the phone's 390", state, w.Client)
	}
	if w.Scroll > w.Client {
		var wide []string
		p.eval(`[...document.querySelectorAll("body *")].filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
			.map(e => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + " " + Math.round(e.getBoundingClientRect().right))`, &wide)
		p.t.Errorf("%s: the page scrolls sideways at 390 px: scrollWidth %v > clientWidth %v; too wide: %q", state, w.Scroll, w.Client, wide)
	}
}

// visible reports whether the element sel takes up room on the page.
func (p *page) visible(sel string) bool {
	p.t.Helper()
	var v bool
	p.eval(`(() => { const e = document.querySelector(`+strconv.Quote(sel)+`); return !!e && e.checkVisibility({visibilityProperty: true, contentVisibilityAuto: true}); })()`, &v)
	return v
}

// accessRequests counts the requests to path in g's access log.
func accessRequests(t *testing.T, g *testGateway, path string) int {
	t.Helper()
	n := 0
	for _, rec := range logRecords(t, g) {
		if rec["msg"] == "request" && rec["path"] == path {
			n++
		}
	}
	return n
}

// statusLook is a status line as a person sees it: its words, its state and its colours.
type statusLook struct {
	Text, State, Color, Background string
}

func (p *page) status(sel string) statusLook {
	p.t.Helper()
	var s statusLook
	p.eval(`(() => { const e = document.querySelector(`+strconv.Quote(sel)+`); const cs = getComputedStyle(e);
		return {Text: e.textContent, State: e.dataset.state || "", Color: cs.color, Background: cs.backgroundColor}; })()`, &s)
	return s
}

// chatEvent is one entry of the console's chat log.
type chatEvent struct {
	Name string  `json:"name"`
	T    float64 `json:"t"` // ms since the request
}

// consoleURL is the URL -demo prints for the console.
var consoleURL = regexp.MustCompile(`http://\S+/console#token=(\S+)`)

// It runs in parallel with the package's other slow, waiting tests, after the rest.
func TestConsoleInBrowser(t *testing.T) {
	t.Parallel()
	b := startBrowser(t)
	g := startRun(t, []string{"-demo"}, map[string]string{"LISTEN_ADDR": "127.0.0.1:0"})
	var url, demoToken string
	eventually(t, 2*time.Second, "-demo prints the console URL", func() bool {
		m := consoleURL.FindStringSubmatch(g.Stdout.String())
		if m != nil {
			url, demoToken = m[0], m[1]
		}
		return m != nil
	})
	if !strings.HasPrefix(url, g.URL+"/console#") {
		t.Fatalf("the console URL %q is not on the gateway %s", url, g.URL)
	}
	w := watchTokens(t, g)
	w.add(demoToken)
	shot := newShots(t)

	t.Run("loads with the token and no errors", func(t *testing.T) {
		p := b.open(t, url)
		var tok string
		p.eval(`document.getElementById("token").value`, &tok)
		if tok != demoToken {
			t.Errorf("the token field holds %.12q…, want the demo's token", tok)
		}
		if got := p.text("#gateway"); got != g.URL {
			t.Errorf("the console talks to %q, want its own origin %s", got, g.URL)
		}
		if errs := p.consoleErrors(); len(errs) > 0 {
			t.Errorf("console errors while loading: %q", errs)
		}
	})

	t.Run("says it is a demo", func(t *testing.T) {
		p := b.open(t, url)
		if !p.visible("#demo-banner") {
			t.Fatal("no demo banner on the console of a gateway started with -demo")
		}
		banner := p.text("#demo-banner")
		for _, want := range []string{"demo", "ignores what you say", "never for production"} {
			if !strings.Contains(banner, want) {
				t.Errorf("the banner %q does not say %q", banner, want)
			}
		}
		shot.take(p, "demo-banner")
		// A gateway in front of a real algorithm service shows none.
		real := startRun(t, nil, map[string]string{"ALGO_URL": doneAlgo(t).URL, "CONSOLE_ENABLED": "true"})
		q := b.open(t, real.URL+"/console")
		if q.visible("#demo-banner") {
			t.Errorf("a gateway without -demo shows the demo banner: %q", q.text("#demo-banner"))
		}
	})

	t.Run("an empty token is caught on the page, and nothing is sent", func(t *testing.T) {
		p := b.open(t, g.URL+"/console")
		var tok string
		p.eval(`document.getElementById("token").value`, &tok)
		if tok != "" {
			t.Fatalf("the token field holds %q without a token in the URL", tok)
		}
		chats, voices := accessRequests(t, g, "/api/v2/chat/stream"), accessRequests(t, g, "/api/v2/voice/stream")
		p.click("#send")
		p.waitFor("the chat to give up", `!window.voicegate.chat.running && window.voicegate.chat.error !== ""`)
		st := p.status("#chat-status")
		if !strings.Contains(st.Text, "Paste a token") || strings.Contains(st.Text, "401") || st.State != "bad" {
			t.Errorf("chat status %+v, want the page's own request for a token, shown as a problem", st)
		}
		p.click("#mic")
		p.waitFor("the microphone to give up", `document.getElementById("voice-status").textContent.includes("Paste a token")`)
		var focused string
		p.eval(`document.activeElement && document.activeElement.id`, &focused)
		if focused != "token" {
			t.Errorf("the focus is on %q, want the token field", focused)
		}
		shot.take(p, "empty-token")
		// Whatever the gateway would log has had time to arrive: the page has already given
		// up, and a request would have been logged before its answer.
		if n := accessRequests(t, g, "/api/v2/chat/stream") - chats; n != 0 {
			t.Errorf("the page sent %d chat requests without a token", n)
		}
		if n := accessRequests(t, g, "/api/v2/voice/stream") - voices; n != 0 {
			t.Errorf("the page sent %d voice upgrades without a token", n)
		}
		var sessions int
		p.eval(`window.voicegate.voice.closes.length`, &sessions)
		if sessions != 0 {
			t.Errorf("%d voice sockets were opened and closed", sessions)
		}
	})

	t.Run("fits a phone screen", func(t *testing.T) {
		p := b.open(t, url)
		p.phone()
		p.fits("loaded")
		shot.take(p, "phone-loaded")

		p.click("#send")
		p.waitFor("the stream to end", `window.voicegate.chat.outcome !== "" && !window.voicegate.chat.running`)
		p.fits("after a chat answer")
		shot.take(p, "phone-chat-done")
		// The longest line of the log: an event's JSON, opened.
		p.do("opening an event", chromedp.Evaluate[chromedp.Void](`document.querySelector("#chat-log li:nth-child(4) summary").click()`))
		p.waitFor("the event's JSON to be written", `document.querySelector("#chat-log li:nth-child(4) pre").textContent !== ""`)
		p.fits("with an event's JSON open")
		shot.take(p, "phone-event-json")

		p.click("#mic")
		p.waitFor("the microphone to be heard", `window.voicegate.voice.framesSent >= 25 && window.voicegate.voice.level > 0`)
		p.fits("while talking")
		shot.take(p, "phone-talking")
		p.click("#hangup")
		p.waitFor("the close", `window.voicegate.voice.closes.length === 1`)
		p.fits("after the session")
		shot.take(p, "phone-voice-closed")

		q := b.open(t, g.URL+"/console")
		q.phone()
		q.click("#send")
		q.waitFor("the empty token to be caught", `window.voicegate.chat.error !== ""`)
		q.fits("asking for a token")
		shot.take(q, "phone-empty-token")
	})

	t.Run("a chat answer streams in", func(t *testing.T) {
		p := b.open(t, url)
		question := "How does the console read a stream?"
		p.do("asking", chromedp.SetValue(chromedp.CSS("#question"), question), chromedp.Click(chromedp.CSS("#send")))
		p.waitFor("the stream to end", `window.voicegate.chat.outcome !== "" && !window.voicegate.chat.running`)
		var evs []chatEvent
		p.eval(`window.voicegate.chat.events`, &evs)
		if len(evs) < 6 || evs[0].Name != "stream_start" || evs[len(evs)-1].Name != "stream_end" {
			t.Fatalf("events %v, want stream_start … stream_end", evs)
		}
		// Streamed, not buffered: the events arrived at many different times before stream_end.
		times := map[float64]bool{}
		for _, e := range evs[:len(evs)-1] {
			times[e.T] = true
		}
		if len(times) < 5 {
			t.Errorf("the %d events before stream_end arrived at only %d distinct times (%v), want them to stream in", len(evs)-1, len(times), evs)
		}
		var outcome, answer string
		p.eval(`window.voicegate.chat.outcome`, &outcome)
		p.eval(`window.voicegate.chat.answer`, &answer)
		if outcome != "completed" || !strings.Contains(answer, question) {
			t.Errorf("outcome %q, answer %q; want completed, quoting the question", outcome, answer)
		}
		if shown := p.text("#answer"); shown != answer {
			t.Errorf("the page shows %q, want the streamed answer %q", shown, answer)
		}
		// The log has one short line per event — its name, id and time — and the event's JSON
		// only once that line is clicked.
		var lines []string
		p.eval(`[...document.querySelectorAll("#chat-log > li.event")].map(li => li.querySelector("summary").textContent)`, &lines)
		if len(lines) != len(evs) {
			t.Fatalf("the log has %d lines for %d events: %q", len(lines), len(evs), lines)
		}
		for i, l := range lines {
			if !strings.Contains(l, evs[i].Name) || !strings.Contains(l, strconv.Itoa(int(evs[i].T))+" ms") || strings.Contains(l, "{") {
				t.Errorf("log line %d is %q, want %s and its time (%v ms), without the JSON", i, l, evs[i].Name, evs[i].T)
			}
		}
		if !strings.Contains(lines[1], "#1") {
			t.Errorf("log line 1 is %q, want the event's id #1", lines[1])
		}
		if p.visible("#chat-log > li:nth-child(2) pre") {
			t.Error("an event's JSON is shown before it is asked for")
		}
		p.click("#chat-log > li:nth-child(2) summary")
		if !p.visible("#chat-log > li:nth-child(2) pre") {
			t.Fatal("clicking an event does not show its JSON")
		}
		// The JSON is written on the details' toggle event, which the browser fires after the
		// click, as a task of its own.
		p.waitFor("the event's JSON to be written", `document.querySelector("#chat-log > li:nth-child(2) pre").textContent !== ""`)
		var data map[string]any
		if err := json.Unmarshal([]byte(p.text("#chat-log > li:nth-child(2) pre")), &data); err != nil || data["line_number"] != 1.0 {
			t.Errorf("the event's JSON %v (%v), want its data with line_number 1", data, err)
		}
		shot.take(p, "chat-done")
		if st := p.status("#chat-status"); st.State != "ok" || !strings.Contains(st.Text, "done") {
			t.Errorf("chat status %+v, want done, shown as ok", st)
		}
		if errs := p.consoleErrors(); len(errs) > 0 {
			t.Errorf("console errors: %q", errs)
		}
	})

	t.Run("cancel ends the stream", func(t *testing.T) {
		p := b.open(t, url)
		p.click("#send")
		p.waitFor("the answer to begin", `window.voicegate.chat.events.some(e => e.name === "generation_chunk")`)
		p.click("#cancel")
		p.waitFor("the stream to end", `!window.voicegate.chat.running`)
		var evs []chatEvent
		p.eval(`window.voicegate.chat.events`, &evs)
		names := make([]string, len(evs))
		for i, e := range evs {
			names[i] = e.Name
		}
		if names[len(names)-1] != "stream_cancelled" || slices.Contains(names, "generation_done") {
			t.Errorf("events %v, want stream_cancelled last, without generation_done", names)
		}
		if got := p.text("#chat-status"); got != "cancelled" {
			t.Errorf("chat status %q, want cancelled", got)
		}
	})

	t.Run("the README's fetch() stream reader works", func(t *testing.T) {
		readme, err := os.ReadFile("docs/chat.md")
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile("(?s)## Reading a stream from a browser\n.*?```js\n(.*?)```").FindSubmatch(readme)
		if m == nil {
			t.Fatal("docs/chat.md has no js block under ## Reading a stream from a browser")
		}
		snippet := strings.ReplaceAll(string(m[1]), "http://127.0.0.1:8080", g.URL)
		p := b.open(t, g.URL+"/console")
		// The snippet logs each event; the page collects what it logs.
		expr := `(async () => { const token = ` + strconv.Quote(demoToken) + `; const seen = []; const log = console.log;
			console.log = (event, data) => seen.push(event + " " + data.request_id);
			try { ` + snippet + ` } finally { console.log = log; } return seen; })()`
		seen, err := chromedp.Run(p.ctx, chromedp.Evaluate[[]string](expr, chromedp.EvalAwaitPromise))
		if err != nil {
			t.Fatalf("running the README's snippet: %v", err)
		}
		if len(seen) < 5 || !strings.HasPrefix(seen[0], "stream_start ") || !strings.HasPrefix(seen[len(seen)-1], "stream_end ") ||
			!slices.ContainsFunc(seen, func(s string) bool { return strings.HasPrefix(s, "generation_chunk ") }) {
			t.Errorf("the snippet logged %q, want stream_start, generation_chunk… and stream_end", seen)
		}
	})

	t.Run("a refused chat shows the error", func(t *testing.T) {
		p := b.open(t, g.URL+"/console#token=not-a-token")
		p.click("#send")
		p.waitFor("the refusal", `!window.voicegate.chat.running && window.voicegate.chat.error !== ""`)
		bad := p.status("#chat-status")
		if !strings.Contains(bad.Text, "401 TOKEN_INVALID") {
			t.Errorf("chat status %q, want the status and code of the refusal", bad.Text)
		}
		shot.take(p, "chat-refused")
		// The words come with a colour of their own: a refusal does not look like success.
		q := b.open(t, url)
		idle := q.status("#chat-status")
		q.click("#send")
		q.waitFor("the stream to end", `window.voicegate.chat.outcome !== "" && !window.voicegate.chat.running`)
		ok := q.status("#chat-status")
		if bad.State != "bad" || ok.State != "ok" || idle.State != "idle" {
			t.Errorf("states %q, %q, %q; want bad, ok and idle", bad.State, ok.State, idle.State)
		}
		if bad.Color == ok.Color || bad.Background == ok.Background || ok.Background == idle.Background {
			t.Errorf("a refusal (%+v), success (%+v) and idle (%+v) are not told apart by colour", bad, ok, idle)
		}
	})

	t.Run("a voice session sends the microphone and plays the answer", func(t *testing.T) {
		p := b.open(t, url)
		p.click("#mic")
		p.waitFor("a second of microphone audio sent", `window.voicegate.voice.open && window.voicegate.voice.audioMs >= 1000`)
		p.waitFor("recognition of it", `window.voicegate.voice.messages.some(m => m.startsWith("asr_partial"))`)
		// The level of what the microphone hears is shown while talking: the fake microphone's
		// tone is at -11.7 dBFS, near the top of the meter's 60 dB.
		var level float64
		p.eval(`document.getElementById("mic-level").value`, &level)
		if !p.visible("#mic-level") || level < 0.6 || level > 0.95 {
			t.Errorf("the microphone level meter: shown %v, at %.2f; want it shown, at about 0.8", p.visible("#mic-level"), level)
		}
		shot.take(p, "voice-talking")
		p.click("#mic")
		p.waitFor("the meter to go when talking stops", `getComputedStyle(document.getElementById("mic-level")).display === "none" || document.getElementById("mic-level").getClientRects().length === 0`)
		p.waitFor("the spoken answer to play", `window.voicegate.voice.messages.some(m => m.startsWith("tts_complete")) && `+
			`window.voicegate.voice.ttsFrames > 0 && window.voicegate.voice.buffersPlayed === window.voicegate.voice.ttsFrames`)
		var v struct {
			FramesSent, BytesSent, TTSFrames, TTSSamples, BuffersPlayed int
			PlayedMs, AudioMs                                           float64
			Format                                                      string
			TalkMs                                                      []float64
		}
		p.eval(`({FramesSent: voicegate.voice.framesSent, BytesSent: voicegate.voice.bytesSent, TTSFrames: voicegate.voice.ttsFrames,
			TTSSamples: voicegate.voice.ttsSamples, BuffersPlayed: voicegate.voice.buffersPlayed, PlayedMs: voicegate.voice.playedMs,
			AudioMs: voicegate.voice.audioMs, Format: voicegate.voice.format, TalkMs: voicegate.voice.talkMs})`, &v)
		// Chromium records Opus: the page sends its raw packets, unpacked from MediaRecorder's
		// WebM, as an Opus session; about a tenth of PCM's bytes for the same audio.
		if v.Format != "opus/48000/1" {
			t.Errorf("the session's format is %q, want opus/48000/1 (Chromium records Opus)", v.Format)
		}
		talk := v.TalkMs[0]
		t.Logf("talked %.0f ms: %d Opus packets, %d bytes, %.0f ms of audio by their TOC bytes", talk, v.FramesSent, v.BytesSent, v.AudioMs)
		if v.AudioMs < talk*0.75-100 || v.AudioMs > talk+100 {
			t.Errorf("%.0f ms of Opus sent in %.0f ms of talking", v.AudioMs, talk)
		}
		if v.BytesSent > v.FramesSent*200 {
			t.Errorf("%d bytes in %d packets: not the Opus of 24 kbit/s", v.BytesSent, v.FramesSent)
		}
		if v.TTSSamples < 8000 || v.PlayedMs < 500 {
			t.Errorf("played %d TTS samples, %.0f ms, want at least half a second", v.TTSSamples, v.PlayedMs)
		}
		if got := p.text("#tts-played"); got == "0 ms" {
			t.Errorf("the page shows %q of TTS audio played", got)
		}
		if got := p.text("#voice-answer"); !strings.Contains(got, "voicegate bridges") {
			t.Errorf("the spoken answer's text %q is not shown", got)
		}
		p.click("#hangup")
		p.waitFor("the close", `window.voicegate.voice.closes.length === 1`)
		var code int
		p.eval(`window.voicegate.voice.closes[0].code`, &code)
		if code != 1000 {
			t.Errorf("the session closed %d, want 1000", code)
		}
		if got := p.text("#voice-status"); !strings.Contains(got, "1000") || !strings.Contains(got, "normal end") {
			t.Errorf("voice status %q, want 1000 and its meaning", got)
		}
		// The gateway saw the page's frames (other subtests' sessions end on the same gateway).
		var id string
		p.eval(`window.voicegate.voice.sessionId`, &id)
		var rec map[string]any
		eventually(t, 2*time.Second, "the session's log line", func() bool {
			for _, r := range logRecords(t, g) {
				if r["msg"] == "voice session ended" && r["session_id"] == id {
					rec = r
					return true
				}
			}
			return false
		})
		if in, _ := rec["packets_in"].(float64); int(in) < v.FramesSent {
			t.Errorf("the gateway counted %v packets in, want at least the page's %d frames", rec["packets_in"], v.FramesSent)
		}
		// The gateway metered the packets exactly as the page counted them, and found none
		// invalid.
		var usage map[string]any
		for _, r := range logRecords(t, g) {
			if r["msg"] == "voice usage" && r["session_id"] == id {
				usage = r
			}
		}
		if sec, _ := strconv.ParseFloat(fmt.Sprint(usage["audio_seconds_in"]), 64); usage["audio_format"] != "opus/48000/1" ||
			usage["invalid_audio"] != "0" || math.Abs(sec*1000-v.AudioMs) > 0.001 {
			t.Errorf("usage record %v, want opus/48000/1, no invalid audio and the page's %.0f ms", usage, v.AudioMs)
		}
		if errs := p.consoleErrors(); len(errs) > 0 {
			t.Errorf("console errors: %q", errs)
		}
	})

	// Barge-in: the spoken answer (paced by the gateway) plays; the stop-speaker button, or the
	// user's voice picked up by the page's voice-activity detection, interrupts it. The speaker
	// goes silent at once and stays silent although most of the answer was still to come; the
	// gateway answers tts_flushed with what was heard.
	for _, by := range []string{"button", "voice activity"} {
		t.Run("an interrupt by "+by+" silences the speaker", func(t *testing.T) {
			p := b.open(t, url)
			p.click("#mic")
			p.waitFor("a second of microphone audio sent", `window.voicegate.voice.open && window.voicegate.voice.audioMs >= 1000`)
			p.click("#mic") // stop talking: the demo answers with 2.8 s of speech
			p.waitFor("half a second of the answer to play", `window.voicegate.voice.playedMs >= 500 && window.voicegate.voice.outputLevel > 0.001`)
			if by == "button" {
				p.click("#interrupt")
			} else {
				p.click("#mic") // the user talks over the answer: the fake microphone's tone
			}
			p.waitFor("the interrupt and the gateway's tts_flushed", `window.voicegate.voice.interrupts.length === 1 && window.voicegate.voice.flushed.length === 1`)
			// Wait out twice the lead: a speaker still fed would have played on meanwhile.
			p.waitFor("half a second after the interrupt", `performance.now() - window.voicegate.voice.interrupts[0].at > 500`)
			var v struct {
				Interrupts []struct {
					At float64
					By string
				}
				Flushed []struct {
					At       float64
					PlayedMs float64 `json:"played_ms"`
				}
				LastSound, OutputLevel, PlayedMs float64
				BuffersPlayed, Sources           int
			}
			p.eval(`({Interrupts: voicegate.voice.interrupts, Flushed: voicegate.voice.flushed, LastSound: voicegate.voice.lastSound,
				OutputLevel: voicegate.voice.outputLevel, PlayedMs: voicegate.voice.playedMs, BuffersPlayed: voicegate.voice.buffersPlayed})`, &v)
			in := v.Interrupts[0]
			t.Logf("interrupted by %s at %.0f ms of speech; last sound %.0f ms after it; the gateway says %.0f ms were heard, tts_flushed %.0f ms after the interrupt",
				in.By, v.PlayedMs, v.LastSound-in.At, v.Flushed[0].PlayedMs, v.Flushed[0].At-in.At)
			if in.By != by {
				t.Errorf("the interrupt came from %q, want %q", in.By, by)
			}
			// Silent within a frame and the analyser's window (an animation frame samples it).
			if v.OutputLevel != 0 || v.LastSound-in.At > 100 {
				t.Errorf("the speaker played %.0f ms after the interrupt, and plays at %.4f now; want silence", v.LastSound-in.At, v.OutputLevel)
			}
			if v.PlayedMs > 2000 {
				t.Errorf("%.0f ms of the answer played, want it cut short", v.PlayedMs)
			}
			// What the gateway takes to be heard and what the page finished playing agree within
			// the lead and the page's own delays (a buffer under way is not yet counted as
			// played; the output starts a moment after a frame arrives).
			if d := v.Flushed[0].PlayedMs - v.PlayedMs; d < -100 || d > 400 {
				t.Errorf("the gateway says %.0f ms were heard, the page played %.0f", v.Flushed[0].PlayedMs, v.PlayedMs)
			}
			if errs := p.consoleErrors(); len(errs) > 0 {
				t.Errorf("console errors: %q", errs)
			}
		})
	}

	t.Run("a revoked token ends the session with 4401", func(t *testing.T) {
		tok := w.token(t, "u-console-revoked", []string{"user"}, nil)
		p := b.open(t, g.URL+"/console#token="+tok)
		p.click("#mic")
		p.waitFor("the session to open", `window.voicegate.voice.open`)
		wantStatus(t, call(t, g, "POST", "/api/v2/auth/revoke", tok, ""), http.StatusOK)
		p.waitFor("the close", `window.voicegate.voice.closes.length === 1`)
		var code int
		p.eval(`window.voicegate.voice.closes[0].code`, &code)
		if code != 4401 {
			t.Errorf("closed %d, want 4401", code)
		}
		if got := p.text("#voice-status"); !strings.Contains(got, "4401") || !strings.Contains(got, "revoked") {
			t.Errorf("voice status %q, want 4401 and its meaning", got)
		}
	})

	t.Run("a page from a disallowed origin is refused and shows why", func(t *testing.T) {
		// A console elsewhere that may use this gateway, which does not allow that origin.
		mux := http.NewServeMux()
		h := console.Handler(console.Options{Gateways: []string{g.URL}})
		mux.Handle("GET /console", h)
		mux.Handle("GET /console/{file}", h)
		other := httptest.NewServer(mux)
		defer other.Close()
		p := b.open(t, fmt.Sprintf("%s/console?gateway=%s#token=%s", other.URL, g.URL, demoToken))
		if got := p.text("#origin-note"); !strings.Contains(got, "CORS_ORIGINS") {
			t.Errorf("the page does not say that its origin must be allowed: %q", got)
		}
		p.click("#mic")
		p.waitFor("the refusal", `window.voicegate.voice.closes.length === 1`)
		var code int
		p.eval(`window.voicegate.voice.closes[0].code`, &code)
		if code != 4403 {
			t.Errorf("closed %d, want 4403", code)
		}
		if got := p.text("#voice-status"); !strings.Contains(got, "PERMISSION_DENIED") || !strings.Contains(got, "origin not allowed") ||
			!strings.Contains(got, "4403") {
			t.Errorf("voice status %q, want the refusal's code, reason and close code", got)
		}
		// Chat from there is refused by the CORS preflight, which no script can read: the page
		// says what that most likely means.
		p.click("#send")
		p.waitFor("the chat request to fail", `!window.voicegate.chat.running && window.voicegate.chat.error !== ""`)
		if got := p.text("#chat-status"); !strings.Contains(got, "CORS_ORIGINS") || !strings.Contains(got, other.URL) {
			t.Errorf("chat status %q, want it to name CORS_ORIGINS and this page's origin", got)
		}
	})

	t.Run("a gateway not listed gets nothing, not even from a script", func(t *testing.T) {
		// A real server where ?gateway= points: it must never hear from the page.
		var heard atomic.Int64
		elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			heard.Add(1)
			w.Header().Set("Access-Control-Allow-Origin", "*")
			w.Header().Set("Access-Control-Allow-Headers", "*")
		}))
		defer elsewhere.Close()
		p := b.open(t, g.URL+"/console?gateway="+elsewhere.URL+"#token="+demoToken)
		if got := p.text("#origin-note"); !strings.Contains(got, "Refused") || !strings.Contains(got, elsewhere.URL) ||
			!strings.Contains(got, "Nothing was sent") {
			t.Errorf("the page does not say that it refused %s: %q", elsewhere.URL, got)
		}
		var sendDisabled, micDisabled bool
		p.eval(`document.getElementById("send").disabled`, &sendDisabled)
		p.eval(`document.getElementById("mic").disabled`, &micDisabled)
		if !sendDisabled || !micDisabled {
			t.Errorf("send disabled %v, microphone disabled %v: want both off", sendDisabled, micDisabled)
		}
		// Asking anyway: the chat form submitted and the microphone pressed by script.
		p.do("asking anyway", chromedp.Evaluate[chromedp.Void](`document.getElementById("chat-form").requestSubmit();
			const mic = document.getElementById("mic"); mic.disabled = false; mic.click();`))
		p.waitFor("both to give up", `!window.voicegate.chat.running && (window.voicegate.voice.closes.length > 0 ||
			document.getElementById("voice-status").textContent.includes("Refused"))`)
		if got := p.text("#voice-status"); !strings.Contains(got, "Refused") {
			t.Errorf("voice status %q, want the refusal", got)
		}
		// A fault in the script, or one injected, that sends there anyway: the policy blocks it.
		probe := `new Promise((resolve) => {
			const out = [];
			const settle = () => { if (out.length === 2) resolve(out); };
			fetch(` + strconv.Quote(elsewhere.URL+"/probe") + `, { method: "POST", headers: { Authorization: "Bearer x" }, body: "x" })
				.then(() => out.push("fetch sent"), (e) => out.push("fetch " + e.name)).then(settle);
			try {
				const ws = new WebSocket(` + strconv.Quote("ws"+strings.TrimPrefix(elsewhere.URL, "http")+"/ws") + `);
				ws.onerror = () => { out.push("websocket failed"); settle(); };
				ws.onopen = () => { out.push("websocket open"); settle(); };
			} catch (e) {
				out.push("websocket " + e.name);
				settle();
			}
		})`
		outcome, err := chromedp.Run(p.ctx, chromedp.Evaluate[[]string](probe, chromedp.EvalAwaitPromise))
		if err != nil {
			t.Fatalf("probing: %v", err)
		}
		if slices.Contains(outcome, "fetch sent") || slices.Contains(outcome, "websocket open") {
			t.Errorf("the page reached the other server: %q", outcome)
		}
		// Every attempt has settled (a request that went out would have reached the server
		// before its answer settled the promise), so the count is final.
		if n := heard.Load(); n != 0 {
			t.Errorf("the server at ?gateway= received %d requests, want none", n)
		}
		var href string
		var entries int
		p.eval(`location.href`, &href)
		p.eval(`history.length`, &entries)
		if strings.Contains(href, demoToken) || strings.Contains(href, "token=") {
			t.Errorf("location.href still holds the token: %.80q…", href)
		}
		hist, err := chromedp.Run(p.ctx, func(ctx context.Context, tg *chromedp.Target) (*cdppage.GetNavigationHistoryResult, error) {
			res, err := cdp.Call(ctx, tg, cdppage.GetNavigationHistory, cdp.Empty{})
			return &res, err
		})
		if err != nil {
			t.Fatalf("reading the tab's history: %v", err)
		}
		// The tab's entries are those of history.length: the blank page it opened with, and the
		// console's, whose URL was replaced.
		if len(hist.Entries) != entries {
			t.Errorf("the tab has %d history entries, the page sees %d", len(hist.Entries), entries)
		}
		for _, e := range hist.Entries {
			t.Logf("history entry %d: %.80q", e.ID, e.URL)
			if strings.Contains(e.URL, demoToken) || strings.Contains(e.URL, "token=") {
				t.Errorf("the tab's history entry %d holds the token: %.80q…", e.ID, e.URL)
			}
		}
		if !slices.ContainsFunc(hist.Entries, func(e *cdppage.NavigationEntry) bool { return strings.HasPrefix(e.URL, g.URL+"/console?gateway=") }) {
			t.Errorf("no history entry is the console's")
		}
	})

	t.Run("a listed gateway gets the chat", func(t *testing.T) {
		// The page comes from a server of its own, whose address is known before it starts;
		// the gateway allows that origin, and the page's server lists the gateway.
		host := httptest.NewUnstartedServer(nil)
		defer host.Close()
		algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
			ndjson(w, `{"type":"generation_chunk","content":"from the listed gateway"}`, `{"type":"generation_done"}`)
		})
		gw := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "http://" + host.Listener.Addr().String()})
		mux := http.NewServeMux()
		h := console.Handler(console.Options{Gateways: []string{gw.URL}})
		mux.Handle("GET /console", h)
		mux.Handle("GET /console/{file}", h)
		host.Config.Handler = mux
		host.Start()
		tok := w.token(t, "u-console-listed", []string{"user"}, nil)
		p := b.open(t, host.URL+"/console?gateway="+gw.URL+"#token="+tok)
		if got := p.text("#gateway"); got != gw.URL {
			t.Errorf("the console talks to %q, want the listed gateway %s", got, gw.URL)
		}
		p.click("#send")
		p.waitFor("the stream to end", `window.voicegate.chat.outcome !== "" && !window.voicegate.chat.running`)
		var answer string
		p.eval(`window.voicegate.chat.answer`, &answer)
		if answer != "from the listed gateway" {
			t.Errorf("answer %q, want the listed gateway's", answer)
		}
		algo.only(t)
		var href string
		p.eval(`location.href`, &href)
		if strings.Contains(href, tok) {
			t.Errorf("location.href still holds the token")
		}
	})

	t.Run("reconnects when the algorithm service restarts", func(t *testing.T) {
		// The first session's algorithm service closes 1012 (restarting) once it is told to
		// start; the console reconnects, and the second session stays open.
		var sessions atomic.Int64
		testDone := t.Context()
		algo := newAlgo(t, algoOptions{Voice: func(w http.ResponseWriter, r *http.Request) {
			c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{voiceSubprotocol}})
			if err != nil {
				return
			}
			defer c.CloseNow()
			first := sessions.Add(1) == 1
			for {
				_, msg, err := c.Read(testDone)
				if err != nil {
					return
				}
				if first && strings.Contains(string(msg), `"type":"start"`) {
					_ = c.Close(websocket.StatusServiceRestart, "restarting")
					return
				}
			}
		}})
		gr := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CONSOLE_ENABLED": "true"})
		tok := w.token(t, "u-console-reconnect", []string{"user"}, nil)
		p := b.open(t, gr.URL+"/console#token="+tok)
		p.click("#mic")
		p.waitFor("the first session to close 1012", `window.voicegate.voice.closes.length === 1`)
		var first struct {
			Code int `json:"code"`
		}
		p.eval(`window.voicegate.voice.closes[0]`, &first)
		if first.Code != 1012 {
			t.Fatalf("the first session closed %d, want 1012", first.Code)
		}
		var firstID string
		p.eval(`window.voicegate.voice.sessionId`, &firstID)
		p.waitFor("a new session", `window.voicegate.voice.open && window.voicegate.voice.sessionId !== `+strconv.Quote(firstID))
		if n := sessions.Load(); n != 2 {
			t.Errorf("the algorithm service saw %d sessions, want 2", n)
		}
		if got := p.text("#voice-log"); !strings.Contains(got, "reconnecting") || !strings.Contains(got, "restarting") {
			t.Errorf("the message log does not show the restart and the reconnect: %q", got)
		}
		// Hang up is offered once the new session's microphone has started, a moment after
		// the session opened: a click on the disabled button would do nothing.
		p.waitFor("hang up to be offered", `!document.getElementById("hangup").disabled`)
		p.click("#hangup")
		p.waitFor("the close", `window.voicegate.voice.closes.length === 2`)
	})

	t.Run("the microphone arrives as 16 kHz PCM16", func(t *testing.T) {
		// The algorithm service keeps the audio of the session: the fake microphone's 440 Hz
		// tone must be in it at 440 Hz, which it is only if the page resampled to 16 kHz.
		var mu sync.Mutex
		var pcm []byte
		rates := map[float64]bool{}
		algo := newAlgo(t, algoOptions{Replier: func() voiceReplier {
			return func(_ websocket.MessageType, msg []byte) []voiceFrame {
				var m struct {
					Type       string  `json:"type"`
					Audio      string  `json:"audio_chunk"`
					SampleRate float64 `json:"sample_rate"`
				}
				if json.Unmarshal(msg, &m) != nil || m.Type != "audio_chunk" {
					return nil
				}
				b, _ := base64.StdEncoding.DecodeString(m.Audio)
				mu.Lock()
				pcm = append(pcm, b...)
				rates[m.SampleRate] = true
				mu.Unlock()
				return nil
			}
		}})
		gr := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CONSOLE_ENABLED": "true"})
		p := b.open(t, gr.URL+"/console#token="+w.token(t, "u-console-tone", []string{"user"}, nil))
		p.click("#opus") // PCM, whose samples the test can read
		p.click("#mic")
		p.waitFor("two seconds of audio sent", `window.voicegate.voice.framesSent >= 100`)
		p.click("#hangup")
		p.waitFor("the close", `window.voicegate.voice.closes.length === 1`)
		eventually(t, 2*time.Second, "the audio at the algorithm service", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(pcm) >= 100*640
		})
		mu.Lock()
		defer mu.Unlock()
		if len(rates) != 1 || !rates[16000] {
			t.Errorf("audio_chunk sample rates %v, want 16000", rates)
		}
		// The last second: after the capture's start-up.
		tail := pcm[len(pcm)-32000:]
		at, off := toneLevel(tail, 16000, 440), toneLevel(tail, 16000, 600)
		if at < 0.02 || at < 10*off {
			t.Errorf("the tone's level at 440 Hz is %.4f (at 600 Hz %.4f), want it clearly there", at, off)
		}
		// Had the page sent the capture's own rate (48 kHz) as 16 kHz, the tone would sit at
		// a third of its frequency.
		if low := toneLevel(tail, 16000, 147); low > at/10 {
			t.Errorf("level at 147 Hz %.4f against %.4f at 440 Hz: the audio is at the wrong rate", low, at)
		}
	})
}
