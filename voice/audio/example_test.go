package audio_test

import (
	"fmt"

	"voicegate/voice/audio"
)

// A client asks for Opus on the upgrade; each packet is metered by its TOC byte.
func Example() {
	f, err := audio.Parse("opus", "", "", audio.Format{Codec: audio.PCM, SampleRate: 16000, Channels: 1})
	if err != nil {
		fmt.Println(err)
		return
	}
	m := audio.NewMeter(f)
	d, _ := m.Frame([]byte{0x0b << 3, 0xaa, 0xbb}) // SILK, 60 ms, one frame
	fmt.Println(f, d)
	_, ferr := m.Frame([]byte{0x0b<<3 | 1, 0xaa}) // two equal frames in one byte: not valid
	fmt.Println(ferr)
	// Output:
	// opus/48000/1 60ms
	// audio: invalid frame: opus: code 1 packet of odd length
}
