package audio

// Opus packets, read as RFC 6716 §3 describes them: the TOC byte (§3.1) gives the frame
// duration from its configuration number and the frame-count code c; code 3 packets give the
// count in their second byte (§3.2.5). A packet is accepted only if it meets the requirements
// of §3.4 [R1]–[R7], which bound every frame at 1275 bytes and a packet at 120 ms.

// maxOpusFrame is the largest Opus frame, in bytes ([R2]).
const maxOpusFrame = 1275

// maxOpusSamples is the longest Opus packet, 120 ms at 48 kHz ([R5]).
const maxOpusSamples = 5760

// opusFrameSamples is the duration of one frame, in 48 kHz samples, by configuration number
// (Table 2 of RFC 6716): SILK-only 10/20/40/60 ms, Hybrid 10/20 ms, CELT-only 2.5/5/10/20 ms.
func opusFrameSamples(config byte) int {
	switch {
	case config < 12:
		return [4]int{480, 960, 1920, 2880}[config%4]
	case config < 16:
		return [2]int{480, 960}[config%2]
	default:
		return [4]int{120, 240, 480, 960}[config%4]
	}
}

// OpusSamples is the duration of one Opus packet in 48 kHz samples (48 a millisecond), or an
// error wrapping ErrInvalid when the packet breaks RFC 6716 §3.4.
func OpusSamples(p []byte) (int, error) {
	if len(p) < 1 {
		return 0, invalid("opus: empty packet") // [R1]
	}
	toc := p[0]
	per := opusFrameSamples(toc >> 3)
	rest := len(p) - 1
	switch toc & 3 {
	case 0: // one frame
		if rest > maxOpusFrame {
			return 0, invalid("opus: frame longer than 1275 bytes") // [R2]
		}
		return per, nil
	case 1: // two frames of equal size
		if rest%2 != 0 {
			return 0, invalid("opus: code 1 packet of odd length") // [R3]
		}
		if rest/2 > maxOpusFrame {
			return 0, invalid("opus: frame longer than 1275 bytes")
		}
		return 2 * per, nil
	case 2: // two frames, the first's length coded
		n, used, ok := opusLength(p[1:])
		if !ok {
			return 0, invalid("opus: code 2 packet too short for its frame length") // [R4]
		}
		if n > rest-used {
			return 0, invalid("opus: code 2 frame longer than the packet") // [R4]
		}
		if n > maxOpusFrame || rest-used-n > maxOpusFrame {
			return 0, invalid("opus: frame longer than 1275 bytes")
		}
		return 2 * per, nil
	}
	// Code 3: a frame count byte, optional padding, CBR or VBR frames.
	if len(p) < 2 {
		return 0, invalid("opus: code 3 packet without its frame count") // [R6]/[R7]
	}
	fc := p[1]
	vbr, padded, m := fc&0x80 != 0, fc&0x40 != 0, int(fc&0x3f)
	if m == 0 {
		return 0, invalid("opus: code 3 packet of zero frames") // [R5]
	}
	if m*per > maxOpusSamples {
		return 0, invalid("opus: packet longer than 120 ms") // [R5]
	}
	i := 2
	pad := 0
	if padded {
		for {
			if i >= len(p) {
				return 0, invalid("opus: padding length runs past the packet") // [R6]/[R7]
			}
			b := int(p[i])
			i++
			if b == 255 {
				pad += 254
				continue
			}
			pad += b
			break
		}
	}
	left := len(p) - i - pad
	if left < 0 {
		return 0, invalid("opus: padding longer than the packet")
	}
	if !vbr {
		if left%m != 0 {
			return 0, invalid("opus: CBR frames do not divide the packet") // [R6]
		}
		if left/m > maxOpusFrame {
			return 0, invalid("opus: frame longer than 1275 bytes")
		}
		return m * per, nil
	}
	sum := 0
	for k := 0; k < m-1; k++ {
		n, used, ok := opusLength(p[i:])
		if !ok {
			return 0, invalid("opus: VBR frame lengths run past the packet") // [R7]
		}
		i += used
		left -= used
		if n > maxOpusFrame {
			return 0, invalid("opus: frame longer than 1275 bytes")
		}
		sum += n
	}
	if left < sum {
		return 0, invalid("opus: VBR frames longer than the packet") // [R7]
	}
	if left-sum > maxOpusFrame {
		return 0, invalid("opus: frame longer than 1275 bytes")
	}
	return m * per, nil
}

// opusLength decodes a frame length (§3.2.1): one byte below 252, else two.
func opusLength(b []byte) (n, used int, ok bool) {
	if len(b) < 1 {
		return 0, 0, false
	}
	if b[0] < 252 {
		return int(b[0]), 1, true
	}
	if len(b) < 2 {
		return 0, 0, false
	}
	return int(b[1])*4 + int(b[0]), 2, true
}
