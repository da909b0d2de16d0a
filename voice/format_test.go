package voice_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/voice"
	"voicegate/voice/audio"
)

// opusPackets makes n Opus packets of TOC configuration cfg and code c, whose bodies are
// body (for code 3, body starts with the frame-count byte).
func opusPackets(n int, cfg, c byte, body []byte) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = append([]byte{cfg<<3 | c}, body...)
	}
	return out
}

// mp3Stream makes frames MPEG-2 Layer III frames at 16 kHz mono of bitrate index bi (their
// bodies zeros), and splits the stream into WebSocket frames of size bytes, headers included.
func mp3Stream(tb testing.TB, frames int, bi byte, size int) [][]byte {
	tb.Helper()
	var s []byte
	for range frames {
		h := []byte{0xff, 0xf3, bi<<4 | 2<<2, 3 << 6}
		hd, err := audio.ParseMP3Header(h)
		if err != nil {
			tb.Fatal(err)
		}
		s = append(s, append(h, make([]byte, hd.Size-4)...)...)
	}
	var out [][]byte
	for i := 0; i < len(s); i += size {
		out = append(out, s[i:min(i+size, len(s))])
	}
	return out
}

// splitBytes cuts n bytes of a byte-sized format into frames of size bytes.
func splitBytes(n, size int) [][]byte {
	var out [][]byte
	for i := 0; i < n; i += size {
		b := make([]byte, min(size, n-i))
		for j := range b {
			b[j] = byte(i + j)
		}
		out = append(out, b)
	}
	return out
}

// logBuffer is a log destination tests read the usage records from.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// usage returns the usage records logged so far.
func (l *logBuffer) usage(tb testing.TB) []map[string]string {
	tb.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]string
	for _, line := range bytes.Split(l.buf.Bytes(), []byte("\n")) {
		var m map[string]string
		if json.Unmarshal(line, &m) == nil && m["msg"] == "voice usage" {
			out = append(out, m)
		}
	}
	return out
}

