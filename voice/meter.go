package voice

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"voicegate/voice/audio"
)

// What a session meters besides its counters: audio seconds each way, the latencies its user
// feels, and barge-ins.
//
// Audio seconds. Each frame's are one call, one per direction — clientFrame for the client's
// audio, ttsFrame for TTS audio to it — whose answer is what the frame is charged, paced and
// counted by: how long the frame plays, exact for every format and found without decoding
// (package audio): PCM, μ-law and A-law from their bytes, Opus from each packet's TOC byte,
// MP3 from its frame headers. The client's frames are in the agreed format (format.go); TTS
// binary frames in the format the algorithm service declared with tts_format, else the agreed
// one. tts_audio JSON messages mark TTS for the latencies but their payload, the service's
// own, is not counted. A frame that is not valid for its format plays for no time, and the
// caller decides what becomes of it.
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
	inFrames  *audio.Meter  // the client's audio; fromClient's
	ttsFrames *audio.Meter  // TTS audio; fromUpstream's
	ttsFor    *audio.Format // what ttsFrames was made for; fromUpstream's
	// tts is the TTS audio's format: the agreed one until the algorithm service declares its
	// own (declared), which then stands whatever the client agrees later.
	tts         atomic.Pointer[audio.Format]
	declared    atomic.Bool
	declaredFmt atomic.Pointer[audio.Format]

	in, out             atomic.Int64 // audio relayed each way, ns
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
	f := cfg.audioFormat()
	m := &meter{inFrames: audio.NewMeter(f)}
	m.tts.Store(&f)
	return m
}

// clientFrame is how long the client's audio frame plays, or why it is not valid for the
// agreed format (fromClient only).
func (m *meter) clientFrame(b []byte) (time.Duration, error) { return m.inFrames.Frame(b) }

// ttsFrame is how long a TTS audio frame to the client plays (fromUpstream only).
func (m *meter) ttsFrame(b []byte) (time.Duration, error) {
	if f := m.tts.Load(); f != m.ttsFor {
		m.ttsFrames, m.ttsFor = audio.NewMeter(*f), f
	}
	return m.ttsFrames.Frame(b)
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
