package auth

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"voicegate/proxy"
)

// JWKSOptions configures a JWKS key source.
type JWKSOptions struct {
	// URL is where the key set is fetched (GET, application/json).
	URL string
	// Client fetches it; nil means a client with a 5 s timeout.
	Client *http.Client
	// Refresh is the scheduled refresh interval; zero means 15 minutes.
	Refresh time.Duration
	// MinRefetch is the least time between two fetches caused by unknown key IDs, so a spray of
	// random kids cannot hammer the identity provider; zero means 30 s.
	MinRefetch time.Duration
	// Log reports fetch failures.
	Log *slog.Logger
}

// JWKS is a cached, refreshed JSON Web Key Set. Only public keys are kept.
type JWKS struct {
	o     JWKSOptions
	keys  atomic.Pointer[map[string]jwk.Key]
	fetch sync.Mutex // one fetch at a time
	last  time.Time  // last fetch attempt caused by an unknown kid; guarded by fetch
	stop  context.CancelFunc
	done  chan struct{}
	// gen changes whenever a fetch brings a key set that differs from the one before (a key
	// added, dropped or replaced). Tokens verified under an older generation are verified again
	// before the token cache may answer for them, so a key dropped from the set stops
	// verifying at once, cached or not.
	gen atomic.Uint64
	sum [sha256.Size]byte // fingerprint of the key set of gen; guarded by fetch
	// Fetches counts fetch attempts, for tests and metrics.
	Fetches atomic.Int64
}

// generation returns the key set's generation. Read it before looking a key up: a refresh
// stores the new keys before it moves the generation on.
func (s *JWKS) generation() uint64 { return s.gen.Load() }

// maxJWKSBytes bounds a key set document.
const maxJWKSBytes = 1 << 20

// NewJWKS fetches the key set once (a failure is logged, not fatal: tokens are then refused
// with AUTH_SERVICE_ERROR until a fetch succeeds) and refreshes it on schedule until Close.
func NewJWKS(ctx context.Context, o JWKSOptions) *JWKS {
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 5 * time.Second}
	}
	if o.Refresh <= 0 {
		o.Refresh = 15 * time.Minute
	}
	if o.MinRefetch <= 0 {
		o.MinRefetch = 30 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &JWKS{o: o, done: make(chan struct{})}
	if err := s.refresh(ctx); err != nil {
		o.Log.Warn("JWKS fetch failed; retrying on schedule", "err", proxy.Describe(err))
	}
	ctx, s.stop = context.WithCancel(context.WithoutCancel(ctx))
	go s.loop(ctx)
	return s
}

// Close stops the scheduled refresh.
func (s *JWKS) Close() {
	s.stop()
	<-s.done
}

func (s *JWKS) loop(ctx context.Context) {
	defer close(s.done)
	interval := s.o.Refresh
	for {
		// Until a first fetch succeeds, retry sooner.
		wait := interval
		if s.keys.Load() == nil {
			wait = min(interval, 5*time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := s.refresh(ctx); err != nil {
			s.o.Log.Warn("JWKS refresh failed; keeping the previous keys", "err", proxy.Describe(err))
		}
	}
}

// Key returns the public key with the given ID. An unknown ID triggers a refetch, at most once
// per MinRefetch, since the identity provider may have rotated keys.
func (s *JWKS) Key(ctx context.Context, kid string) (jwk.Key, error) {
	if k := s.lookup(kid); k != nil {
		return k, nil
	}
	s.fetch.Lock()
	defer s.fetch.Unlock()
	if k := s.lookup(kid); k != nil {
		return k, nil // another request fetched it meanwhile
	}
	if time.Since(s.last) >= s.o.MinRefetch {
		s.last = time.Now()
		if err := s.refreshLocked(ctx); err != nil {
			s.o.Log.Warn("JWKS refetch for an unknown kid failed", "err", proxy.Describe(err))
		}
		if k := s.lookup(kid); k != nil {
			return k, nil
		}
	}
	if s.keys.Load() == nil {
		return nil, &TokenError{Kind: ErrKeysUnavailable, Reason: "no key set could be fetched yet"}
	}
	return nil, invalid("unknown kid")
}

func (s *JWKS) lookup(kid string) jwk.Key {
	if m := s.keys.Load(); m != nil {
		return (*m)[kid]
	}
	return nil
}

func (s *JWKS) refresh(ctx context.Context) error {
	s.fetch.Lock()
	defer s.fetch.Unlock()
	return s.refreshLocked(ctx)
}

func (s *JWKS) refreshLocked(ctx context.Context) error {
	s.Fetches.Add(1)
	ctx, cancel := context.WithTimeout(ctx, s.o.Client.Timeout+time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.o.URL, nil)
	if err != nil {
		return fmt.Errorf("auth: JWKS request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	res, err := s.o.Client.Do(req)
	if err != nil {
		return fmt.Errorf("auth: fetch JWKS: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("auth: fetch JWKS: status %d", res.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(res.Body, maxJWKSBytes+1))
	if err != nil {
		return fmt.Errorf("auth: read JWKS: %w", err)
	}
	if len(body) > maxJWKSBytes {
		return errors.New("auth: JWKS larger than 1 MiB")
	}
	set, err := jwk.Parse(body)
	if err != nil {
		return fmt.Errorf("auth: parse JWKS: %w", err)
	}
	keys := make(map[string]jwk.Key, set.Len())
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		if k.KeyID() == "" || (k.KeyUsage() != "" && k.KeyUsage() != string(jwk.ForSignature)) {
			continue
		}
		pub, err := k.PublicKey() // never verify with (or keep) private material
		if err != nil {
			continue
		}
		keys[k.KeyID()] = pub
	}
	sum, ok := fingerprint(keys)
	s.keys.Store(&keys)
	if !ok || sum != s.sum || s.gen.Load() == 0 {
		s.sum = sum
		s.gen.Add(1) // after the store: see generation
	}
	return nil
}

// fingerprint identifies a key set by its key IDs, each key's algorithm and its RFC 7638
// thumbprint, so that a refetch of the same set does not count as a change. ok is false when a
// key cannot be thumbprinted; the set then counts as changed.
func fingerprint(keys map[string]jwk.Key) (sum [sha256.Size]byte, ok bool) {
	h := sha256.New()
	for _, kid := range slices.Sorted(maps.Keys(keys)) {
		k := keys[kid]
		tp, err := k.Thumbprint(crypto.SHA256)
		if err != nil {
			return sum, false
		}
		alg := ""
		if a := k.Algorithm(); a != nil {
			alg = a.String()
		}
		fmt.Fprintf(h, "%d:%s|%s|%x\n", len(kid), kid, alg, tp)
	}
	h.Sum(sum[:0])
	return sum, true
}
