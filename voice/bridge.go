// Package voice owns voicegate's voice sessions: a WebSocket from the voice app bridged to a
// WebSocket to the algorithm service (github.com/coder/websocket on both sides), with the
// session protocol of DESIGN.md — session_initialized, audio in as audio_chunk messages, control
// messages validated and forwarded, recognition/answer/speech events and TTS audio relayed back —
// keepalive, bounded queues, meaningful close codes, and the registry of live sessions.
package voice

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"

	"voicegate/proxy"
)

// Options configures the voice handler. Zero values pick the defaults named.
type Options struct {
	// AlgoURL is the algorithm service; sessions dial {AlgoURL}/voice/stream as ws or wss.
	AlgoURL *url.URL
	// Client dials the algorithm service; nil means a client with DialTimeout. Its transport
	// must speak HTTP/1.1 (the WebSocket upgrade).
	Client *http.Client
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
	// StallTimeout drops a peer whose write has been stuck this long (checked on the session's
	// timer, so writes carry no deadline of their own); zero means 10 s.
	StallTimeout time.Duration
	// QueueBytes bounds what may wait to be written to each side; zero means 512 KiB. A side
	// that lets it fill gets an error message and close 1013.
	QueueBytes int
	// RawAudio relays client audio to the algorithm service as binary frames, untouched, instead
	// of audio_chunk JSON messages.
	RawAudio bool
	// Audio is the session's audio format; zero fields mean 16 kHz, mono, pcm, "zh-CN".
	Audio AudioConfig
	// Registry tracks sessions; nil means a private, local one.
	Registry *Registry
	// Owner names the request's user and tenant.
	Owner func(r *http.Request) (userID, tenantID string)
	// Recheck, if set, is called every RecheckInterval during a session; an error (a revoked or
	// expired token) closes it with 4401.
	Recheck         func(ctx context.Context, r *http.Request) error
	RecheckInterval time.Duration // zero means 500 ms
	// UpstreamHeaders adds headers to the dial (identity, trace context).
	UpstreamHeaders func(in *http.Request, out http.Header)
	// OnStart and OnEnd, if set, are called as sessions begin and end (metrics, logs).
	OnStart func()
	OnEnd   func(Stats)
	Log     *slog.Logger
}

// Stats are a session's counters, logged when it ends and exported as metrics.
type Stats struct {
	SessionID     string
	Duration      time.Duration
	PacketsIn     int64 // client → gateway messages
	BytesIn       int64
	PacketsOut    int64 // gateway → client messages relayed from the algorithm service
	BytesOut      int64
	AudioBytesIn  int64 // client audio
	AudioBytesOut int64 // TTS audio frames
	ASRPartial    int64
	ASRFinal      int64
	LLMChunks     int64
	TTSChunks     int64
	Errors        int64
	FirstASR      time.Duration // first client audio → first recognition event; 0 if none
	CloseCode     websocket.StatusCode
	CloseReason   string
}

// Handler is the GET /api/v2/voice/stream handler.
type Handler struct {
	o    Options
	pool sync.Pool
	ws   *url.URL
}

// NewHandler returns the voice handler.
func NewHandler(o Options) *Handler {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.DialTimeout, 5*time.Second)
	def(&o.PingInterval, 30*time.Second)
	def(&o.IdleTimeout, 5*time.Minute)
	def(&o.StallTimeout, 10*time.Second)
	def(&o.RecheckInterval, 500*time.Millisecond)
	if o.ReadLimit <= 0 {
		o.ReadLimit = 1 << 20
	}
	if o.QueueBytes <= 0 {
		o.QueueBytes = 512 << 10
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
	if o.Client == nil {
		o.Client = &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: o.DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSHandshakeTimeout: o.DialTimeout,
		}}
	}
	// Keep hold of each dialed connection's raw socket: the library's CloseNow waits for a close
	// handshake already under way, and a dead peer must be droppable at once.
	client := *o.Client
	if client.Transport == nil {
		client.Transport = http.DefaultTransport
	}
	client.Transport = rawConnRecorder{client.Transport}
	o.Client = &client
	if o.Registry == nil {
		o.Registry = NewRegistry(RegistryOptions{})
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
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
	h := &Handler{o: o, ws: ws}
	h.pool.New = func() any { b := make([]byte, 0, 4<<10); return &b }
	return h
}

func (h *Handler) getBuf() *[]byte { return h.pool.Get().(*[]byte) }

