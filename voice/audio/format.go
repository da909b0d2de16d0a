// Package audio owns the audio formats a voice session may carry and how long their frames
// play, found without decoding: PCM (signed 16-bit little-endian), μ-law and A-law by their
// bytes, Opus by each packet's TOC byte and frame count (RFC 6716 §3.1), MP3 by each frame's
// header (ISO/IEC 11172-3, 13818-3, and the MPEG 2.5 extension).
//
// A Format is what a client and the gateway agreed (Parse, Validate); a Meter, one per stream
// of frames, says how long each frame plays (Meter.Frame), or that it is not valid for the
// format (ErrInvalid). A Meter is used by one goroutine.
package audio

import (
	"fmt"
	"slices"
	"strconv"
)

// Codec names. They are the values of the "format" field on the wire.
const (
	PCM   = "pcm"   // signed 16-bit little-endian, interleaved
	Opus  = "opus"  // one raw Opus packet (RFC 6716) per frame
	MP3   = "mp3"   // MPEG-1/2/2.5 Layer III frames, split anywhere
	MuLaw = "mulaw" // G.711 μ-law, one byte a sample
	ALaw  = "alaw"  // G.711 A-law, one byte a sample
)

// Format is an agreed audio format: the codec, the sample rate in Hz and the channels.
type Format struct {
	Codec      string `json:"format"`
	SampleRate int    `json:"sample_rate"`
	Channels   int    `json:"channels"`
}

// String is the format as codec/rate/channels ("pcm/16000/1"), as logs and metrics name it.
func (f Format) String() string {
	return f.Codec + "/" + strconv.Itoa(f.SampleRate) + "/" + strconv.Itoa(f.Channels)
}

// codec is what a codec allows.
type codec struct {
	rates       []int // allowed sample rates; the first is the default
	maxChannels int
}

var codecs = map[string]codec{
	PCM:   {rates: []int{16000, 8000, 24000, 48000}, maxChannels: 2},
	Opus:  {rates: []int{48000, 8000, 12000, 16000, 24000}, maxChannels: 2},
	MP3:   {rates: []int{16000, 8000, 11025, 12000, 22050, 24000, 32000, 44100, 48000}, maxChannels: 2},
	MuLaw: {rates: []int{8000}, maxChannels: 1},
	ALaw:  {rates: []int{8000}, maxChannels: 1},
}

// Codecs lists the supported codec names.
func Codecs() []string { return []string{PCM, Opus, MP3, MuLaw, ALaw} }

// Rates lists the sample rates a codec allows, its default first; nil for an unknown codec.
func Rates(codecName string) []int { return slices.Clone(codecs[codecName].rates) }

// FieldError says which parameter of a format is not acceptable, and why. Field is "format",
// "sample_rate" or "channels", as on the wire.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return "audio: " + e.Field + ": " + e.Reason }

// Validate reports the first field of f that is not supported, or nil.
func (f Format) Validate() *FieldError {
	c, ok := codecs[f.Codec]
	if !ok {
		return &FieldError{Field: "format", Reason: "must be one of pcm, opus, mp3, mulaw, alaw"}
	}
	if !slices.Contains(c.rates, f.SampleRate) {
		return &FieldError{Field: "sample_rate", Reason: fmt.Sprintf("%s allows %s Hz", f.Codec, list(c.rates))}
	}
	if f.Channels < 1 || f.Channels > c.maxChannels {
		if c.maxChannels == 1 {
			return &FieldError{Field: "channels", Reason: f.Codec + " is mono: channels must be 1"}
		}
		return &FieldError{Field: "channels", Reason: "must be 1 or 2"}
	}
	return nil
}

func list(v []int) string {
	s := slices.Clone(v)
	slices.Sort(s)
	var out string
	for i, r := range s {
		if i > 0 {
			out += ", "
		}
		out += strconv.Itoa(r)
	}
	return out
}

// Parse makes the format that a client's parameters ask for, as text (query parameters;
// empty means not given), over def. A parameter not given is def's when the codec is def's,
// else the codec's default (its first rate, mono): a client that says only format=mulaw gets
// mulaw/8000/1, whatever def is. The answer is validated.
func Parse(codecName, sampleRate, channels string, def Format) (Format, *FieldError) {
	f := def
	if codecName != "" && codecName != def.Codec {
		c, ok := codecs[codecName]
		if !ok {
			return Format{}, &FieldError{Field: "format", Reason: "must be one of pcm, opus, mp3, mulaw, alaw"}
		}
		f = Format{Codec: codecName, SampleRate: c.rates[0], Channels: 1}
	}
	if sampleRate != "" {
		n, err := strconv.Atoi(sampleRate)
		if err != nil {
			return Format{}, &FieldError{Field: "sample_rate", Reason: "must be an integer number of Hz"}
		}
		f.SampleRate = n
	}
	if channels != "" {
		n, err := strconv.Atoi(channels)
		if err != nil {
			return Format{}, &FieldError{Field: "channels", Reason: "must be 1 or 2"}
		}
		f.Channels = n
	}
	if err := f.Validate(); err != nil {
		return Format{}, err
	}
	return f, nil
}

// Merge is Parse for a JSON config message's fields: zero values are "not given".
func Merge(codecName string, sampleRate, channels int, def Format) (Format, *FieldError) {
	rate, ch := "", ""
	if sampleRate != 0 {
		rate = strconv.Itoa(sampleRate)
	}
	if channels != 0 {
		ch = strconv.Itoa(channels)
	}
	return Parse(codecName, rate, ch, def)
}
