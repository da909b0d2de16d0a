package main

// Benchmark of authentication: verified requests per second.

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkAuthThroughput compares small proxied requests on the admin route with a token (JWT
// verification cache, revocation check, policy decision, rate limit) against the same route made
// public with AUTH_PUBLIC_PATHS, through the same gateway in the same run.
func BenchmarkAuthThroughput(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"users":[{"id":"u1","name":"Ada"}]}`)
	}))
	b.Cleanup(backend.Close)
	gw, _ := benchGateway(b, map[string]string{"ALGO_URL": backend.URL, "ADMIN_URL": backend.URL,
		"AUTH_PUBLIC_PATHS": "/api/v2/admin/public/"})
	client := benchClient(b)
	for _, target := range []struct{ name, url string }{
		{"unauthenticated", gw.URL + "/api/v2/admin/public/users"},
		{"authenticated", gw.URL + "/api/v2/admin/users"},
	} {
		b.Run(target.name, func(b *testing.B) { parallelGets(b, client, target.url) })
	}
}
