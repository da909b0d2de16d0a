package main

import (
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"voicegate/auth"
	"voicegate/console"
	"voicegate/proxy"
	"voicegate/voice/audio"
)

// config is everything run needs, parsed and validated once.
type config struct {
	Demo        bool
	HealthCheck bool // probe a running gateway's /healthz and exit (for container health checks)
	Version     bool // print the version and exit

	ListenAddr     string
	ListenAddrFile string     // "" writes none; else the address listened on, for -healthcheck
	AlgoURLs       []*url.URL // replicas of the algorithm service
	AdminURLs      []*url.URL // none: the admin route answers 404
	DocsURLs       []*url.URL // none: the documents route answers 404
	CORSOrigins    []string
	TrustedProxies proxy.Prefixes
	LogFormat      string // "text", "json" or "" (text on a terminal, else JSON)
	LogLevel       slog.Level
	ShutdownGrace  time.Duration

	// TLSCertFile and TLSKeyFile: serve TLS (and HTTP/2), reloading the files when they change.
	TLSCertFile, TLSKeyFile string

	MaxBodyBytes    int64         // proxied routes
	BodyReadTimeout time.Duration // every body: this long, plus a second per BodyMinRate bytes
	BodyMinRate     int64         // bytes per second
	// Credentials of the client passed on to ADMIN_URL and DOCS_URL; by default neither is.
	ForwardAuthorization bool
	ForwardCookies       bool
	UpstreamTimeout      time.Duration // how long an upstream may take to answer headers
	ProxyWriteTimeout    time.Duration // bound on every write of a proxied response
	ChatMaxBodyBytes     int64
	ChatMaxMessage       int
	ChatMaxTokens        int
	ChatDefaultModel     string
	OpenAIModels         []string // the models /v1/ serves and lists; empty: CHAT_DEFAULT_MODEL alone
	SSEPingInterval      time.Duration
	SSEWriteTimeout      time.Duration
	SSEResumeWindow      time.Duration
	SSEResumeRetention   time.Duration
	SSEMaxResumes        int
	SSEMaxLineBytes      int

	JWTSecret          []byte
	JWKSURL            *url.URL
	JWTIssuer          string
	JWTAudience        string
	JWTLeeway          time.Duration
	JWTMaxLifetime     time.Duration
	JWKSRefresh        time.Duration
	JWKSMinRefetch     time.Duration
	AuthFailOpen       bool
	AuthPublicPaths    []string
	AuthRefreshWindow  time.Duration
	AuthBudget         time.Duration
	Claims             auth.Claims // where the identity is in a token
	UserServiceURL     *url.URL
	RedisAddrs         []string // empty: in-memory stores, one instance only
	RedisDB            int
	RedisUser          string
	RedisPassword      string
	RedisPrefix        string
	RedisConnectWithin time.Duration

	Instance   string // INSTANCE_NAME, else the host name: shown in listings and usage records
	InstanceID string // this process's own identity (instanceID): the name of its channels and entries

	MetricsEnabled   bool
	MetricsAddr      string        // "" serves /metrics on the main listener
	DrainDelay       time.Duration // readiness fails this long before the listener stops
	ServiceName      string
	OTLPEndpoint     string // full traces URL; "" means no tracing
	OTLPHeaders      map[string]string
	TraceSampleRatio float64

	VoicePing         time.Duration
	VoiceIdle         time.Duration
	VoiceWriteTimeout time.Duration
	VoiceRawAudio     bool
	VoiceLanguage     string
	// VoiceReservation is the audio a voice session reserves from its quotas at a time;
	// VoicePace and VoicePaceBurst bound how much faster than real time a client may send;
	// VoiceUsageMaxLen caps the usage stream.
	VoiceReservation time.Duration
	VoicePace        float64
	VoicePaceBurst   time.Duration
	VoiceUsageMaxLen int
	// VoiceAudio is the audio format of voice clients that name none (voice/audio);
	// VoiceEchoCancellation what session_initialized says of echo cancellation.
	VoiceAudio            audio.Format
	VoiceEchoCancellation bool
	// VoiceTTSPacing releases TTS audio at playback rate plus VoiceTTSLead, holding at most
	// VoiceTTSQueue bytes, so that an interrupt drops what was not heard.
	VoiceTTSPacing bool
	VoiceTTSLead   time.Duration
	VoiceTTSQueue  int64
	// VoiceResumeWindow is how long a voice session outlives its client's connection; 0: off.
	VoiceResumeWindow time.Duration

	PolicyFile  string
	PolicyWatch time.Duration
	LeaseTTL    time.Duration
	LimitBudget time.Duration

	ConsoleEnabled  bool     // serve the browser console at /console
	ConsoleGateways []string // origins besides its own the console may talk to (console.Origin's form)
}

// setting is one configuration variable: an environment variable that a flag of the same name
// (lower case, dashes) overrides.
type setting struct {
	env   string
	def   string
	usage string
	parse func(c *config, v string) error
}

