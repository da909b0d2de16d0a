package main

// Voice sessions governed: daily audio quotas held as audio arrives, the pace bound, the
// longest session, usage records (also of a killed instance), session detail and broadcast
// across instances, and bounded metrics.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/voice"
)

// govPolicy is the e2e policy with a daily voice audio quota of 2 s per user (100 s per
// tenant), and tenant-a named.
func govPolicy(tb testing.TB) string {
	return voicePolicy(tb, "e2e.json", func(l *policy.Limits) {
		l.VoiceAudioSecondsPerDay = &policy.AudioQuota{PerUser: 2, PerTenant: 100}
		l.Tenants = map[string]policy.TenantLimits{"tenant-a": {}}
	})
}

// talkingAlgo is the fake algorithm service answering like a real one: the first audio of an
// utterance gets an asr_partial, a stop gets asr_final, one llm_response_chunk, a TTS binary
// frame of 3200 bytes (100 ms of 16 kHz mono PCM) and tts_complete.
func talkingAlgo(t *testing.T) *fakeAlgo {
	t.Helper()
	return newAlgo(t, algoOptions{Replier: func() voiceReplier {
		talking := false
		return func(_ websocket.MessageType, msg []byte) []voiceFrame {
			var m struct{ Type string }
			_ = json.Unmarshal(msg, &m)
			switch m.Type {
			case "audio_chunk":
				if !talking {
					talking = true
					return []voiceFrame{{Text: `{"type":"asr_partial","text":"hel"}`}}
				}
			case "stop":
				talking = false
				return []voiceFrame{{Text: `{"type":"asr_final","text":"hello"}`}, {Text: `{"type":"llm_response_chunk","text":"hi"}`},
					{Audio: 3200}, {Text: `{"type":"tts_complete"}`}}
			}
			return nil
		}
	}})
}

// sendAudio sends d of 16 kHz mono PCM in 20 ms frames, as fast as the session takes them.
func sendAudio(t *testing.T, v *voiceClient, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for range int(d / (20 * time.Millisecond)) {
		if err := v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			t.Fatalf("send audio: %v", err)
		}
	}
}

// sendAudioUntilClosed is sendAudio that stops at the first write the session no longer takes,
// and returns how much it sent.
func sendAudioUntilClosed(t *testing.T, v *voiceClient, d time.Duration) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	var sent time.Duration
	for ; sent < d; sent += 20 * time.Millisecond {
		if err := v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			break
		}
	}
	return sent
}

func num(t *testing.T, rec map[string]string, field string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(rec[field], 64)
	if err != nil {
		t.Fatalf("usage field %s = %q: %v", field, rec[field], err)
	}
	return v
}

// chargedMS reads a user's audio charged today, in ms (Redis's day).
func chargedMS(t *testing.T, r *testRedis, user string) int64 {
	t.Helper()
	key := "voicegate:vq:{tenant-a}:u:" + user + ":" + redisNow(t, r).UTC().Format("20060102")
	switch v := r.Do(t, "GET", key).(type) {
	case nil:
		return 0
	case string:
		n, _ := strconv.ParseInt(v, 10, 64)
		return n
	default:
		t.Fatalf("GET %s = %v", key, v)
		return 0
	}
}

