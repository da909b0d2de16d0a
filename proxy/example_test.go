package proxy_test

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"

	"voicegate/proxy"
)

func ExampleChain() {
	logger := slog.New(slog.DiscardHandler)
	hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello, request", proxy.RequestIDFrom(r.Context()))
	})
	// The first middleware runs outermost.
	h := proxy.Chain(hello, proxy.Recover(logger), proxy.RequestID())

	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req.Header.Set("X-Request-ID", "demo-42")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)

	fmt.Print(rec.Body.String())
	fmt.Println("X-Request-ID:", rec.Header().Get("X-Request-ID"))
	// Output:
	// hello, request demo-42
	// X-Request-ID: demo-42
}