// secret settings are never repeated in error messages.
func secret(env string) bool {
	return env == "JWT_SECRET" || env == "REDIS_URL" || env == "OTEL_EXPORTER_OTLP_HEADERS"
}

func settings() []setting {
	return []setting{
		{"LISTEN_ADDR", ":8080", "listen address (host:port)", func(c *config, v string) error {
			if _, _, err := net.SplitHostPort(v); err != nil {
				return errors.New("want host:port, such as :8080")
			}
			c.ListenAddr = v
			return nil
		}},
		{"LISTEN_ADDR_FILE", "", "write the address listened on to this file, where -healthcheck finds it (the image sets /run/voicegate/addr)", func(c *config, v string) error {
			if strings.ContainsRune(v, 0) {
				return errors.New("want a file path")
			}
			c.ListenAddrFile = v
			return nil
		}},
		{"ALGO_URL", "", "base URL of the algorithm service, or several replicas separated by commas (required unless -demo)", func(c *config, v string) (err error) {
			c.AlgoURLs, err = parseReplicas(v)
			return err
		}},
		{"ADMIN_URL", "", "admin back end (or replicas, comma-separated) for /api/v2/admin/ (unset: 404)", func(c *config, v string) (err error) {
			c.AdminURLs, err = parseReplicas(v)
			return err
		}},
		{"DOCS_URL", "", "documents back end (or replicas, comma-separated) for /api/v2/documents/ (unset: 404)", func(c *config, v string) (err error) {
			c.DocsURLs, err = parseReplicas(v)
			return err
		}},
		{"CORS_ORIGINS", "", "comma-separated allowed browser origins (also the WebSocket Origin check)", func(c *config, v string) error {
			for _, o := range strings.Split(v, ",") {
				o = strings.TrimSpace(o)
				if o == "" {
					continue
				}
				if o != "*" {
					u, err := url.Parse(o)
					if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" {
						return fmt.Errorf("%q is not an origin like https://app.example.com", o)
					}
				}
				c.CORSOrigins = append(c.CORSOrigins, o)
			}
			return nil
		}},
		{"TRUSTED_PROXIES", "", "comma-separated CIDRs whose X-Forwarded-For is believed", func(c *config, v string) (err error) {
			c.TrustedProxies, err = proxy.ParsePrefixes(v)
			return err
		}},
		{"LOG_FORMAT", "", "text or json (default: text on a terminal, else json)", func(c *config, v string) error {
			switch v {
			case "", "text", "json":
				c.LogFormat = v
				return nil
			}
			return errors.New("want text or json")
		}},
		{"LOG_LEVEL", "info", "debug, info, warn or error", func(c *config, v string) error {
			return c.LogLevel.UnmarshalText([]byte(v))
		}},
		{"SHUTDOWN_GRACE", "25s", "how long open streams get on SIGTERM", durationSetting(func(c *config) *time.Duration { return &c.ShutdownGrace }, 0)},
		{"BACKEND_FORWARD_CREDENTIALS", "", "client credentials passed on to ADMIN_URL and DOCS_URL: authorization, cookie, both comma-separated, or none", func(c *config, v string) error {
			for _, f := range strings.Split(v, ",") {
				switch strings.ToLower(strings.TrimSpace(f)) {
				case "", "none":
				case "authorization":
					c.ForwardAuthorization = true
				case "cookie":
					c.ForwardCookies = true
				default:
					return errors.New("want authorization, cookie, both comma-separated, or none")
				}
			}
			return nil
		}},
		{"MAX_BODY_BYTES", "10485760", "largest request body on proxied routes", bytesSetting(func(c *config) *int64 { return &c.MaxBodyBytes })},
		{"BODY_READ_TIMEOUT", "5s", "how long any request body may take, whatever its size (plus a second per BODY_MIN_RATE bytes received)", durationSetting(func(c *config) *time.Duration { return &c.BodyReadTimeout }, time.Millisecond)},
		{"BODY_MIN_RATE", "16384", "bytes per second a request body must keep up on average beyond BODY_READ_TIMEOUT", bytesSetting(func(c *config) *int64 { return &c.BodyMinRate })},
		{"UPSTREAM_TIMEOUT", "30s", "how long an upstream may take to answer headers", durationSetting(func(c *config) *time.Duration { return &c.UpstreamTimeout }, time.Millisecond)},
		{"PROXY_WRITE_TIMEOUT", "10s", "bound on every write of a response proxied from ADMIN_URL or DOCS_URL; a client that does not take a write within it is dropped, with its back-end connection", durationSetting(func(c *config) *time.Duration { return &c.ProxyWriteTimeout }, 10*time.Millisecond)},
		{"CHAT_MAX_BODY_BYTES", "65536", "largest chat request body", boundedBytes(func(c *config) *int64 { return &c.ChatMaxBodyBytes }, maxChatBody)},
		{"CHAT_MAX_MESSAGE", "4000", "longest chat message, in characters", intSetting(func(c *config) *int { return &c.ChatMaxMessage })},
		{"CHAT_MAX_TOKENS", "8192", "largest max_tokens a chat request may ask for", intSetting(func(c *config) *int { return &c.ChatMaxTokens })},
		{"CHAT_DEFAULT_MODEL", "default", "model used when a chat request names none", func(c *config, v string) error {
			if v == "" {
				return errors.New("must not be empty")
			}
			c.ChatDefaultModel = v
			return nil
		}},
		{"TLS_CERT_FILE", "", "PEM certificate chain: with TLS_KEY_FILE, the gateway serves HTTPS (HTTP/2 and HTTP/1.1, wss:// for voice and realtime) and reloads both files when they change", func(c *config, v string) error {
			c.TLSCertFile = v
			return nil
		}},
		{"TLS_KEY_FILE", "", "PEM private key of TLS_CERT_FILE", func(c *config, v string) error {
			c.TLSKeyFile = v
			return nil
		}},
		{"OPENAI_MODELS", "", "models POST /v1/chat/completions takes and GET /v1/models lists, comma-separated (another is refused with 404 model_not_found); unset: CHAT_DEFAULT_MODEL alone (-demo: voicegate-demo)", func(c *config, v string) error {
			c.OpenAIModels = nil
			for _, m := range strings.Split(v, ",") {
				if m = strings.TrimSpace(m); m == "" {
					continue
				}
				if !proxy.ValidLabel(m, 256) {
					return errors.New("want model names of printable characters, at most 256 bytes each")
				}
				c.OpenAIModels = append(c.OpenAIModels, m)
			}
			return nil
		}},
		{"SSE_PING_INTERVAL", "15s", "ping comment interval while the upstream is silent", durationSetting(func(c *config) *time.Duration { return &c.SSEPingInterval }, time.Millisecond)},
		{"SSE_WRITE_TIMEOUT", "10s", "bound on every write to a chat stream's client; a client that does not take a write within it loses the stream", durationSetting(func(c *config) *time.Duration { return &c.SSEWriteTimeout }, 10*time.Millisecond)},
		{"SSE_RESUME_WINDOW", "0s", "how long a chat stream whose client lost its connection keeps running for the client to resume it (Last-Event-ID); 0 turns resuming off", durationSetting(func(c *config) *time.Duration { return &c.SSEResumeWindow }, 0)},
		{"SSE_RESUME_RETENTION", "5m", "how long a resumable stream's replay log is kept after its last event", durationSetting(func(c *config) *time.Duration { return &c.SSEResumeRetention }, time.Second)},
		{"SSE_MAX_RESUMES", "1024", "how many chat streams one instance answers from replay logs at once (resumes, and repeats of a finished request); more are refused with 503", intSetting(func(c *config) *int { return &c.SSEMaxResumes })},
		{"SSE_MAX_LINE_BYTES", "1048576", "longest upstream NDJSON line", func(c *config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 64 || n > maxLineBytes {
				return fmt.Errorf("want a byte count between 64 and %d", maxLineBytes)
			}
			c.SSEMaxLineBytes = n
			return nil
		}},
		{"JWT_SECRET", "", "HMAC key for HS256/384/512 tokens: at least 32 bytes, no surrounding white space, at least 8 distinct characters", func(c *config, v string) error {
			if v == "" {
				return nil
			}
			if err := auth.CheckHMACSecret([]byte(v)); err != nil {
				return err
			}
			c.JWTSecret = []byte(v)
			return nil
		}},
		{"JWT_JWKS_URL", "", "JWKS for RS/PS/ES/EdDSA tokens, cached and refreshed", func(c *config, v string) (err error) {
			c.JWKSURL, err = parseBaseURL(v)
			return err
		}},
		{"JWT_ISSUER", "", "required token issuer (iss)", func(c *config, v string) error {
			c.JWTIssuer = v
			return nil
		}},
		{"JWT_AUDIENCE", "", "required token audience (aud)", func(c *config, v string) error {
			c.JWTAudience = v
			return nil
		}},
		{"JWT_USER_CLAIM", auth.DefaultUserClaim, "claim paths of the user ID, first present wins (dotted, such as oid)", claimSetting(func(c *auth.Claims) *[]auth.ClaimPath { return &c.UserID })},
		{"JWT_USERNAME_CLAIM", auth.DefaultUsernameClaim, "claim paths of the user name, first present wins (such as preferred_username)", claimSetting(func(c *auth.Claims) *[]auth.ClaimPath { return &c.Username })},
		{"JWT_TENANT_CLAIM", auth.DefaultTenantClaim, "claim paths of the tenant, first present wins (such as tid or org_id)", claimSetting(func(c *auth.Claims) *[]auth.ClaimPath { return &c.TenantID })},
		{"JWT_ROLES_CLAIM", auth.DefaultRolesClaim, "claim paths of the roles, all merged (such as realm_access.roles,resource_access.my-client.roles)", claimSetting(func(c *auth.Claims) *[]auth.ClaimPath { return &c.Roles })},
		{"JWT_SCOPES_CLAIM", auth.DefaultScopesClaim, "claim paths of direct permission grants, all merged (lists, or space-separated strings such as scp)", claimSetting(func(c *auth.Claims) *[]auth.ClaimPath { return &c.Scopes })},
		{"JWT_LEEWAY", "30s", "clock skew allowed for exp, nbf and iat", durationSetting(func(c *config) *time.Duration { return &c.JWTLeeway }, 0)},
		{"JWT_MAX_LIFETIME", "24h", "the longest a token lives (how long revocations are kept)", durationSetting(func(c *config) *time.Duration { return &c.JWTMaxLifetime }, time.Minute)},
		{"JWKS_REFRESH", "15m", "scheduled JWKS refresh interval", durationSetting(func(c *config) *time.Duration { return &c.JWKSRefresh }, time.Second)},
		{"JWKS_MIN_REFETCH", "30s", "least time between JWKS fetches caused by unknown kids", durationSetting(func(c *config) *time.Duration { return &c.JWKSMinRefetch }, 0)},
		{"AUTH_FAIL_OPEN", "false", "let requests through when the revocation store is unreachable", func(c *config, v string) (err error) {
			c.AuthFailOpen, err = strconv.ParseBool(v)
			if err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"AUTH_PUBLIC_PATHS", "", "comma-separated extra paths served without a token (a trailing / covers the subtree)", func(c *config, v string) error {
			for _, p := range strings.Split(v, ",") {
				p = strings.TrimSpace(p)
				if p == "" {
					continue
				}
				if !strings.HasPrefix(p, "/") || strings.Contains(p, "..") || strings.ContainsAny(p, "?#%;") {
					return fmt.Errorf("%q is not a clean absolute path", p)
				}
				c.AuthPublicPaths = append(c.AuthPublicPaths, p)
			}
			return nil
		}},
		{"AUTH_REFRESH_WINDOW", "15m", "tokens with less left get X-Token-Refresh-Required", durationSetting(func(c *config) *time.Duration { return &c.AuthRefreshWindow }, 0)},
		{"AUTH_BUDGET", "75ms", "time budget of each revocation or user-status lookup", durationSetting(func(c *config) *time.Duration { return &c.AuthBudget }, time.Millisecond)},
		{"USER_SERVICE_URL", "", "user service asked GET {url}/users/{id} for the user's status (unset: no check)", func(c *config, v string) (err error) {
			c.UserServiceURL, err = parseBaseURL(v)
			return err
		}},
		{"REDIS_URL", "", "redis://[user:password@]host:port/db, or comma-separated host:port addresses of a Redis Cluster (unset: in-memory, one instance)", parseRedis},
		{"REDIS_PREFIX", "voicegate:", "prefix of every Redis key, without braces", func(c *config, v string) error {
			// A brace in the prefix would become the Redis Cluster hash tag of every key,
			// splitting the keys of one script over several slots.
			if strings.ContainsAny(v, "{}") {
				return errors.New("must not contain { or }: on Redis Cluster they would decide the slot of every key")
			}
			c.RedisPrefix = v
			return nil
		}},
		{"INSTANCE_NAME", "", "this instance's name in session listings and usage records, only a label (default: the host name); its identity in Redis is the name and a random suffix made at start", func(c *config, v string) error {
			c.Instance = v
			return nil
		}},
		{"VOICE_PING_INTERVAL", "30s", "WebSocket keepalive; a peer silent for two intervals is dead", durationSetting(func(c *config) *time.Duration { return &c.VoicePing }, 10*time.Millisecond)},
		{"VOICE_IDLE_TIMEOUT", "5m", "close a voice session with no client message for this long", durationSetting(func(c *config) *time.Duration { return &c.VoiceIdle }, 10*time.Millisecond)},
		{"VOICE_WRITE_TIMEOUT", "10s", "bound on every write to either side of a voice session; a side that takes longer is dropped (1013)", durationSetting(func(c *config) *time.Duration { return &c.VoiceWriteTimeout }, 10*time.Millisecond)},
		{"VOICE_RAW_AUDIO", "false", "relay client audio as binary frames untouched, not as audio_chunk JSON", func(c *config, v string) (err error) {
			if c.VoiceRawAudio, err = strconv.ParseBool(v); err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"VOICE_LANGUAGE", "zh-CN", "language of voice sessions that name none", func(c *config, v string) error {
			if v == "" || len(v) > 16 || strings.ContainsAny(v, " \t\"'") {
				return errors.New("want a language tag such as en-US")
			}
			c.VoiceLanguage = v
			return nil
		}},
		{"VOICE_RESERVATION", "2s", "voice audio is reserved from the daily quotas this much at a time, ahead of its use, and charged as it arrives (a session exceeds its quota by at most one)", durationSetting(func(c *config) *time.Duration { return &c.VoiceReservation }, 20*time.Millisecond)},
		{"VOICE_PACE", "1.2", "how many times faster than real time a voice client may send audio, beyond VOICE_PACE_BURST; the session stops reading a faster one (0: no bound)", func(c *config, v string) error {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f != 0 && (f < 1 || f > 100) {
				return errors.New("want 0 (no bound) or a number from 1 to 100, such as 1.2")
			}
			c.VoicePace = f
			return nil
		}},
		{"VOICE_PACE_BURST", "3s", "voice audio a client may send ahead of VOICE_PACE at once (catching up after a stall)", durationSetting(func(c *config) *time.Duration { return &c.VoicePaceBurst }, 20*time.Millisecond)},
		{"VOICE_AUDIO_FORMAT", "pcm/16000/1", "audio format of voice clients that name none on the upgrade or in a config message, as format/sample_rate/channels: pcm (8000, 16000, 24000, 48000 Hz; 1 or 2 channels), opus, mp3, mulaw or alaw (8000/1)", func(c *config, v string) error {
			parts := strings.Split(v, "/")
			if len(parts) != 3 {
				return errors.New("want format/sample_rate/channels, such as pcm/16000/1")
			}
			f, err := audio.Parse(parts[0], parts[1], parts[2], audio.Format{})
			if err != nil {
				return errors.New(err.Field + ": " + err.Reason)
			}
			c.VoiceAudio = f
			return nil
		}},
		{"VOICE_ECHO_CANCELLATION", "false", "what session_initialized.config says of echo cancellation (the origin's default is false)", func(c *config, v string) (err error) {
			if c.VoiceEchoCancellation, err = strconv.ParseBool(v); err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"VOICE_TTS_PACING", "true", "release TTS audio to voice clients at playback rate plus VOICE_TTS_LEAD, so that an interrupt silences what was not yet heard within a frame", func(c *config, v string) (err error) {
			if c.VoiceTTSPacing, err = strconv.ParseBool(v); err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"VOICE_TTS_LEAD", "250ms", "how far ahead of playback paced TTS audio is released (the client's jitter buffer)", durationSetting(func(c *config) *time.Duration { return &c.VoiceTTSLead }, 10*time.Millisecond)},
		{"VOICE_TTS_QUEUE", "262144", "bytes of TTS audio a paced session holds for its client; beyond them it stops reading the algorithm service", boundedBytes(func(c *config) *int64 { return &c.VoiceTTSQueue }, maxTTSQueue)},
		{"VOICE_RESUME_WINDOW", "30s", "how long a voice session outlives its client's connection for the client to resume it, on any instance (0: resuming off); each dropped session holds its upstream connection that long", durationSetting(func(c *config) *time.Duration { return &c.VoiceResumeWindow }, 0)},
		{"VOICE_USAGE_MAX_LEN", "100000", "usage records kept in the Redis stream {REDIS_PREFIX}usage (approximately; older ones are trimmed)", intSetting(func(c *config) *int { return &c.VoiceUsageMaxLen })},
		{"METRICS_ENABLED", "true", "record metrics and serve /metrics", func(c *config, v string) (err error) {
			if c.MetricsEnabled, err = strconv.ParseBool(v); err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"CONSOLE_ENABLED", "false", "serve the browser console (chat and microphone) at /console", func(c *config, v string) (err error) {
			if c.ConsoleEnabled, err = strconv.ParseBool(v); err != nil {
				return errors.New("want true or false")
			}
			return nil
		}},
		{"CONSOLE_GATEWAYS", "", "comma-separated origins, besides its own, that the console may be pointed at with ?gateway= (and send its token to)", func(c *config, v string) error {
			for _, o := range strings.Split(v, ",") {
				if o = strings.TrimSpace(o); o == "" {
					continue
				}
				origin, err := console.Origin(o)
				if err != nil {
					return fmt.Errorf("%q: %w", o, err)
				}
				c.ConsoleGateways = append(c.ConsoleGateways, origin)
			}
			return nil
		}},
		{"METRICS_ADDR", "", "serve /metrics on this separate address instead of the main one", func(c *config, v string) error {
			if v == "" {
				return nil
			}
			if _, _, err := net.SplitHostPort(v); err != nil {
				return errors.New("want host:port, such as 127.0.0.1:9090")
			}
			c.MetricsAddr = v
			return nil
		}},
		{"DRAIN_DELAY", "5s", "on SIGTERM, how long /readyz fails while traffic is still served, so the load balancer stops sending new work", durationSetting(func(c *config) *time.Duration { return &c.DrainDelay }, 0)},
		{"OTEL_SERVICE_NAME", "voicegate", "service name on traces and metrics", func(c *config, v string) error {
			c.ServiceName = v
			return nil
		}},
		{"OTEL_EXPORTER_OTLP_ENDPOINT", "", "OTLP/HTTP collector base URL; traces go to {url}/v1/traces (unset: no tracing)", func(c *config, v string) error {
			if v == "" {
				return nil
			}
			u, err := parseBaseURL(v)
			if err != nil {
				return err
			}
			if c.OTLPEndpoint == "" {
				c.OTLPEndpoint = u.JoinPath("v1", "traces").String()
			}
			return nil
		}},
		{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", "OTLP/HTTP traces URL, used as is (wins over OTEL_EXPORTER_OTLP_ENDPOINT)", func(c *config, v string) error {
			if v == "" {
				return nil
			}
			if _, err := parseBaseURL(v); err != nil {
				return err
			}
			c.OTLPEndpoint = v
			return nil
		}},
		{"OTEL_EXPORTER_OTLP_HEADERS", "", "headers for the collector, key=value,key=value", func(c *config, v string) error {
			for _, kv := range strings.Split(v, ",") {
				if strings.TrimSpace(kv) == "" {
					continue
				}
				k, val, ok := strings.Cut(kv, "=")
				if !ok || strings.TrimSpace(k) == "" {
					return errors.New("want key=value pairs separated by commas")
				}
				if c.OTLPHeaders == nil {
					c.OTLPHeaders = map[string]string{}
				}
				c.OTLPHeaders[strings.TrimSpace(k)] = strings.TrimSpace(val)
			}
			return nil
		}},
		{"OTEL_TRACES_SAMPLER_ARG", "1", "fraction of new traces sampled (traces started upstream follow their parent)", func(c *config, v string) error {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f < 0 || f > 1 {
				return errors.New("want a number between 0 and 1")
			}
			c.TraceSampleRatio = f
			return nil
		}},
		{"POLICY_FILE", "", "RBAC and fair-use policy (JSON; unset: the built-in default)", func(c *config, v string) error {
			c.PolicyFile = v
			return nil
		}},
		{"POLICY_WATCH_INTERVAL", "2s", "how often the policy file is checked for changes", durationSetting(func(c *config) *time.Duration { return &c.PolicyWatch }, 10*time.Millisecond)},
		{"LEASE_TTL", "30s", "how long a concurrency slot outlives its last renewal (an instance that dies frees its slots within it)", durationSetting(func(c *config) *time.Duration { return &c.LeaseTTL }, 300*time.Millisecond)},
		{"LIMIT_BUDGET", "100ms", "time budget of each rate-limit or lease call", durationSetting(func(c *config) *time.Duration { return &c.LimitBudget }, time.Millisecond)},
		{"REDIS_CONNECT_TIMEOUT", "10s", "how long to wait for Redis at start", durationSetting(func(c *config) *time.Duration { return &c.RedisConnectWithin }, time.Millisecond)},
	}
}

// parseRedis reads REDIS_URL: one redis:// or rediss:// URL, or several host:port addresses
// (optionally with the redis:// scheme) for a cluster.
func parseRedis(c *config, v string) error {
	if v == "" {
		return nil
	}
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if !strings.Contains(part, "://") {
			part = "redis://" + part
		}
		u, err := url.Parse(part)
		if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
			return errors.New("want redis://host:port/db or a comma-separated list of host:port")
		}
		if u.Scheme == "rediss" {
			return errors.New("rediss:// (TLS) is not supported yet; use redis:// on a private network")
		}
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return fmt.Errorf("%q lacks a port", u.Host)
		}
		c.RedisAddrs = append(c.RedisAddrs, u.Host)
		if db := strings.Trim(u.Path, "/"); db != "" {
			n, err := strconv.Atoi(db)
			if err != nil || n < 0 {
				return fmt.Errorf("database %q is not a number", db)
			}
			c.RedisDB = n
		}
		if u.User != nil {
			c.RedisUser = u.User.Username()
			c.RedisPassword, _ = u.User.Password()
		}
	}
	return nil
}

