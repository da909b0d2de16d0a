package main

// In-band refusals: a browser cannot read the status of a refused WebSocket handshake, so a
// browser-style upgrade (an Origin, offering voice-protocol-v2) that the gateway refuses is
// accepted only to carry one error message and a close code of 4000 + the status.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// refusalMsg is the error message of an in-band refusal.
type refusalMsg struct {
	Type       string `json:"type"`
	Code       string `json:"code"`
	Message    string `json:"message"`
	Status     int    `json:"status"`
	RequestID  string `json:"request_id"`
	RetryAfter int    `json:"retry_after"`
}

// browserRefused dials g as a browser from origin (with the token, if any, as a subprotocol),
// and fails the test unless the gateway accepts only to send one error message and close
// with 4000 + its status. It returns the message.
func browserRefused(t *testing.T, g *testGateway, origin, token string) refusalMsg {
	t.Helper()
	protos := []string{voiceSubprotocol}
	if token != "" {
		protos = append(protos, "bearer."+token)
	}
	conn, res, err := voiceDial(t, g, "?conversation_id=c-refused", http.Header{"Origin": {origin}}, protos...)
	if err != nil {
		t.Fatalf("the browser-style upgrade was not accepted: %v (%s)", err, describeResult(res, err))
	}
	if got := res.Header.Values("Sec-WebSocket-Protocol"); !slices.Equal(got, []string{voiceSubprotocol}) {
		t.Errorf("the refusal's 101 selects %.30q, want exactly [%s]", got, voiceSubprotocol)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	typ, raw, err := conn.Read(ctx)
	if err != nil || typ != websocket.MessageText {
		t.Fatalf("no error message before the close: %v", err)
	}
	var m refusalMsg
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("the refusal is not JSON: %s", raw)
	}
	if m.Type != "error" || m.Status < 400 || m.Code == "" || m.Message == "" {
		t.Errorf("refusal message %s, want type error with status, code and message", raw)
	}
	if own := res.Header.Get("X-Request-ID"); m.RequestID == "" || m.RequestID != own {
		t.Errorf("refusal request_id %q, want the 101's X-Request-ID %q", m.RequestID, own)
	}
	_, _, err = conn.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("after the error message: %v, want a close frame", err)
	}
	if want := websocket.StatusCode(4000 + m.Status); ce.Code != want || ce.Reason != m.Code {
		t.Errorf("closed %d %q, want %d %q", ce.Code, ce.Reason, want, m.Code)
	}
	return m
}

