package voice

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// What a session meters besides its counters: audio seconds each way, the latencies its user
// feels, and barge-ins.
//
// Audio seconds. Each frame's are one call, one per direction — clientFrame for the client's
// audio, ttsFrame for TTS audio to it — whose answer is what the frame is charged, paced and
// counted by: how long the frame plays. For PCM ("pcm": 16-bit samples) it is exact, from its
// bytes, the sample rate and the channels: 16 kHz mono is 32000 bytes a second, each way (TTS
// binary frames are taken to be in the session's format; tts_audio JSON messages mark TTS for
// the latencies but their payload, the service's own, is not counted). For any other format it
// is an estimate: the time since the previous audio frame while frames flow, each gap counted
// up to maxFrameGap, so a pause in the stream (a client that stopped sending) costs nothing.
//
// Latencies, per session (kept for its usage record) and reported to Options.OnLatency:
//   - response: from the end of an utterance (the client's stop, or the algorithm service's
//     asr_final, whichever comes first) to the next TTS audio frame sent to the client (a binary
//     frame or a tts_audio message);
//   - asr: from the first audio frame of an utterance to its first asr_partial. An utterance
//     begins with the first audio frame after the session starts or after the last one ended.
//
// A barge-in is the client speaking while TTS audio flows (from the first TTS frame to
// tts_complete): it sends start or interrupt, or begins a new utterance. Each stretch of TTS is
// interrupted at most once.

// maxFrameGap is the most one gap between audio frames adds to a non-PCM estimate.
const maxFrameGap = 250 * time.Millisecond

// maxSamples bounds the latencies a session keeps for its p50; beyond it the most recent count.
const maxSamples = 256

// LatencyKind names a latency histogram.
type LatencyKind int

const (
	LatencyResponse LatencyKind = iota // end of utterance → first TTS audio
	LatencyASR                         // first audio of an utterance → first asr_partial
)

// meter is a session's metering state. Fields are atomics where both relay goroutines touch
// them; samples are under mu, held only to append or copy.
type meter struct {
	pcm         bool
	bytesPerSec int64

	in, out             atomic.Int64 // audio relayed each way, ns
	lastIn, lastOut     int64        // unix ns of the last frame; each owned by one relay goroutine
	eou                 atomic.Int64 // unix ns of an end of utterance awaiting its answer; 0 none
	speaking            atomic.Bool  // an utterance is under way: audio came since the last end
	asrFrom             atomic.Int64 // unix ns of an utterance's first audio, until its first asr_partial; 0 none
	ttsFlowing          atomic.Bool
	bargeIns            atomic.Int64
	mu                  sync.Mutex
	response, asr       ring
	responseMax, asrMax time.Duration
}

type ring struct {
	v []time.Duration
	n int // samples ever added
}

func (r *ring) add(d time.Duration) {
	if len(r.v) < maxSamples {
		r.v = append(r.v, d)
	} else {
		r.v[r.n%maxSamples] = d
	}
	r.n++
}

