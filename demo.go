package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
	"voicegate/proxy"

	"github.com/coder/websocket"
)

// demoAlgo is the fake algorithm service behind -demo: it answers POST /query with a believable
// NDJSON stream (retrieval, then generation chunks a few tens of milliseconds apart, then
// generation_done), on loopback only. It exists so a first look needs nothing else; it knows
// nothing about language. "voicegate demo-algo" serves it alone, for the compose topology.
type demoAlgo struct {
	URL *url.URL
	srv *http.Server
}

// demoModel is the model the demo's OpenAI-compatible routes list and take.
const demoModel = "voicegate-demo"

// demoChunkDelay paces generation chunks like a model producing tokens.
const demoChunkDelay = 40 * time.Millisecond

// startDemo serves the fake service on addr ("127.0.0.1:0" behind -demo).
func startDemo(logger *slog.Logger, addr string) (*demoAlgo, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /query", demoQuery)
	mux.Handle("GET /voice/stream", newDemoVoices())
	// For the container health check (voicegate -healthcheck) of demo-algo.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		proxy.WriteJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug)}
	go func() { _ = srv.Serve(ln) }()
	logger.Warn("DEMO MODE: a built-in fake algorithm service answers; never use it in production",
		"algo_addr", ln.Addr().String())
	return &demoAlgo{URL: &url.URL{Scheme: "http", Host: ln.Addr().String()}, srv: srv}, nil
}

// Close stops the fake service and its streams.
func (d *demoAlgo) Close() error { return d.srv.Close() }

type demoQueryBody struct {
	Messages []struct {
		Content string `json:"content"`
	} `json:"messages"`
	Model string `json:"model"`
}

func demoQuery(w http.ResponseWriter, r *http.Request) {
	var q demoQueryBody
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&q); err != nil || len(q.Messages) == 0 {
		http.Error(w, `{"error":"bad query"}`, http.StatusBadRequest)
		return
	}
	question := q.Messages[len(q.Messages)-1].Content
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	rc := http.NewResponseController(w)
	send := func(v any) bool {
		if enc.Encode(v) != nil || rc.Flush() != nil {
			return false
		}
		return true
	}
	pause := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-r.Context().Done():
			return false
		}
	}

	docs := []map[string]any{
		{"id": "doc-17", "title": "voicegate operator guide", "score": 0.91},
		{"id": "doc-04", "title": "Streaming answers with Server-Sent Events", "score": 0.84},
		{"id": "doc-22", "title": "Voice sessions over WebSocket", "score": 0.71},
	}
	steps := []map[string]any{
		{"type": "retrieval_start", "query": question},
		{"type": "retrieval_progress", "progress": 0.5, "documents_scanned": 640},
		{"type": "retrieval_result", "documents": docs},
		{"type": "generation_start", "model": q.Model},
	}
	for _, s := range steps {
		if !send(s) || !pause(demoChunkDelay) {
			return
		}
	}
	words := strings.Fields(demoAnswer(question))
	for i, word := range words {
		if i < len(words)-1 {
			word += " "
		}
		if !send(map[string]any{"type": "generation_chunk", "content": word, "index": i}) || !pause(demoChunkDelay) {
			return
		}
	}
	send(map[string]any{"type": "generation_done", "finish_reason": "stop",
		"usage":   map[string]int{"prompt_tokens": len(strings.Fields(question)), "completion_tokens": len(words)},
		"sources": []string{"doc-17", "doc-04"}})
}

// demoVoices is the demo service's voice endpoint: it answers a voice session the way an
// algorithm service would: recognition events while audio arrives, then, on "stop" (or after
// three seconds of audio), the final transcript, an answer in llm_response_chunk messages and
// synthesized speech as binary PCM frames (tts_start, the frames, tts_complete), their format
// declared once a session with tts_format so that the gateway meters and paces them right. The
// words are canned; the speech is a voice-like signal (see demoSpeech) at the session's PCM
// sample rate, so a listener hears it.
//
// It keeps the conversation's state per session, not per connection, and implements the
// resume contract: a dial with resume=1 for a session it has moves the session to the new
// connection, an answer in progress included, and closes the older connection with 4100
// "moved" after its last write to it. A session whose last connection ended is kept for
// demoSessionKeep, for a resume to find.
type demoVoices struct {
	mu       sync.Mutex
	sessions map[string]*demoSession
}

// demoSessionKeep is how long the demo keeps a session without a connection.
const demoSessionKeep = time.Minute