// TestVoiceQuotaAcrossInstances: a user's daily audio (2 s, govPolicy) is shared by two
// instances. A session on A uses 1 s; the user's session on B is closed 4429 after an error
// QUOTA_EXCEEDED once it has used the rest; a new session on A is refused with 429 before the
// upgrade; and the user was charged exactly the audio both sessions carried.
func TestVoiceQuotaAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{"POLICY_FILE": govPolicy(t)}))
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	tok := w.token(t, "u-quota", []string{"user"}, nil)

	first := openVoice(t, a, "", bearer(tok))
	ended := first.readToClose(t.Context())
	sendAudio(t, first, time.Second)
	_ = first.conn.Close(websocket.StatusNormalClosure, "bye")
	waitEnding(t, ended, 5*time.Second)
	eventually(t, 5*time.Second, "A charges the first session's second", func() bool { return chargedMS(t, r, "u-quota") == 1000 })

	second := openVoice(t, b, "", bearer(tok))
	ended = second.readToClose(t.Context())
	sendAudioUntilClosed(t, second, 1500*time.Millisecond) // more than the 1 s left
	e := waitEnding(t, ended, 5*time.Second)
	if e.code != voice.CloseQuotaExceeded {
		t.Errorf("the crossing session closed %v (%v), want 4429", e.code, e.err)
	}
	if codes := e.errorCodes(); len(codes) != 1 || codes[0] != voice.CodeQuotaExceeded {
		t.Errorf("error messages %v, want [QUOTA_EXCEEDED]", codes)
	}
	// Charged for what the sessions carried, and nothing more: the second session the second
	// it was allowed, as its frames arrived.
	eventually(t, 5*time.Second, "the algorithm service got both sessions' audio", func() bool {
		return algo.voiceOpen.Load() == 0 && algo.audioReceived(t) == 2*time.Second
	})
	eventually(t, 5*time.Second, "B settles the second session", func() bool { return chargedMS(t, r, "u-quota") == 2000 })

	res := voiceRefused(t, a, "", bearer(tok))
	wantError(t, res, http.StatusTooManyRequests, voice.CodeQuotaExceeded)
	if ra, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || ra < 1 || ra > 86401 {
		t.Errorf("Retry-After = %q, want the seconds to the next UTC day", res.Header.Get("Retry-After"))
	}
	// Another user of the tenant still has audio.
	other := openVoice(t, b, "", bearer(w.token(t, "u-quota-other", []string{"user"}, nil)))
	_ = other.conn.Close(websocket.StatusNormalClosure, "bye")
}

// TestVoiceMaxSessionLength: with voice_max_session 1s the session is closed 4408 after an
// error SESSION_TOO_LONG, within a recheck interval of its second.
func TestVoiceMaxSessionLength(t *testing.T) {
	t.Parallel()
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "POLICY_FILE": voicePolicy(t, "e2e.json", func(l *policy.Limits) {
		l.VoiceMaxSession = policy.Duration(time.Second)
	})})
	w := watchTokens(t, g)
	tok := w.token(t, "u-long", []string{"user"}, nil)
	dialed := time.Now() // before the session starts: its second ends after dialed+1s
	v := openVoice(t, g, "", bearer(tok))
	e := waitEnding(t, v.readToClose(t.Context()), 5*time.Second)
	if e.code != voice.CloseSessionTooLong {
		t.Errorf("closed %v (%v), want 4408", e.code, e.err)
	}
	if codes := e.errorCodes(); len(codes) != 1 || codes[0] != voice.CodeSessionTooLong {
		t.Errorf("error messages %v, want [SESSION_TOO_LONG]", codes)
	}
	if took := e.at.Sub(dialed); took < time.Second {
		t.Errorf("closed after %v, before the maximum length", took)
	}
}

