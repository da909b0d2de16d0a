package main

// The voice session registry and audio meter against a real redis-server: outages, Redis's
// clock, a charge answered late, usage records retried.

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/voice"
)

// wantTrueRecords fails the test unless the usage stream holds a record for every session in
// ids, and each of its records is the session's own (its close code is want), none a record of a
// session lost with its instance. It returns the records.
func wantTrueRecords(t *testing.T, r *testRedis, want string, ids ...string) []map[string]string {
	t.Helper()
	recs := usageRecords(t, r)
	for _, id := range ids {
		n := 0
		for _, rec := range recs {
			if rec["session_id"] != id {
				continue
			}
			n++
			if rec["close_code"] != want || rec["close_reason"] == "instance lost" {
				t.Errorf("session %s has a record with close %s %q, want only its own end (%s)", id,
					rec["close_code"], rec["close_reason"], want)
			}
		}
		if n == 0 {
			t.Errorf("no usage record for session %s: %v", id, recs)
		}
	}
	return recs
}

// TestVoiceRegistryRedisOutage: Redis is frozen for more than two LEASE_TTLs while one session
// runs on and another ends. Once Redis answers again, the running session is published again
// and is not written off as lost, and the one that ended leaves its entry nowhere and only its
// own record: each session's records are its own end's, never a 1006 "instance lost".
func TestVoiceRegistryRedisOutage(t *testing.T) {
	t.Parallel()
	const ttl = time.Second
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), map[string]string{"LEASE_TTL": ttl.String()}))
	w := watchTokens(t, g)
	admin := w.token(t, "u-outage-admin", []string{"admin"}, nil)
	live := openVoice(t, g, "", bearer(w.token(t, "u-outage-live", []string{"user"}, nil)))
	gone := openVoice(t, g, "", bearer(w.token(t, "u-outage-gone", []string{"user"}, nil)))
	liveEnded, goneEnded := live.readToClose(t.Context()), gone.readToClose(t.Context())
	eventually(t, 5*time.Second, "both sessions are listed", func() bool {
		l := listVoice(t, g, admin)
		return l.hasSession(live.id) && l.hasSession(gone.id)
	})

	r.Freeze()
	thawed := false
	defer func() {
		if !thawed {
			r.Thaw()
		}
	}()
	frozen := time.Now()
	_ = gone.conn.Close(websocket.StatusNormalClosure, "bye")
	waitEnding(t, goneEnded, 5*time.Second)
	eventually(t, 5*time.Second, "the ended session's upstream closes", func() bool { return algo.voiceOpen.Load() == 1 })
	// The outage itself: more than two TTLs, so that every entry of this instance has been
	// expired for a whole TTL by the time Redis answers again.
	time.Sleep(time.Until(frozen.Add(2*ttl + ttl/2)))
	r.Thaw()
	thawed = true

	eventually(t, 10*time.Second, "the ended session's record is written", func() bool {
		return recordOf(usageRecords(t, r), gone.id) != nil
	})
	eventually(t, 10*time.Second, "the live session is listed again", func() bool { return listVoice(t, g, admin).hasSession(live.id) })
	// Two more renewal periods (LEASE_TTL/3): a sweep that would write the live session off has
	// run by then.
	before := redisNow(t, r)
	eventually(t, 10*time.Second, "two renewal periods pass on Redis's clock", func() bool {
		return redisNow(t, r).Sub(before) > 2*ttl/3+ttl/10
	})
	if rec := recordOf(usageRecords(t, r), live.id); rec != nil {
		t.Errorf("the live session has a usage record while it runs: %v", rec)
	}
	if l := listVoice(t, g, admin); l.hasSession(gone.id) {
		t.Errorf("the ended session is listed again: %v", l)
	}

	_ = live.conn.Close(websocket.StatusNormalClosure, "bye")
	waitEnding(t, liveEnded, 5*time.Second)
	eventually(t, 10*time.Second, "the live session's record is written", func() bool {
		return recordOf(usageRecords(t, r), live.id) != nil
	})
	eventually(t, 10*time.Second, "the registry is empty", func() bool {
		return r.Do(t, "ZCARD", "voicegate:voice:sessions") == int64(0) && r.Do(t, "EXISTS", "voicegate:voice:session:"+gone.id) == int64(0)
	})
	wantTrueRecords(t, r, "1000", live.id, gone.id)
}