// TestSessionPerFormat: a session in each format, agreed on the upgrade or in a config message.
// The algorithm service is dialled with the format and gets every frame labelled with it, the
// frame's bytes unchanged; the stats and the usage record carry the audio's true length.
func TestSessionPerFormat(t *testing.T) {
	for _, c := range []struct {
		name   string
		query  string // on the upgrade
		config string // a config message before the audio; "" none
		want   audio.Format
		frames [][]byte
		length time.Duration // the audio's true length
	}{
		{"opus 20 ms packets", "format=opus", "", audio.Format{Codec: "opus", SampleRate: 48000, Channels: 1},
			opusPackets(50, 1, 0, make([]byte, 40)), time.Second},
		{"opus 60 ms packets", "format=opus&sample_rate=16000", "", audio.Format{Codec: "opus", SampleRate: 16000, Channels: 1},
			opusPackets(20, 3, 0, make([]byte, 120)), 1200 * time.Millisecond},
		{"opus multi-frame packets (3 × 20 ms CELT)", "format=opus&channels=2", "", audio.Format{Codec: "opus", SampleRate: 48000, Channels: 2},
			opusPackets(10, 31, 3, append([]byte{3}, make([]byte, 90)...)), 600 * time.Millisecond},
		{"opus by config", "", `{"type":"config","format":"opus"}`, audio.Format{Codec: "opus", SampleRate: 48000, Channels: 1},
			opusPackets(25, 1, 1, make([]byte, 80)), time.Second},
		{"mp3 at 32 kbps", "format=mp3", "", audio.Format{Codec: "mp3", SampleRate: 16000, Channels: 1},
			mp3Stream(t, 30, 4, 500), 30 * 36 * time.Millisecond},
		{"mp3 at 64 kbps, by config", "", `{"type":"config","format":"mp3","sample_rate":16000}`, audio.Format{Codec: "mp3", SampleRate: 16000, Channels: 1},
			mp3Stream(t, 30, 8, 1000), 30 * 36 * time.Millisecond},
		{"mulaw at 8 kHz", "format=mulaw", "", audio.Format{Codec: "mulaw", SampleRate: 8000, Channels: 1},
			splitBytes(8000, 160), time.Second},
		{"alaw at 8 kHz, by config", "", `{"type":"config","format":"alaw"}`, audio.Format{Codec: "alaw", SampleRate: 8000, Channels: 1},
			splitBytes(4000, 160), 500 * time.Millisecond},
		{"pcm at 48 kHz stereo", "format=pcm&sample_rate=48000&channels=2", "", audio.Format{Codec: "pcm", SampleRate: 48000, Channels: 2},
			splitBytes(192000, 3840), time.Second},
		{"pcm by default", "", "", audio.Format{Codec: "pcm", SampleRate: 16000, Channels: 1},
			splitBytes(32000, 640), time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			logs := &logBuffer{}
			o := fast()
			o.Registry = voice.NewRegistry(voice.RegistryOptions{Instance: "gw-test",
				Log: slog.New(slog.NewJSONHandler(logs, nil))})
			e := newEnv(t, setup{opts: o})
			cl := e.connect(t, c.query, nil)
			init := cl.initMsg(t)
			fc := e.fake.next(t)
			q := fc.url.Query()
			if c.config == "" {
				cfg, _ := init["config"].(map[string]any)
				if cfg["format"] != c.want.Codec || cfg["sample_rate"] != float64(c.want.SampleRate) || cfg["channels"] != float64(c.want.Channels) {
					t.Errorf("session_initialized.config %v, want %v", cfg, c.want)
				}
				if q.Get("format") != c.want.Codec || q.Get("sample_rate") != strconv.Itoa(c.want.SampleRate) || q.Get("channels") != strconv.Itoa(c.want.Channels) {
					t.Errorf("dialled with %v, want %v", q, c.want)
				}
			} else {
				write(t, cl.c, websocket.MessageText, []byte(c.config))
				fwd := fc.recvJSON(t)
				if fwd["type"] != "config" || fwd["format"] != c.want.Codec || fwd["sample_rate"] != float64(c.want.SampleRate) || fwd["channels"] != float64(c.want.Channels) {
					t.Errorf("config forwarded as %v, want the agreed %v", fwd, c.want)
				}
			}
			for _, f := range c.frames {
				write(t, cl.c, websocket.MessageBinary, f)
			}
			for i, f := range c.frames {
				m := fc.recvJSON(t)
				if m["type"] != "audio_chunk" || m["format"] != c.want.Codec || m["sample_rate"] != float64(c.want.SampleRate) || m["channels"] != float64(c.want.Channels) {
					t.Fatalf("chunk %d labelled %v %v/%v/%v, want %v", i, m["type"], m["format"], m["sample_rate"], m["channels"], c.want)
				}
				if b, _ := base64.StdEncoding.DecodeString(m["audio_chunk"].(string)); !bytes.Equal(b, f) {
					t.Fatalf("chunk %d: the audio changed on the way", i)
				}
			}
			cl.c.Close(websocket.StatusNormalClosure, "")
			st := e.nextStats(t)
			bytesIn := 0
			for _, f := range c.frames {
				bytesIn += len(f)
			}
			t.Logf("metering %-44s true %-8v metered %-8v error %v (as 16 kHz PCM bytes, as before: %v)", c.name, c.length, st.AudioIn,
				st.AudioIn-c.length, time.Duration(bytesIn)*time.Second/32000)
			if st.AudioIn != c.length || st.AudioFormat != c.want.String() || st.InvalidAudio != 0 {
				t.Errorf("stats: audio in %v as %s (%d invalid), want %v as %s", st.AudioIn, st.AudioFormat, st.InvalidAudio, c.length, c.want)
			}
			u := logs.usage(t)
			if len(u) != 1 {
				t.Fatalf("%d usage records, want 1", len(u))
			}
			if got, _ := strconv.ParseFloat(u[0]["audio_seconds_in"], 64); got != c.length.Seconds() || u[0]["audio_format"] != c.want.String() {
				t.Errorf("usage record: %s s as %s, want %v as %s", u[0]["audio_seconds_in"], u[0]["audio_format"], c.length.Seconds(), c.want)
			}
		})
	}
}

