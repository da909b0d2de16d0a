package proxy

import (
	"encoding/json"
	"net/http"
	"strings"
)

// Router registers Go 1.22 patterns on a ServeMux, answers unknown paths with a JSON 404 and
// known paths with the wrong method with a JSON 405 (the mux's own answers are plain text),
// records each route's pattern for logs and metrics (Route), and strips the upgrade of every
// request to a route that does not declare one (StripUpgrade).
type Router struct {
	mux      *http.ServeMux
	methods  map[string][]string
	patterns []string
}

// NewRouter returns an empty router.
func NewRouter() *Router {
	rt := &Router{mux: http.NewServeMux(), methods: map[string][]string{}}
	rt.mux.Handle("/", http.HandlerFunc(NotFound))
	return rt
}

// Handle registers h for pattern: "METHOD /path", or "/path/" for any method. Requests that
// ask to upgrade are served without the upgrade (StripUpgrade).
func (rt *Router) Handle(pattern string, h http.Handler) { rt.handle(pattern, StripUpgrade(h)) }

// HandleUpgrade registers h for pattern as Handle does, for a route that declares an upgrade
// (a WebSocket): h gets the request's Upgrade as sent.
func (rt *Router) HandleUpgrade(pattern string, h http.Handler) { rt.handle(pattern, h) }

func (rt *Router) handle(pattern string, h http.Handler) {
	rt.patterns = append(rt.patterns, pattern)
	rt.mux.Handle(pattern, Route(h))
	method, path, ok := strings.Cut(pattern, " ")
	if !ok {
		return
	}
	if len(rt.methods[path]) == 0 {
		rt.mux.Handle(path, Route(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			allowed := strings.Join(rt.methods[path], ", ")
			w.Header().Set("Allow", allowed)
			Errorf(w, r, http.StatusMethodNotAllowed, CodeMethodNotAllowed, "method not allowed; use "+allowed)
		})))
	}
	rt.methods[path] = append(rt.methods[path], method)
	if method == http.MethodGet {
		rt.methods[path] = append(rt.methods[path], http.MethodHead) // the mux serves HEAD with GET
	}
}

// Patterns returns the registered patterns, in order.
func (rt *Router) Patterns() []string { return rt.patterns }

func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) { rt.mux.ServeHTTP(w, r) }

// NotFound answers with the JSON 404.
func NotFound(w http.ResponseWriter, r *http.Request) {
	Errorf(w, r, http.StatusNotFound, CodeNotFound, "no such route")
}

// WriteJSON answers with v as JSON, never cached.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
