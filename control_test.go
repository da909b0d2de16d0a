package main

// Control that follows live sessions to whichever instance runs them: revocations end voice
// sessions and chat streams everywhere at once, an admin closes a session on another instance,
// cancels reach only the right stream and the right tenant, a dead instance's streams are not
// pretended to run, and the routes that act by ID refuse IDs a client may not send.

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"voicegate/proxy"
)

// holdStream opens a chat stream of token with request_id id on g (chatVoiceAlgo holds it
// until it is cancelled) and returns it once the upstream has answered.
func holdStream(t *testing.T, c *http.Client, base, token, id string) (*http.Response, *sseReader) {
	t.Helper()
	res := chatRequest(t, c, base, token, id, "hold", "")
	s := wantStream(t, res)
	if ev := nextEvent(t, s); ev.Event != "stream_start" {
		t.Fatalf("event %q, want stream_start", ev.Event)
	}
	return res, s
}

func TestControlAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := holdAlgo(t, nil)
	env := redisEnv(r, algo, okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	tenantB := map[string]any{"tenant_id": "tenant-b"}

	t.Run("a revocation on A ends voice and chat on B", func(t *testing.T) {
		// A hundred, so that the p99 is the 99th: one trial the machine stalled (a few ms is
		// usual; one of over 100 ms was seen with other test binaries running beside, under
		// -race) does not decide it alone.
		const trials = 100
		var lags []time.Duration
		for i := range trials {
			tok := w.token(t, "u-rev-"+strconv.Itoa(i), []string{"user"}, nil)
			v := openVoice(t, b, "?conversation_id=c-rev", bearer(tok))
			ended := v.readToClose(t.Context())
			res, s := holdStream(t, b.Client, b.URL, tok, "rev-"+strconv.Itoa(i))
			chatEnd := make(chan sseEvent, 1)
			go func() {
				ev, _ := s.next()
				chatEnd <- ev
			}()

			// From just before the revocation is sent to A (its 200 may come after B has acted).
			revoked := time.Now()
			wantStatus(t, call(t, a, "POST", "/api/v2/auth/revoke", tok, ""), http.StatusOK)
			e := waitEnding(t, ended, 3*time.Second)
			if e.code != 4401 || !slices.Contains(e.errorCodes(), "TOKEN_REVOKED") && !slices.Contains(e.errorCodes(), "TOKEN_INVALID") {
				t.Fatalf("voice session: close %d after %v, want 4401 after TOKEN_REVOKED", e.code, e.errorCodes())
			}
			var ev sseEvent
			select {
			case ev = <-chatEnd:
			case <-time.After(3 * time.Second):
				t.Fatal("the chat stream on B was not ended within 3s of the revocation")
			}
			chatAt := time.Now()
			if ev.Event != "error" || ev.fields(t)["code"] != "TOKEN_REVOKED" {
				t.Fatalf("chat stream: %s %s, want an error TOKEN_REVOKED", ev.Event, ev.Data)
			}
			if next := nextEvent(t, s); next.Event != "stream_end" {
				t.Fatalf("after TOKEN_REVOKED: %s, want stream_end", next.Event)
			}
			res.Body.Close()
			lags = append(lags, max(e.at.Sub(revoked), chatAt.Sub(revoked)))
		}
		slices.Sort(lags)
		p50, p99 := percentile(lags, 0.5), percentile(lags, 0.99)
		t.Logf("from sending a revocation to A to the end of both B's voice session and chat stream, over %d: p50 %v, p99 %v", len(lags), p50, p99)
		if p99 > 100*time.Millisecond {
			t.Errorf("p99 lag %v, want at most 100ms", p99)
		}
	})

	t.Run("an admin closes a session on the other instance", func(t *testing.T) {
		user := w.token(t, "u-talk", []string{"user"}, nil)
		admin := w.token(t, "u-admin", []string{"admin"}, nil)
		otherAdmin := w.token(t, "u-admin-b", []string{"admin"}, tenantB)
		v := openVoice(t, b, "?conversation_id=c-close", bearer(user))
		ended := v.readToClose(t.Context())
		wantError(t, call(t, a, "DELETE", "/api/v2/voice/sessions/"+v.id, otherAdmin, ""), http.StatusNotFound, "NOT_FOUND")
		res := call(t, a, "DELETE", "/api/v2/voice/sessions/"+v.id, admin, "")
		wantStatus(t, res, http.StatusOK)
		e := waitEnding(t, ended, 3*time.Second)
		if e.code != websocket.StatusPolicyViolation || !slices.Contains(e.errorCodes(), "SESSION_CLOSED") {
			t.Fatalf("closed by an admin: close %d after %v, want 1008 after SESSION_CLOSED", e.code, e.errorCodes())
		}
		wantError(t, call(t, a, "DELETE", "/api/v2/voice/sessions/"+v.id, admin, ""), http.StatusNotFound, "NOT_FOUND")
	})

	t.Run("listing and cancels stay in their tenant", func(t *testing.T) {
		user := w.token(t, "u-list", []string{"user"}, nil)
		adminB := w.token(t, "u-admin-b2", []string{"admin"}, tenantB)
		super := w.token(t, "u-root", []string{"super_admin"}, tenantB)
		v := openVoice(t, b, "?conversation_id=c-list", bearer(user))
		defer v.conn.CloseNow()
		if l := listVoice(t, a, adminB); l.hasSession(v.id) {
			t.Error("an admin of tenant-b lists a session of tenant-a")
		}
		if l := listVoice(t, a, super); !l.hasSession(v.id) {
			t.Error("a super admin does not list every tenant's sessions")
		}
		res, s := holdStream(t, b.Client, b.URL, user, "tenant-bound")
		defer res.Body.Close()
		// tenant-b's admin looks in tenant-b: there is no such stream there.
		wantError(t, cancelUserStream(t, a, adminB, "u-list", "tenant-bound", nil), http.StatusNotFound, "NOT_FOUND")
		// A super admin may address tenant-a, and name the stream's owner there.
		wantStatus(t, cancelUserStream(t, a, super, "u-list", "tenant-bound", map[string]string{"X-Tenant-Id": "tenant-a"}), http.StatusOK)
		if ev := nextEvent(t, s); ev.Event != "stream_cancelled" {
			t.Errorf("after the super admin's cancel: %s, want stream_cancelled", ev.Event)
		}
	})

	t.Run("one request_id, two users, two instances", func(t *testing.T) {
		alice := w.token(t, "u-alice", []string{"user"}, nil)
		bob := w.token(t, "u-bob", []string{"user"}, nil)
		carol := w.token(t, "u-carol", []string{"user"}, tenantB)
		resA, sA := holdStream(t, a.Client, a.URL, alice, "shared-id")
		defer resA.Body.Close()
		aliceGot := make(chan sseEvent, 1)
		go func() {
			ev, _ := sA.next()
			aliceGot <- ev
		}()
		// A request ID is its user's: to Bob, a colleague in the same tenant, Alice's stream
		// does not exist, on either instance.
		for _, g := range []*testGateway{a, b} {
			wantError(t, cancelStream(t, g, bob, "shared-id", nil), http.StatusNotFound, "NOT_FOUND")
			// Naming her takes chat:admin, whether or not she has such a stream.
			wantError(t, cancelUserStream(t, g, bob, "u-alice", "shared-id", nil), http.StatusForbidden, "PERMISSION_DENIED")
			wantError(t, cancelUserStream(t, g, bob, "u-alice", "nobody-uses-this", nil), http.StatusForbidden, "PERMISSION_DENIED")
		}
		// Bob's stream of the same ID is his own, and his cancel ends his only.
		resB, sB := holdStream(t, b.Client, b.URL, bob, "shared-id")
		defer resB.Body.Close()
		wantStatus(t, cancelStream(t, a, bob, "shared-id", nil), http.StatusOK)
		if ev := nextEvent(t, sB); ev.Event != "stream_cancelled" {
			t.Errorf("Bob's stream after his cancel: %s, want stream_cancelled", ev.Event)
		}
		// Carol's, in another tenant, is her own too.
		resC, sC := holdStream(t, b.Client, b.URL, carol, "shared-id")
		defer resC.Body.Close()
		wantStatus(t, cancelStream(t, a, carol, "shared-id", nil), http.StatusOK)
		if ev := nextEvent(t, sC); ev.Event != "stream_cancelled" {
			t.Errorf("Carol's stream after her cancel: %s, want stream_cancelled", ev.Event)
		}
		select {
		case ev := <-aliceGot:
			t.Fatalf("Alice's stream got %s %s from the others' cancels", ev.Event, ev.Data)
		default:
		}
		// An admin of her tenant names her, through the other instance.
		admin := w.token(t, "u-admin-a", []string{"admin"}, nil)
		wantStatus(t, cancelUserStream(t, b, admin, "u-alice", "shared-id", nil), http.StatusOK)
		select {
		case ev := <-aliceGot:
			if ev.Event != "stream_cancelled" {
				t.Errorf("Alice's stream after the admin's cancel: %s, want stream_cancelled", ev.Event)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Alice's stream was not cancelled within 5s of the admin's cancel")
		}
	})

	t.Run("a cancel for a dead instance's stream: 404", func(t *testing.T) {
		c := startChildGateway(t, with(env, map[string]string{"INSTANCE_NAME": "c"}))
		dave := w.token(t, "u-dave", []string{"user"}, nil)
		res, _ := holdStream(t, c.client, c.url, dave, "on-c")
		defer res.Body.Close()
		c.kill()
		killed := time.Now()
		eventually(t, 5*time.Second, "a cancel for the dead instance's stream answers 404", func() bool {
			res := cancelStream(t, b, dave, "on-c", nil)
			defer res.Body.Close()
			return res.StatusCode == http.StatusNotFound
		})
		t.Logf("404 %v after the kill", time.Since(killed))
		if keys, _ := r.Do(t, "KEYS", "voicegate:stream:*on-c").([]any); len(keys) != 0 {
			t.Errorf("the dead instance's directory entry is still there: %v", keys)
		}
	})
}

// TestControlRevocationStaysInTenant: two tenants each have a user "1001", and their tokens
// share a jti. An admin of tenant-a revoking that jti, then user 1001, through instance A ends
// tenant-a's 1001's chat streams and voice sessions on B and refuses its tokens; tenant-b's
// 1001 keeps its tokens, its stream (which still takes a cancel: stream_cancelled, not
// TOKEN_REVOKED) and its voice session (which an admin of tenant-b then closes: 1008, not
// 4401). The admin of tenant-a cannot revoke in tenant-b; a super admin can.
func TestControlRevocationStaysInTenant(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	env := redisEnv(r, holdAlgo(t, nil), okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	const doc = "/api/v2/documents/x"
	tenantB := map[string]any{"tenant_id": "tenant-b"}
	adminA := w.token(t, "u-admin-a", []string{"admin"}, nil)
	adminB := w.token(t, "u-admin-b", []string{"admin"}, tenantB)
	super := w.token(t, "u-root", []string{"super_admin"}, nil)

	// live is what runs on B for one token: a chat stream and a voice session.
	type live struct {
		token  string
		stream *sseReader
		id     string // the stream's request_id
		voice  *voiceClient
		ended  <-chan voiceEnding
	}
	start := func(t *testing.T, token, id string) *live {
		t.Helper()
		res, s := holdStream(t, b.Client, b.URL, token, id)
		t.Cleanup(func() { res.Body.Close() })
		v := openVoice(t, b, "?conversation_id=c-"+id, bearer(token))
		return &live{token: token, stream: s, id: id, voice: v, ended: v.readToClose(t.Context())}
	}
	// revokedEverywhere: the token is refused on both instances, its stream ended with
	// TOKEN_REVOKED, its voice session closed 4401.
	revokedEverywhere := func(t *testing.T, l *live) {
		t.Helper()
		if ev := nextEvent(t, l.stream); ev.Event != "error" || ev.fields(t)["code"] != "TOKEN_REVOKED" {
			t.Errorf("stream %s: %s %s, want an error TOKEN_REVOKED", l.id, ev.Event, ev.Data)
		}
		if e := waitEnding(t, l.ended, 3*time.Second); e.code != 4401 {
			t.Errorf("voice session of %s: close %d, want 4401", l.id, e.code)
		}
		for _, g := range []*testGateway{a, b} {
			wantError(t, call(t, g, "GET", doc, l.token, ""), http.StatusUnauthorized, "TOKEN_REVOKED")
		}
	}
	// untouched: checked once the same revocation has ended the other tenant's on B (one
	// message ends both, or neither): the token passes on both instances, the voice session
	// runs, and the stream's next event is the one its cancel makes.
	untouched := func(t *testing.T, l *live) {
		t.Helper()
		select {
		case e := <-l.ended:
			t.Fatalf("voice session of %s ended: %d %v", l.id, e.code, e.errorCodes())
		default:
		}
		for _, g := range []*testGateway{a, b} {
			wantStatus(t, call(t, g, "GET", doc, l.token, ""), http.StatusOK)
		}
		wantStatus(t, cancelStream(t, a, l.token, l.id, nil), http.StatusOK)
		if ev := nextEvent(t, l.stream); ev.Event != "stream_cancelled" {
			t.Errorf("stream %s after its cancel: %s %s, want stream_cancelled", l.id, ev.Event, ev.Data)
		}
		wantStatus(t, call(t, a, "DELETE", "/api/v2/voice/sessions/"+l.voice.id, adminB, ""), http.StatusOK)
		if e := waitEnding(t, l.ended, 3*time.Second); e.code != websocket.StatusPolicyViolation {
			t.Errorf("voice session of %s closed by its admin: %d %v, want 1008", l.id, e.code, e.errorCodes())
		}
	}

	t.Run("one jti in two tenants", func(t *testing.T) {
		inA := start(t, w.token(t, "1001", []string{"user"}, map[string]any{"jti": "jti-shared"}), "jti-a")
		inB := start(t, w.token(t, "1001", []string{"user"}, map[string]any{"jti": "jti-shared", "tenant_id": "tenant-b"}), "jti-b")
		wantStatus(t, call(t, a, "POST", "/api/v2/auth/revoke", adminA, `{"jti":"jti-shared"}`), http.StatusOK)
		revokedEverywhere(t, inA)
		untouched(t, inB)
	})

	t.Run("one user ID in two tenants", func(t *testing.T) {
		inA := start(t, w.token(t, "1001", []string{"user"}, nil), "user-a")
		inB := start(t, w.token(t, "1001", []string{"user"}, tenantB), "user-b")
		res := call(t, a, "POST", "/api/v2/auth/revoke", adminA, `{"user_id":"1001"}`)
		wantStatus(t, res, http.StatusOK)
		var got map[string]any
		if err := json.NewDecoder(res.Body).Decode(&got); err != nil || got["tenant_id"] != "tenant-a" {
			t.Errorf("answer %v (%v), want tenant_id tenant-a", got, err)
		}
		revokedEverywhere(t, inA)
		untouched(t, inB)
	})

	t.Run("another tenant: only a super admin", func(t *testing.T) {
		inB := start(t, w.token(t, "1001", []string{"user"}, tenantB), "super-b")
		for _, body := range []string{`{"user_id":"1001","tenant_id":"tenant-b"}`, `{"jti":"jti-shared","tenant_id":"tenant-b"}`} {
			wantError(t, call(t, a, "POST", "/api/v2/auth/revoke", adminA, body), http.StatusForbidden, "PERMISSION_DENIED")
		}
		wantStatus(t, call(t, b, "GET", doc, inB.token, ""), http.StatusOK)
		wantStatus(t, call(t, a, "POST", "/api/v2/auth/revoke", super, `{"user_id":"1001","tenant_id":"tenant-b"}`), http.StatusOK)
		revokedEverywhere(t, inB)
	})
}

// TestControlInstancesOnOneHost: two gateway processes on one host, configured with nothing
// but their ports and the shared Redis (no INSTANCE_NAME, so one host name), are two
// instances: a cancel sent to the live one for a stream of the one killed (SIGKILL) answers 404
// within a second — nobody listens on the dead instance's channel — instead of being taken by
// its sibling.
func TestControlInstancesOnOneHost(t *testing.T) {
	r := startRedis(t)
	env := map[string]string{"ALGO_URL": holdAlgo(t, nil).URL, "REDIS_URL": r.URL(), "JWT_SECRET": testSecret}
	one := startChildGateway(t, env)
	two := startChildGateway(t, env)
	user := tokenFor(t, "u-host", []string{"user"}, nil)
	res, _ := holdStream(t, one.client, one.url, user, "on-one")
	defer res.Body.Close()
	// Both are running the same host name, and each its own identity.
	var ids []string
	for _, g := range []*child{one, two} {
		for _, line := range strings.Split(g.stderr.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "listening" {
				id, _ := rec["instance"].(string)
				ids = append(ids, id)
			}
		}
	}
	host, _ := os.Hostname()
	if len(ids) != 2 || ids[0] == ids[1] || !strings.HasPrefix(ids[0], host+"-") || !strings.HasPrefix(ids[1], host+"-") {
		t.Errorf("instance identities %q, want two different ones, each the host name %q and a suffix", ids, host)
	}

	one.kill()
	killed := time.Now()
	cancel := func() int {
		h := map[string]string{"Authorization": "Bearer " + user, "Content-Type": "application/json"}
		req, err := http.NewRequestWithContext(t.Context(), "POST", two.url+"/api/v2/chat/cancel", strings.NewReader(`{"request_id":"on-one"}`))
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range h {
			req.Header.Set(k, v)
		}
		res, err := two.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	eventually(t, time.Second, "a cancel for the killed instance's stream answers 404", func() bool {
		return cancel() == http.StatusNotFound
	})
	t.Logf("404 %v after the kill", time.Since(killed).Round(time.Millisecond))
	if keys, _ := r.Do(t, "KEYS", "voicegate:stream:*on-one").([]any); len(keys) != 0 {
		t.Errorf("the killed instance's directory entry is still there: %v", keys)
	}
}

// hasCtl reports whether s holds a byte no HTTP client sends in a header value.
func hasCtl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// TestControlRoutesRefuseIDAttacks: the routes that act on streams, sessions and tokens by ID.
func TestControlRoutesRefuseIDAttacks(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "SSE_RESUME_WINDOW": "10s"})
	admin := tokenFor(t, "u-ids-admin", []string{"admin"}, nil)
	super := tokenFor(t, "u-ids-super", []string{"super_admin"}, nil)
	for _, a := range idAttacks(t) {
		path := url.PathEscape(a.Value)
		t.Run("resume request_id/"+a.Name, func(t *testing.T) {
			wantFieldError(t, call(t, g, "GET", "/api/v2/chat/stream/"+path, admin, ""), "request_id")
		})
		t.Run("cancel request_id/"+a.Name, func(t *testing.T) {
			wantFieldError(t, call(t, g, "POST", "/api/v2/chat/cancel", admin, jsonBody(t, map[string]any{"request_id": a.Value})), "request_id")
		})
		t.Run("session_id/"+a.Name, func(t *testing.T) {
			wantFieldError(t, call(t, g, "GET", "/api/v2/voice/sessions/"+path, admin, ""), "session_id")
			wantFieldError(t, call(t, g, "DELETE", "/api/v2/voice/sessions/"+path, admin, ""), "session_id")
		})
		for _, field := range []string{"tenant_id", "user_id"} {
			t.Run("broadcast "+field+"/"+a.Name, func(t *testing.T) {
				body := jsonBody(t, map[string]any{"message": "maintenance at noon", field: a.Value})
				wantFieldError(t, call(t, g, "POST", "/api/v2/voice/broadcast", super, body), field)
			})
		}
		for _, field := range []string{"jti", "user_id", "tenant_id"} {
			t.Run("revoke "+field+"/"+a.Name, func(t *testing.T) {
				fields := map[string]any{field: a.Value}
				if field == "tenant_id" {
					fields["jti"] = "j-1" // a tenant names the tenant of a jti or user
				}
				wantFieldError(t, call(t, g, "POST", "/api/v2/auth/revoke", super, jsonBody(t, fields)), field)
			})
		}
		if hasCtl(a.Value) {
			continue // no client sends these in a header
		}
		t.Run("X-Tenant-ID/"+a.Name, func(t *testing.T) {
			res := callWith(t, g, "POST", "/api/v2/chat/cancel", super, `{"request_id":"r-1"}`, map[string]string{"X-Tenant-ID": a.Value})
			wantFieldError(t, res, "X-Tenant-ID")
		})
		t.Run("X-Request-ID/"+a.Name, func(t *testing.T) {
			// A request ID the client picks is only a correlation aid: a bad one is replaced,
			// never echoed, and the upstream gets the replacement.
			before := len(algo.requests())
			res := postChat(t, g, `{"message":"hi"}`, map[string]string{"X-Request-ID": a.Value})
			wantStatus(t, res, http.StatusOK)
			id := res.Header.Get("X-Request-ID")
			if id == a.Value || !proxy.ValidRequestID(id) {
				t.Errorf("X-Request-ID %q answered with %q, want a fresh one", a.Value, id)
			}
			reqs := algo.requests()
			if len(reqs) != before+1 {
				t.Fatalf("the algorithm service received %d requests, want 1", len(reqs)-before)
			}
			if got := reqs[len(reqs)-1].Header.Get("X-Request-ID"); got != id {
				t.Errorf("the algorithm service got X-Request-ID %q, want the gateway's %q", got, id)
			}
		})
	}
	// The access log names the refused paths; its lines stay one JSON record each.
	if log := g.Stderr.String(); strings.ContainsAny(log, "\u2028\u2029") {
		t.Errorf("a log line holds a raw line separator:\n%s", clipText(log))
	}
	logRecords(t, g)
}