// registryGateway serves the voice handler of reg alone, in front of algo, on loopback: a
// gateway instance whose registry a test can reach (its clock, its renewals).
func registryGateway(t *testing.T, reg *voice.Registry, algo *fakeAlgo, meter policy.AudioMeter, ends chan<- voice.Stats) *httptest.Server {
	t.Helper()
	u, err := url.Parse(algo.URL)
	if err != nil {
		t.Fatal(err)
	}
	o := voice.Options{AlgoURL: u, Registry: reg,
		Owner: func(*http.Request) (string, string) { return "u-registry", "tenant-a" },
		OnEnd: func(s voice.Stats) {
			if ends != nil {
				ends <- s
			}
		}}
	if meter != nil {
		o.Meter = meter
		o.Reservation = 100 * time.Millisecond
		o.Limits = func(string) policy.VoiceLimits { return policy.VoiceLimits{UserSecondsPerDay: 3600} }
	}
	h := voice.NewHandler(o)
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		reg.CloseAll(ctx, websocket.StatusGoingAway, "", "test over")
		srv.Close()
		h.Close()
	})
	return srv
}

// dialRegistry opens a session on srv and reads its session_initialized message.
func dialRegistry(t *testing.T, srv *httptest.Server) *voiceClient {
	t.Helper()
	return openVoice(t, &testGateway{Addr: srv.Listener.Addr().String()}, "", nil)
}

