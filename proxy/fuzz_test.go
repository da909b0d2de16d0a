package proxy_test

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path"
	"strings"
	"testing"

	"voicegate/proxy"
)

// FuzzCanonicalPath feeds arbitrary request targets, parsed as net/http parses a request line,
// to the CanonicalPath middleware. Whatever it lets through means the same to the router and to
// any back end: an absolute path that path.Clean leaves alone (no //, /./, /../), without
// backslashes, ';' or NULs, whose escaped form encodes no '/', '\', '.', ';' or NUL, and that
// decodes back to itself. Whatever it refuses is a 400 VALIDATION_ERROR.
func FuzzCanonicalPath(f *testing.F) {
	for _, s := range []string{
		"/", "/api/v2/documents/x", "/api/v2/admin/", "/api/v2/documents/a%20b", "/x?y=1",
		"//api/v2/admin/x", "/api/v2//admin/x", "/api/v2/documents/../admin/x",
		"/api/v2/documents/..%2fadmin/x", "/api/v2/documents/%2e%2e/admin/x", "/api/v2/documents/.%2e/admin",
		"/api/v2/documents/x;/../../admin", "/api/v2/documents\\..\\admin", "/api/v2/documents/%5c..%5cadmin",
		"/api/v2/documents/%00", "/api/v2/documents/.", "/api/v2/documents/x/..", "/%252e%252e/", "*",
		"http://evil/api/v2/admin/x", "/api/v2/documents/%E2%80%AE", "/api/v2/documents/%",
	} {
		f.Add("GET", s)
	}
	f.Add("OPTIONS", "*")
	reached := func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) }
	h := proxy.Chain(http.HandlerFunc(reached), proxy.RequestID(), proxy.CanonicalPath())
	f.Fuzz(func(t *testing.T, method, target string) {
		if strings.ContainsAny(method, " \r\n") || strings.ContainsAny(target, " \r\n") {
			t.Skip() // not one request line
		}
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(method + " " + target + " HTTP/1.1\r\nHost: gw\r\n\r\n")))
		if err != nil {
			t.Skip() // net/http refuses it before any handler
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		if rec.Code != http.StatusTeapot {
			if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), proxy.CodeValidation) {
				t.Fatalf("%s %q refused with %d %s, want 400 %s", method, target, rec.Code, rec.Body, proxy.CodeValidation)
			}
			return
		}
		p := r.URL.Path
		if p == "*" && method == http.MethodOptions {
			return
		}
		if !strings.HasPrefix(p, "/") {
			t.Fatalf("%q passed with path %q, not absolute", target, p)
		}
		clean := path.Clean(p)
		if strings.HasSuffix(p, "/") && clean != "/" {
			clean += "/"
		}
		if clean != p || strings.Contains(p, "//") {
			t.Fatalf("%q passed with path %q, which cleans to %q", target, p, clean)
		}
		if strings.ContainsAny(p, "\\;\x00") {
			t.Fatalf("%q passed with path %q", target, p)
		}
		esc := strings.ToLower(r.URL.EscapedPath())
		for _, bad := range []string{"%2f", "%5c", "%2e", "%00", "%3b"} {
			if strings.Contains(esc, bad) {
				t.Fatalf("%q passed with escaped path %q, which encodes %s", target, esc, bad)
			}
		}
		if back, err := url.PathUnescape(r.URL.EscapedPath()); err != nil || back != p {
			t.Fatalf("%q passed: escaped path %q decodes to %q (%v), not %q", target, r.URL.EscapedPath(), back, err, p)
		}
	})
}
