package main

import (
	"math"
	"strings"
	"testing"
)

// TestDemoSpeech: the demo's TTS is audible speech-like sound at whatever rate the session
// has: the right length, loud enough, never clipped, voiced (energy at the pitch's harmonics,
// not at a frequency between them) and silent in the pauses between syllables.
func TestDemoSpeech(t *testing.T) {
	words := strings.Fields("one two three four five six seven eight nine ten eleven twelve thirteen")
	for _, rate := range []int{8000, 16000, 24000, 48000} {
		pcm := demoSpeech(words, rate)
		per := int(float64(rate) * 0.23)
		if want := 12 * per * 2; len(pcm) != want {
			t.Errorf("%d Hz: %d bytes, want %d (12 syllables of 230 ms)", rate, len(pcm), want)
			continue
		}
		sample := func(i int) float64 { return float64(int16(uint16(pcm[2*i])|uint16(pcm[2*i+1])<<8)) / 32768 }
		var sum, peak float64
		for i := range len(pcm) / 2 {
			v := sample(i)
			sum += v * v
			peak = max(peak, math.Abs(v))
		}
		rms := math.Sqrt(sum / float64(len(pcm)/2))
		if rms < 0.02 || peak >= 0.999 {
			t.Errorf("%d Hz: rms %.3f, peak %.3f; want audible and unclipped", rate, rms, peak)
		}
		// The pause at the end of the first syllable (180–230 ms) is silent.
		for i := int(0.185 * float64(rate)); i < per; i++ {
			if sample(i) != 0 {
				t.Errorf("%d Hz: sample %d in the pause is %f", rate, i, sample(i))
				break
			}
		}
		// Voiced: the first syllable's middle (its pitch near 130 Hz) has far more energy at
		// the pitch than halfway between two harmonics.
		mid := pcm[2*int(0.06*float64(rate)) : 2*int(0.12*float64(rate))]
		if f0, between := toneLevel(mid, rate, 130), toneLevel(mid, rate, 195); f0 < 3*between {
			t.Errorf("%d Hz: level %.4f at the pitch, %.4f between harmonics; want a voiced sound", rate, f0, between)
		}
	}
}
