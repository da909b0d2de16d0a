package voice

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"voicegate/policy"
	"voicegate/proxy"
)

// Options configures the voice handler. Zero values pick the defaults named.
type Options struct {
	// AlgoURL is the algorithm service; sessions dial {AlgoURL}/voice/stream as ws or wss.
	AlgoURL *url.URL
	// Via, if set, wraps the transport the dials go through (replica balancing and health).
	Via func(http.RoundTripper) http.RoundTripper
	// DialContext makes the algorithm service's TCP connections; nil means a net.Dialer.
	// Tests use it to dial an in-memory network.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// DialTimeout bounds the dial and handshake; zero means 5 s.
	DialTimeout time.Duration
	// AllowOrigin decides browser origins (CORS_ORIGINS). Same-host origins and requests without
	// Origin (non-browser clients) are always allowed.
	AllowOrigin func(origin string) bool
	// ReadLimit bounds one message from either side; zero means 1 MiB. Over it: close 1009.
	ReadLimit int64
	// PingInterval is the keepalive period on both connections; a peer that has not answered a
	// ping within another period is dead. Zero means 30 s (dead within 60 s).
	PingInterval time.Duration
	// IdleTimeout closes a session with no message from the client for this long; zero means 5
	// minutes.
	IdleTimeout time.Duration
	// WriteTimeout bounds every write to either side; a side that does not take a write within
	// it is dropped and the session closed 1013 (SLOW_CONSUMER). Zero means 10 s.
	WriteTimeout time.Duration
	// RawAudio relays client audio to the algorithm service as binary frames, untouched, instead
	// of audio_chunk JSON messages.
	RawAudio bool
	// Audio is the sessions' default audio format (format.go), which a client may change on
	// the upgrade or in a config message before its first audio; zero fields mean 16 kHz,
	// mono, pcm, "zh-CN". Its EchoCancellation is what session_initialized says of echo
	// cancellation (false: the origin's default); VADEnabled and NoiseSuppression are said true
	// whatever they are, as the origin does. NewHandler panics on a format package audio does
	// not support: the configuration checks it first.
	Audio AudioConfig
	// Registry tracks sessions; nil means a private, local one.
	Registry *Registry
	// Owner names the request's user and tenant.
	Owner func(r *http.Request) (userID, tenantID string)
	// Token, if set, names the token of a request (its ID and when it was issued), so that
	// revoking it closes the session at once (Registry.Revoke).
	Token func(r *http.Request) (tokenID string, issuedAt time.Time)
	// Admit, if set, charges a session to the caller's rates and takes its concurrency slot,
	// once the request is validated and before anything is dialled (policy.Admit). It answers a
	// refused request itself and returns false. The session holds what it took until it ends,
	// long after ServeHTTP has returned.
	Admit func(w http.ResponseWriter, r *http.Request) (release func(), ok bool)
	// Recheck, if set, is called once as a session starts; the function it returns then checks
	// the session's token against the stores (revocations, user status) every RecheckInterval,
	// or less often with more than RecheckRate sessions (timers.go): the fallback for a
	// revocation whose message was lost. An error (a revoked token, a disabled user) closes the
	// session with 4401. It must not keep r.
	Recheck         func(r *http.Request) func(ctx context.Context) error
	RecheckInterval time.Duration // zero means 500 ms
	// RecheckRate bounds the rechecks of all sessions together, per second; zero means 2000.
	RecheckRate float64
	// Expiry, if set, says when the request's token stops being accepted: the session closes
	// with 4401 then, within a RecheckInterval, whatever the pace of the rechecks. Zero: never.
	Expiry func(r *http.Request) time.Time
	// Outbound shapes the dial's request (forwarded-for, request ID, identity).
	Outbound proxy.Outbound
	// OnStart and OnEnd, if set, are called as sessions begin and end (metrics, logs).
	OnStart func()
	OnEnd   func(Stats)
	// Meter, if set, charges sessions' audio to the daily quotas that Limits gives each tenant
	// (see govern.go); Limits also gives the maximum session length. Nil Limits means none.
	Meter  policy.AudioMeter
	Limits func(tenant string) policy.VoiceLimits
	// Reservation is the audio a session reserves from the meter at a time, ahead of its use;
	// what it relays exceeds its quota by at most one. Zero means 2 s. ChargeBudget bounds each
	// call to the meter; zero means 250 ms.
	Reservation, ChargeBudget time.Duration
	// Pace is how many times faster than real time a client may send audio, beyond PaceBurst
	// of audio sent ahead of that pace (see pace.go); zero means no bound. Zero PaceBurst means
	// 3 s.
	Pace      float64
	PaceBurst time.Duration
	// OnLatency and OnBargeIn, if set, are told each latency and barge-in (see meter.go), with
	// the session's tenant; they run on a relay goroutine and must not block.
	OnLatency func(kind LatencyKind, tenant string, d time.Duration)
	OnBargeIn func(tenant string)
	// TTSPacing releases TTS audio to the client at playback rate plus TTSLead, holding the
	// rest (at most TTSQueue bytes), so that an interrupt can drop what the client has not
	// heard (tts.go). Zero TTSLead means 250 ms, zero TTSQueue 256 KiB.
	TTSPacing bool
	TTSLead   time.Duration
	TTSQueue  int
	// Dialect, if set, is the protocol the route's clients speak instead of the voice
	// protocol (dialect.go): OpenAI's Realtime API on GET /v1/realtime. Its sessions are the
	// voice route's in every other respect, in the same Registry.
	Dialect Dialect
	Log     *slog.Logger
	// ResumeWindow is how long a session outlives its client's connection, for the client to
	// resume it (resume.go); zero turns resuming off. ResumeBuffer is the recent downlink each
	// session keeps in memory for that, in bytes; zero means 128 KiB (4 s of 16 kHz TTS). A
	// Dialect's sessions are never resumable (OpenAI's Realtime API has no resume): with a
	// Dialect, ResumeWindow is taken as zero.
	ResumeWindow time.Duration
	ResumeBuffer int
	// AdmitResume, if set, admits a resume of a session that ran on another instance: its
	// rates and its concurrency slot, allowed one over the cap while the old instance holds its
	// slot (policy.AdmitHandover); the old instance gives its slot back as it lets go. A resume
	// on the same instance keeps the session's slot.
	AdmitResume func(w http.ResponseWriter, r *http.Request) (release func(), ok bool)
	// OnResume, if set, is told each resume's outcome (Resume* constants) and, for those that
	// resumed, the gap the client saw: from its connection's loss, as the owner noticed it, to
	// its first replayed message.
	OnResume func(outcome string, gap time.Duration)
}

