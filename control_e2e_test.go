package main

// Control that follows live sessions to whichever instance runs them: revocations end voice
// sessions and chat streams everywhere at once, an admin closes a session on another instance,
// cancels reach only the right stream and the right tenant, and a dead instance's streams are
// not pretended to run.

import (
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
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

// cancelStream asks g to cancel request_id id for token, with extra headers.
func cancelStream(t *testing.T, g *testGateway, token, id string, header map[string]string) *http.Response {
	t.Helper()
	return cancelUserStream(t, g, token, "", id, header)
}

// cancelUserStream asks g to cancel user's (none: the caller's) stream of request_id id.
func cancelUserStream(t *testing.T, g *testGateway, token, user, id string, header map[string]string) *http.Response {
	t.Helper()
	h := map[string]string{"Authorization": "Bearer " + token, "Content-Type": "application/json"}
	for k, v := range header {
		h[k] = v
	}
	body := `{"request_id":"` + id + `"}`
	if user != "" {
		body = `{"request_id":"` + id + `","user_id":"` + user + `"}`
	}
	return doRequest(t, g.Client, "POST", g.URL+"/api/v2/chat/cancel", strings.NewReader(body), h)
}

func TestControlAcrossInstances(t *testing.T) {
	r := startRedis(t)
	algo := chatVoiceAlgo(t)
	env := redisEnv(r, algo, okBackend(t), roomyBudgets)
	a := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "a"}))
	b := startRun(t, nil, with(env, map[string]string{"INSTANCE_NAME": "b"}))
	w := watchTokens(t, a, b)
	tenantB := map[string]any{"tenant_id": "tenant-b"}

	t.Run("a revocation on A ends voice and chat on B", func(t *testing.T) {
		var lags []time.Duration
		for i := range 50 {
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
