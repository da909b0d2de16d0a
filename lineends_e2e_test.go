package main

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestVoiceNoticeEscapesLineEnds: a broadcast's message is re-encoded for the sessions it
// reaches; a raw U+2028 or U+2029 in it arrives escaped, as in every JSON the gateway writes,
// so a client that reads messages as lines (or logs them) sees one line.
func TestVoiceNoticeEscapesLineEnds(t *testing.T) {
	algo := newAlgo(t, algoOptions{})
	g := startRun(t, nil, map[string]string{"ALGO_URL": algo.URL})
	v := openVoice(t, g, "", bearer(tokenFor(t, "u-notice", []string{"user"}, nil)))
	admin := tokenFor(t, "u-notice-admin", []string{"admin"}, nil)
	// Written by hand: encoding/json would escape them in the request already.
	body := `{"message":{"text":"maintenance` + "\u2028" + `at noon` + "\u2029" + `"}}`
	wantStatus(t, call(t, g, "POST", "/api/v2/voice/broadcast", admin, body), http.StatusOK)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for {
		typ, msg, err := v.conn.Read(ctx)
		if err != nil {
			t.Fatalf("no notice arrived: %v", err)
		}
		if typ != websocket.MessageText || !strings.Contains(string(msg), `"type":"notice"`) {
			continue
		}
		if strings.ContainsAny(string(msg), "\u2028\u2029") || !strings.Contains(string(msg), `maintenance\u2028at noon\u2029`) {
			t.Errorf("the notice %q does not escape U+2028 and U+2029", msg)
		}
		return
	}
}