// TestFormatRefusedOnUpgrade: a format the gateway does not support is refused before
// anything is dialled, with a 400 VALIDATION_ERROR that names the parameter.
func TestFormatRefusedOnUpgrade(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	for query, field := range map[string]string{
		"format=flac": "format", "format=pcm&sample_rate=44100": "sample_rate", "format=mulaw&sample_rate=16000": "sample_rate",
		"format=pcm&channels=6": "channels", "format=alaw&channels=2": "channels", "sample_rate=abc": "sample_rate",
	} {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		c, res, err := e.dial(ctx, query, nil)
		cancel()
		if err == nil {
			c.CloseNow()
			t.Fatalf("%s: upgraded", query)
		}
		doc, raw := errorBody(t, res)
		if res.StatusCode != http.StatusBadRequest || doc["code"] != "VALIDATION_ERROR" || !bytes.Contains([]byte(raw), []byte(`"field":"`+field+`"`)) {
			t.Errorf("%s: %d %s, want 400 VALIDATION_ERROR naming %s", query, res.StatusCode, raw, field)
		}
	}
	if n := e.fake.dials.Load(); n != 0 {
		t.Errorf("the algorithm service was dialled %d times for refused upgrades", n)
	}
}

// TestFormatRefusedInBand: a config message with an unsupported format, or one that changes
// the format after audio has flowed, is answered with VALIDATION_ERROR and goes no further;
// the session goes on in the format it had.
func TestFormatRefusedInBand(t *testing.T) {
	e := newEnv(t, setup{opts: fast()})
	cl := e.connect(t, "format=mulaw", nil)
	cl.initMsg(t)
	fc := e.fake.next(t)
	for _, bad := range []string{
		`{"type":"config","format":"flac"}`, `{"type":"config","format":"mulaw","sample_rate":16000}`,
		`{"type":"config","sample_rate":"8000"}`, `{"type":"config","channels":0}`,
	} {
		write(t, cl.c, websocket.MessageText, []byte(bad))
		m := cl.nextJSON(t)
		if m["type"] != "error" || m["code"] != "VALIDATION_ERROR" || m["error"] == "" {
			t.Errorf("%s answered %v, want an error VALIDATION_ERROR", bad, m)
		}
	}
	write(t, cl.c, websocket.MessageText, []byte(`{"type":"config","language":"en-US"}`)) // no format: forwarded
	if m := fc.recvJSON(t); m["type"] != "config" || m["language"] != "en-US" {
		t.Fatalf("the fake got %v, want the config without a format (the refused ones never came)", m)
	}
	write(t, cl.c, websocket.MessageBinary, make([]byte, 160))
	write(t, cl.c, websocket.MessageText, []byte(`{"type":"config","format":"pcm"}`))
	if m := cl.nextJSON(t); m["code"] != "VALIDATION_ERROR" {
		t.Errorf("a format change after audio answered %v", m)
	}
	write(t, cl.c, websocket.MessageText, []byte(`{"type":"config","format":"mulaw"}`)) // the same: fine
	if m := fc.recvJSON(t); m["type"] != "audio_chunk" || m["format"] != "mulaw" {
		t.Errorf("the fake got %v, want the mulaw chunk", m)
	}
	if m := fc.recvJSON(t); m["type"] != "config" || m["format"] != "mulaw" {
		t.Errorf("the fake got %v, want the config that changes nothing", m)
	}
}