func TestVoiceBrowserRefusals(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL, "CORS_ORIGINS": "https://app.example.com",
		"POLICY_FILE": "testdata/policy/e2e-voice-cap.json"})
	w := watchTokens(t, g)
	user := w.token(t, "u-refused", []string{"user"}, nil)
	noPerm := w.token(t, "u-refused-noperm", []string{}, nil)
	now := time.Now()
	forged := w.add(signHS256(t, "not-the-gateway-secret-0123456789abcdef", map[string]any{
		"sub": "u-refused", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "roles": []string{"user"}}))
	const app = "https://app.example.com"

	for _, tt := range []struct {
		name, origin, token string
		status              int
		code, mention       string
	}{
		{"no token", app, "", 401, "TOKEN_MISSING", ""},
		{"bad token", app, forged, 401, "TOKEN_INVALID", ""},
		{"no voice:write", app, noPerm, 403, "PERMISSION_DENIED", "voice:write"},
		{"disallowed origin", "https://evil.example", user, 403, "PERMISSION_DENIED", "origin"},
		// Only the origin's reason, whatever else is wrong: a page elsewhere learns nothing about
		// the token it sent.
		{"disallowed origin, bad token", "https://evil.example", forged, 403, "PERMISSION_DENIED", "origin"},
		{"disallowed origin, no token", "https://evil.example", "", 403, "PERMISSION_DENIED", "origin"},
		{"localhost is not 127.0.0.1", "http://localhost:" + strings.Split(g.Addr, ":")[1], user, 403, "PERMISSION_DENIED", "origin"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := browserRefused(t, g, tt.origin, tt.token)
			if m.Status != tt.status || m.Code != tt.code || !strings.Contains(m.Message, tt.mention) {
				t.Errorf("refused %d %s %q, want %d %s mentioning %q", m.Status, m.Code, m.Message, tt.status, tt.code, tt.mention)
			}
			if n := len(algo.dials()); n != 0 {
				t.Errorf("the algorithm service was dialed %d times, want never", n)
			}
		})
	}

	t.Run("a non-browser client keeps the HTTP status", func(t *testing.T) {
		wantError(t, voiceRefused(t, g, "", nil, voiceSubprotocol), http.StatusUnauthorized, "TOKEN_MISSING")
		// A client that sends Authorization is no browser, whatever its Origin says.
		h := bearer(noPerm)
		h.Set("Origin", app)
		wantError(t, voiceRefused(t, g, "", h, voiceSubprotocol), http.StatusForbidden, "PERMISSION_DENIED")
	})

	t.Run("the access log counts the refusal's status", func(t *testing.T) {
		m := browserRefused(t, g, "https://logged.example", user)
		eventually(t, 2*time.Second, "the refusal's access log line", func() bool {
			for _, rec := range logRecords(t, g) {
				if rec["msg"] == "request" && rec["request_id"] == m.RequestID {
					if rec["status"] != float64(403) || rec["code"] != "PERMISSION_DENIED" || rec["origin"] != "https://logged.example" {
						t.Fatalf("access log line %v, want status 403, code PERMISSION_DENIED and the origin", rec)
					}
					return true
				}
			}
			return false
		})
	})

	t.Run("over the concurrency cap", func(t *testing.T) {
		first := openVoice(t, g, "", http.Header{"Origin": {app}}, voiceSubprotocol, "bearer."+user)
		m := browserRefused(t, g, app, user)
		if m.Status != http.StatusTooManyRequests || m.Code != "RATE_LIMITED" {
			t.Errorf("second session refused %d %s, want 429 RATE_LIMITED", m.Status, m.Code)
		}
		if m.RetryAfter <= 0 {
			t.Errorf("the 429 refusal carries retry_after %d, want the Retry-After seconds", m.RetryAfter)
		}
		if n := len(listVoice(t, g, tokenFor(t, "u-admin", []string{"admin"}, nil)).Sessions); n != 1 {
			t.Errorf("%d sessions listed, want only the first", n)
		}
		_ = first.conn.Close(websocket.StatusNormalClosure, "")
	})

	t.Run("algorithm service down", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		down := "http://" + ln.Addr().String()
		ln.Close()
		gd := startRun(t, nil, map[string]string{"ALGO_URL": down})
		m := browserRefused(t, gd, gd.URL, tokenFor(t, "u-down", []string{"user"}, nil))
		if m.Status != http.StatusBadGateway || m.Code != "ALGO_SERVICE_ERROR" {
			t.Errorf("refused %d %s, want 502 ALGO_SERVICE_ERROR", m.Status, m.Code)
		}
	})
}

// TestVoiceBrowserRefusalClientStalls: a browser-style client that is refused and then never
// reads nor answers the close loses its socket within the refusal's bounds.
func TestVoiceBrowserRefusalClientStalls(t *testing.T) {
	g := startRun(t, nil, map[string]string{"ALGO_URL": newAlgo(t, algoOptions{}).URL})
	c, err := net.DialTimeout("tcp", g.Addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /api/v2/voice/stream HTTP/1.1\r\nHost: " + g.Addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
		"Sec-WebSocket-Protocol: " + voiceSubprotocol + "\r\nOrigin: " + g.URL + "\r\n\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101 for an in-band refusal", res.StatusCode)
	}
	// The client now reads nothing more and never sends its close frame; the gateway must
	// give up on the close handshake and drop the socket by itself.
	start := time.Now()
	_, err = io.Copy(io.Discard, br)
	if err != nil {
		t.Fatalf("the gateway did not close the socket: %v after %v", err, time.Since(start))
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the socket closed %v after the 101, want within the refusal's 2 s bound and a margin", took)
	}
}
