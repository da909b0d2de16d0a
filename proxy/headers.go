package proxy

import (
	"net/http"
	"slices"
	"strings"
)

// This file is the one list of request headers a client may not pass to a back end. Back ends
// (and the frameworks they run on) believe these about the caller or the request, so only the
// gateway may set them. Every proxied request loses them all in Rewrite (StripUntrusted); the
// gateway then sets X-Forwarded-For/-Host/-Proto and the identity headers itself.

// The identity headers: through them upstreams learn who the caller is. Upstreams trust them,
// so only the gateway may set them, from a verified token.
const (
	HeaderUserID    = "X-User-Id"
	HeaderUsername  = "X-Username"
	HeaderTenantID  = "X-Tenant-Id"
	HeaderUserRoles = "X-User-Roles"
	HeaderSessionID = "X-Session-Id"
)

// identityHeaders is the one list of them: StripIdentity removes each from whatever a client
// sent, and SetIdentity sets each, in this order, from a Caller (Caller.values).
var identityHeaders = [...]string{HeaderUserID, HeaderUsername, HeaderTenantID, HeaderUserRoles, HeaderSessionID}

// Caller is what upstreams are told about a verified caller, one field per identity header.
type Caller struct {
	UserID, Username, TenantID string
	Roles                      string // comma-separated
	SessionID                  string
}

// values returns c's fields in the order of identityHeaders.
func (c *Caller) values() [len(identityHeaders)]string {
	return [...]string{c.UserID, c.Username, c.TenantID, c.Roles, c.SessionID}
}

// SetIdentity replaces every identity header in h (whatever the client sent, in any spelling)
// with c's values, leaving out empty ones; with a nil c it only removes them. Every request to an
// upstream gets its identity headers here — proxied ones, chat queries and voice dials alike —
// through Outbound.Shape and its Identity hook (auth.UpstreamHeaders).
func SetIdentity(h http.Header, c *Caller) {
	StripIdentity(h)
	if c == nil {
		return
	}
	for i, v := range c.values() {
		if v != "" {
			h[identityHeaders[i]] = []string{v}
		}
	}
}

// spoofableHeaders claim something about the client or the request that some back ends
// believe: the client's address (besides X-Forwarded-For, which SetXForwarded owns), the port
// or path prefix it used, the URL it "really" asked for, or another method than the one sent.
// Their names are in canonical form.
var spoofableHeaders = [...]string{
	// client addresses
	"X-Real-Ip", "X-Client-Ip", "True-Client-Ip", "X-Cluster-Client-Ip", "Cf-Connecting-Ip",
	"Fastly-Client-Ip", "X-Originating-Ip", "X-Remote-Ip", "X-Remote-Addr",
	// how the request reached a front end
	"X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Forwarded-Ssl",
	"X-Forwarded-Scheme", "X-Url-Scheme", "Front-End-Https",
	// URL overrides
	"X-Original-Url", "X-Rewrite-Url", "X-Original-Uri",
	// method overrides
	"X-Http-Method-Override", "X-Http-Method", "X-Method-Override",
}

// StripIdentity deletes every identity header from h, in any spelling: case, and underscores for
// dashes (some servers treat X_User_ID as X-User-ID).
func StripIdentity(h http.Header) {
	for k := range h {
		if len(k) < len(HeaderUserID) || (k[0] != 'X' && k[0] != 'x') {
			continue // shorter than any identity header, or not an X- header
		}
		norm := strings.ReplaceAll(k, "_", "-")
		for _, id := range identityHeaders {
			if strings.EqualFold(norm, id) {
				delete(h, k)
				break
			}
		}
	}
}

// StripUntrusted deletes from h, bound for a back end, every header a client may not set: the
// identity headers, the spoofable headers above, and every header whose name holds an
// underscore. CGI-style servers (WSGI, PHP-FPM, Rack) map both X_Forwarded_For and
// X-Forwarded-For to HTTP_X_FORWARDED_FOR, so an underscore spelling would slip past any list;
// nginx drops such headers by default for the same reason.
func StripUntrusted(h http.Header) {
	for k := range h {
		if strings.IndexByte(k, '_') >= 0 || slices.Contains(spoofableHeaders[:], http.CanonicalHeaderKey(k)) {
			delete(h, k)
		}
	}
	StripIdentity(h)
}

// Outbound shapes every request the gateway sends an upstream on a client's behalf — proxied,
// chat or voice dial — in one place: X-Request-ID, X-Forwarded-For (the client's chain kept only
// when it came from a trusted proxy, as ClientIP decided), X-Forwarded-Host and -Proto, and the
// identity headers of the verified caller (Identity). Trace context is the upstream pool's: it
// is per attempt.
type Outbound struct {
	// Identity, if set, sets the headers of the request's verified caller (auth.UpstreamHeaders,
	// which sets them with SetIdentity).
	Identity func(in *http.Request, out http.Header)
}

// Shape sets out's gateway-made headers for a request to an upstream made on behalf of in. out
// may hold what the client sent (a proxied request): whatever a client may not set is dropped
// first.
func (o Outbound) Shape(in *http.Request, out http.Header) {
	StripUntrusted(out)
	info := InfoFrom(in.Context())
	if info != nil && info.RequestID != "" {
		out.Set("X-Request-Id", info.RequestID)
	}
	peer := remoteAddr(in)
	var chain string
	if info != nil && info.PeerTrusted {
		chain = strings.Join(in.Header.Values("X-Forwarded-For"), ", ")
	}
	if peer.IsValid() {
		if chain != "" {
			chain += ", "
		}
		chain += peer.String()
	}
	if chain != "" {
		out.Set("X-Forwarded-For", chain)
	} else {
		out.Del("X-Forwarded-For")
	}
	out.Set("X-Forwarded-Host", in.Host)
	proto := "http"
	if in.TLS != nil {
		proto = "https"
	}
	out.Set("X-Forwarded-Proto", proto)
	out.Del("Forwarded")
	if o.Identity != nil {
		o.Identity(in, out)
	}
}