func claimSetting(field func(*auth.Claims) *[]auth.ClaimPath) func(*config, string) error {
	return func(c *config, v string) (err error) {
		*field(&c.Claims), err = auth.ParseClaimPaths(v)
		return err
	}
}

func durationSetting(field func(*config) *time.Duration, least time.Duration) func(*config, string) error {
	return func(c *config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil || d < least {
			return fmt.Errorf("want a duration of at least %v, such as 15s", least)
		}
		*field(c) = d
		return nil
	}
}

func bytesSetting(field func(*config) *int64) func(*config, string) error {
	return func(c *config, v string) error {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 {
			return errors.New("want a positive byte count")
		}
		*field(c) = n
		return nil
	}
}

// Upper bounds of settings that size memory held per stream, request or session: a typo (an
// extra digit or three) must not let one client make the gateway hold gigabytes.
const (
	maxLineBytes = 16 << 20 // SSE_MAX_LINE_BYTES: a line is buffered whole, per stream
	maxChatBody  = 16 << 20 // CHAT_MAX_BODY_BYTES: a chat body is read whole before it goes on
	maxTTSQueue  = 16 << 20 // VOICE_TTS_QUEUE: held per paced voice session
)

// boundedBytes is bytesSetting with an upper bound.
func boundedBytes(field func(*config) *int64, most int64) func(*config, string) error {
	return func(c *config, v string) error {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 || n > most {
			return fmt.Errorf("want a byte count between 1 and %d", most)
		}
		*field(c) = n
		return nil
	}
}