func newDemoVoices() *demoVoices { return &demoVoices{sessions: map[string]*demoSession{}} }

// demoSession is one voice session's state: its connection of the moment and its conversation.
type demoSession struct {
	mu       sync.Mutex // held for each write, so that a move waits for the write in progress
	conn     *websocket.Conn
	moved    chan struct{} // closed and replaced when the session moves to a new connection
	rate     int           // the session's, as each audio_chunk says, until declared
	chunks   int           // of the utterance in progress
	answered bool
	declared bool        // tts_format sent: once a session
	idle     *time.Timer // forgets the session once no connection has had it for demoSessionKeep
}

func (d *demoVoices) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	id, resume := q.Get("session_id"), q.Get("resume") == "1"
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"voice-protocol-v2"}})
	if err != nil {
		return
	}
	defer c.CloseNow()
	d.mu.Lock()
	s := d.sessions[id]
	if s == nil || !resume {
		s = &demoSession{rate: 16000, moved: make(chan struct{})}
		if id != "" {
			d.sessions[id] = s
		}
	}
	d.mu.Unlock()
	s.mu.Lock()
	old := s.conn
	s.conn = c
	close(s.moved)
	s.moved = make(chan struct{})
	if s.idle != nil {
		s.idle.Stop()
	}
	s.mu.Unlock()
	if old != nil {
		go old.Close(4100, "moved") // after its last write: writes hold s.mu
	}
	defer func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.conn == c {
			s.idle = time.AfterFunc(demoSessionKeep, func() {
				d.mu.Lock()
				defer d.mu.Unlock()
				if d.sessions[id] == s {
					delete(d.sessions, id)
				}
			})
		}
	}()
	s.serve(r.Context(), c, id)
}

// write writes one message to the session's connection of the moment. A write that fails (the
// gateway holding the connection went away) waits for the session to move, and is made again
// on the new connection.
func (s *demoSession) write(typ websocket.MessageType, msg []byte) error {
	for {
		s.mu.Lock()
		c, moved := s.conn, s.moved
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.Write(ctx, typ, msg)
		cancel()
		s.mu.Unlock()
		if err == nil {
			return nil
		}
		t := time.NewTimer(5 * time.Second)
		select {
		case <-moved:
			t.Stop()
		case <-t.C:
			return err
		}
	}
}

// serve reads connection c of session id until it ends.
func (s *demoSession) serve(ctx context.Context, c *websocket.Conn, session string) {
	send := func(v map[string]any) error {
		now := time.Now()
		v["session_id"] = session
		v["timestamp"], v["timestamp_ms"] = now.Unix(), now.UnixMilli()
		b, _ := json.Marshal(v)
		return s.write(websocket.MessageText, b)
	}
	words := strings.Fields("what can voicegate do for my voice assistant")
	reply := strings.Fields("voicegate bridges your voice app to the algorithm service, relays recognition and answers as they happen, and streams synthesized speech back.")
	answer := func() error {
		s.mu.Lock()
		s.chunks, s.answered = 0, true
		rate := s.rate
		s.mu.Unlock()
		if err := send(map[string]any{"type": "asr_final", "text": strings.Join(words, " "), "confidence": 0.93}); err != nil {
			return err
		}
		for _, part := range reply {
			if err := send(map[string]any{"type": "llm_response_chunk", "content": part + " "}); err != nil {
				return err
			}
			time.Sleep(demoChunkDelay / 2)
		}
		pcm := demoSpeech(reply, rate)
		// The TTS format, declared once a session so the gateway paces and meters it right;
		// tts_start is the demo's own marker of an answer's speech.
		// Once a session, not a connection: a resumed session's instance has the declaration
		// from the one it took over from.
		s.mu.Lock()
		declare := !s.declared
		s.declared = true
		s.mu.Unlock()
		if declare {
			if err := send(map[string]any{"type": "tts_format", "format": "pcm", "sample_rate": rate, "channels": 1}); err != nil {
				return err
			}
		}
		if err := send(map[string]any{"type": "tts_start", "sample_rate": rate, "channels": 1, "format": "pcm_s16le"}); err != nil {
			return err
		}
		frame := rate / 50 * 2 // 20 ms of mono pcm_s16le
		for i := 0; i < len(pcm); i += frame {
			if err := s.write(websocket.MessageBinary, pcm[i:min(i+frame, len(pcm))]); err != nil {
				return err
			}
		}
		return send(map[string]any{"type": "tts_complete", "audio_ms": len(pcm) / 2 * 1000 / rate})
	}
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			return
		}
		var m struct {
			Type       string `json:"type"`
			SampleRate int    `json:"sample_rate"`
		}
		if typ == websocket.MessageText {
			_ = json.Unmarshal(msg, &m)
		}
		switch {
		case typ == websocket.MessageBinary || m.Type == "audio_chunk":
			s.mu.Lock()
			if (m.SampleRate == 8000 || m.SampleRate == 16000 || m.SampleRate == 24000 || m.SampleRate == 48000) && !s.declared {
				s.rate = m.SampleRate // speech at a PCM rate the gateway takes, declared with the first answer
			}
			s.chunks++
			chunks := s.chunks
			s.mu.Unlock()
			if chunks%10 == 0 {
				n := min(chunks/10, len(words))
				if err := send(map[string]any{"type": "asr_partial", "text": strings.Join(words[:n], " ")}); err != nil {
					return
				}
			}
			if chunks == 150 {
				if answer() != nil {
					return
				}
			}
		case m.Type == "stop":
			// The utterance so far gets its answer, unless it had one already.
			s.mu.Lock()
			due := s.chunks > 0 || !s.answered
			s.mu.Unlock()
			if due && answer() != nil {
				return
			}
		case m.Type == "ping":
			if send(map[string]any{"type": "pong"}) != nil {
				return
			}
		case m.Type == "start", m.Type == "config":
			if send(map[string]any{"type": "ack", "of": m.Type}) != nil {
				return
			}
		}
	}
}

