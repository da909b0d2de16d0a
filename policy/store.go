package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
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
	// policy file must bind every one of their routes, and no other.
	Routes []Binding
	// ExtraPerms are permissions handlers check themselves.
	ExtraPerms []string
	// Log receives one line per reload.
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
		p, err := Compile(Default(o.Routes), s.routes, o.ExtraPerms)
		if err != nil {
			return nil, err
		}
		s.current.Store(p)
		return s, nil
	}
	if _, err := s.load(); err != nil {
		return nil, err
	}
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
	changed, err := s.load()
	if err != nil {
		s.o.Log.Error("policy reload refused; keeping the running policy", "file", s.o.Path, "err", err.Error())
		return err
	}
	if changed {
		s.o.Log.Info("policy reloaded", "file", s.o.Path)
	}
	return nil
}

func (s *Store) load() (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	data, err := readFile(s.o.Path)
	if err != nil {
		return false, err
	}
	sum := sha256.Sum256(data)
	if s.current.Load() != nil && bytes.Equal(sum[:], s.sum[:]) {
		return false, nil
	}
	f, err := Parse(data)
	if err != nil {
		return false, err
	}
	p, err := Compile(f, s.routes, s.o.ExtraPerms)
	if err != nil {
		return false, err
	}
	s.current.Store(p)
	s.sum = sum
	return true, nil
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