func (h *Handler) putBuf(b *[]byte) {
	if cap(*b) > 64<<10 {
		return // let big, rare buffers go
	}
	*b = (*b)[:0]
	h.pool.Put(b)
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !isUpgrade(r) {
		w.Header().Set("Upgrade", "websocket")
		proxy.Errorf(w, r, http.StatusUpgradeRequired, proxy.CodeValidation, "this route speaks WebSocket only")
		return
	}
	if origin := r.Header.Get("Origin"); origin != "" && !sameHost(origin, r.Host) &&
		(h.o.AllowOrigin == nil || !h.o.AllowOrigin(origin)) {
		proxy.Errorf(w, r, http.StatusForbidden, proxy.CodePermission, "origin not allowed")
		return
	}
	q := r.URL.Query()
	conversation, language := q.Get("conversation_id"), q.Get("language")
	if !validValue(conversation, 256) || !validLanguage(language) {
		proxy.Errorf(w, r, http.StatusBadRequest, proxy.CodeValidation,
			"conversation_id must be at most 256 printable characters and language a tag such as en-US")
		return
	}
	cfg := h.o.Audio
	if language != "" {
		cfg.Language = language
	}
	info := Info{SessionID: rand.Text(), ConversationID: conversation, Language: cfg.Language,
		Instance: h.o.Registry.instance, StartedAt: time.Now().UTC()}
	if h.o.Owner != nil {
		info.UserID, info.TenantID = h.o.Owner(r)
	}

	// The algorithm service first: if it is down the client gets a proper HTTP error, not a
	// socket that opens and dies.
	var raw rawConns
	up, err := h.dial(r, info, &raw)
	if err != nil {
		proxy.WriteError(w, r, &proxy.Error{Status: http.StatusBadGateway, Code: proxy.CodeAlgoService,
			Message: "the algorithm service is unavailable", Cause: err})
		return
	}
	client, err := websocket.Accept(&hijackRecorder{ResponseWriter: w, raw: &raw}, r, &websocket.AcceptOptions{
		Subprotocols:    []string{Subprotocol}, // "bearer.<token>" is never selected, so never echoed
		OriginPatterns:  originPatterns(r),     // checked above already
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		up.CloseNow()
		return // Accept answered the request
	}
	client.SetReadLimit(h.o.ReadLimit)
	up.SetReadLimit(h.o.ReadLimit)

	s := h.newSession(r, info, cfg, client, up)
	s.raw = &raw
	h.o.Registry.add(r.Context(), s)
	defer h.o.Registry.remove(s)
	if h.o.OnStart != nil {
		h.o.OnStart()
	}
	s.run()
}

// dial opens the algorithm-service side of a session.
func (h *Handler) dial(r *http.Request, info Info, raw *rawConns) (*websocket.Conn, error) {
	target := *h.ws
	q := target.Query()
	q.Set("session_id", info.SessionID)
	if info.ConversationID != "" {
		q.Set("conversation_id", info.ConversationID)
	}
	q.Set("language", info.Language)
	target.RawQuery = q.Encode()
	hdr := http.Header{}
	if h.o.UpstreamHeaders != nil {
		h.o.UpstreamHeaders(r, hdr)
	}
	if id := proxy.RequestIDFrom(r.Context()); id != "" {
		hdr.Set("X-Request-ID", id)
	}
	ctx, cancel := context.WithTimeout(context.WithValue(r.Context(), rawConnsKey{}, raw), h.o.DialTimeout)
	defer cancel()
	conn, res, err := websocket.Dial(ctx, target.String(), &websocket.DialOptions{
		HTTPClient:      h.o.Client,
		HTTPHeader:      hdr,
		Subprotocols:    []string{Subprotocol},
		CompressionMode: websocket.CompressionDisabled,
	})
	if res != nil && res.Body != nil {
		res.Body.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("voice: dial algorithm service: %w", err)
	}
	return conn, nil
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

// rawConns are a session's two sockets, closed directly to drop a dead peer at once.
type rawConns struct {
	mu     sync.Mutex
	client io.Closer
	up     io.Closer
}

func (c *rawConns) closeClient() { c.close(func() io.Closer { return c.client }) }
func (c *rawConns) closeUp()     { c.close(func() io.Closer { return c.up }) }

func (c *rawConns) close(which func() io.Closer) {
	c.mu.Lock()
	conn := which()
	c.mu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
}

type rawConnsKey struct{}

// rawConnRecorder notes the connection of a 101 answer (its body is the raw connection).
type rawConnRecorder struct{ http.RoundTripper }

func (t rawConnRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	res, err := t.RoundTripper.RoundTrip(r)
	if err == nil && res.StatusCode == http.StatusSwitchingProtocols {
		if raw, ok := r.Context().Value(rawConnsKey{}).(*rawConns); ok {
			if rwc, ok := res.Body.(io.Closer); ok {
				raw.mu.Lock()
				raw.up = rwc
				raw.mu.Unlock()
			}
		}
	}
	return res, err
}

// hijackRecorder notes the client's connection when the library hijacks it.
type hijackRecorder struct {
	http.ResponseWriter
	raw *rawConns
}

func (w *hijackRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.raw.mu.Lock()
		w.raw.client = conn
		w.raw.mu.Unlock()
	}
	return conn, brw, err
}

func (w *hijackRecorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

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

func validValue(s string, max int) bool {
	if len(s) > max || !utf8.ValidString(s) {
		return false
	}
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

func validLanguage(s string) bool {
	if len(s) > 16 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// session is one bridged voice session.
type session struct {
	h        *Handler
	r        *http.Request
	info     Info
	cfg      AudioConfig
	client   *websocket.Conn
	up       *websocket.Conn
	toClient *sender
	toUp     *sender
	enc      *chunkEncoder
	raw      *rawConns
	start    time.Time

	errors      atomic.Int64 // error messages to the client and from the algorithm service
	lastIn      atomic.Int64 // unix ms of the last client message
	firstAudio  atomic.Int64 // unix ns of the first client audio
	pinging     [2]atomic.Bool
	lastPing    time.Time // guarded by the tick (one at a time)
	tick        *time.Timer
	ended       atomic.Bool
	endOnce     sync.Once
	closeCode   websocket.StatusCode
	closeReason string
	stats       Stats
	upDone      chan struct{}
}

func (h *Handler) newSession(r *http.Request, info Info, cfg AudioConfig, client, up *websocket.Conn) *session {
	s := &session{h: h, r: r, info: info, cfg: cfg, client: client, up: up, start: time.Now(),
		upDone: make(chan struct{})}
	s.toClient = newSender(client, h.putBuf, h.o.QueueBytes, func(err error) {
		s.clientDead("client write failed")
	})
	s.toUp = newSender(up, h.putBuf, h.o.QueueBytes, func(err error) {
		s.upstreamDead("the algorithm service connection failed")
	})
	s.enc = newChunkEncoder(info.SessionID, info.ConversationID, cfg)
	s.stats.SessionID = info.SessionID
	// Made stopped, armed in run: onTick re-arms it and must never see it unset.
	s.tick = time.AfterFunc(time.Hour, s.onTick)
	s.tick.Stop()
	s.lastIn.Store(time.Now().UnixMilli())
	return s
}

// run relays until the session ends: the upstream in its own goroutine, the client here.
func (s *session) run() {
	s.sendInit()
	go s.readUpstream()
	s.lastPing = time.Now()
	s.tick.Reset(s.h.o.RecheckInterval)
	s.readClient()

	// The client side is finished; make sure the rest is too.
	s.tick.Stop()
	<-s.upDone
	<-s.toClient.drained()
	<-s.toUp.drained()
	s.client.CloseNow()
	s.up.CloseNow()
	s.stats.Duration = time.Since(s.start)
	s.stats.CloseCode, s.stats.CloseReason = s.closeCode, s.closeReason
	s.stats.Errors = s.errors.Load()
	s.h.o.Log.Info("voice session ended", "session_id", s.info.SessionID, "user_id", s.info.UserID,
		"duration", s.stats.Duration, "packets_in", s.stats.PacketsIn, "bytes_in", s.stats.BytesIn,
		"packets_out", s.stats.PacketsOut, "bytes_out", s.stats.BytesOut, "asr_partial", s.stats.ASRPartial,
		"asr_final", s.stats.ASRFinal, "tts_chunks", s.stats.TTSChunks, "errors", s.stats.Errors,
		"first_asr", s.stats.FirstASR, "close_code", int(s.closeCode), "close_reason", s.closeReason)
	if s.h.o.OnEnd != nil {
		s.h.o.OnEnd(s.stats)
	}
}

func (s *session) sendInit() {
	b := s.h.getBuf()
	msg, _ := json.Marshal(sessionInitialized{
		Type: TypeSessionInitialized, SessionID: s.info.SessionID,
		Config: AudioConfig{SampleRate: s.cfg.SampleRate, Channels: s.cfg.Channels, Format: s.cfg.Format,
			Language: s.cfg.Language, VADEnabled: true, NoiseSuppression: true, EchoCancellation: true},
		ServerTime: time.Now().UnixMilli(),
		Capabilities: map[string]bool{"asr": true, "tts": true, "llm_streaming": true, "retrieval": true,
			"raw_audio": s.h.o.RawAudio, "control": true},
	})
	*b = append(*b, msg...)
	_ = s.toClient.send(websocket.MessageText, b)
}

// sendError queues an error message for the client.
func (s *session) sendError(code, msg string) {
	b := s.h.getBuf()
	*b = append(*b, encodeError(s.info.SessionID, code, msg)...)
	s.toClient.sendAnyway(websocket.MessageText, b) // even into a full queue: it explains the close
	s.errors.Add(1)
}

// read reads one message into a pooled buffer.
func (s *session) read(c *websocket.Conn) (websocket.MessageType, *[]byte, error) {
	typ, rd, err := c.Reader(context.Background())
	if err != nil {
		return 0, nil, err
	}
	b := s.h.getBuf()
	buf := *b
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := rd.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			*b = buf
			s.h.putBuf(b)
			return 0, nil, err
		}
	}
	*b = buf
	return typ, b, nil
}

func (s *session) readClient() {
	var seq int64
	for {
		typ, b, err := s.read(s.client)
		if err != nil {
			s.clientGone(err)
			return
		}
		s.lastIn.Store(time.Now().UnixMilli())
		s.stats.PacketsIn++
		s.stats.BytesIn += int64(len(*b))
		switch typ {
		case websocket.MessageBinary:
			s.stats.AudioBytesIn += int64(len(*b))
			s.firstAudio.CompareAndSwap(0, time.Now().UnixNano())
			out := b
			if !s.h.o.RawAudio {
				seq++
				out = s.h.getBuf()
				*out = s.enc.appendChunk(*out, *b, seq, time.Now())
				s.h.putBuf(b)
				typ = websocket.MessageText
			}
			if err := s.toUp.send(typ, out); errors.Is(err, errSlow) {
				s.end(websocket.StatusTryAgainLater, CodeSlowConsumer, "the algorithm service is not keeping up")
			}
		case websocket.MessageText:
			if !utf8.Valid(*b) {
				s.h.putBuf(b)
				s.end(websocket.StatusInvalidFramePayloadData, CodeInvalidMessage, "text messages must be UTF-8")
				s.drainClient()
				return
			}
			out, _, code, reason := control(*b, s.info.SessionID)
			s.h.putBuf(b)
			if code != "" {
				s.sendError(code, reason)
				continue
			}
			ob := s.h.getBuf()
			*ob = append(*ob, out...)
			if err := s.toUp.send(websocket.MessageText, ob); errors.Is(err, errSlow) {
				s.end(websocket.StatusTryAgainLater, CodeSlowConsumer, "the algorithm service is not keeping up")
			}
		}
	}
}

// drainClient keeps reading after the session ended from this side, so that the close
// handshake can complete.
func (s *session) drainClient() {
	for {
		_, b, err := s.read(s.client)
		if err != nil {
			return
		}
		s.h.putBuf(b)
	}
}

// clientGone handles the end of the client connection.
func (s *session) clientGone(err error) {
	var ce websocket.CloseError
	switch {
	case errors.As(err, &ce):
		s.end(ce.Code, "", "client closed: "+ce.Reason)
	case websocket.CloseStatus(err) == websocket.StatusMessageTooBig || strings.Contains(err.Error(), "read limited"):
		s.end(websocket.StatusMessageTooBig, "", "message too big")
	default:
		// Vanished without a close frame (or killed on purpose): nothing more to say to it.
		s.clientDead("client gone")
	}
}

func (s *session) readUpstream() {
	defer close(s.upDone)
	for {
		typ, b, err := s.read(s.up)
		if err != nil {
			var ce websocket.CloseError
			switch {
			case errors.As(err, &ce) && ce.Code == websocket.StatusNormalClosure:
				s.end(websocket.StatusNormalClosure, "", "the algorithm service ended the session")
			case errors.As(err, &ce):
				// It closed properly, with a code saying something went wrong.
				s.end(websocket.StatusInternalError, CodeAlgoService, "the algorithm service ended the session: "+ce.Reason)
			default:
				s.upstreamDead("the algorithm service went away")
			}
			return
		}
		s.count(typ, *b)
		if err := s.toClient.send(typ, b); errors.Is(err, errSlow) {
			s.end(websocket.StatusTryAgainLater, CodeSlowConsumer, "the client is not reading fast enough")
		}
	}
}

// count updates the per-session counters for a message from the algorithm service.
func (s *session) count(typ websocket.MessageType, msg []byte) {
	s.stats.PacketsOut++
	s.stats.BytesOut += int64(len(msg))
	if typ == websocket.MessageBinary {
		s.stats.AudioBytesOut += int64(len(msg))
		s.stats.TTSChunks++
		return
	}
	switch string(upstreamType(msg)) {
	case "asr_partial":
		s.stats.ASRPartial++
		s.firstASR()
	case "asr_final":
		s.stats.ASRFinal++
		s.firstASR()
	case "llm_response_chunk":
		s.stats.LLMChunks++
	case "tts_audio":
		s.stats.TTSChunks++
	case "error":
		s.errors.Add(1)
	}
}

func (s *session) firstASR() {
	if s.stats.FirstASR == 0 {
		if fa := s.firstAudio.Load(); fa != 0 {
			s.stats.FirstASR = time.Duration(time.Now().UnixNano() - fa)
		}
	}
}

// onTick runs on a timer: token recheck, idle timeout and keepalive pings. No goroutine waits
// for it between ticks.
func (s *session) onTick() {
	if s.ended.Load() {
		return
	}
	o := &s.h.o
	if o.Recheck != nil {
		ctx, cancel := context.WithTimeout(context.Background(), o.RecheckInterval)
		err := o.Recheck(ctx, s.r)
		cancel()
		if err != nil {
			s.end(CloseTokenInvalid, CodeTokenInvalid, "the token is no longer valid: "+err.Error())
			return
		}
	}
	now := time.Now()
	if s.toClient.stuck(now) > o.StallTimeout {
		s.clientDead("client not reading")
		return
	}
	if s.toUp.stuck(now) > o.StallTimeout {
		s.upstreamDead("the algorithm service is not reading")
		return
	}
	if idle := now.Sub(time.UnixMilli(s.lastIn.Load())); idle >= o.IdleTimeout {
		s.end(websocket.StatusNormalClosure, CodeIdle, "no message from the client for "+o.IdleTimeout.String())
		return
	}
	if time.Since(s.lastPing) >= o.PingInterval {
		s.lastPing = time.Now()
		s.ping(0, s.client, func() { s.clientDead("client stopped answering pings") })
		s.ping(1, s.up, func() { s.upstreamDead("the algorithm service stopped answering") })
	}
	s.tick.Reset(o.RecheckInterval)
}

// ping sends a ping on c in a short-lived goroutine; no pong within a ping interval means the
// peer is dead.
func (s *session) ping(i int, c *websocket.Conn, dead func()) {
	if !s.pinging[i].CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.pinging[i].Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), s.h.o.PingInterval)
		defer cancel()
		if err := c.Ping(ctx); err != nil && !s.ended.Load() {
			dead()
		}
	}()
}