func intSetting(field func(*config) *int) func(*config, string) error {
	return func(c *config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return errors.New("want a positive whole number")
		}
		*field(c) = n
		return nil
	}
}

// parseReplicas reads a comma-separated list of replicas of one upstream: base URLs that
// differ only in scheme and host.
func parseReplicas(v string) ([]*url.URL, error) {
	var out []*url.URL
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		u, err := parseBaseURL(part)
		if err != nil {
			return nil, err
		}
		if len(out) > 0 && strings.TrimSuffix(u.Path, "/") != strings.TrimSuffix(out[0].Path, "/") {
			return nil, errors.New("replicas must share one path; they may differ only in scheme and host")
		}
		out = append(out, u)
	}
	return out, nil
}

// parseBaseURL accepts an absolute http(s) URL without query or fragment; "" gives nil.
func parseBaseURL(v string) (*url.URL, error) {
	if v == "" {
		return nil, nil
	}
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("want an absolute http:// or https:// URL")
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, errors.New("want a base URL without credentials, query or fragment")
	}
	return u, nil
}

// shown quotes a rejected value for the error line, with any password in a URL masked.
func shown(v string) string {
	if u, err := url.Parse(v); err == nil && u.User != nil {
		v = u.Redacted()
	}
	return strconv.Quote(v)
}

