package main

// Resuming together with paced TTS, audio formats and the realtime dialect: the numbered
// downlink is the one writer that paced TTS, the gateway's own messages and a dialect's
// translated events all go through.

import (
	"context"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestVoiceResumePacedTTS: a session agreed on 8 kHz PCM, with TTS paced, is cut (RST) while the
// pacer holds most of an answer the service sent faster than real time, and resumes on the
// other instance. What the pacer held is released into the log on its clock and, at the
// handover, at once: the client gets every message exactly once, each kind in the service's
// order. The session's one usage record has its resume and its TTS seconds in the agreed format
// (40 frames of 640 bytes: 40 ms each at 8 kHz, not the 20 ms they would be at the default
// 16 kHz), counted across both instances.
func TestVoiceResumePacedTTS(t *testing.T) {
	r := startRedis(t)
	const burst = 80 // 40 text messages and 40 TTS frames, one a millisecond
	algo := newNumberingAlgo(t, burst, time.Millisecond)
	env := resumeEnv(r, algo.URL, map[string]string{"VOICE_TTS_PACING": "true", "VOICE_TTS_LEAD": "100ms"})
	a, b := startChildGateway(t, env), startChildGateway(t, env)

	c := openResumingWith(t, a.url, tokenFor(t, "u-paced", []string{"user"}, nil),
		"?conversation_id=c-paced&format=pcm&sample_rate=8000")
	if err := c.send(`{"type":"stop"}`); err != nil {
		t.Fatal(err)
	}
	if err := c.readUntil(2); err != nil { // the first TTS frame
		t.Fatal(err)
	}
	// The service sent its whole answer within some 100 ms; the pacer releases 1.6 s of speech
	// at playback rate, so at the cut it holds most of it.
	ttsBefore := 0
	for _, k := range c.got {
		if k%2 == 0 {
			ttsBefore++
		}
	}
	c.cut()
	if ttsBefore >= burst/4 {
		t.Fatalf("%d of %d TTS frames reached the client before the cut: the pacer held too little for the test to mean anything", ttsBefore, burst/2)
	}
	received := len(c.got)
	// The whole answer reaches the old instance before the resume, so that the handover finds
	// most of its speech still in the pacer.
	eventually(t, 5*time.Second, "the service to send its whole answer", func() bool { return algo.sent(c.id) >= burst })
	res, _, err := c.resume(b.url)
	if err != nil {
		t.Fatal(err)
	}
	// Everything after the cut was the old instance's, numbered by it, logged and sealed: the
	// TTS its pacer held included.
	if want := int64(burst - received); res.Replayed != want {
		t.Errorf("session_resumed replayed %d, want the %d messages the client had not received", res.Replayed, want)
	}
	if err := c.readUntil(burst); err != nil {
		t.Fatalf("after resuming (replayed %d): %v", res.Replayed, err)
	}
	c.wantAll(t, burst)
	t.Logf("%d TTS frames before the cut; resumed at last_seq %d, %d replayed", ttsBefore, res.LastSeq, res.Replayed)

	c.conn.Close(websocket.StatusNormalClosure, "done")
	eventually(t, 5*time.Second, "one usage record", func() bool { return len(resumeUsage(t, r, c.id)) == 1 })
	u := resumeUsage(t, r, c.id)[0]
	if u["resumes"] != "1" || u["audio_format"] != "pcm/8000/1" {
		t.Errorf("usage record resumes %q, audio_format %q; want 1, pcm/8000/1: %v", u["resumes"], u["audio_format"], u)
	}
	// Carried across the handover as seconds (a float): exact to well within a frame.
	out, _ := strconv.ParseFloat(u["audio_seconds_out"], 64)
	if want := float64(burst/2) * 0.040; math.Abs(out-want) > 0.001 {
		t.Errorf("usage record audio_seconds_out %v, want %v (every TTS frame once, at 8 kHz)", out, want)
	}
}

// sent is how many messages the service has written to session id.
func (a *numberingAlgo) sent(id string) int {
	a.mu.Lock()
	s := a.sessions[id]
	a.mu.Unlock()
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next - 1
}

// TestRealtimeNotResumable: the Realtime API has no resume, and its sessions are not resumable
// with resuming on: session.created carries no resume token, a resume on the route is refused
// before the upgrade, and a client whose connection is cut (RST) ends its session at once
// rather than leaving it to wait for a resume.
func TestRealtimeNotResumable(t *testing.T) {
	algo := realtimeAlgo(t, 4800)
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "VOICE_RESUME_WINDOW": "30s"})
	tok := tokenFor(t, "u-rt-resume", []string{"user"}, nil)
	admin := tokenFor(t, "u-admin", []string{"admin"}, nil)

	var sock *net.TCPConn
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			sock = nc.(*net.TCPConn)
		}
		return nc, err
	}}
	conn, _, err := websocket.Dial(ctx, "ws://"+g.Addr+"/v1/realtime?model=m", &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: tr}, Subprotocols: []string{"realtime"}, HTTPHeader: bearer(tok)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	_, created, err := conn.Read(ctx)
	if err != nil || !strings.Contains(string(created), `"type":"session.created"`) {
		t.Fatalf("first event %s (%v), want session.created", created, err)
	}
	if strings.Contains(string(created), "resume") {
		t.Errorf("session.created offers a resume: %s", created)
	}
	if n := len(listVoice(t, g, admin).Sessions); n != 1 {
		t.Fatalf("%d live sessions, want the realtime one", n)
	}

	_, res, err := websocket.Dial(ctx, "ws://"+g.Addr+"/v1/realtime?model=m&resume_token=ABCDEFGHIJKLMNOPQRSTUVWXYZ&last_seq=0",
		&websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{}}, Subprotocols: []string{"realtime"},
			HTTPHeader: bearer(tok)})
	if err == nil || res == nil || res.StatusCode != http.StatusNotFound {
		status := 0
		if res != nil {
			status = res.StatusCode
		}
		t.Errorf("a resume on /v1/realtime: status %d (%v), want 404", status, err)
	}

	_ = sock.SetLinger(0)
	_ = sock.Close()
	eventually(t, 5*time.Second, "the realtime session to end with its client", func() bool {
		return len(listVoice(t, g, admin).Sessions) == 0
	})
}