// TestVoiceRegistryRedisClock: the registry's expiries are Redis's. Instance A's clock is right;
// instance B's runs an hour fast, and C's an hour slow. B and C still list A's session and read
// its detail, A lists C's, and neither B's renewals nor C's write A's live session off as lost,
// although by B's clock its entry expired long ago.
func TestVoiceRegistryRedisClock(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	client := testClient(t, r)
	algo := newAlgo(t, algoOptions{})
	const ttl = time.Second
	registry := func(name string, skew time.Duration) *voice.Registry {
		return voice.NewRegistry(voice.RegistryOptions{Instance: name, Redis: client, Prefix: "voicegate:", TTL: ttl,
			Now: func() time.Time { return time.Now().Add(skew) }})
	}
	a, b, c := registry("a", 0), registry("b", time.Hour), registry("c", -time.Hour)
	va := dialRegistry(t, registryGateway(t, a, algo, nil, nil))
	vc := dialRegistry(t, registryGateway(t, c, algo, nil, nil))
	for _, reg := range []*voice.Registry{a, b, c} {
		if err := reg.Renew(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	for name, reg := range map[string]*voice.Registry{"b": b, "c": c} {
		list, err := reg.List(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != 2 {
			t.Errorf("instance %s lists %v, want the sessions of a and c", name, list)
		}
		if l, ok, err := reg.Get(t.Context(), va.id); err != nil || !ok || l.Instance != "a" {
			t.Errorf("instance %s reads a's session: %+v %v %v", name, l, ok, err)
		}
	}
	if l, ok, err := a.Get(t.Context(), vc.id); err != nil || !ok || l.Instance != "c" {
		t.Errorf("instance a reads c's session: %+v %v %v", l, ok, err)
	}
	// Renewals a few TTLs on: a and c renew theirs; b's and c's sweeps find nothing lost.
	start := redisNow(t, r)
	for redisNow(t, r).Sub(start) < 3*ttl {
		for _, reg := range []*voice.Registry{a, b, c} {
			if err := reg.Renew(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(ttl / 4) // the renewal period the gateway's renewer keeps
	}
	if recs := usageRecords(t, r); len(recs) != 0 {
		t.Errorf("usage records of live sessions: %v", recs)
	}
	if list, err := b.List(t.Context()); err != nil || len(list) != 2 {
		t.Errorf("instance b lists %v (%v), want both sessions", list, err)
	}
}

// gateMeter is an audio meter on Redis whose answer to a session's first charge of audio it used
// (a reservation) can be held back: as a Redis that answers late.
type gateMeter struct {
	inner   policy.AudioMeter
	holding atomic.Bool
	held    chan struct{} // a charge is being held back
	release chan struct{} // closed to let it answer
	once    sync.Once
}

func (m *gateMeter) Charge(ctx context.Context, uses []*policy.AudioUse) error {
	if m.holding.Load() && len(uses) == 1 && uses[0].Session != "" && uses[0].Used > 0 && m.holding.CompareAndSwap(true, false) {
		m.once.Do(func() { close(m.held) })
		<-m.release
	}
	return m.inner.Charge(ctx, uses)
}

// TestVoiceLateChargeAnswer: the answer to a session's charge comes late — after the session
// ended and its registry entry was deleted. It does not bring the entry back, and the session
// leaves one record, its own, even once the entry would have been swept as lost.
func TestVoiceLateChargeAnswer(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	client := testClient(t, r)
	algo := newAlgo(t, algoOptions{})
	const ttl = 500 * time.Millisecond
	reg := voice.NewRegistry(voice.RegistryOptions{Instance: "x", Redis: client, Prefix: "voicegate:", TTL: ttl})
	meter := &gateMeter{inner: policy.NewRedisAudioMeter(client, "voicegate:"), held: make(chan struct{}), release: make(chan struct{})}
	ends := make(chan voice.Stats, 1)
	srv := registryGateway(t, reg, algo, meter, ends)
	meter.holding.Store(true)
	v := dialRegistry(t, srv)
	if err := reg.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for range 5 { // 100 ms of audio
		if err := v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-meter.held:
	case <-ctx.Done():
		t.Fatal("the session's audio was never charged")
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	// The session ends (or waits for the charge's answer to settle its quota), and its entry is
	// deleted; then the late answer arrives.
	ended := false
	select {
	case <-ends:
		ended = true
	case <-time.After(time.Second):
	}
	if err := reg.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	close(meter.release)
	if !ended { // it waited for the answer: it ends now
		select {
		case <-ends:
		case <-time.After(5 * time.Second):
			t.Fatal("the session did not end")
		}
		if err := reg.Renew(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	// Renewals for three TTLs on Redis's clock: an entry brought back would be swept by then.
	start := redisNow(t, r)
	for redisNow(t, r).Sub(start) < 3*ttl {
		if err := reg.Renew(t.Context()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(ttl / 4)
	}
	if n := r.Do(t, "ZCARD", "voicegate:voice:sessions"); n != int64(0) {
		t.Errorf("the index holds %v sessions after the only one ended", n)
	}
	if n := r.Do(t, "EXISTS", "voicegate:voice:session:"+v.id); n != int64(0) {
		t.Error("the ended session's entry is back")
	}
	if recs := wantTrueRecords(t, r, "1000", v.id); len(recs) != 1 {
		t.Errorf("%d usage records for one session: %v", len(recs), recs)
	}
}

// TestVoiceUsageRecordsRetried: usage records that Redis refuses are written later, each once.
// Session A ends while the usage stream cannot be written (its key holds a string: every XADD
// fails, unrun); a renewal tries to write its record, and B ends while that renewal waits for
// Redis (paused). Once the stream can be written, the next renewal writes one record for each,
// and both entries are deleted.
func TestVoiceUsageRecordsRetried(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	client := testClient(t, r)
	algo := newAlgo(t, algoOptions{})
	reg := voice.NewRegistry(voice.RegistryOptions{Instance: "x", Redis: client, Prefix: "voicegate:", TTL: time.Second})
	ends := make(chan voice.Stats, 2)
	srv := registryGateway(t, reg, algo, nil, ends)
	a, b := dialRegistry(t, srv), dialRegistry(t, srv)
	end := func(v *voiceClient) {
		t.Helper()
		_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
		select {
		case <-ends:
		case <-time.After(5 * time.Second):
			t.Fatal("the session did not end")
		}
	}
	r.Do(t, "SET", "voicegate:usage", "not a stream")
	end(a)
	r.Do(t, "CLIENT", "PAUSE", "500", "ALL")
	renewed := make(chan error, 1)
	go func() { renewed <- reg.Renew(t.Context()) }()
	end(b) // while the renewal waits
	if err := <-renewed; err == nil {
		t.Fatal("a renewal wrote to a stream that is a string")
	}
	r.Do(t, "DEL", "voicegate:usage")
	if err := reg.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	recs := usageRecords(t, r)
	if len(recs) != 2 || recordOf(recs, a.id) == nil || recordOf(recs, b.id) == nil {
		t.Errorf("usage records %v, want one for each session", recs)
	}
	if n := r.Do(t, "ZCARD", "voicegate:voice:sessions"); n != int64(0) {
		t.Errorf("the index holds %v sessions after both ended", n)
	}
}
