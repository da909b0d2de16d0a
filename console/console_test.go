package console_test

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"voicegate/console"
)

func get(t *testing.T, path string) *httptest.ResponseRecorder {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("GET /console", console.Handler())
	mux.Handle("GET /console/{file}", console.Handler())
	w := httptest.NewRecorder()
	mux.ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
	return w
}

// TestOnlyItsOwnFiles: the page loads only the console's own files, each of which is served,
// and the Content-Security-Policy lets no other script run.
func TestOnlyItsOwnFiles(t *testing.T) {
	page := get(t, "/console")
	if page.Code != http.StatusOK {
		t.Fatalf("GET /console = %d", page.Code)
	}
	csp := page.Header().Get("Content-Security-Policy")
	if !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("Content-Security-Policy %q does not keep scripts to the page's own", csp)
	}
	refs := regexp.MustCompile(`(?:src|href)="([^"]+)"`).FindAllStringSubmatch(page.Body.String(), -1)
	if len(refs) < 3 {
		t.Fatalf("the page refers to %d files, want its script and style sheet at least", len(refs))
	}
	for _, m := range refs {
		ref := m[1]
		switch {
		case ref == "data:,", ref == "/openapi.json": // no favicon; the document, by the gateway
		case strings.HasPrefix(ref, "/console/"):
			if w := get(t, ref); w.Code != http.StatusOK || w.Body.Len() == 0 {
				t.Errorf("the page refers to %s, which answers %d", ref, w.Code)
			}
		default:
			t.Errorf("the page refers to %s, outside the console", ref)
		}
	}
	js := get(t, "/console/console.js").Body.String()
	if regexp.MustCompile(`\bimport\b[^;]*["']https?:`).MatchString(js) {
		t.Error("console.js imports a module from elsewhere")
	}
	if !strings.Contains(js, `addModule("/console/mic-worklet.js")`) {
		t.Error("console.js does not load its own worklet")
	}
}

func TestNoTraversal(t *testing.T) {
	for _, path := range []string{"/console/..%2fconsole.go", "/console/static", "/console/.", "/console/index.html%00"} {
		if w := get(t, path); w.Code == http.StatusOK {
			t.Errorf("GET %s = 200, want it refused", path)
		}
	}
}