// Handler is the GET /api/v2/voice/stream handler.
type Handler struct {
	o         Options
	ws        *url.URL
	transport *http.Transport // voice dials only: they need HTTP/1.1, and their sockets wrapped
	client    *http.Client
	timers    *timers
	bufs      sync.Pool // *[]byte message buffers, taken only while a message is in hand

	chargeWarned atomic.Int64 // unix ns of the last log line of a failed charge
}

// closeWait is how long the end of a session waits for close handshakes before it drops the
// sockets: a healthy peer answers in milliseconds.
const closeWait = time.Second

// NewHandler returns the voice handler. Close releases its idle upstream connections.
func NewHandler(o Options) *Handler {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.DialTimeout, 5*time.Second)
	def(&o.PingInterval, 30*time.Second)
	def(&o.IdleTimeout, 5*time.Minute)
	def(&o.WriteTimeout, 10*time.Second)
	def(&o.RecheckInterval, 500*time.Millisecond)
	if o.RecheckRate <= 0 {
		o.RecheckRate = 2000
	}
	def(&o.Reservation, 2*time.Second)
	def(&o.ChargeBudget, 250*time.Millisecond)
	def(&o.PaceBurst, 3*time.Second)
	def(&o.TTSLead, 250*time.Millisecond)
	if o.TTSQueue <= 0 {
		o.TTSQueue = 256 << 10
	}
	if o.ReadLimit <= 0 {
		o.ReadLimit = 1 << 20
	}
	if o.Audio.SampleRate == 0 {
		o.Audio.SampleRate = 16000
	}
	if o.Audio.Channels == 0 {
		o.Audio.Channels = 1
	}
	if o.Audio.Format == "" {
		o.Audio.Format = "pcm"
	}
	if o.Audio.Language == "" {
		o.Audio.Language = "zh-CN"
	}
	if o.Dialect != nil {
		o.Audio = o.Dialect.Audio(o.Audio)
	}
	if err := o.Audio.audioFormat().Validate(); err != nil {
		panic("voice: Options.Audio: " + err.Error())
	}
	if o.Registry == nil {
		o.Registry = NewRegistry(RegistryOptions{})
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.ResumeBuffer <= 0 {
		o.ResumeBuffer = 128 << 10
	}
	if o.Dialect != nil {
		o.ResumeWindow = 0
	}
	dial := o.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: o.DialTimeout, KeepAlive: 30 * time.Second}).DialContext
	}
	transport := &http.Transport{
		Proxy:               nil, // upstreams are internal
		DialContext:         (&Dialer{DialContext: dial, ReadTimeout: o.readTimeout(), WriteTimeout: o.WriteTimeout}).Dial,
		TLSHandshakeTimeout: o.DialTimeout,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
		WriteBufferSize:     1 << 10, // only the upgrade request goes through these
		ReadBufferSize:      1 << 10,
	}
	var rt http.RoundTripper = transport
	if o.Via != nil {
		rt = o.Via(transport)
	}
	ws := o.AlgoURL.JoinPath("voice", "stream")
	if !strings.HasPrefix(ws.Path, "/") {
		ws.Path = "/" + ws.Path
	}
	switch ws.Scheme {
	case "https":
		ws.Scheme = "wss"
	default:
		ws.Scheme = "ws"
	}
	h := &Handler{o: o, ws: ws, transport: transport, client: &http.Client{Transport: rt}}
	h.timers = newTimers(h)
	h.bufs.New = func() any { b := make([]byte, 0, 4<<10); return &b }
	return h
}

