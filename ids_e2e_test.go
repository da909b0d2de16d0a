package main

// What an ID or label from a client may hold, seen from outside: every route that takes one
// refuses the values of testdata/ids/attacks.json (C0 and C1 controls, U+2028 and U+2029, bidi
// controls, ...) with 400 VALIDATION_ERROR naming the field, before anything is done with it.

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"

	"voicegate/proxy"
)

// idAttack is one value no ID or label may hold.
type idAttack struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// idAttacks is the table shared with proxy's tests of the validator.
func idAttacks(t *testing.T) []idAttack {
	t.Helper()
	b, err := os.ReadFile("testdata/ids/attacks.json")
	if err != nil {
		t.Fatal(err)
	}
	var as []idAttack
	if err := json.Unmarshal(b, &as); err != nil || len(as) == 0 {
		t.Fatalf("testdata/ids/attacks.json: %v (%d entries)", err, len(as))
	}
	return as
}

// wantFieldError checks that res is a 400 VALIDATION_ERROR whose details name field first.
func wantFieldError(t *testing.T, res *http.Response, field string) {
	t.Helper()
	doc := wantError(t, res, http.StatusBadRequest, proxy.CodeValidation)
	var details []struct{ Field, Reason string }
	if err := json.Unmarshal(doc.Details, &details); err != nil || len(details) == 0 {
		t.Fatalf("details = %s, want a list of field errors", doc.Details)
	}
	if details[0].Field != field || details[0].Reason == "" {
		t.Errorf("details = %s, want field %q with a reason", doc.Details, field)
	}
}

// jsonBody encodes fields as a JSON object.
func jsonBody(t *testing.T, fields map[string]any) string {
	t.Helper()
	b, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// hasCtl reports whether s holds a byte no HTTP client sends in a header value.
func hasCtl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

func TestChatRefusesIDAttacks(t *testing.T) {
	algo := newFakeAlgo(t, func(w http.ResponseWriter, r *http.Request) {
		ndjson(w, `{"type":"generation_done"}`)
	})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	for _, a := range idAttacks(t) {
		for _, field := range []string{"conversation_id", "stream_id", "model", "request_id"} {
			t.Run(field+"/"+a.Name, func(t *testing.T) {
				body := jsonBody(t, map[string]any{"message": "hi", field: a.Value})
				wantFieldError(t, postChat(t, g, body, nil), field)
			})
		}
	}
	if n := len(algo.requests()); n != 0 {
		t.Errorf("the algorithm service received %d requests, want none", n)
	}
}

func TestVoiceRefusesIDAttacks(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	tok := tokenFor(t, "u-voice-ids", []string{"user"}, nil)
	for _, a := range idAttacks(t) {
		for _, field := range []string{"conversation_id", "language"} {
			t.Run(field+"/"+a.Name, func(t *testing.T) {
				res := voiceRefused(t, g, "?"+field+"="+url.QueryEscape(a.Value), bearer(tok))
				wantFieldError(t, res, field)
			})
		}
	}
	if n := len(algo.dials()); n != 0 {
		t.Errorf("the algorithm service was dialled %d times, want never", n)
	}
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
