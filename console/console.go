// Package console serves voicegate's browser console at /console: one page with its script
// and its microphone worklet, embedded in the binary, with no build step and no third-party
// scripts. The page talks to the gateway as any web client would — chat through fetch() with a
// streamed body, voice through a WebSocket with the token as a "bearer.<token>" subprotocol —
// so it is also the reference browser client. It holds no secret: the token is typed in, or
// comes in the URL's fragment (#token=...), which browsers never send to a server and which
// the page removes from the address bar and the history as soon as it has read it.
//
// A gateway started with -demo says so (Options.Demo): the page shows a banner that its
// algorithm service is the built-in fake, whose speech recognition ignores what is said.
//
// The page sends its token only to its own origin, or to a gateway the operator listed
// (Options.Gateways, CONSOLE_GATEWAYS) and that ?gateway= names. Any other ?gateway= is
// refused on the page, with nothing sent; and the Content-Security-Policy's connect-src names
// the same origins and no others, so that not even a fault in the script can send elsewhere.
package console

import (
	"bytes"
	"embed"
	"errors"
	"html"
	"io/fs"
	"mime"
	"net"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"

	"voicegate/proxy"
)

//go:embed static
var static embed.FS

// files are the console's files, by name: index.html is the page itself.
var files, _ = fs.Sub(static, "static")

// Options configures the console.
type Options struct {
	// Gateways are the origins, besides the page's own, that the page may talk to when
	// ?gateway= names them, each as Origin returns it. None: only its own.
	Gateways []string
	// Demo says that the gateway serving the page runs with -demo, in front of the built-in
	// fake algorithm service: the page says so in a banner. False: no banner.
	Demo bool
}

// gatewaysMark and demoMark are the attributes of index.html the handler fills, for the
// script and the style sheet to read: Options.Gateways, space-separated, and Options.Demo.
const (
	gatewaysMark = `data-gateways=""`
	demoMark     = `data-demo=""`
)

// Handler serves the console: GET /console is the page, GET /console/{file} its other files.
func Handler(o Options) http.Handler {
	// The page and the policy depend only on o: made once.
	page, _ := fs.ReadFile(files, "index.html")
	page = bytes.Replace(page, []byte(gatewaysMark),
		[]byte(`data-gateways="`+html.EscapeString(strings.Join(o.Gateways, " "))+`"`), 1)
	page = bytes.Replace(page, []byte(demoMark), []byte(`data-demo="`+strconv.FormatBool(o.Demo)+`"`), 1)
	policy := securityPolicy(o.Gateways)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("file")
		if name == "" {
			name = "index.html"
		}
		b, err := fs.ReadFile(files, name)
		if err != nil || name != path.Base(name) {
			proxy.NotFound(w, r)
			return
		}
		if name == "index.html" {
			b = page
		}
		h := w.Header()
		ctype := mime.TypeByExtension(path.Ext(name))
		if ctype == "" {
			ctype = "application/octet-stream"
		}
		h.Set("Content-Type", ctype)
		// The files change with the binary: always revalidate, never serve a stale script.
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", policy)
		h.Set("Referrer-Policy", "no-referrer")
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(b)
		}
	})
}

// securityPolicy keeps the page to its own scripts, and its connections (fetch() and
// WebSockets) to its own origin and the gateways listed: nothing else may run, and nothing
// may be sent anywhere else.
func securityPolicy(gateways []string) string {
	connect := "'self'"
	for _, g := range gateways {
		// A WebSocket's URL has its own scheme, which a source of http or https may not cover.
		ws := "ws" + strings.TrimPrefix(g, "http")
		connect += " " + g + " " + ws
	}
	return "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
		"connect-src " + connect + "; media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}

// Origin returns raw, an http or https origin (scheme, host and optional port, nothing else),
// as a browser writes it in location.origin and compares it: scheme and host in lower case,
// without the scheme's default port.
func Origin(raw string) (string, error) {
	bad := errors.New("want an origin such as https://gateway.example.com: scheme, host and port only")
	u, err := url.Parse(raw)
	if err != nil || u.Opaque != "" || u.User != nil || u.Host == "" || (u.Path != "" && u.Path != "/") ||
		u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.HasSuffix(raw, "#") {
		return "", bad
	}
	scheme := strings.ToLower(u.Scheme)
	if scheme != "http" && scheme != "https" {
		return "", bad
	}
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if host == "" || strings.ContainsAny(host, " *") {
		return "", bad
	}
	if port == "80" && scheme == "http" || port == "443" && scheme == "https" {
		port = ""
	}
	if strings.Contains(host, ":") { // IPv6
		host = "[" + host + "]"
	}
	if port != "" {
		host = net.JoinHostPort(strings.Trim(host, "[]"), port)
	}
	return scheme + "://" + host, nil
}