// readTimeout bounds every socket read: a peer that answers no ping sends nothing at all, and
// is dead after two ping intervals (plus a write timeout, which a reader blocked in a write
// may spend before it reads again).
func (o *Options) readTimeout() time.Duration { return 2*o.PingInterval + o.WriteTimeout }

// Close releases the handler's idle upstream connections. Sessions end on their own (see
// Registry.CloseAll).
func (h *Handler) Close() { h.transport.CloseIdleConnections() }

func (h *Handler) getBuf() *[]byte { return h.bufs.Get().(*[]byte) }

func (h *Handler) putBuf(b *[]byte) {
	if cap(*b) > 64<<10 {
		return // let big, rare buffers go
	}
	*b = (*b)[:0]
	h.bufs.Put(b)
}

// maxConversationID bounds the conversation_id of an upgrade, as chat's.
const maxConversationID = 256

// msgOriginRefused is the error of an upgrade from an origin that is not allowed.
const msgOriginRefused = "origin not allowed"

// originRefused reports whether r comes from a browser page whose origin may not open voice
// sessions: one with an Origin that is neither this host nor allowed by allow (nil: none is).
func originRefused(r *http.Request, allow func(origin string) bool) bool {
	origin := r.Header.Get("Origin")
	return origin != "" && !sameHost(origin, r.Host) && (allow == nil || !allow(origin))
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !isUpgrade(r) {
		w.Header().Set("Upgrade", "websocket")
		proxy.Errorf(w, r, http.StatusUpgradeRequired, proxy.CodeValidation, "this route speaks WebSocket only")
		return
	}
	if originRefused(r, h.o.AllowOrigin) {
		proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, msgOriginRefused)
		return
	}
	q := r.URL.Query()
	if q.Has("resume_token") || q.Has("last_seq") {
		var user, tenant string
		if h.o.Owner != nil {
			user, tenant = h.o.Owner(r)
		}
		if h.o.Dialect != nil {
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeSessionNotFound, "this protocol's sessions cannot be resumed")
			return
		}
		if h.o.ResumeWindow <= 0 {
			proxy.Errorf(w, r, http.StatusNotFound, proxy.CodeSessionNotFound, "resuming voice sessions is turned off")
			return
		}
		h.serveResume(w, r, user, tenant)
		return
	}
	conversation, language := q.Get("conversation_id"), q.Get("language")
	var bad []proxy.FieldError
	if !proxy.ValidLabel(conversation, maxConversationID) {
		bad = append(bad, proxy.FieldError{Field: "conversation_id", Reason: proxy.LabelReason(maxConversationID)})
	}
	if !proxy.ValidLanguage(language) {
		bad = append(bad, proxy.FieldError{Field: "language", Reason: proxy.LanguageReason})
	}
	cfg, fbad := negotiate(q, h.o.Audio)
	if fbad != nil {
		bad = append(bad, *fbad)
	}
	if len(bad) > 0 {
		proxy.WriteError(w, r, proxy.InvalidFields(bad...))
		return
	}
	if language != "" {
		cfg.Language = language
	}
	var user, tenant string
	if h.o.Owner != nil {
		user, tenant = h.o.Owner(r)
	}
	var gov governor // what the admission found; the session's own is set from it
	if !h.admitQuota(w, r, user, tenant, &gov) {
		return
	}
	release := func() {}
	if h.o.Admit != nil {
		var ok bool
		if release, ok = h.o.Admit(w, r); !ok {
			return
		}
	}
	started := false
	defer func() {
		if !started {
			release()
		}
	}()
	info := Info{SessionID: rand.Text(), ConversationID: conversation, Language: cfg.Language,
		Instance: h.o.Registry.instance, StartedAt: time.Now().UTC(), UserID: user, TenantID: tenant}
	if h.o.Token != nil {
		info.TokenID, info.IssuedAt = h.o.Token(r)
	}

	// The algorithm service first: if it is down the client gets a proper HTTP error, not a
	// socket that opens and dies.
	up, upConn, err := h.dial(r, info, cfg, false)
	if err != nil {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadGateway, Code: proxy.CodeAlgoService,
			Message: "the algorithm service is unavailable", Cause: err})
		return
	}
	hj := &hijacker{ResponseWriter: w, read: h.o.readTimeout(), write: h.o.WriteTimeout}
	subprotocol := Subprotocol
	if h.o.Dialect != nil {
		subprotocol = h.o.Dialect.Subprotocol()
	}
	client, err := websocket.Accept(hj, r, &websocket.AcceptOptions{
		Subprotocols:    []string{subprotocol}, // a token offered as a subprotocol is never selected, so never echoed
		OriginPatterns:  originPatterns(r),     // checked above already
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil || hj.conn == nil {
		upConn.drop()
		up.CloseNow()
		if err == nil { // accepted through a writer that would not hand over its socket
			client.CloseNow()
		}
		return // Accept answered the request
	}
	client.SetReadLimit(h.o.ReadLimit)
	if h.o.Dialect != nil {
		client.SetReadLimit(dialectReadLimit(h.o.ReadLimit))
	}
	up.SetReadLimit(h.o.ReadLimit)

	s := newSession(h, info, cfg, side{ws: client, conn: hj.conn}, side{ws: up, conn: upConn})
	s.release = release
	if h.o.ResumeWindow > 0 {
		s.rs = &resumable{window: h.o.ResumeWindow, kick: make(chan struct{}, 1)}
		s.rs.token, s.rs.key = h.o.Registry.newResumeToken(tenant, user)
		s.ring = newDownRing(h.o.ResumeBuffer)
	}
	s.gov.limits, s.gov.metered, s.gov.size = gov.limits, gov.metered, gov.size
	s.gov.open.Store(gov.open.Load())
	if h.o.Recheck != nil {
		s.recheck = h.o.Recheck(r)
	}
	if h.o.Expiry != nil {
		s.expiry = h.o.Expiry(r)
	}
	if s.gov.metered {
		s.reserve(0) // the first reservation, while the client reads session_initialized
	}
	if s.rs != nil {
		h.o.Registry.keep(r.Context(), s, -1, false) // its record goes with its publication
	}
	h.o.Registry.add(r.Context(), s)
	if h.o.OnStart != nil {
		h.o.OnStart()
	}
	// The session outlives this handler: returning lets net/http drop what it kept for the
	// request (its buffers, the middleware's stack frames), which an idle session would
	// otherwise hold for its whole life. Nothing of the request is kept, its context least of
	// all: it holds on to a few KiB of the request's state.
	started = true
	s.sendInit() // here, so that the session's goroutines never grow a stack for encoding/json
	go s.run()
}

// dial opens the algorithm-service side of a session in the agreed format cfg, and returns its
// socket too. A resume's dial says resume=1: the service moves the session's state to it
// (resume.go).
func (h *Handler) dial(r *http.Request, info Info, cfg AudioConfig, resume bool) (*websocket.Conn, *conn, error) {
	target := *h.ws
	q := target.Query()
	q.Set("session_id", info.SessionID)
	if resume {
		q.Set("resume", "1")
	}
	if info.ConversationID != "" {
		q.Set("conversation_id", info.ConversationID)
	}
	q.Set("language", info.Language)
	q.Set("format", cfg.Format)
	q.Set("sample_rate", strconv.Itoa(cfg.SampleRate))
	q.Set("channels", strconv.Itoa(cfg.Channels))
	target.RawQuery = q.Encode()
	hdr := http.Header{}
	h.o.Outbound.Shape(r, hdr)
	// The transport names the socket it used; the session needs it to bound and drop it.
	var got net.Conn
	ctx := httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{
		GotConn: func(ci httptrace.GotConnInfo) { got = ci.Conn },
	})
	ctx, cancel := context.WithTimeout(ctx, h.o.DialTimeout)
	defer cancel()
	ws, res, err := websocket.Dial(ctx, target.String(), &websocket.DialOptions{
		HTTPClient:      h.client,
		HTTPHeader:      hdr,
		Subprotocols:    []string{Subprotocol},
		CompressionMode: websocket.CompressionDisabled,
	})
	if res != nil && res.Body != nil {
		res.Body.Close()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("voice: dial algorithm service: %w", err)
	}
	c := socketOf(got)
	if c == nil {
		ws.CloseNow()
		return nil, nil, errors.New("voice: dial algorithm service: the transport did not use the voice dialer")
	}
	return ws, c, nil
}

// socketOf finds the conn under a connection the transport used (TLS wraps it).
func socketOf(c net.Conn) *conn {
	for c != nil {
		switch x := c.(type) {
		case *conn:
			return x
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return nil
		}
	}
	return nil
}

func isUpgrade(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket") &&
		headerHasToken(r.Header, "Connection", "upgrade")
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// sameHost reports whether origin names the host the request was sent to.
func sameHost(origin, host string) bool {
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, host)
}

// originPatterns lets exactly the request's origin through the library's own check, which
// runs after ours.
func originPatterns(r *http.Request) []string {
	o := r.Header.Get("Origin")
	if o == "" {
		return nil
	}
	u, err := url.Parse(o)
	if err != nil {
		return nil
	}
	// Patterns are path.Match patterns: escape what would be read as one (IPv6 brackets).
	return []string{escapePattern(u.Scheme + "://" + u.Host)}
}

func escapePattern(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`\*?[]`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}