// TestVoiceUsageRecords: every session leaves one usage record in the stream, with its fields;
// a session whose instance was SIGKILLed leaves one too, written by the other instance from what
// its instance last published, and stays charged what it held: at most one reservation more
// than it relayed.
func TestVoiceUsageRecords(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := talkingAlgo(t)
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": govPolicy(t), "VOICE_RESERVATION": "500ms", "LEASE_TTL": "900ms"}))
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	bin := buildGateway(t)
	k := startGatewayProcess(t, bin, "instance k", with(env, map[string]string{"INSTANCE_NAME": "k"}))
	kgw := &testGateway{Addr: k.addr}
	w := watchTokens(t, a)
	tok := w.token(t, "u-usage", []string{"user"}, nil)
	admin := w.token(t, "u-usage-admin", []string{"admin"}, nil)

	// A full turn on A: 0.5 s of audio, stop, the answer.
	v := openVoice(t, a, "?conversation_id=c-usage", bearer(tok))
	ended := v.readToClose(t.Context())
	sendAudio(t, v, 500*time.Millisecond)
	v.send(t, `{"type":"stop"}`)
	eventually(t, 5*time.Second, "the answer arrives", func() bool {
		l, ok, _ := a.voiceLive(t, admin, v.id)
		return ok && l.TTSChunks == 1
	})
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
	waitEnding(t, ended, 5*time.Second)

	// A session on K, which dies mid-session: a second of audio, published by its renewals,
	// then 100 ms more just before the SIGKILL, which may or may not be relayed.
	kv := openVoice(t, kgw, "", bearer(tok))
	sendAudio(t, kv, time.Second)
	eventually(t, 5*time.Second, "K publishes the second of audio", func() bool {
		l, ok, _ := a.voiceLive(t, admin, kv.id)
		return ok && l.AudioSecondsIn == 1
	})
	sendAudio(t, kv, 100*time.Millisecond)
	if err := k.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-k.done

	var recs []map[string]string
	eventually(t, 10*time.Second, "A writes the lost session's record", func() bool {
		recs = usageRecords(t, r)
		return recordOf(recs, kv.id) != nil
	})
	if len(recs) != 2 {
		t.Errorf("%d usage records, want one per session (2): %v", len(recs), recs)
	}
	rec := recordOf(recs, v.id)
	if rec == nil {
		t.Fatalf("no usage record for the session on A: %v", recs)
	}
	for field, want := range map[string]string{"user_id": "u-usage", "tenant_id": "tenant-a", "instance": "a",
		"conversation_id": "c-usage", "close_code": "1000", "asr_partial": "1", "asr_final": "1", "llm_chunks": "1",
		"tts_chunks": "1", "audio_seconds_in": "0.5", "audio_seconds_out": "0.1", "charged_seconds": "0.6", "barge_ins": "0"} {
		if rec[field] != want {
			t.Errorf("record field %s = %q, want %q", field, rec[field], want)
		}
	}
	if num(t, rec, "duration_s") <= 0 || num(t, rec, "response_latency_max_s") <= 0 || num(t, rec, "asr_latency_max_s") <= 0 ||
		num(t, rec, "response_latency_p50_s") > num(t, rec, "response_latency_max_s") {
		t.Errorf("record times: %v", rec)
	}
	lost := recordOf(recs, kv.id)
	if lost["close_code"] != "1006" || lost["close_reason"] != "instance lost" || lost["instance"] != "k" || lost["user_id"] != "u-usage" {
		t.Errorf("the lost session's record: %v", lost)
	}
	// Its counters are as K last published them: the second, or more of the 1.1 s; what it
	// held then was its use and at most a reservation (500 ms) ahead.
	in, c := num(t, lost, "audio_seconds_in"), num(t, lost, "charged_seconds")
	if in < 1 || in > 1.1 || c < in || c > in+0.5 {
		t.Errorf("lost session: %v s of audio in, %v s charged; want 1 to 1.1 s, charged that and at most 0.5 s more", in, c)
	}
	// The quota keeps what K held when it died: what it relayed, at most 1.1 s, and at most a
	// reservation ahead of that.
	if got := chargedMS(t, r, "u-usage") - 600; got < int64(c*1000+0.5) || got > 1600 {
		t.Errorf("the lost session is charged %d ms, want what it last published (%v s) to 1.6 s", got, c)
	}
	// A consumer group reads the records as a billing job would.
	if res := r.Do(t, "XGROUP", "CREATE", "voicegate:usage", "billing", "0"); res != "OK" {
		t.Fatalf("XGROUP CREATE = %v", res)
	}
	got, _ := r.Do(t, "XREADGROUP", "GROUP", "billing", "worker", "COUNT", "10", "STREAMS", "voicegate:usage", ">").([]any)
	if len(got) != 1 || len(got[0].([]any)[1].([]any)) != 2 {
		t.Errorf("XREADGROUP = %v, want both records", got)
	}
}

