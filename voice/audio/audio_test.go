package audio_test

import (
	"errors"
	"testing"
	"time"

	"voicegate/voice/audio"
)

func TestParse(t *testing.T) {
	def := audio.Format{Codec: audio.PCM, SampleRate: 16000, Channels: 1}
	for _, c := range []struct {
		codec, rate, ch string
		want            audio.Format
		field           string
	}{
		{"", "", "", def, ""},
		{"pcm", "48000", "2", audio.Format{Codec: "pcm", SampleRate: 48000, Channels: 2}, ""},
		{"", "8000", "", audio.Format{Codec: "pcm", SampleRate: 8000, Channels: 1}, ""},
		{"mulaw", "", "", audio.Format{Codec: "mulaw", SampleRate: 8000, Channels: 1}, ""},
		{"alaw", "8000", "1", audio.Format{Codec: "alaw", SampleRate: 8000, Channels: 1}, ""},
		{"opus", "", "", audio.Format{Codec: "opus", SampleRate: 48000, Channels: 1}, ""},
		{"opus", "16000", "2", audio.Format{Codec: "opus", SampleRate: 16000, Channels: 2}, ""},
		{"mp3", "44100", "2", audio.Format{Codec: "mp3", SampleRate: 44100, Channels: 2}, ""},
		{"flac", "", "", audio.Format{}, "format"},
		{"PCM", "", "", audio.Format{}, "format"},
		{"pcm", "44100", "", audio.Format{}, "sample_rate"},
		{"pcm", "16k", "", audio.Format{}, "sample_rate"},
		{"mulaw", "16000", "", audio.Format{}, "sample_rate"},
		{"mulaw", "", "2", audio.Format{}, "channels"},
		{"pcm", "", "3", audio.Format{}, "channels"},
		{"pcm", "", "0", audio.Format{}, "channels"},
		{"pcm", "", "x", audio.Format{}, "channels"},
	} {
		got, err := audio.Parse(c.codec, c.rate, c.ch, def)
		if c.field != "" {
			if err == nil || err.Field != c.field {
				t.Errorf("Parse(%q,%q,%q) error %v, want one naming %s", c.codec, c.rate, c.ch, err, c.field)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Parse(%q,%q,%q) = %v, %v; want %v", c.codec, c.rate, c.ch, got, err, c.want)
		}
	}
}

// opusPacket makes a packet of config cfg, code c, with body bytes after the TOC.
func opusPacket(cfg, c byte, body ...byte) []byte { return append([]byte{cfg<<3 | c}, body...) }

func TestOpusSamples(t *testing.T) {
	filler := func(n int) []byte { return make([]byte, n) }
	for _, c := range []struct {
		name string
		p    []byte
		want int // samples at 48 kHz; -1 invalid
	}{
		{"SILK 20 ms", opusPacket(1, 0, filler(40)...), 960},
		{"SILK 60 ms", opusPacket(3, 0, filler(100)...), 2880},
		{"Hybrid 10 ms", opusPacket(12, 0, filler(30)...), 480},
		{"CELT 2.5 ms", opusPacket(16, 0, filler(10)...), 120},
		{"CELT 20 ms", opusPacket(31, 0, filler(60)...), 960},
		{"DTX: TOC only", opusPacket(1, 0), 960},
		{"code 1, two 20 ms", opusPacket(1, 1, filler(40)...), 1920},
		{"code 1, odd", opusPacket(1, 1, filler(41)...), -1},
		{"code 2", opusPacket(1, 2, append([]byte{10}, filler(25)...)...), 1920},
		{"code 2, two-byte length", opusPacket(1, 2, append([]byte{252, 1}, filler(300)...)...), 1920},
		{"code 2, length past the end", opusPacket(1, 2, append([]byte{50}, filler(20)...)...), -1},
		{"code 2, no length", opusPacket(1, 2), -1},
		{"code 3 CBR, 3×20 ms", opusPacket(1, 3, append([]byte{3}, filler(60)...)...), 2880},
		{"code 3 CBR, 6×20 ms", opusPacket(1, 3, append([]byte{6}, filler(60)...)...), 5760},
		{"code 3, 7×20 ms is over 120 ms", opusPacket(1, 3, append([]byte{7}, filler(70)...)...), -1},
		{"code 3, zero frames", opusPacket(1, 3, 0), -1},
		{"code 3, no count", opusPacket(1, 3), -1},
		{"code 3 CBR, uneven", opusPacket(1, 3, append([]byte{3}, filler(61)...)...), -1},
		{"code 3 VBR", opusPacket(1, 3, append([]byte{0x80 | 3, 10, 20}, filler(40)...)...), 2880},
		{"code 3 VBR, lengths past the end", opusPacket(1, 3, append([]byte{0x80 | 3, 30, 20}, filler(40)...)...), -1},
		{"code 3 padded", opusPacket(1, 3, append([]byte{0x40 | 2, 255, 1}, filler(20+255)...)...), 1920},
		{"code 3 padding past the end", opusPacket(1, 3, 0x40|2, 200), -1},
		{"code 0, frame over 1275", opusPacket(1, 0, filler(1276)...), -1},
		{"empty", nil, -1},
	} {
		got, err := audio.OpusSamples(c.p)
		if c.want < 0 {
			if !errors.Is(err, audio.ErrInvalid) {
				t.Errorf("%s: %d, %v; want ErrInvalid", c.name, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: %d, %v; want %d", c.name, got, err, c.want)
		}
	}
}

// MP3Frame makes one MPEG Layer III frame of the given version bits (3 MPEG-1, 2 MPEG-2, 0
// MPEG 2.5), bitrate index, rate index, padding and mono flag, its body zeros.
func mp3Frame(t testing.TB, version, bi, ri byte, pad, mono bool) []byte {
	t.Helper()
	h := []byte{0xff, 0xe0 | version<<3 | 1<<1 | 1, bi<<4 | ri<<2, 0}
	if pad {
		h[2] |= 2
	}
	if mono {
		h[3] |= 3 << 6
	}
	hd, err := audio.ParseMP3Header(h)
	if err != nil {
		t.Fatal(err)
	}
	return append(h, make([]byte, hd.Size-4)...)
}

func TestMP3Header(t *testing.T) {
	for _, c := range []struct {
		h                      []byte
		samples, rate, ch, siz int
	}{
		{[]byte{0xff, 0xfb, 0x90, 0x00}, 1152, 44100, 2, 417}, // MPEG-1, 128 kbps
		{[]byte{0xff, 0xfb, 0x92, 0x00}, 1152, 44100, 2, 418}, // padded
		{[]byte{0xff, 0xf3, 0x88, 0xc0}, 576, 16000, 1, 288},  // MPEG-2, 64 kbps, mono
		{[]byte{0xff, 0xe3, 0x18, 0xc0}, 576, 8000, 1, 72},    // MPEG 2.5, 8 kbps
	} {
		h, err := audio.ParseMP3Header(c.h)
		if err != nil || h.Samples != c.samples || h.SampleRate != c.rate || h.Channels != c.ch || h.Size != c.siz {
			t.Errorf("% x: %+v, %v", c.h, h, err)
		}
	}
	for _, bad := range [][]byte{
		{0xff, 0xfb, 0x00, 0x00}, // free format
		{0xff, 0xfb, 0xf0, 0x00}, // bad bitrate
		{0xff, 0xfb, 0x9c, 0x00}, // reserved rate
		{0xff, 0xfd, 0x90, 0x00}, // Layer II
		{0xff, 0xeb, 0x90, 0x00}, // reserved version
		{0xfe, 0xfb, 0x90, 0x00}, // no sync
		{0xff, 0xfb, 0x90, 0x02}, // reserved emphasis
		{0xff, 0xfb},
	} {
		if _, err := audio.ParseMP3Header(bad); !errors.Is(err, audio.ErrInvalid) {
			t.Errorf("% x accepted", bad)
		}
	}
}

// TestMeterMP3Split meters an MP3 stream split at every offset, the headers included: the
// total is exact whatever the split.
func TestMeterMP3Split(t *testing.T) {
	f := audio.Format{Codec: audio.MP3, SampleRate: 16000, Channels: 1}
	var stream []byte
	stream = append(stream, 'I', 'D', '3', 4, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4, 5) // a 5-byte ID3v2 tag
	for i := range 50 {
		stream = append(stream, mp3Frame(t, 2, 8, 2, i%3 == 0, true)...)
	}
	stream = append(stream, append([]byte("TAG"), make([]byte, 125)...)...)
	want := 50 * 576 * time.Second / 16000 // 1.8 s
	for _, step := range []int{1, 2, 3, 7, 100, 288, 289, 1000, len(stream)} {
		m := audio.NewMeter(f)
		var sum time.Duration
		for i := 0; i < len(stream); i += step {
			d, err := m.Frame(stream[i:min(i+step, len(stream))])
			if err != nil {
				t.Fatalf("step %d at %d: %v", step, i, err)
			}
			sum += d
		}
		if sum != want || m.Total() != want {
			t.Errorf("step %d: %v (total %v), want %v", step, sum, m.Total(), want)
		}
	}
}

func TestMeterRejects(t *testing.T) {
	mono16 := audio.Format{Codec: audio.MP3, SampleRate: 16000, Channels: 1}
	for _, c := range []struct {
		name string
		f    audio.Format
		b    []byte
	}{
		{"pcm half a sample", audio.Format{Codec: "pcm", SampleRate: 16000, Channels: 1}, make([]byte, 3)},
		{"pcm stereo, half a frame", audio.Format{Codec: "pcm", SampleRate: 48000, Channels: 2}, make([]byte, 6)},
		{"empty", audio.Format{Codec: "mulaw", SampleRate: 8000, Channels: 1}, nil},
		{"mp3 garbage", mono16, []byte("hello world")},
		{"mp3 at another rate", mono16, mp3Frame(t, 3, 9, 0, false, true)},
		{"mp3 stereo for mono", mono16, mp3Frame(t, 2, 8, 2, false, false)},
		{"opus over 120 ms", audio.Format{Codec: "opus", SampleRate: 48000, Channels: 1}, opusPacket(3, 3, 3)},
	} {
		m := audio.NewMeter(c.f)
		if d, err := m.Frame(c.b); !errors.Is(err, audio.ErrInvalid) || d != 0 || m.Total() != 0 {
			t.Errorf("%s: %v, %v, total %v", c.name, d, err, m.Total())
		}
	}
	// A rejected frame leaves an MP3 meter where it was: the stream goes on at its boundary.
	m := audio.NewMeter(mono16)
	fr := mp3Frame(t, 2, 8, 2, false, true)
	if _, err := m.Frame(fr[:100]); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Frame(append(fr[100:], 0x00)); !errors.Is(err, audio.ErrInvalid) {
		t.Errorf("a frame body followed by no sync was accepted: %v", err)
	}
	if d, err := m.Frame(fr[100:]); err != nil || d != 0 {
		t.Errorf("the rest of the frame: %v, %v", d, err)
	}
	if d, err := m.Frame(fr); err != nil || d != 36*time.Millisecond {
		t.Errorf("the next whole frame: %v, %v", d, err)
	}
}

// TestMeterExact: byte formats at rates whose samples are no whole number of nanoseconds add
// up exactly over many frames.
func TestMeterExact(t *testing.T) {
	for _, f := range []audio.Format{
		{Codec: "pcm", SampleRate: 24000, Channels: 1},
		{Codec: "pcm", SampleRate: 48000, Channels: 2},
		{Codec: "mulaw", SampleRate: 8000, Channels: 1},
		{Codec: "alaw", SampleRate: 8000, Channels: 1},
	} {
		m := audio.NewMeter(f)
		bytesPerSec := f.SampleRate * f.Channels
		if f.Codec == "pcm" {
			bytesPerSec *= 2
		}
		var sum time.Duration
		frame := make([]byte, bytesPerSec/1000*7/f.Channels/2*f.Channels*2) // 7 ms-ish, whole samples
		if f.Codec != "pcm" {
			frame = make([]byte, 7*f.SampleRate/1000*f.Channels)
		}
		total := 0
		for range 3000 {
			d, err := m.Frame(frame)
			if err != nil {
				t.Fatal(err)
			}
			sum += d
			total += len(frame)
		}
		want := time.Duration(float64(total) / float64(bytesPerSec) * float64(time.Second))
		if diff := sum - want; diff < -time.Microsecond || diff > time.Microsecond {
			t.Errorf("%v: %v, want %v", f, sum, want)
		}
	}
}

func FuzzOpusSamples(f *testing.F) {
	for _, p := range [][]byte{
		opusPacket(1, 0, 1, 2, 3), opusPacket(1, 1, 1, 2), opusPacket(1, 2, 1, 9),
		opusPacket(1, 3, 0x80|3, 1, 2, 3, 4, 5), opusPacket(1, 3, 0x40|2, 255, 1, 0, 0), {},
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		n, err := audio.OpusSamples(p)
		if err != nil {
			if !errors.Is(err, audio.ErrInvalid) || n != 0 {
				t.Fatalf("%d, %v", n, err)
			}
			return
		}
		if n <= 0 || n > 5760 || n%120 != 0 {
			t.Fatalf("%d samples from a packet of %d bytes", n, len(p))
		}
	})
}

func FuzzMP3Meter(f *testing.F) {
	fr := mp3Frame(f, 2, 8, 2, false, true)
	f.Add(fr, 7)
	f.Add(append([]byte("ID3\x04\x00\x00\x00\x00\x00\x01x"), fr...), 3)
	f.Add([]byte("TAG"), 1)
	f.Fuzz(func(t *testing.T, b []byte, step int) {
		if step <= 0 || step > len(b) {
			step = max(len(b), 1)
		}
		m := audio.NewMeter(audio.Format{Codec: audio.MP3, SampleRate: 16000, Channels: 1})
		var sum time.Duration
		for i := 0; i < len(b); i += step {
			d, err := m.Frame(b[i:min(i+step, len(b))])
			if err != nil {
				if !errors.Is(err, audio.ErrInvalid) || d != 0 {
					t.Fatalf("%v, %v", d, err)
				}
				continue
			}
			sum += d
		}
		// Each frame is 36 ms, charged when its header arrives; every one but the last was
		// whole, of 72 bytes at least (8 kbps at 16 kHz is the smallest frame).
		frames := int(sum / (36 * time.Millisecond))
		if (frames > 0 && (frames-1)*72+4 > len(b)) || sum%(36*time.Millisecond) != 0 || sum != m.Total() {
			t.Fatalf("%v from %d bytes", sum, len(b))
		}
	})
}

// TestMeterMP3TagsBounded: ID3 tags cost nothing, so a stream may carry at most 64 KiB of them:
// a client cannot relay any bytes it likes, uncharged, as one endless tag.
func TestMeterMP3TagsBounded(t *testing.T) {
	m := audio.NewMeter(audio.Format{Codec: audio.MP3, SampleRate: 16000, Channels: 1})
	small := append([]byte{'I', 'D', '3', 4, 0, 0, 0, 0, 0x7f, 0x76}, make([]byte, 16374)...) // a 16 KiB tag
	for i := range 4 {
		if d, err := m.Frame(small); err != nil || d != 0 {
			t.Fatalf("tag %d: %v, %v", i, d, err)
		}
	}
	if _, err := m.Frame(small); !errors.Is(err, audio.ErrInvalid) {
		t.Errorf("a fifth 16 KiB tag was accepted: %v", err)
	}
	huge := []byte{'I', 'D', '3', 4, 0, 0, 0x7f, 0x7f, 0x7f, 0x7f} // 256 MiB announced
	if _, err := audio.NewMeter(m.Format()).Frame(huge); !errors.Is(err, audio.ErrInvalid) {
		t.Errorf("a 256 MiB tag was accepted: %v", err)
	}
}
