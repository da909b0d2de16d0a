package voice

import "time"

// The pace bound: a client may send audio at most Options.Pace times faster than real time,
// averaged over a burst of Options.PaceBurst of audio (3 s) it may send ahead of that pace at
// once (a client catching up after a stall). Beyond it the session stops reading the client
// until the client is back within the burst: nothing is dropped, the client's writes back up in
// TCP and wait. It is a token bucket in audio time, kept as the time at which the audio the
// client sent would have been sent at the pace (GCRA): one float division and a comparison a
// frame.
//
// It bounds what any session relays in a given time, metered or not, and with it what a
// session relays while the quota's meter cannot answer (govern.go).

// pacer is the pace bound of one client; fromClient owns it.
type pacer struct {
	rate  float64 // audio seconds a second; 0: no bound
	ahead int64   // ns of wall time the client may be ahead of the pace: the burst at the rate
	due   int64   // unix ns at which the audio sent so far is due at the pace
	wake  *time.Timer
}

func newPacer(rate float64, burst time.Duration) pacer {
	if rate <= 0 {
		return pacer{}
	}
	return pacer{rate: rate, ahead: int64(float64(burst) / rate)}
}

// wait notes a frame of d that arrived at now (unix ns), and says how long to wait before the
// client's next message is read: until it is back within the burst.
func (p *pacer) wait(d time.Duration, now int64) time.Duration {
	if p.rate == 0 {
		return 0
	}
	p.due = max(p.due, now) + int64(float64(d)/p.rate)
	return time.Duration(max(p.due-now-p.ahead, 0))
}

// paced waits d before fromClient reads on, or until the session ends. The timer is the
// session's own, made at its first wait.
func (s *session) paced(d time.Duration) {
	p := &s.pace
	if p.wake == nil {
		p.wake = time.NewTimer(d)
	} else {
		p.wake.Reset(d)
	}
	select {
	case <-p.wake.C:
	case <-s.ending:
		p.wake.Stop()
	}
}