// TestVoiceDetailAndBroadcastAcrossInstances: a session's live counters are read on either
// instance by an admin of its tenant (not another tenant's, unless super_admin); a broadcast
// reaches the matching sessions on both instances, within the caller's tenant unless
// super_admin, and says how many it reached.
func TestVoiceDetailAndBroadcastAcrossInstances(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	env := redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": govPolicy(t), "LEASE_TTL": "900ms"}))
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	adminA := w.token(t, "u-admin-a", []string{"admin"}, nil)
	adminB := w.token(t, "u-admin-b", []string{"admin"}, map[string]any{"tenant_id": "tenant-b"})
	super := w.token(t, "u-super", []string{"super_admin"}, map[string]any{"tenant_id": "tenant-z"})
	user := w.token(t, "u-plain", []string{"user"}, nil)

	s1 := openVoice(t, a, "", bearer(w.token(t, "u-one", []string{"user"}, nil)))
	s2 := openVoice(t, b, "", bearer(w.token(t, "u-two", []string{"user"}, nil)))
	s3 := openVoice(t, b, "", bearer(w.token(t, "u-three", []string{"user"}, map[string]any{"tenant_id": "tenant-b"})))
	sendAudio(t, s2, 400*time.Millisecond)

	// Live detail of a session on B, read on A.
	eventually(t, 5*time.Second, "A reads the audio of B's session", func() bool {
		l, ok, _ := a.voiceLive(t, adminA, s2.id)
		return ok && l.AudioSecondsIn == 0.4 && l.PacketsIn == 20 && l.Instance == "b" && l.UserID == "u-two"
	})
	if _, _, status := a.voiceLive(t, adminB, s2.id); status != http.StatusNotFound {
		t.Errorf("another tenant's admin reads the session: %d, want 404", status)
	}
	if _, ok, status := b.voiceLive(t, super, s2.id); !ok {
		t.Errorf("super_admin reads the session: %d, want 200", status)
	}
	if _, _, status := a.voiceLive(t, adminA, "no-such-session"); status != http.StatusNotFound {
		t.Errorf("an unknown session: %d, want 404", status)
	}
	wantError(t, call(t, a, "GET", "/api/v2/voice/sessions/"+s2.id, user, ""), http.StatusForbidden, "PERMISSION_DENIED")

	ends := map[string]<-chan voiceEnding{}
	for _, s := range []*voiceClient{s1, s2, s3} {
		ends[s.id] = s.readToClose(t.Context())
	}
	broadcast := func(g *testGateway, token, body string) int {
		t.Helper()
		res := call(t, g, "POST", "/api/v2/voice/broadcast", token, body)
		wantStatus(t, res, http.StatusOK)
		var got struct{ Delivered int }
		if err := json.NewDecoder(res.Body).Decode(&got); err != nil {
			t.Fatal(err)
		}
		return got.Delivered
	}
	if n := broadcast(a, adminA, `{"message":"maintenance at noon"}`); n != 2 {
		t.Errorf("tenant-a's broadcast reached %d sessions, want 2 (one per instance)", n)
	}
	if n := broadcast(b, adminA, `{"message":{"text":"only you"},"user_id":"u-two"}`); n != 1 {
		t.Errorf("a broadcast to u-two reached %d sessions, want 1", n)
	}
	if n := broadcast(a, super, `{"message":"everyone"}`); n != 3 {
		t.Errorf("super_admin's broadcast reached %d sessions, want 3", n)
	}
	if n := broadcast(a, super, `{"message":"tenant b","tenant_id":"tenant-b"}`); n != 1 {
		t.Errorf("super_admin's broadcast to tenant-b reached %d sessions, want 1", n)
	}
	wantError(t, call(t, a, "POST", "/api/v2/voice/broadcast", adminA, `{"message":"x","tenant_id":"tenant-b"}`), http.StatusForbidden, "PERMISSION_DENIED")
	wantError(t, call(t, a, "POST", "/api/v2/voice/broadcast", user, `{"message":"x"}`), http.StatusForbidden, "PERMISSION_DENIED")
	wantError(t, call(t, a, "POST", "/api/v2/voice/broadcast", adminA, `{"text":"x"}`), http.StatusBadRequest, "INVALID_JSON")

	for _, s := range []*voiceClient{s1, s2, s3} {
		_ = s.conn.Close(websocket.StatusNormalClosure, "bye")
	}
	want := map[string][]string{
		s1.id: {`"maintenance at noon"`, `"everyone"`},
		s2.id: {`"maintenance at noon"`, `{"text":"only you"}`, `"everyone"`},
		s3.id: {`"everyone"`, `"tenant b"`},
	}
	for _, s := range []*voiceClient{s1, s2, s3} {
		e := waitEnding(t, ends[s.id], 5*time.Second)
		var got []string
		for _, m := range e.msgs {
			if m["type"] == "notice" {
				b, _ := json.Marshal(m["message"])
				got = append(got, string(b))
				if m["session_id"] != s.id {
					t.Errorf("notice for session %v delivered to %s", m["session_id"], s.id)
				}
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want[s.id]) {
			t.Errorf("session %s got notices %v, want %v", s.id, got, want[s.id])
		}
	}
}

// TestVoiceMetricsTenantsBounded: latencies and barge-ins of 1,000 tenants make series for the
// tenants the policy names (tenant-a) and one "other", however many tenants there are.
func TestVoiceMetricsTenantsBounded(t *testing.T) {
	cfg := &config{MetricsEnabled: true, ServiceName: "voicegate", VoiceReservation: time.Second}
	tel, err := newTelemetry(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tel.shutdown(context.Background())
	store, err := policy.NewStore(policy.StoreOptions{Path: govPolicy(t),
		Routes: routeBindings(&config{}), ExtraPerms: handlerPerms})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := newVoiceMetrics(tel, store)
	if err != nil {
		t.Fatal(err)
	}
	o := voice.Options{OnLatency: vm.latency, OnBargeIn: vm.bargeIn}
	for i := range 1000 {
		tenant := fmt.Sprintf("tenant-%d", i)
		if i == 0 {
			tenant = "tenant-a"
		}
		o.OnLatency(voice.LatencyResponse, tenant, 300*time.Millisecond)
		o.OnLatency(voice.LatencyASR, tenant, 100*time.Millisecond)
		o.OnBargeIn(tenant)
	}
	rec := httptest.NewRecorder()
	tel.metricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	series := map[string]map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(rec.Body.String()))
	for sc.Scan() {
		line := sc.Text()
		for _, m := range []string{"voice_response_latency_seconds_count", "voice_asr_latency_seconds_count", "voice_barge_ins_total"} {
			if strings.HasPrefix(line, m+"{") {
				if series[m] == nil {
					series[m] = map[string]string{}
				}
				labels, value, _ := strings.Cut(line[len(m):], " ")
				series[m][labels] = value
			}
		}
	}
	for _, m := range []string{"voice_response_latency_seconds_count", "voice_asr_latency_seconds_count", "voice_barge_ins_total"} {
		want := map[string]string{`{tenant="tenant-a"}`: "1", `{tenant="other"}`: "999"}
		if fmt.Sprint(series[m]) != fmt.Sprint(want) {
			t.Errorf("%s series = %v, want %v", m, series[m], want)
		}
	}
}

// TestVoiceQuotaHeldAsAudioArrives: with a daily quota of 20 s a user sends audio as fast as the
// gateway takes it (the pace bound set wide open). The algorithm service receives at most the 20
// s plus one reservation (VOICE_RESERVATION, 2 s), the session ends 4429 after an error
// QUOTA_EXCEEDED, and the user is charged exactly what was relayed.
func TestVoiceQuotaHeldAsAudioArrives(t *testing.T) {
	t.Parallel()
	const quota, reservation = 20 * time.Second, 2 * time.Second
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), with(roomyBudgets, map[string]string{
		"POLICY_FILE": voicePolicy(t, "e2e.json", func(l *policy.Limits) {
			l.VoiceAudioSecondsPerDay = &policy.AudioQuota{PerUser: int64(quota / time.Second)}
		}),
		"VOICE_RESERVATION": reservation.String(), "VOICE_PACE_BURST": "1h"})))
	w := watchTokens(t, g)
	v := openVoice(t, g, "", bearer(w.token(t, "u-fast", []string{"user"}, nil)))
	ended := v.readToClose(t.Context())
	start := time.Now()
	sent := sendAudioUntilClosed(t, v, 10*quota)
	e := waitEnding(t, ended, 10*time.Second)
	eventually(t, 5*time.Second, "the algorithm service's side closes", func() bool { return algo.voiceOpen.Load() == 0 })
	got := algo.audioReceived(t)
	t.Logf("sent %v of audio in %v; the algorithm service received %v", sent, time.Since(start), got)
	if e.code != voice.CloseQuotaExceeded {
		t.Errorf("closed %v (%v), want 4429", e.code, e.err)
	}
	if codes := e.errorCodes(); len(codes) != 1 || codes[0] != voice.CodeQuotaExceeded {
		t.Errorf("error messages %v, want [QUOTA_EXCEEDED]", codes)
	}
	if got > quota+reservation || got < quota-reservation {
		t.Errorf("the algorithm service received %v of audio, want the quota %v, give or take one reservation (%v)", got, quota, reservation)
	}
	eventually(t, 5*time.Second, "the user is charged what was relayed", func() bool {
		return chargedMS(t, r, "u-fast") == got.Milliseconds()
	})
}

