package proxy

import (
	"net/http"
	"strings"
)

// This file holds the edge's rules about what may turn a request into something other than an
// HTTP exchange the gateway sees whole: a protocol upgrade, a CONNECT tunnel, a TRACE echo.
// A tunnel carries bytes the gateway never parses, so nothing in it is authenticated,
// authorized or stripped of forged identity headers.
//
//   - Only routes that declare an upgrade (Router.HandleUpgrade; in the gateway, the route
//     table's upgrade column) may switch protocols. On every other route an Upgrade is
//     stripped (StripUpgrade) and the request is served as the plain request it also is.
//   - No reverse proxy made by New ever relays a 101 from its back end: it answers 502.
//   - CONNECT and TRACE are refused at the edge, on every path (RefuseMethods).

// servedMethods are the methods some route of the gateway serves: the Allow of a refused CONNECT
// or TRACE, which is refused before routing, for every path alike.
const servedMethods = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

// RefuseMethods answers CONNECT and TRACE with 405 on every path, before authentication and
// routing. CONNECT asks the gateway to become a tunnel to wherever the client names (a
// ReverseProxy passes it on, and a back end may honour it); TRACE asks for the request to be
// echoed back as received, credentials included (cross-site tracing). Neither has a use against
// this API.
func RefuseMethods() Middleware {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodConnect || r.Method == http.MethodTrace {
				w.Header().Set("Allow", servedMethods)
				Errorf(w, r, http.StatusMethodNotAllowed, CodeMethodNotAllowed, r.Method+" is not served; use "+servedMethods)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// StripUpgrade serves a request that asks to upgrade (websocket, h2c, anything) as the plain
// HTTP request it also is: h and everything behind it, back ends included, see no Upgrade
// header and no upgrade token in Connection. It wraps every route that does not declare an
// upgrade. Stripping rather than refusing is what RFC 9110 (7.8) lets a server do with an
// upgrade it does not take, and what clients expect: curl --http2 on an http:// URL asks for h2c
// this way, and must still be served.
func StripUpgrade(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := r.Header["Upgrade"]; ok {
			// A copy: handlers do not change the request they were given.
			r = r.Clone(r.Context())
			stripUpgrade(r.Header)
		}
		h.ServeHTTP(w, r)
	})
}

// stripUpgrade deletes Upgrade from h, and the upgrade token from Connection.
func stripUpgrade(h http.Header) {
	delete(h, "Upgrade")
	var keep []string
	for _, v := range h["Connection"] {
		for _, tok := range strings.Split(v, ",") {
			if tok = strings.TrimSpace(tok); tok != "" && !strings.EqualFold(tok, "upgrade") {
				keep = append(keep, tok)
			}
		}
	}
	if len(keep) == 0 {
		delete(h, "Connection")
		return
	}
	h["Connection"] = []string{strings.Join(keep, ", ")}
}

// refuseSwitch is the first ModifyResponse of every proxy made by New: a back end that answers
// 101 Switching Protocols (to an upgrade that got past StripUpgrade, or to nothing at all) would
// get, through ReverseProxy, a raw tunnel with the client. The answer becomes a 502, and its
// body, which is the upgraded connection, is closed by ReverseProxy with it.
func refuseSwitch(res *http.Response) error {
	if res.StatusCode == http.StatusSwitchingProtocols {
		return &UpstreamStatusError{Status: res.StatusCode}
	}
	return nil
}
