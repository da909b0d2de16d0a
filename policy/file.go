package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"
)

// File is the policy file (POLICY_FILE), JSON. See docs/auth-and-policy.md for a worked example.
type File struct {
	// Roles maps role names to their grants and parents.
	Roles map[string]Role `json:"roles"`
	// Routes binds routes of the gateway to what they need. A route it leaves out takes the
	// built-in policy's binding (see WithDefaults).
	Routes []Binding `json:"routes"`
	// Limits are the fair-use limits; absent means none.
	Limits Limits `json:"limits"`
}

// Binding is what one route needs. Route is the gateway's route pattern exactly as its route
// table registers it ("POST /api/v2/chat/stream", "/api/v2/admin/").
type Binding struct {
	Route string `json:"route"`
	// Permission is needed for every method Methods does not list; "" means any authenticated
	// caller.
	Permission string `json:"permission"`
	// Methods maps HTTP methods to the permission they need instead ("GET": "admin:read").
	Methods map[string]string `json:"methods,omitempty"`
	// OwnerOverride, on a route with {user_id} in its pattern, is the permission that lets a
	// caller act on other users; without it only the user named in the path may.
	OwnerOverride string `json:"owner_override,omitempty"`
	// Class names the route's rate-limit class ("chat", "voice", ...); empty means no class
	// limit.
	Class string `json:"class,omitempty"`
	// Lease names the concurrency cap the route holds while it runs: "chat" or "voice".
	Lease string `json:"lease,omitempty"`
}

// Limits are the fair-use limits.
type Limits struct {
	// PerUser, PerTenant: request rates for every authenticated request of a user or tenant.
	PerUser   *Rate `json:"per_user,omitempty"`
	PerTenant *Rate `json:"per_tenant,omitempty"`
	// Classes: request rates per user for the routes of a class.
	Classes map[string]Rate `json:"classes,omitempty"`
	// DailyRequestsPerUser caps a user's requests per UTC day; 0 means no quota.
	DailyRequestsPerUser int64 `json:"daily_requests_per_user,omitempty"`
	// Concurrency caps open streams and sessions, by lease name ("chat", "voice").
	Concurrency map[string]Concurrency `json:"concurrency,omitempty"`
	// VoiceAudioSecondsPerDay caps voice audio per user and tenant per UTC day; absent means
	// none. VoiceMaxSession caps one voice session's length; absent means none. Tenants names
	// tenants, with limits of their own. See voicequota.go.
	VoiceAudioSecondsPerDay *AudioQuota             `json:"voice_audio_seconds_per_day,omitempty"`
	VoiceMaxSession         Duration                `json:"voice_max_session,omitempty"`
	Tenants                 map[string]TenantLimits `json:"tenants,omitempty"`
}

// Rate is a GCRA rate: Requests per Per, with bursts of up to Burst requests.
type Rate struct {
	Requests int      `json:"requests"`
	Per      Duration `json:"per"`
	Burst    int      `json:"burst"`
}

// Concurrency caps how many leases a user and a tenant may hold at once.
type Concurrency struct {
	PerUser   int `json:"per_user"`
	PerTenant int `json:"per_tenant"`
}

