package audio

import (
	"errors"
	"time"
)

// ErrInvalid is the error of a frame that is not valid for its format. Errors from Meter.Frame
// wrap it with the reason.
var ErrInvalid = errors.New("audio: invalid frame")

func invalid(reason string) error { return &invalidError{reason} }

type invalidError struct{ reason string }

func (e *invalidError) Error() string { return "audio: invalid frame: " + e.reason }
func (e *invalidError) Unwrap() error { return ErrInvalid }

// Meter says how long each frame of one stream plays. The figures are exact: a Meter counts
// samples at the stream's rate (48 kHz for Opus, whatever the rate it was encoded from) and
// answers each frame with the difference of the running total before and after it, so no
// rounding accumulates over a session. A frame that is not valid leaves the Meter as it was,
// as if the frame never came: it is the caller's to drop.
type Meter struct {
	f       Format
	rate    int64 // samples a second of what samples counts
	unit    int   // bytes a sample of every channel, for PCM, μ-law and A-law; 0 otherwise
	samples int64 // since the start
	played  time.Duration
	mp3     mp3State
}

// NewMeter returns a Meter for frames of f, which must be valid.
func NewMeter(f Format) *Meter {
	m := &Meter{f: f, rate: int64(f.SampleRate)}
	switch f.Codec {
	case PCM:
		m.unit = 2 * f.Channels
	case MuLaw, ALaw:
		m.unit = f.Channels
	case Opus:
		m.rate = 48000
	}
	return m
}

// Format is the format the Meter reads.
func (m *Meter) Format() Format { return m.f }

// Total is how long the frames metered so far play.
func (m *Meter) Total() time.Duration { return m.played }

// Frame meters one frame (one WebSocket message) and says how long it plays, or returns an
// error wrapping ErrInvalid. It does not allocate.
func (m *Meter) Frame(b []byte) (time.Duration, error) {
	if len(b) == 0 {
		return 0, invalid("empty frame")
	}
	var n int64
	switch {
	case m.unit > 0:
		if len(b)%m.unit != 0 {
			return 0, invalid("not a whole number of samples")
		}
		n = int64(len(b) / m.unit)
	case m.f.Codec == Opus:
		s, err := OpusSamples(b)
		if err != nil {
			return 0, err
		}
		n = int64(s)
	case m.f.Codec == MP3:
		st := m.mp3
		s, err := st.feed(b, m.f)
		if err != nil {
			return 0, err
		}
		m.mp3 = st
		n = s
	default:
		return 0, invalid("unknown format")
	}
	m.samples += n
	total := time.Duration(m.samples/m.rate)*time.Second + time.Duration(m.samples%m.rate*int64(time.Second)/m.rate)
	d := total - m.played
	m.played = total
	return d, nil
}

// Length is how long n bytes of a byte-sized format (PCM, μ-law, A-law) play, rounded down to
// the nanosecond; 0 for the others.
func (f Format) Length(n int) time.Duration {
	unit := 0
	switch f.Codec {
	case PCM:
		unit = 2 * f.Channels
	case MuLaw, ALaw:
		unit = f.Channels
	}
	if unit == 0 || f.SampleRate <= 0 {
		return 0
	}
	s, r := int64(n/unit), int64(f.SampleRate)
	return time.Duration(s/r)*time.Second + time.Duration(s%r*int64(time.Second)/r)
}