// TestVoicePaceBound: a client that sends 6 s of audio at once, with VOICE_PACE 2 and
// VOICE_PACE_BURST 1s, has all of it relayed — nothing is dropped — but no sooner than the pace
// allows: the second beyond the burst at once, the other 5 s at twice real time, 2.5 s.
func TestVoicePaceBound(t *testing.T) {
	t.Parallel()
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "VOICE_PACE": "2", "VOICE_PACE_BURST": "1s"})
	w := watchTokens(t, g)
	v := openVoice(t, g, "", bearer(w.token(t, "u-pace", []string{"user"}, nil)))
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	for range 300 { // 6 s of 20 ms frames
		if err := v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640)); err != nil {
			t.Fatalf("send audio: %v", err)
		}
	}
	took := eventually(t, 20*time.Second, "the algorithm service gets all 6 s", func() bool {
		return algo.audioReceived(t) == 6*time.Second
	})
	t.Logf("6 s of audio relayed in %v", took)
	// The last frame is read once the 5.98 s before it are due at the pace, less the burst.
	if floor := (5980*time.Millisecond - time.Second) / 2; time.Since(start) < floor {
		t.Errorf("6 s of audio relayed in %v, faster than the pace allows (%v)", time.Since(start), floor)
	}
	_ = v.conn.Close(websocket.StatusNormalClosure, "bye")
}