// Latency sums up one kind of latency of a session.
type Latency struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"-"`
	Max   time.Duration `json:"-"`
	P50S  float64       `json:"p50_s"`
	MaxS  float64       `json:"max_s"`
}

func summary(r *ring, maxd time.Duration) Latency {
	l := Latency{Count: r.n, Max: maxd}
	if len(r.v) > 0 {
		s := slices.Clone(r.v)
		slices.Sort(s)
		l.P50 = s[(len(s)-1)/2]
	}
	l.P50S, l.MaxS = l.P50.Seconds(), l.Max.Seconds()
	return l
}

func newMeter(cfg AudioConfig) *meter {
	m := &meter{pcm: cfg.Format == "pcm"}
	if m.pcm {
		m.bytesPerSec = int64(cfg.SampleRate) * int64(cfg.Channels) * 2
	}
	return m
}

// clientFrame is how long the client's audio frame of n bytes, arriving at now (unix ns), plays
// (fromClient only).
func (m *meter) clientFrame(n int, now int64) time.Duration {
	if !m.pcm {
		return estimate(&m.lastIn, now)
	}
	return m.pcmLength(n)
}

// ttsFrame is how long a TTS audio frame of n bytes to the client plays (fromUpstream only). It
// reads the clock only for an estimate.
func (m *meter) ttsFrame(n int) time.Duration {
	if !m.pcm {
		return estimate(&m.lastOut, time.Now().UnixNano())
	}
	return m.pcmLength(n)
}

// pcmLength is how long n bytes of the session's PCM play.
func (m *meter) pcmLength(n int) time.Duration {
	if m.bytesPerSec <= 0 {
		return 0
	}
	return time.Duration(int64(n) * int64(time.Second) / m.bytesPerSec)
}

// estimate is the gap since the previous frame, up to maxFrameGap: a non-PCM frame's length.
func estimate(last *int64, now int64) time.Duration {
	var d time.Duration
	if *last != 0 {
		if gap := now - *last; gap > 0 {
			d = time.Duration(min(gap, int64(maxFrameGap)))
		}
	}
	*last = now
	return d
}

// clientAudio notes an audio frame from the client (fromClient only).
func (s *session) clientAudio(now int64) {
	m := s.m
	if !m.speaking.Load() && m.speaking.CompareAndSwap(false, true) {
		m.asrFrom.Store(now)
		if m.ttsFlowing.Load() {
			s.bargeIn()
		}
	}
}

// clientControl notes a control message of type typ from the client (fromClient only).
func (s *session) clientControl(typ string, now int64) {
	m := s.m
	switch typ {
	case "stop":
		s.endUtterance(now)
	case "start", "interrupt":
		if m.ttsFlowing.Load() {
			s.bargeIn()
		}
	}
}

func (s *session) endUtterance(now int64) {
	s.m.speaking.Store(false)
	s.m.eou.CompareAndSwap(0, now)
}

func (s *session) bargeIn() {
	if s.m.ttsFlowing.CompareAndSwap(true, false) {
		s.m.bargeIns.Add(1)
		if s.h.o.OnBargeIn != nil {
			s.h.o.OnBargeIn(s.info.TenantID)
		}
	}
}

// ttsAudio notes TTS audio on its way to the client (fromUpstream only). It reads the clock
// only when it needs to: a PCM frame that answers no utterance costs two atomic loads.
func (s *session) ttsAudio() {
	m := s.m
	if !m.ttsFlowing.Load() {
		m.ttsFlowing.Store(true)
	}
	if m.eou.Load() != 0 {
		if at := m.eou.Swap(0); at != 0 {
			s.latency(LatencyResponse, time.Duration(max(time.Now().UnixNano()-at, 0)))
		}
	}
}

// ttsComplete notes the end of a stretch of TTS audio.
func (s *session) ttsComplete() { s.m.ttsFlowing.Store(false) }

// asrPartial notes an asr_partial (fromUpstream only).
func (s *session) asrPartial(now int64) {
	// Its utterance may have ended already (a short one): the partial still answers it.
	if s.m.asrFrom.Load() != 0 {
		if at := s.m.asrFrom.Swap(0); at != 0 {
			s.latency(LatencyASR, time.Duration(max(now-at, 0)))
		}
	}
}

func (s *session) latency(k LatencyKind, d time.Duration) {
	m := s.m
	m.mu.Lock()
	if k == LatencyResponse {
		m.response.add(d)
		m.responseMax = max(m.responseMax, d)
	} else {
		m.asr.add(d)
		m.asrMax = max(m.asrMax, d)
	}
	m.mu.Unlock()
	if s.h.o.OnLatency != nil {
		s.h.o.OnLatency(k, s.info.TenantID, d)
	}
}

func (m *meter) latencies() (response, asr Latency) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return summary(&m.response, m.responseMax), summary(&m.asr, m.asrMax)
}
