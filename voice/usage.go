package voice

import (
	"strconv"
	"time"
)

// Live is a session's counters as they stand: GET /api/v2/voice/sessions/{session_id}. The
// instance that runs a session publishes it with the session's registry entry, at every
// charge and renewal, so other instances read it as of UpdatedAt.
type Live struct {
	Info
	UpdatedAt       time.Time `json:"updated_at"`
	DurationS       float64   `json:"duration_s"`
	AudioSecondsIn  float64   `json:"audio_seconds_in"`
	AudioSecondsOut float64   `json:"audio_seconds_out"`
	ChargedSeconds  float64   `json:"charged_seconds"`
	PacketsIn       int64     `json:"packets_in"`
	BytesIn         int64     `json:"bytes_in"`
	PacketsOut      int64     `json:"packets_out"`
	BytesOut        int64     `json:"bytes_out"`
	ASRPartial      int64     `json:"asr_partial"`
	ASRFinal        int64     `json:"asr_final"`
	LLMChunks       int64     `json:"llm_chunks"`
	TTSChunks       int64     `json:"tts_chunks"`
	Errors          int64     `json:"errors"`
	BargeIns        int64     `json:"barge_ins"`
	AudioFormat     string    `json:"audio_format"`
	InvalidAudio    int64     `json:"invalid_audio"`
	ResponseLatency Latency   `json:"response_latency"`
	ASRLatency      Latency   `json:"asr_latency"`
	Resumes         int64     `json:"resumes"` // how many times its client resumed it
}

// live reads s's counters now.
func (s *session) live() Live {
	now := time.Now()
	resp, asr := s.m.latencies()
	return Live{Info: s.info, UpdatedAt: now.UTC(), DurationS: now.Sub(s.start).Seconds(),
		AudioSecondsIn:  time.Duration(s.m.in.Load()).Seconds(),
		AudioSecondsOut: time.Duration(s.m.out.Load()).Seconds(),
		ChargedSeconds:  time.Duration(s.gov.held.Load()).Seconds(),
		PacketsIn:       s.n.packetsIn.Load(), BytesIn: s.n.bytesIn.Load(),
		PacketsOut: s.n.packetsOut.Load(), BytesOut: s.n.bytesOut.Load(),
		ASRPartial: s.n.asrPartial.Load(), ASRFinal: s.n.asrFinal.Load(), LLMChunks: s.n.llmChunks.Load(),
		TTSChunks: s.n.ttsChunks.Load(), Errors: s.n.errors.Load(), BargeIns: s.m.bargeIns.Load(),
		AudioFormat: s.format.Load().String(), InvalidAudio: s.n.invalidAudio.Load(),
		ResponseLatency: resp, ASRLatency: asr, Resumes: s.resumes()}
}

// Usage is the record a session leaves when it ends: in the log ("voice usage"), and with
// Redis in the stream {prefix}usage, one entry per session, its fields those of the JSON tags
// below (numbers in decimal, times in RFC 3339). A session whose instance died leaves one too,
// written by another instance from its last published counters, with close code 1006 and the
// reason "instance lost": its audio is then what was charged, at most one charge increment short.
type Usage struct {
	SessionID       string    `json:"session_id"`
	UserID          string    `json:"user_id"`
	TenantID        string    `json:"tenant_id"`
	ConversationID  string    `json:"conversation_id"`
	Instance        string    `json:"instance"`
	StartedAt       time.Time `json:"started_at"`
	EndedAt         time.Time `json:"ended_at"`
	DurationS       float64   `json:"duration_s"`
	AudioSecondsIn  float64   `json:"audio_seconds_in"`
	AudioSecondsOut float64   `json:"audio_seconds_out"`
	ChargedSeconds  float64   `json:"charged_seconds"`
	ASRPartial      int64     `json:"asr_partial"`
	ASRFinal        int64     `json:"asr_final"`
	LLMChunks       int64     `json:"llm_chunks"`
	TTSChunks       int64     `json:"tts_chunks"`
	BargeIns        int64     `json:"barge_ins"`
	Errors          int64     `json:"errors"`
	AudioFormat     string    `json:"audio_format"`
	InvalidAudio    int64     `json:"invalid_audio"`
	ResponseP50S    float64   `json:"response_latency_p50_s"`
	ResponseMaxS    float64   `json:"response_latency_max_s"`
	ASRP50S         float64   `json:"asr_latency_p50_s"`
	ASRMaxS         float64   `json:"asr_latency_max_s"`
	CloseCode       int       `json:"close_code"`
	CloseReason     string    `json:"close_reason"`
	Resumes         int64     `json:"resumes"`
}

// usageOf is the usage record of l, ended at with code and reason.
func usageOf(l Live, at time.Time, code int, reason string) Usage {
	return Usage{SessionID: l.SessionID, UserID: l.UserID, TenantID: l.TenantID, ConversationID: l.ConversationID,
		Instance: l.Instance, StartedAt: l.StartedAt, EndedAt: at.UTC(), DurationS: l.DurationS,
		AudioSecondsIn: l.AudioSecondsIn, AudioSecondsOut: l.AudioSecondsOut, ChargedSeconds: l.ChargedSeconds,
		ASRPartial: l.ASRPartial, ASRFinal: l.ASRFinal, LLMChunks: l.LLMChunks, TTSChunks: l.TTSChunks,
		BargeIns: l.BargeIns, Errors: l.Errors, AudioFormat: l.AudioFormat, InvalidAudio: l.InvalidAudio,
		ResponseP50S: l.ResponseLatency.P50S, ResponseMaxS: l.ResponseLatency.MaxS,
		ASRP50S: l.ASRLatency.P50S, ASRMaxS: l.ASRLatency.MaxS, CloseCode: code, CloseReason: reason,
		Resumes: l.Resumes}
}

// fields are u's stream entry: field, value, field, value...
func (u *Usage) fields() []string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	i := func(v int64) string { return strconv.FormatInt(v, 10) }
	return []string{
		"session_id", u.SessionID, "user_id", u.UserID, "tenant_id", u.TenantID,
		"conversation_id", u.ConversationID, "instance", u.Instance,
		"started_at", u.StartedAt.Format(time.RFC3339Nano), "ended_at", u.EndedAt.Format(time.RFC3339Nano),
		"duration_s", f(u.DurationS), "audio_seconds_in", f(u.AudioSecondsIn), "audio_seconds_out", f(u.AudioSecondsOut),
		"charged_seconds", f(u.ChargedSeconds), "asr_partial", i(u.ASRPartial), "asr_final", i(u.ASRFinal),
		"llm_chunks", i(u.LLMChunks), "tts_chunks", i(u.TTSChunks), "barge_ins", i(u.BargeIns), "errors", i(u.Errors),
		"response_latency_p50_s", f(u.ResponseP50S), "response_latency_max_s", f(u.ResponseMaxS),
		"asr_latency_p50_s", f(u.ASRP50S), "asr_latency_max_s", f(u.ASRMaxS),
		"close_code", strconv.Itoa(u.CloseCode), "close_reason", u.CloseReason,
		"audio_format", u.AudioFormat, "invalid_audio", i(u.InvalidAudio),
		"resumes", i(u.Resumes),
	}
}
