package policy

import "strings"

// Keys names every Redis key and pub/sub channel voicegate uses: it is the one place a name is
// made from its parts, so that two different tuples of parts never name one key. Every part is
// escaped (Part), so that an ID holding ":" (a user "a:b", a request "x:y") cannot make its
// name collide with another's, and a tenant becomes the key's Redis Cluster hash tag (Tag), so
// that every key one script touches for a tenant hashes to one slot.
//
// A name is the prefix (REDIS_PREFIX, as given, which has no braces), the kind, then the parts,
// joined by ":". Kinds are the constants below, never input; each takes a fixed number of parts,
// so a name decodes to one kind and one tuple. The zero Keys has no prefix.
type Keys struct{ prefix string }

// NewKeys returns the names of a deployment whose keys all begin with prefix.
func NewKeys(prefix string) Keys { return Keys{prefix: prefix} }

// The kinds of name, with the parts each takes after it. A kind under a tenant (Keys.Tenant)
// carries the tenant's tag first; a kind holding a literal tag ("{control}") shares that slot.
const (
	KindRateLimit  = "rl"              // {tenant} bucket parts (Bucket.Parts)
	KindQuota      = "quota"           // {tenant} user, day (YYYYMMDD): daily request count
	KindLease      = "lease"           // {tenant} kind, "u", user | kind, "t": concurrency slots
	KindReleased   = "released"        // {tenant} member: an admission released before Redis answered it
	KindAudioQuota = "vq"              // {tenant} "u", user, day | "t", day: audio seconds
	KindStream     = "stream"          // {tenant} user, request ID: a running stream's directory entry
	KindReplay     = "replay"          // {tenant} user, request ID: a stream's replay log
	KindReplayBeat = "replayhb"        // {tenant} user, request ID: set while an instance produces it
	KindReplayWait = "replayw"         // {tenant} user, request ID: set while someone resumes it
	KindRevoked    = "revoked"         // {tenant} "jti", token ID | "user", user: tokens issued before a time
	KindUserStatus = "user:status"     // user: the user service's answer, cached
	KindSession    = "voice:session"   // session ID: a live voice session
	KindSessions   = "voice:sessions"  // no parts: the index of live sessions
	KindUsage      = "usage"           // no parts: the usage stream of finished sessions
	KindBroadcast  = "voice:broadcast" // no parts: broadcasts | reply ID: one's answers
	KindControl    = "{control}"       // no parts: revocations | instance: that instance's cancels
	// Voice resuming (voice/resume.go).
	KindVoiceResume   = "voice:resume"   // {tenant} user, token hash: a resumable session's single-use resume token
	KindVoiceLog      = "voice:log"      // {tenant} session ID: a session's downlink while its client is away
	KindVoiceHandover = "voice:handover" // instance: the channel that asks that instance to hand its sessions over
)

// Key returns the name of kind's key for parts, under no tenant.
func (k Keys) Key(kind string, parts ...string) string {
	var b strings.Builder
	b.Grow(len(k.prefix) + len(kind) + 16*len(parts))
	b.WriteString(k.prefix)
	b.WriteString(kind)
	for _, p := range parts {
		b.WriteByte(':')
		writePart(&b, p)
	}
	return b.String()
}

// Tenant returns the name of kind's key for parts under tenant: the tenant's tag comes first,
// so every key of one tenant hashes to the tenant's slot.
func (k Keys) Tenant(kind, tenant string, parts ...string) string {
	var b strings.Builder
	b.Grow(len(k.prefix) + len(kind) + len(tenant) + 4 + 16*len(parts))
	b.WriteString(k.prefix)
	b.WriteString(kind)
	b.WriteByte(':')
	b.WriteString(Tag(tenant))
	for _, p := range parts {
		b.WriteByte(':')
		writePart(&b, p)
	}
	return b.String()
}

// Tag returns the Redis Cluster hash tag, braces included, of the keys of a tenant. Redis
// hashes the bytes between a key's first "{" and the first "}" after it, so the tenant is
// escaped as a part is, and no tenant (an empty one) becomes "%", which no escaped tenant can
// be. The tag is then never empty, never cut short, and tells tenants apart.
func Tag(tenant string) string {
	if tenant == "" {
		return "{%}"
	}
	return "{" + Part(tenant) + "}"
}

// Part escapes one variable part of a name: "%", ":", "{", "}" and every byte that is not
// printable ASCII become %XX. The escaping is one to one, and an escaped part holds no
// separator and no brace.
func Part(s string) string {
	if !needsEscape(s) {
		return s
	}
	var b strings.Builder
	writePart(&b, s)
	return b.String()
}

func writePart(b *strings.Builder, s string) {
	if !needsEscape(s) {
		b.WriteString(s)
		return
	}
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if escaped(c) {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
			continue
		}
		b.WriteByte(c)
	}
}

func needsEscape(s string) bool {
	for i := 0; i < len(s); i++ {
		if escaped(s[i]) {
			return true
		}
	}
	return false
}

func escaped(c byte) bool {
	return c <= ' ' || c >= 0x7f || c == '%' || c == ':' || c == '{' || c == '}'
}

// KindOf returns the kind of a name k made (one of the Kind constants), or "" when name is not
// one of k's. It reads the prefix and the kind only: what a metric may say about a key without
// saying whose it is.
func (k Keys) KindOf(name string) string {
	rest, ok := strings.CutPrefix(name, k.prefix)
	if !ok {
		return ""
	}
	// A kind is one segment or two ("voice:session"); the longer reading wins, so a kind that
	// were a shorter kind's prefix could not be mistaken for it.
	one := strings.IndexByte(rest, ':')
	if one < 0 {
		return knownKind(rest)
	}
	two := strings.IndexByte(rest[one+1:], ':')
	if two < 0 {
		two = len(rest)
	} else {
		two += one + 1
	}
	if kind := knownKind(rest[:two]); kind != "" {
		return kind
	}
	return knownKind(rest[:one])
}

// knownKind returns s if it is a kind, else "".
func knownKind(s string) string {
	switch s {
	case KindRateLimit, KindQuota, KindLease, KindReleased, KindAudioQuota, KindStream, KindReplay, KindReplayBeat,
		KindReplayWait, KindRevoked, KindUserStatus, KindSession, KindSessions, KindUsage, KindBroadcast,
		KindControl, KindVoiceResume, KindVoiceLog, KindVoiceHandover:
		return s
	}
	return ""
}