func flagName(env string) string {
	return strings.ReplaceAll(strings.ToLower(env), "_", "-")
}

// errHelp is returned when the user asked for -h: usage was printed, nothing failed.
var errHelp = flag.ErrHelp

// parseConfig reads flags from args (args[0] is the program name) and the environment through
// getenv; a flag wins over its variable. An invalid value is one error naming where it came
// from: the flag as typed, or the variable.
func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (*config, error) {
	fs := flag.NewFlagSet("voicegate", flag.ContinueOnError)
	c := &config{}
	fs.BoolVar(&c.Demo, "demo", false, "run with a built-in fake algorithm service, for a first look (never production)")
	fs.BoolVar(&c.HealthCheck, "healthcheck", false, "ask the running gateway (LISTEN_ADDR_FILE, else LISTEN_ADDR) for /healthz and exit 0 if it answers 200")
	fs.BoolVar(&c.Version, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: voicegate [flags]\n       voicegate token [flags]      mint a development token for JWT_SECRET\n       voicegate demo-algo [flags]  serve only the demo algorithm service\n       voicegate policy check FILE  check a POLICY_FILE and print every route's binding\n\nFlags:\n")
		fs.PrintDefaults()
	}
	all := settings()
	values := bindSettings(fs, all)
	if len(args) > 0 {
		args = args[1:]
	}
	typed, err := parseFlags(fs, args, stderr)
	if err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.Version {
		return c, nil // nothing else matters, not even invalid settings
	}
	explicit := func(env string) bool { return typed[flagName(env)] != "" || getenv(env) != "" }
	// source names a setting as the user gave it: the flag as typed, else the variable.
	source := func(env string) string {
		if f := typed[flagName(env)]; f != "" {
			return f
		}
		return env
	}
	defaults := map[string]string{}
	if c.Demo {
		// The demo hands out a ready token: keep it off the network. And there is no load
		// balancer to drain from, so Ctrl-C ends it at once.
		defaults["LISTEN_ADDR"] = "127.0.0.1:8080"
		defaults["DRAIN_DELAY"] = "0s"
		defaults["CONSOLE_ENABLED"] = "true" // a first look should let you talk to it
		defaults["OPENAI_MODELS"] = demoModel
	}
	if err := applySettings(c, all, values, typed, getenv, defaults); err != nil {
		return nil, err
	}
	if c.HealthCheck {
		// The running gateway's own record of its address beats LISTEN_ADDR, which a
		// container's health check inherits even when the gateway was started with
		// -listen-addr; only a -listen-addr given to -healthcheck itself wins.
		if c.ListenAddrFile != "" && typed[flagName("LISTEN_ADDR")] == "" {
			if b, err := os.ReadFile(c.ListenAddrFile); err == nil {
				if a := strings.TrimSpace(string(b)); a != "" {
					if _, _, err := net.SplitHostPort(a); err == nil {
						c.ListenAddr = a
					}
				}
			}
		}
		return c, nil
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return nil, errors.New("TLS_CERT_FILE and TLS_KEY_FILE: set both, or neither")
	}
	if len(c.OpenAIModels) == 0 {
		c.OpenAIModels = []string{c.ChatDefaultModel}
	}
	if len(c.AlgoURLs) == 0 && !c.Demo {
		return nil, errors.New("ALGO_URL is required (or run with -demo for a first look)")
	}
	if c.JWTSecret == nil && c.JWKSURL == nil && !c.Demo {
		return nil, errors.New("JWT_SECRET or JWT_JWKS_URL is required: every route but the health checks needs a token")
	}
	if c.DrainDelay > c.ShutdownGrace/2 {
		drain, grace := source("DRAIN_DELAY"), source("SHUTDOWN_GRACE")
		name := drain
		if !explicit("DRAIN_DELAY") {
			name = "DRAIN_DELAY (default 5s)"
		}
		return nil, fmt.Errorf("invalid %s: %v is more than half of %s (%v); streams need the rest of the grace period to finish: lower %s or raise %s",
			name, c.DrainDelay, grace, c.ShutdownGrace, drain, grace)
	}
	if c.Instance == "" {
		c.Instance, _ = os.Hostname()
	}
	c.InstanceID = instanceID(c.Instance)
	return c, nil
}

