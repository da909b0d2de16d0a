package voice_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"

	"voicegate/proxy"
	"voicegate/voice"
)

// The handler is an http.Handler for GET /api/v2/voice/stream. A request that is not a
// WebSocket upgrade is answered before anything is dialled: 426 and the JSON error document.
func ExampleNewHandler() {
	algo, _ := url.Parse("http://algo.internal:9000")
	h := voice.NewHandler(voice.Options{
		AlgoURL:     algo, // sessions dial ws://algo.internal:9000/voice/stream
		AllowOrigin: proxy.CORSOptions{Origins: []string{"https://app.example.com"}}.AllowOrigin,
	})
	mux := http.NewServeMux()
	mux.Handle("GET /api/v2/voice/stream", proxy.Chain(h, proxy.RequestID()))

	req := httptest.NewRequest(http.MethodGet, "/api/v2/voice/stream?language=en-US", nil)
	req.Header.Set("X-Request-ID", "demo-1")
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, req)

	var body struct {
		Code      string `json:"code"`
		RequestID string `json:"request_id"`
	}
	json.Unmarshal(rec.Body.Bytes(), &body)
	fmt.Println(rec.Code, rec.Header().Get("Upgrade"), body.Code, body.RequestID)
	fmt.Println("subprotocol:", voice.Subprotocol)
	// Output:
	// 426 websocket VALIDATION_ERROR demo-1
	// subprotocol: voice-protocol-v2
}