// TestVoiceQuotaFailsOpenThenCharged: Redis freezes while a user with a 2 s quota talks. The
// session goes on past its quota (fair use fails open), no faster than the pace bound lets it
// (VOICE_PACE 2, VOICE_PACE_BURST 1s); once Redis answers again its next reservation charges
// all it relayed and finds nothing left, and it ends 4429, charged exactly what it relayed.
func TestVoiceQuotaFailsOpenThenCharged(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, redisEnv(r, algo, okBackend(t), map[string]string{
		"POLICY_FILE": govPolicy(t), "VOICE_PACE": "2", "VOICE_PACE_BURST": "1s"}))
	w := watchTokens(t, g)
	v := openVoice(t, g, "", bearer(w.token(t, "u-open", []string{"user"}, nil)))
	ended := v.readToClose(t.Context())
	eventually(t, 5*time.Second, "the session holds its first reservation", func() bool {
		return r.Do(t, "HGET", "voicegate:vq:{tenant-a}:s:"+v.id, "ms") == "2000"
	})

	r.Freeze()
	thawed := false
	defer func() {
		if !thawed {
			r.Thaw()
		}
	}()
	start := time.Now()
	sendAudio(t, v, 4*time.Second) // twice the quota
	eventually(t, 10*time.Second, "the algorithm service gets all 4 s while Redis is frozen", func() bool {
		return algo.audioReceived(t) == 4*time.Second
	})
	if took, floor := time.Since(start), (3980*time.Millisecond-time.Second)/2; took < floor {
		t.Errorf("4 s of audio relayed in %v, faster than the pace allows (%v)", took, floor)
	}
	r.Thaw()
	thawed = true

	// The client talks on, a frame every 20 ms, until the session ends.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var e voiceEnding
	for done := false; !done; {
		select {
		case e = <-ended:
			done = true
		case <-tick.C:
			_ = v.conn.Write(ctx, websocket.MessageBinary, make([]byte, 640))
		case <-ctx.Done():
			t.Fatal("the session did not end once Redis answered again")
		}
	}
	if e.code != voice.CloseQuotaExceeded {
		t.Errorf("closed %v (%v), want 4429", e.code, e.err)
	}
	eventually(t, 5*time.Second, "the algorithm service's side closes", func() bool { return algo.voiceOpen.Load() == 0 })
	got := algo.audioReceived(t)
	eventually(t, 5*time.Second, "the user is charged all that was relayed", func() bool {
		return chargedMS(t, r, "u-open") == got.Milliseconds()
	})
	t.Logf("relayed %v on a quota of 2 s, %v of it once Redis answered again", got, got-4*time.Second)
}