// instanceID names this process among the instances sharing Redis: its name and a random
// suffix made at start. The name alone is not enough: two instances on one host share a host
// name, and a deployment may give several the same INSTANCE_NAME; with one identity they would
// share a control channel, and a cancel for a dead instance's stream would be answered by its
// live sibling. A restarted process is a new instance too: nothing addressed to the old one
// (its streams died with it) reaches the new.
func instanceID(name string) string {
	if name == "" {
		name = "voicegate"
	}
	return name + "-" + strings.ToLower(rand.Text()[:10])
}

// bindSettings registers a string flag for each setting and returns their values by variable.
func bindSettings(fs *flag.FlagSet, list []setting) map[string]*string {
	values := make(map[string]*string, len(list))
	for _, s := range list {
		usage := fmt.Sprintf("%s (env %s", s.usage, s.env)
		if s.def != "" {
			usage += ", default " + s.def
		}
		values[s.env] = fs.String(flagName(s.env), "", usage+")")
	}
	return values
}

// parseFlags parses args with fs, and returns the flags given, each as it was typed ("-name"
// or "--name", the last one given). Usage goes to stderr only when asked for (-h). Any other
// mistake is a one-line error, naming the flag as typed and saying where the list is: printed
// above ninety lines of usage, as the flag package does, it would scroll out of sight, and
// main prints the error again.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) (typed map[string]string, err error) {
	help := fs.Name() + " -h lists the flags"
	typed = map[string]string{}
	// The walk mirrors the flag package's: flags end at the first argument that is not one, or
	// after "--"; a flag that is not boolean takes the next argument unless it has "=".
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(a) < 2 || a[0] != '-' || a == "--" {
			break
		}
		dashes := "-"
		if a[1] == '-' {
			dashes = "--"
		}
		name, _, hasValue := strings.Cut(a[len(dashes):], "=")
		if name == "" || name[0] == '-' || name[0] == '=' {
			break // bad syntax: fs.Parse says so below
		}
		f := fs.Lookup(name)
		if f == nil {
			if name == "h" || name == "help" {
				break
			}
			return nil, fmt.Errorf("unknown flag %s (%s)", dashes+name, help)
		}
		typed[name] = dashes + name
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); !hasValue && !(ok && b.IsBoolFlag()) {
			i++ // its value
		}
	}
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stderr)
			fs.Usage()
			return nil, errHelp
		}
		return nil, fmt.Errorf("%v (%s)", err, help)
	}
	return typed, nil
}

