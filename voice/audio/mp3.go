package audio

// MP3 streams, read frame header by frame header. A stream may be split across WebSocket
// frames anywhere, a header included, so the state between frames is the bytes left of the
// frame (or tag) under way and the first bytes of a header not yet complete. ID3v2 tags (at a
// frame boundary) and ID3v1 tags play for no time, up to maxTagBytes a stream. Each MPEG frame
// is charged in full when its header arrives. Only Layer III is mp3; free-format and reserved values are refused, and so
// is a frame whose sample rate or channel count is not the agreed one, since its label would
// then be wrong.

// MP3Header is what one MPEG audio frame header says.
type MP3Header struct {
	Samples    int // per channel: 1152 (MPEG-1) or 576 (MPEG-2, 2.5)
	SampleRate int
	Channels   int
	Size       int // bytes of the whole frame, header included
}

var (
	mp3Rates = [4][3]int{ // by version bits, then the rate index
		{11025, 12000, 8000},  // MPEG 2.5
		{},                    // reserved
		{22050, 24000, 16000}, // MPEG-2
		{44100, 48000, 32000}, // MPEG-1
	}
	mp3BitratesV1 = [16]int{0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0}
	mp3BitratesV2 = [16]int{0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0}
)

// ParseMP3Header reads the four-byte header at the start of b, or returns an error wrapping
// ErrInvalid.
func ParseMP3Header(b []byte) (MP3Header, error) {
	if len(b) < 4 {
		return MP3Header{}, invalid("mp3: short header")
	}
	if b[0] != 0xff || b[1]&0xe0 != 0xe0 {
		return MP3Header{}, invalid("mp3: no frame sync")
	}
	version := (b[1] >> 3) & 3
	if version == 1 {
		return MP3Header{}, invalid("mp3: reserved MPEG version")
	}
	if (b[1]>>1)&3 != 1 {
		return MP3Header{}, invalid("mp3: not Layer III")
	}
	bi, ri := b[2]>>4, (b[2]>>2)&3
	if ri == 3 {
		return MP3Header{}, invalid("mp3: reserved sample rate")
	}
	if b[3]&3 == 2 {
		return MP3Header{}, invalid("mp3: reserved emphasis")
	}
	h := MP3Header{SampleRate: mp3Rates[version][ri], Channels: 2}
	if b[3]>>6 == 3 {
		h.Channels = 1
	}
	pad := int(b[2]>>1) & 1
	var kbps int
	if version == 3 {
		kbps, h.Samples = mp3BitratesV1[bi], 1152
	} else {
		kbps, h.Samples = mp3BitratesV2[bi], 576
	}
	if kbps == 0 {
		return MP3Header{}, invalid("mp3: free-format or reserved bitrate")
	}
	// Bytes a frame: samples/8 × bitrate / rate, plus a padding byte.
	h.Size = h.Samples/8*kbps*1000/h.SampleRate + pad
	return h, nil
}

// maxTagBytes bounds the ID3 tags of one stream. Tags play for no time, so they are charged
// nothing: without a bound a stream of one endless "tag" would carry any bytes for free.
const maxTagBytes = 64 << 10

// mp3State is where a Meter is in an MP3 stream between frames.
type mp3State struct {
	skip  int      // bytes left of the frame or tag under way
	head  [10]byte // the start of a header that the last frame ended in
	nhead int
	tags  int // bytes of ID3 tags so far
}

// feed meters b and returns its samples at the stream's rate.
func (st *mp3State) feed(b []byte, f Format) (int64, error) {
	var samples int64
	for {
		if st.skip > 0 {
			take := min(st.skip, len(b))
			st.skip -= take
			b = b[take:]
		}
		if len(b) == 0 {
			return samples, nil
		}
		// At a boundary: a header, perhaps begun in an earlier frame.
		held := st.nhead
		n := copy(st.head[held:], b)
		hv := st.head[:held+n]
		need := 4
		switch hv[0] {
		case 0xff:
		case 'I':
			need = 10
		case 'T':
			need = 3
		default:
			return 0, invalid("mp3: no frame sync")
		}
		if len(hv) < need {
			st.nhead = len(hv)
			return samples, nil
		}
		size := 0
		switch {
		case need == 10:
			s, err := id3v2Size(hv)
			if err != nil {
				return 0, err
			}
			size = s
		case need == 3:
			if string(hv[:3]) != "TAG" {
				return 0, invalid("mp3: no frame sync")
			}
			size = 128
		default:
			h, err := ParseMP3Header(hv)
			if err != nil {
				return 0, err
			}
			if h.SampleRate != f.SampleRate {
				return 0, invalid("mp3: frame sample rate differs from the agreed one")
			}
			if h.Channels != f.Channels {
				return 0, invalid("mp3: frame channels differ from the agreed ones")
			}
			size = h.Size
			samples += int64(h.Samples)
		}
		if need != 4 {
			if st.tags += size; st.tags > maxTagBytes {
				return 0, invalid("mp3: more than 64 KiB of ID3 tags")
			}
		}
		st.nhead = 0
		st.skip = size - held
	}
}

// id3v2Size is the length of the ID3v2 tag at the start of b (10 bytes or more).
func id3v2Size(b []byte) (int, error) {
	if string(b[:3]) != "ID3" || b[3] == 0xff || b[4] == 0xff {
		return 0, invalid("mp3: no frame sync")
	}
	n := 0
	for _, c := range b[6:10] {
		if c >= 0x80 {
			return 0, invalid("mp3: bad ID3v2 tag size")
		}
		n = n<<7 | int(c)
	}
	n += 10
	if b[5]&0x10 != 0 {
		n += 10 // a footer
	}
	return n, nil
}