// demoSpeech synthesizes a voice-like signal for words as 16-bit little-endian mono PCM at
// rate: one syllable per word (at most 12), each a glottal pulse train — harmonics of a pitch
// that falls through the syllable, weighted by two formant resonances of a vowel — under an
// attack and decay, with short pauses between. It is no language, but it sounds like speech.
func demoSpeech(words []string, rate int) []byte {
	vowels := [][2]float64{{730, 1090}, {270, 2290}, {530, 1840}, {570, 840}, {300, 870}, {660, 1720}}
	const syllable, gap = 0.18, 0.05 // seconds
	n := min(len(words), 12)
	per := int(float64(rate) * (syllable + gap))
	out := make([]byte, 0, n*per*2)
	phase := 0.0
	for w := 0; w < n; w++ {
		f1, f2 := vowels[(len(words[w])+w)%len(vowels)][0], vowels[(len(words[w])+w)%len(vowels)][1]
		resonance := func(f, center float64) float64 { d := (f - center) / 90; return 1 / (1 + d*d) }
		for i := 0; i < per; i++ {
			t := float64(i) / float64(rate)
			v := 0.0
			if t < syllable {
				f0 := 150 - 40*t/syllable // falling pitch, as at the end of a phrase
				phase += 2 * math.Pi * f0 / float64(rate)
				env := math.Min(1, t/0.02) * math.Min(1, (syllable-t)/0.06)
				for k := 1; float64(k)*f0 < math.Min(4000, float64(rate)/2); k++ {
					f := float64(k) * f0
					v += (resonance(f, f1) + 0.6*resonance(f, f2) + 0.02) / float64(k) * math.Sin(float64(k)*phase)
				}
				v *= env
			}
			s := int16(max(-1, min(1, 0.25*v)) * 32767)
			out = append(out, byte(s), byte(uint16(s)>>8))
		}
	}
	return out
}

// demoAnswer composes a plausible answer that quotes the question, so a reader can see that it
// went through.
func demoAnswer(question string) string {
	q := strings.TrimSpace(question)
	if len(q) > 120 {
		q = q[:120] + "…"
	}
	return fmt.Sprintf("You asked: %q. This answer comes from voicegate's built-in demo service, "+
		"streamed one chunk at a time: the gateway reads each NDJSON line the algorithm service "+
		"writes and turns it into a Server-Sent Event as soon as the line is complete. "+
		"Retrieval found three documents, the operator guide first. In production the same path "+
		"carries real model output, with pings while the model is thinking and a stream_end "+
		"event that tells you how many lines arrived.", q)
}

// demoSecret makes a fresh HMAC secret for one demo run.
func demoSecret() []byte {
	return []byte(rand.Text() + rand.Text())
}

