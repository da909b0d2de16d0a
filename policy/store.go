package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// StoreOptions configures a Store.
type StoreOptions struct {
	// Path is the policy file; empty means the built-in Default(Routes), never reloaded.
	Path string
	// Routes are the gateway's routes, each with the binding the built-in policy gives it. A
	// policy file may bind no other route; a route it does not bind takes this binding
	// (File.WithDefaults).
	Routes []Binding
	// ExtraPerms are permissions handlers check themselves.
	ExtraPerms []string
	// Log receives one line per reload, and a warning naming the routes the file does not bind
	// each time it is loaded; nil means none.
	Log *slog.Logger
}

// Store holds the policy in force. Reload swaps in a new one atomically; a bad file is refused
// and the running policy stays.
type Store struct {
	o       StoreOptions
	routes  []string // the patterns of o.Routes
	current atomic.Pointer[Policy]
	mu      sync.Mutex // serialises reloads
	sum     [sha256.Size]byte
}

// NewStore loads the policy; a bad file is an error here, at start.
func NewStore(o StoreOptions) (*Store, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Store{o: o, routes: make([]string, 0, len(o.Routes))}
	for _, b := range o.Routes {
		s.routes = append(s.routes, b.Route)
	}
	if o.Path == "" {
		p, err := s.compile(Default(o.Routes))
		if err != nil {
			return nil, err
		}
		s.current.Store(p)
		return s, nil
	}
	p, err := s.load()
	if err != nil {
		return nil, err
	}
	s.warnUnbound(p)
	return s, nil
}

// Policy returns the policy in force.
func (s *Store) Policy() *Policy { return s.current.Load() }

// Reload reads the file again. A file that fails to parse or compile is refused with one log
// line, and the running policy stays.
func (s *Store) Reload() error {
	if s.o.Path == "" {
		return nil
	}
	p, err := s.load()
	if err != nil {
		s.o.Log.Error("policy reload refused; keeping the running policy", "file", s.o.Path, "err", err.Error())
		return err
	}
	if p != nil {
		s.o.Log.Info("policy reloaded", "file", s.o.Path)
		s.warnUnbound(p)
	}
	return nil
}

// warnUnbound says, in one line, which routes the policy in force takes from the built-in
// policy because its file does not bind them: a file written for an earlier release, whose
// owner should review what the new routes are bound to.
func (s *Store) warnUnbound(p *Policy) {
	if unbound := p.Unbound(); len(unbound) > 0 {
		s.o.Log.Warn("the policy file does not bind every route; these routes take the built-in policy's binding (voicegate policy check FILE lists them)",
			"file", s.o.Path, "routes", strings.Join(unbound, ", "))
	}
}

// compile compiles f for the gateway's routes; a route f does not bind takes its built-in
// binding, and the policy names it (Policy.Unbound).
func (s *Store) compile(f *File) (*Policy, error) {
	f, unbound := f.WithDefaults(s.o.Routes)
	p, err := Compile(f, s.routes, s.o.ExtraPerms)
	if err != nil {
		return nil, err
	}
	p.unbound = unbound
	return p, nil
}

// load reads and compiles the file and puts it in force. It returns the new policy, or nil
// when the file has not changed since it was last put in force.
func (s *Store) load() (*Policy, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	data, err := readFile(s.o.Path)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(data)
	if s.current.Load() != nil && bytes.Equal(sum[:], s.sum[:]) {
		return nil, nil
	}
	f, err := Parse(data)
	if err != nil {
		return nil, err
	}
	p, err := s.compile(f)
	if err != nil {
		return nil, err
	}
	s.current.Store(p)
	s.sum = sum
	return p, nil
}

// Watch reloads the file whenever its content changes, checking every interval, until ctx ends.
// Polling keeps to the standard library and works on every file system, mounted ConfigMaps
// included.
func (s *Store) Watch(ctx context.Context, interval time.Duration) {
	if s.o.Path == "" {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastMod time.Time
	var lastSize int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := os.Stat(s.o.Path)
		if err != nil {
			continue // a file being replaced may be missing for a moment
		}
		if st.ModTime().Equal(lastMod) && st.Size() == lastSize {
			continue
		}
		lastMod, lastSize = st.ModTime(), st.Size()
		_ = s.Reload()
	}
}

// MaxFileBytes bounds a policy file. Real ones are a few KiB; the bound keeps a mistaken path
// (/dev/zero, a log file) from eating memory.
const MaxFileBytes = 1 << 20

// readFile reads a policy file: a regular file of at most MaxFileBytes. Anything else is
// refused rather than read: a device never ends, and a FIFO that nobody writes to would block
// start-up forever (so it is opened non-blocking, and checked before any read).
func readFile(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("policy: %s is not a regular file (%v)", path, st.Mode().Type())
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if len(data) > MaxFileBytes {
		return nil, fmt.Errorf("policy: %s is larger than %d bytes", path, MaxFileBytes)
	}
	return data, nil
}