// applySettings parses each setting from its flag when given (typed: as parseFlags returns),
// else its variable, else the default (defaults overrides the table's). The first invalid value
// is an error naming where it came from: the flag as the user typed it, or the variable.
func applySettings(c *config, list []setting, values map[string]*string, typed map[string]string,
	getenv func(string) string, defaults map[string]string) error {
	for _, s := range list {
		v := getenv(s.env)
		flagged := typed[flagName(s.env)]
		if flagged != "" {
			v = *values[s.env]
		}
		if v == "" {
			v = s.def
			if d, ok := defaults[s.env]; ok {
				v = d
			}
		}
		if err := s.parse(c, v); err != nil {
			switch {
			case flagged != "" && secret(s.env):
				return fmt.Errorf("%s: invalid value: %v", flagged, err)
			case flagged != "":
				return fmt.Errorf("%s: invalid value %s: %v", flagged, shown(v), err)
			case secret(s.env):
				return fmt.Errorf("invalid %s: %v", s.env, err)
			}
			return fmt.Errorf("invalid %s %s: %v", s.env, shown(v), err)
		}
	}
	return nil
}

// settingsNamed returns the settings with the given variables, in the table's order.
func settingsNamed(names ...string) []setting {
	var out []setting
	for _, s := range settings() {
		if slices.Contains(names, s.env) {
			out = append(out, s)
		}
	}
	return out
}