// end finishes the session once: the client gets an error message when errCode is set, then a
// close with code; the algorithm service is closed at once.
func (s *session) end(code websocket.StatusCode, errCode, reason string) {
	s.endOnce.Do(func() {
		s.ended.Store(true)
		s.closeCode, s.closeReason = code, reason
		if errCode != "" {
			s.sendError(errCode, reason)
		}
		s.toClient.close(code, clip(reason))
		upCode := websocket.StatusNormalClosure
		if code == websocket.StatusServiceRestart {
			upCode = websocket.StatusGoingAway
		}
		s.toUp.close(upCode, "session ended")
	})
}

// clientDead ends the session for a client that is gone: no handshake with it, the algorithm
// service closed at once.
func (s *session) clientDead(reason string) {
	s.toClient.stop()
	s.end(websocket.StatusGoingAway, "", reason)
	s.raw.closeClient()
}

// upstreamDead ends the session for an algorithm service that is gone: no handshake with it; the
// client is told and closed 1011.
func (s *session) upstreamDead(reason string) {
	s.toUp.stop()
	s.end(websocket.StatusInternalError, CodeAlgoService, reason)
	s.raw.closeUp()
}

// kill drops both connections without handshakes (shutdown overtime).
func (s *session) kill() {
	s.toClient.stop()
	s.toUp.stop()
	s.endOnce.Do(func() {
		s.ended.Store(true)
		s.closeCode, s.closeReason = websocket.StatusGoingAway, "killed"
	})
	s.raw.closeClient()
	s.raw.closeUp()
}

// clip keeps a close reason within the protocol's 123 bytes.
func clip(s string) string {
	if len(s) <= 120 {
		return s
	}
	return s[:120]
}