// TestInvalidAudio: frames that are not valid for the agreed format are answered with
// INVALID_AUDIO, dropped (neither relayed nor charged) and counted; the session goes on, until
// 16 come in a row: then it ends with 1007.
func TestInvalidAudio(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		e := newEnv(t, setup{opts: governed(meter, policy.VoiceLimits{UserSecondsPerDay: 100}), net: n})
		cl := e.connect(t, "format=opus", nil)
		cl.initMsg(t)
		fc := e.fake.next(t)
		good := []byte{1 << 3, 1, 2, 3}  // SILK 20 ms
		bad := []byte{1<<3 | 1, 1, 2, 3} // code 1 of odd length
		write(t, cl.c, websocket.MessageBinary, bad)
		if m := cl.nextJSON(t); m["type"] != "error" || m["code"] != voice.CodeInvalidAudio {
			t.Fatalf("got %v, want INVALID_AUDIO", m)
		}
		write(t, cl.c, websocket.MessageBinary, good)
		if m := fc.recvJSON(t); m["type"] != "audio_chunk" {
			t.Fatalf("the fake got %v first, want the valid frame", m)
		}
		for i := range 15 { // 15 in a row: the session goes on
			write(t, cl.c, websocket.MessageBinary, bad)
			if m := cl.nextJSON(t); m["code"] != voice.CodeInvalidAudio {
				t.Fatalf("invalid frame %d answered %v", i, m)
			}
		}
		write(t, cl.c, websocket.MessageBinary, good) // resets the run
		write(t, cl.c, websocket.MessageBinary, []byte{})
		cl.nextJSON(t)
		for range 15 {
			write(t, cl.c, websocket.MessageBinary, bad)
		}
		msgs, err := cl.end(t, wait)
		if code := websocket.CloseStatus(err); code != websocket.StatusInvalidFramePayloadData {
			t.Fatalf("closed %v (%v), want 1007", code, err)
		}
		if codes := errorCodes(t, msgs); len(codes) != 15 || codes[14] != voice.CodeInvalidAudio {
			t.Errorf("error messages at the end %v, want 14 INVALID_AUDIO and the closing one", codes)
		}
		st := e.nextStats(t)
		if st.InvalidAudio != 1+15+16 || st.AudioIn != 40*time.Millisecond || st.Charged != 40*time.Millisecond {
			t.Errorf("invalid %d, audio in %v, charged %v; want 32 invalid, 40ms relayed and charged",
				st.InvalidAudio, st.AudioIn, st.Charged)
		}
		if got := audioChunks(t, fc); got != 1 { // the first good frame was read above
			t.Errorf("the algorithm service got %d more chunks, want 1", got)
		}
	})
}

// TestOpusQuotaExact: a 10 s quota of Opus audio is used up by 10 s of Opus, however few bytes
// that is (20 ms packets of 40 bytes: 16 kbit/s, a tenth of what 16 kHz PCM would be).
func TestOpusQuotaExact(t *testing.T) {
	bubble(t, func(t *testing.T, n *memNet) {
		meter := policy.NewMemoryAudioMeter()
		var chunks atomic.Int64
		e := newEnv(t, setup{opts: governed(meter, policy.VoiceLimits{UserSecondsPerDay: 10}), net: n,
			serve: countChunks(&chunks)})
		cl := e.connect(t, "format=opus", nil)
		cl.initMsg(t)
		fc := e.fake.next(t)
		packet := append([]byte{1 << 3}, make([]byte, 40)...) // SILK, 20 ms
		sent := 0
		for ; sent < 5000; sent++ { // 100 s of Opus, in real time until the session closes
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			err := cl.c.Write(ctx, websocket.MessageBinary, packet)
			cancel()
			if err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
			select {
			case <-cl.done:
			default:
				continue
			}
			break
		}
		_, err := cl.end(t, wait)
		if code := websocket.CloseStatus(err); code != voice.CloseQuotaExceeded {
			t.Fatalf("closed %v (%v) after %d packets, want %d", code, err, sent, voice.CloseQuotaExceeded)
		}
		st := e.nextStats(t)
		if st.AudioIn != 10*time.Second || st.Charged != 10*time.Second {
			t.Errorf("relayed %v, charged %v of Opus; want the quota's 10s", st.AudioIn, st.Charged)
		}
		if sent > 510 {
			t.Errorf("the session took %d packets (%v of audio) before it closed", sent, time.Duration(sent)*20*time.Millisecond)
		}
		if bytes := st.AudioBytesIn; bytes != 500*41 {
			t.Errorf("%d bytes of Opus relayed, want 500 packets of 41", bytes)
		}
		u := &policy.AudioUse{Tenant: "acme", User: "alice"}
		if err := meter.Charge(context.Background(), []*policy.AudioUse{u}); err != nil {
			t.Fatal(err)
		}
		if u.UserUsed != 10*time.Second {
			t.Errorf("the meter holds %v, want 10s", u.UserUsed)
		}
		fc.ended(t, wait)
		if got := chunks.Load(); got != 500 {
			t.Errorf("the algorithm service got %d audio chunks, want the quota's 500", got)
		}
	})
}

// countChunks reads until the connection ends, counting audio_chunk messages.
func countChunks(n *atomic.Int64) behaviour {
	return func(fc *fakeConn) {
		for {
			_, b, err := fc.conn.Read(context.Background())
			if err != nil {
				fc.err = err
				return
			}
			if bytes.Contains(b, []byte(`"type":"audio_chunk"`)) {
				n.Add(1)
			}
		}
	}
}
