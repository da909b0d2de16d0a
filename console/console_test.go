package console_test

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"voicegate/console"
)

func get(t *testing.T, path string) *httptest.ResponseRecorder {
	t.Helper()
	return getWith(t, console.Options{}, path)
}

func getWith(t *testing.T, o console.Options, path string) *httptest.ResponseRecorder {
	t.Helper()
	mux := http.NewServeMux()
	h := console.Handler(o)
	mux.Handle("GET /console", h)
	mux.Handle("GET /console/{file}", h)
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

// connectSources returns the sources of the connect-src directive of a policy.
func connectSources(t *testing.T, csp string) []string {
	t.Helper()
	for _, d := range strings.Split(csp, ";") {
		if f := strings.Fields(d); len(f) > 0 && f[0] == "connect-src" {
			return f[1:]
		}
	}
	t.Fatalf("Content-Security-Policy %q has no connect-src", csp)
	return nil
}

// TestConnectsOnlyToItsGateways: the page's connections may go to its own origin and to the
// gateways it is given, and nowhere else, whatever file is served; the page is told the same
// list.
func TestConnectsOnlyToItsGateways(t *testing.T) {
	for _, tt := range []struct {
		name     string
		gateways []string
		want     []string
		attr     string
	}{
		{"its own origin only", nil, []string{"'self'"}, ""},
		{"and the gateways listed", []string{"https://gw.example.com", "http://127.0.0.1:8081"},
			[]string{"'self'", "https://gw.example.com", "wss://gw.example.com", "http://127.0.0.1:8081", "ws://127.0.0.1:8081"},
			"https://gw.example.com http://127.0.0.1:8081"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, path := range []string{"/console", "/console/console.js"} {
				w := getWith(t, console.Options{Gateways: tt.gateways}, path)
				if got := connectSources(t, w.Header().Get("Content-Security-Policy")); !slices.Equal(got, tt.want) {
					t.Errorf("GET %s: connect-src %q, want %q", path, got, tt.want)
				}
			}
			page := getWith(t, console.Options{Gateways: tt.gateways}, "/console").Body.String()
			m := regexp.MustCompile(`<html [^>]*data-gateways="([^"]*)"`).FindStringSubmatch(page)
			if m == nil || m[1] != tt.attr {
				t.Errorf("the page names the gateways %q, want %q", m, tt.attr)
			}
		})
	}
}

func TestOrigin(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"https://gw.example.com", "https://gw.example.com"},
		{"https://GW.Example.com/", "https://gw.example.com"},
		{"HTTP://gw.example.com:80", "http://gw.example.com"},
		{"https://gw.example.com:443", "https://gw.example.com"},
		{"https://gw.example.com:8443", "https://gw.example.com:8443"},
		{"http://127.0.0.1:8080", "http://127.0.0.1:8080"},
		{"http://[::1]:8080", "http://[::1]:8080"},
		{"http://[::1]", "http://[::1]"},
		{"gw.example.com", ""},
		{"ws://gw.example.com", ""},
		{"javascript:alert(1)", ""},
		{"https://gw.example.com/api", ""},
		{"https://gw.example.com?x=1", ""},
		{"https://gw.example.com#", ""},
		{"https://user@gw.example.com", ""},
		{"https://*.example.com", ""},
		{"https://", ""},
		{"*", ""},
	} {
		got, err := console.Origin(tt.in)
		if got != tt.want || (err == nil) != (tt.want != "") {
			t.Errorf("Origin(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// TestDemoMark: the page says whether its gateway runs with -demo, in an attribute its style
// sheet shows the demo banner by; the gateway says so, nothing on the page decides it.
func TestDemoMark(t *testing.T) {
	for _, demo := range []bool{false, true} {
		page := getWith(t, console.Options{Demo: demo}, "/console").Body.String()
		m := regexp.MustCompile(`<html [^>]*data-demo="([^"]*)"`).FindStringSubmatch(page)
		if want := strconv.FormatBool(demo); m == nil || m[1] != want {
			t.Errorf("Demo %v: the page's data-demo is %q, want %q", demo, m, want)
		}
		if !strings.Contains(page, `id="demo-banner"`) {
			t.Error("the page has no demo banner to show")
		}
	}
	css := get(t, "/console/console.css").Body.String()
	if !strings.Contains(css, `html[data-demo="true"] .banner { display: block; }`) || !strings.Contains(css, ".banner { display: none;") {
		t.Error("console.css does not show the banner only on a demo gateway's page")
	}
}