// demoTokenFor mints a day-long token for a demo user with the "user" role, its claims where
// the configuration looks for them.
func demoTokenFor(cfg *config) (string, error) {
	return mintToken(cfg, mintOptions{sub: "demo-user", username: "demo", tenant: "demo-tenant",
		roles: []string{"user"}, lifetime: min(24*time.Hour, cfg.JWTMaxLifetime)})
}

// printDemo tells the user what to try. ownSecret says the secret is the user's JWT_SECRET
// rather than one made up for this run; console that /console is served. Its commands are those
// of the README's first tour, which a test runs in a fresh clone: go run . from the source tree
// (the built binary takes the same arguments), and the token as a line to paste that exports it,
// since the voice client reads it from the environment.
func printDemo(w io.Writer, addr, token string, ownSecret, console bool) {
	addr = dialAddr(addr)
	consoleLine := "The browser console is off (CONSOLE_ENABLED=false)."
	if console {
		// The token rides in the fragment, which the browser keeps to itself: it is never
		// sent to the server, logged, or left at a URL anyone can fetch.
		consoleLine = fmt.Sprintf("Talk to it in a browser (chat, and voice through your microphone):\n\n  http://%s/console#token=%s", addr, token)
	}
	secretLine := "the HMAC secret is made up for this run"
	tokens := `More tokens (other users, roles, tenants): stop the demo and start it again, in the source
tree, with a secret of your own kept in a file that another terminal reads too:

  (umask 077 && openssl rand -hex 32 > demo.secret)
  JWT_SECRET=$(cat demo.secret) go run . -demo

then mint them in the other terminal, in the same directory:

  export JWT_SECRET=$(cat demo.secret)
  export TOKEN=$(go run . token -sub bob -roles admin -tenant demo-tenant -lifetime 2h)`
	if ownSecret {
		secretLine = "tokens are checked against your JWT_SECRET"
		tokens = `More tokens (other users, roles, tenants): mint them in another terminal, in the source tree,
with the same JWT_SECRET set (export JWT_SECRET=$(cat demo.secret) if you keep it in that file):

  export TOKEN=$(go run . token -sub bob -roles admin -tenant demo-tenant -lifetime 2h)`
	}
	fmt.Fprintf(w, `
voicegate is running in DEMO MODE on http://%[1]s
A built-in fake algorithm service answers and %[3]s; this mode is for a
first look, never for production.

%[5]s

A token for the demo user (role "user", valid 24 hours). Paste this line into the terminal you
try things in: the commands below read $TOKEN.

  export TOKEN=%[2]s

Stream a chat answer (events arrive one by one):

  curl -N http://%[1]s/api/v2/chat/stream -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"message":"How does voicegate stream answers?"}'

Open a voice session from a terminal with voice.py, the Python client of the README's first
tour (apt-get install python3-websockets), then type {"type":"start"} and {"type":"stop"}:

  python3 voice.py ws://%[1]s/api/v2/voice/stream

%[4]s

These commands run in the source tree; with the built binary, "voicegate ARGS" is "go run . ARGS".
Press Ctrl-C to stop (open streams get SHUTDOWN_GRACE to finish; Ctrl-C again stops at once).
`, addr, token, secretLine, tokens, consoleLine)
}

// runDemoAlgo is "voicegate demo-algo": the demo's fake algorithm service alone, on
// LISTEN_ADDR (default :9000), until ctx ends. The compose topology runs it as its own
// container, so the gateways in front of it are configured as in production.
func runDemoAlgo(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	fs := flag.NewFlagSet("voicegate demo-algo", flag.ContinueOnError)
	list := settingsNamed("LISTEN_ADDR", "LOG_FORMAT", "LOG_LEVEL")
	values := bindSettings(fs, list)
	typed, err := parseFlags(fs, args, stderr)
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("demo-algo: unexpected argument %q", fs.Arg(0))
	}
	c := &config{}
	if err := applySettings(c, list, values, typed, getenv, map[string]string{"LISTEN_ADDR": ":9000"}); err != nil {
		return fmt.Errorf("demo-algo: %w", err)
	}
	logger := newLogger(c, stderr)
	demo, err := startDemo(logger, c.ListenAddr)
	if err != nil {
		return fmt.Errorf("demo-algo: listen on %s: %w", c.ListenAddr, err)
	}
	logger.Info("listening", "addr", demo.URL.Host)
	<-ctx.Done()
	// Chat answers take a few seconds; voice sessions are hijacked and closed at once.
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := demo.srv.Shutdown(sctx); err != nil {
		_ = demo.srv.Close()
	}
	logger.Info("stopped")
	return nil
}
