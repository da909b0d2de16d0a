// Package console serves voicegate's browser console at /console: one page with its script
// and its microphone worklet, embedded in the binary, with no build step and no third-party
// scripts. The page talks to the gateway as any web client would — chat through fetch() with a
// streamed body, voice through a WebSocket with the token as a "bearer.<token>" subprotocol —
// so it is also the reference browser client. It holds no secret: the token is typed in, or
// comes in the URL's fragment (#token=...), which browsers never send to a server.
package console

import (
	"embed"
	"io/fs"
	"mime"
	"net/http"
	"path"

	"voicegate/proxy"
)

//go:embed static
var static embed.FS

// files are the console's files, by name: index.html is the page itself.
var files, _ = fs.Sub(static, "static")

// securityPolicy keeps the page to its own scripts: nothing but the console's files may run,
// while connections may go to any gateway the page is pointed at (?gateway=).
const securityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self' http: https: ws: wss:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the console: GET /console is the page, GET /console/{file} its other files.
func Handler() http.Handler {
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
		h := w.Header()
		ctype := mime.TypeByExtension(path.Ext(name))
		if ctype == "" {
			ctype = "application/octet-stream"
		}
		h.Set("Content-Type", ctype)
		// The files change with the binary: always revalidate, never serve a stale script.
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", securityPolicy)
		h.Set("Referrer-Policy", "no-referrer")
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(b)
		}
	})
}
