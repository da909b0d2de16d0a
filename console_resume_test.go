package main

import (
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
)

// TestConsoleResumesInBrowser: the console in Chromium, with its fake microphone, talks to the
// demo's algorithm service through a load balancer in front of two gateway processes on one
// redis-server. While the answer streams in, the instance serving the page is killed (SIGKILL)
// and the balancer sends what comes next to the other one: the console resumes the same session
// by itself, its microphone talks again, and once the user stops talking the TTS arrives and
// plays.
func TestConsoleResumesInBrowser(t *testing.T) {
	t.Parallel()
	b := startBrowser(t)
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{Voice: newDemoVoices().ServeHTTP})
	env := resumeEnv(r, algo.URL, map[string]string{"CONSOLE_ENABLED": "true"})
	a, other := startChildGateway(t, env), startChildGateway(t, env)

	// The balancer: a ReverseProxy (it relays WebSocket upgrades) to whichever instance is
	// current, keeping the page's Host, so that the page's origin is the gateway's own.
	var target atomic.Pointer[url.URL]
	au, _ := url.Parse(a.url)
	target.Store(au)
	lb := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target.Load())
		pr.Out.Host = pr.In.Host
	}})
	t.Cleanup(lb.Close)

	tok := tokenFor(t, "u-console-resume", []string{"user"}, nil)
	p := b.open(t, lb.URL+"/console#token="+tok)
	// A loaded machine may refuse the first upgrade with 503 (the revocation store's budget
	// missed): a person clicks again, and so does this test.
	for try := 0; ; try++ {
		p.click("#mic")
		p.waitFor("the session to open or be refused", `window.voicegate.voice.open || window.voicegate.voice.closes.length > `+strconv.Itoa(try))
		var open bool
		p.eval(`window.voicegate.voice.open`, &open)
		if open {
			break
		}
		if try == 4 {
			t.Fatal("the session did not open in five tries")
		}
		p.waitFor("the microphone button", `!document.getElementById("mic").disabled`)
	}
	// The demo answers three seconds of audio: its words stream in, the speech after them.
	p.waitFor("the answer to begin", `window.voicegate.voice.messages.some(m => m.startsWith("llm_response_chunk"))`)
	var id string
	p.eval(`window.voicegate.voice.sessionId`, &id)
	var before struct {
		TTSFrames int `json:"ttsFrames"`
	}
	p.eval(`window.voicegate.voice`, &before)

	ou, _ := url.Parse(other.url)
	target.Store(ou)
	a.kill()

	p.waitFor("the session to resume", `window.voicegate.voice.resumes >= 1 && window.voicegate.voice.open`)
	var after string
	p.eval(`window.voicegate.voice.sessionId`, &after)
	if after != id {
		t.Errorf("the console is in session %q after the resume, want the same session %q", after, id)
	}
	// The conversation goes on: the microphone is on again, and its audio reaches the service.
	var framesAtResume int
	p.eval(`window.voicegate.voice.framesSent`, &framesAtResume)
	p.waitFor("the microphone to talk again", `window.voicegate.voice.framesSent > `+strconv.Itoa(framesAtResume)+
		` && document.getElementById("mic").textContent === "Stop talking"`)
	// The user stops talking to hear the answer, as a person does: talking over it is a
	// barge-in, which the console's voice-activity detection turns into an interrupt that
	// silences the speech (docs/voice.md#barge-in).
	p.click("#mic")
	p.waitFor("the speech to arrive and play", `window.voicegate.voice.ttsFrames > `+strconv.Itoa(before.TTSFrames+20)+
		` && window.voicegate.voice.buffersPlayed > 0`)
	p.waitFor("the answer to complete", `window.voicegate.voice.messages.some(m => m.startsWith("tts_complete"))`)
	var closes []struct {
		Code int `json:"code"`
	}
	p.eval(`window.voicegate.voice.closes`, &closes)
	if len(closes) == 0 || closes[len(closes)-1].Code != 1006 {
		t.Errorf("closes %v, want the last the 1006 of the killed instance", closes)
	}
	if got := p.text("#voice-log"); !strings.Contains(got, "resuming") || !strings.Contains(got, "session_resumed") {
		t.Errorf("the message log does not show the resume: %q", clipText(got))
	}
	var msgs []string
	p.eval(`window.voicegate.voice.messages`, &msgs)
	t.Logf("the console's log: %s", clipText(strings.Join(msgs, " | ")))
	p.click("#hangup")
	p.waitFor("the close", `window.voicegate.voice.closes.length === `+strconv.Itoa(len(closes)+1))
}