// Duration is a time.Duration written as "1m", "30s" in JSON.
type Duration time.Duration

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New(`durations are strings such as "1m"`)
	}
	v, err := time.ParseDuration(s)
	if err != nil || v <= 0 {
		return fmt.Errorf("%q is not a positive duration", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// Parse reads a policy file strictly: unknown fields and trailing data are errors.
func Parse(data []byte) (*File, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f File
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("policy: trailing data after the JSON object")
	}
	return &f, nil
}

var knownMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"}

// Policy is a compiled policy file: the roles, the route bindings and the limits.
type Policy struct {
	Rules    *Rules
	Limits   Limits
	bindings map[string]*binding // by route pattern
	routes   []string            // the patterns compiled for, in the route table's order
	unbound  []string            // the routes the file left out, bound as the built-in policy binds them
}

type binding struct {
	src           Binding // as written (or, for a route the file left out, as the built-in policy has it)
	perm          string
	methods       map[string]string
	ownerOverride string
	class         string
	lease         string
	tenantParam   bool // the pattern has {tenant_id}
	userParam     bool // the pattern has {user_id}
}

// permFor returns the permission method needs on this route.
func (b *binding) permFor(method string) string {
	if p, ok := b.methods[method]; ok {
		return p
	}
	if method == http.MethodHead {
		if p, ok := b.methods[http.MethodGet]; ok {
			return p
		}
	}
	if p, ok := b.methods["*"]; ok {
		return p
	}
	return b.perm
}

// Compile checks a policy file against the gateway's routes and compiles it. Every route must
// be bound (a Store first binds the routes a file leaves out: WithDefaults), every binding must
// name a route, every role and permission must be well-formed, and limits must be sane.
// extraPerms are permissions handlers check themselves.
func Compile(f *File, routes []string, extraPerms []string) (*Policy, error) {
	p := &Policy{Limits: f.Limits, bindings: map[string]*binding{}, routes: slices.Clone(routes)}
	var perms []string
	add := func(s string) error {
		if s == "" {
			return nil
		}
		if _, err := parsePerm(s); err != nil {
			return err
		}
		if !slices.Contains(perms, s) {
			perms = append(perms, s)
		}
		return nil
	}
	for _, b := range f.Routes {
		if !slices.Contains(routes, b.Route) {
			return nil, fmt.Errorf("policy: binding for %q, which is not a route of the gateway", b.Route)
		}
		if _, dup := p.bindings[b.Route]; dup {
			return nil, fmt.Errorf("policy: route %q is bound twice", b.Route)
		}
		cb := &binding{src: b, perm: b.Permission, methods: b.Methods, ownerOverride: b.OwnerOverride, class: b.Class,
			lease: b.Lease, tenantParam: strings.Contains(b.Route, "{tenant_id"), userParam: strings.Contains(b.Route, "{user_id")}
		for _, s := range append([]string{b.Permission, b.OwnerOverride}, slices.Collect(maps.Values(b.Methods))...) {
			if err := add(s); err != nil {
				return nil, fmt.Errorf("policy: route %q: %w", b.Route, err)
			}
		}
		for m := range b.Methods {
			if !slices.Contains(knownMethods, m) {
				return nil, fmt.Errorf("policy: route %q: unknown method %q", b.Route, m)
			}
		}
		if b.Class != "" && (!validPart(b.Class) || b.Class == "*") {
			return nil, fmt.Errorf("policy: route %q: class %q is not a lower-case name", b.Route, b.Class)
		}
		if b.Lease != "" {
			if _, ok := f.Limits.Concurrency[b.Lease]; !ok {
				return nil, fmt.Errorf("policy: route %q: lease %q has no concurrency limit", b.Route, b.Lease)
			}
		}
		p.bindings[b.Route] = cb
	}
	var missing []string
	for _, r := range routes {
		if _, ok := p.bindings[r]; !ok {
			missing = append(missing, r)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return nil, fmt.Errorf("policy: no binding for route(s) %s", strings.Join(missing, ", "))
	}
	for _, e := range extraPerms {
		if err := add(e); err != nil {
			return nil, fmt.Errorf("policy: %w", err)
		}
	}
	if err := f.Limits.check(); err != nil {
		return nil, err
	}
	rules, err := CompileRoles(f.Roles, perms)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if len(f.Roles) == 0 {
		return nil, errors.New("policy: no roles")
	}
	p.Rules = rules
	return p, nil
}

func (l Limits) check() error {
	rates := map[string]*Rate{"per_user": l.PerUser, "per_tenant": l.PerTenant}
	for name, r := range l.Classes {
		if !validPart(name) || name == "*" {
			return fmt.Errorf("policy: limits: class %q is not a lower-case name", name)
		}
		r := r
		rates["classes."+name] = &r
	}
	for name, r := range rates {
		if r == nil {
			continue
		}
		if r.Requests < 1 || r.Per <= 0 || r.Burst < 0 {
			return fmt.Errorf("policy: limits.%s: want requests ≥ 1, a positive per and burst ≥ 0", name)
		}
		if time.Duration(r.Per)/time.Duration(r.Requests) < time.Microsecond {
			return fmt.Errorf("policy: limits.%s: more than a million requests a second is finer than the limiter's microsecond resolution", name)
		}
	}
	if l.DailyRequestsPerUser < 0 {
		return errors.New("policy: limits: daily_requests_per_user cannot be negative")
	}
	for name, c := range l.Concurrency {
		if name != "chat" && name != "voice" {
			return fmt.Errorf("policy: limits.concurrency: unknown lease %q (want chat or voice)", name)
		}
		if c.PerUser < 0 || c.PerTenant < 0 {
			return fmt.Errorf("policy: limits.concurrency.%s: caps cannot be negative", name)
		}
	}
	return l.checkVoice()
}

// WithDefaults returns a copy of f in which every route of routes that f does not bind is bound
// as routes binds it, and the patterns of those routes, in routes' order. routes are the
// gateway's routes, each with the binding the built-in policy gives it.
//
// A policy file names the routes of the release it was written for; each release may add
// routes. Binding a new route as the built-in policy does keeps a working file working across an
// upgrade, with the permission the gateway's authors chose for that route, rather than stopping
// the gateway at start; the caller names those routes (Store logs them, "voicegate policy check"
// lists them). A binding for a route that is not among routes stays an error (Compile): it is a
// typo or a route that is gone, which a default cannot stand in for.
//
// A built-in binding keeps its lease only if f caps that lease (limits.concurrency): a lease
// without a cap limits nothing, and Compile refuses one in a file as a mistake.
func (f *File) WithDefaults(routes []Binding) (*File, []string) {
	bound := make(map[string]bool, len(f.Routes))
	for _, b := range f.Routes {
		bound[b.Route] = true
	}
	out := *f
	out.Routes = slices.Clone(f.Routes)
	var added []string
	for _, b := range routes {
		if bound[b.Route] {
			continue
		}
		if _, capped := f.Limits.Concurrency[b.Lease]; !capped {
			b.Lease = ""
		}
		b.Methods = maps.Clone(b.Methods)
		out.Routes = append(out.Routes, b)
		added = append(added, b.Route)
		bound[b.Route] = true
	}
	return &out, added
}

// Bindings returns the binding in force for every route the policy was compiled for, in the
// order of those routes.
func (p *Policy) Bindings() []Binding {
	out := make([]Binding, 0, len(p.routes))
	for _, r := range p.routes {
		b := p.bindings[r].src
		b.Methods = maps.Clone(b.Methods)
		out = append(out, b)
	}
	return out
}

// Unbound returns the routes the policy file left out, which take the built-in policy's binding
// (see WithDefaults); none for the built-in policy itself.
func (p *Policy) Unbound() []string { return slices.Clone(p.unbound) }

// Default is the built-in policy (used without POLICY_FILE): DefaultRoles, the limits below,
// and routes as the bindings. Its routes come from the gateway's route table, where each route
// says what it asks of its caller; this package keeps no second list of them.
func Default(routes []Binding) *File {
	return &File{
		Roles:  DefaultRoles(),
		Routes: slices.Clone(routes),
		Limits: Limits{
			PerUser:              &Rate{Requests: 600, Per: Duration(time.Minute), Burst: 60},
			PerTenant:            &Rate{Requests: 6000, Per: Duration(time.Minute), Burst: 600},
			Classes:              map[string]Rate{"chat": {Requests: 30, Per: Duration(time.Minute), Burst: 10}, "voice": {Requests: 10, Per: Duration(time.Minute), Burst: 5}},
			DailyRequestsPerUser: 20000,
			Concurrency:          map[string]Concurrency{"chat": {PerUser: 4, PerTenant: 200}, "voice": {PerUser: 2, PerTenant: 100}},
		},
	}
}
