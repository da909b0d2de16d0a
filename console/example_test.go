package console_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"

	"voicegate/console"
)

// The console is two routes of a mux: the page and its files.
func Example() {
	mux := http.NewServeMux()
	h := console.Handler(console.Options{})
	mux.Handle("GET /console", h)
	mux.Handle("GET /console/{file}", h)

	for _, path := range []string{"/console", "/console/console.js", "/console/mic-worklet.js", "/console/nothing.js"} {
		w := httptest.NewRecorder()
		mux.ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
		fmt.Println(path, w.Code, w.Header().Get("Content-Type"))
	}
	// Output:
	// /console 200 text/html; charset=utf-8
	// /console/console.js 200 text/javascript; charset=utf-8
	// /console/mic-worklet.js 200 text/javascript; charset=utf-8
	// /console/nothing.js 404 application/json; charset=utf-8
}
