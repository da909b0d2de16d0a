//go:build unix

package policy_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"voicegate/policy"
)

// TestStoreRefusesUnboundedFiles: POLICY_FILE pointing at something that is not a small regular
// file is refused at once — a device that never ends, a FIFO nobody writes to, a directory, a
// file over the bound — without reading it whole or blocking. A reload of such a file keeps the
// running policy.
func TestStoreRefusesUnboundedFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "policy.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.json")
	good, err := os.ReadFile(filepath.Join(fixtures, "good", "readme.json"))
	if err != nil {
		t.Fatal(err)
	}
	// Valid JSON, padded past the bound with white space: only the size is wrong.
	if err := os.WriteFile(big, append(good, strings.Repeat(" ", policy.MaxFileBytes)...), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, path, want string }{
		{"FIFO", fifo, "not a regular file"},
		{"/dev/zero", "/dev/zero", "not a regular file"},
		{"directory", dir, "not a regular file"},
		{"over 1 MiB", big, "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				_, err := policy.NewStore(policy.StoreOptions{Path: tt.path, Routes: gatewayBindings, ExtraPerms: handlerPerms})
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("NewStore(%s) = %v, want an error saying %q", tt.path, err, tt.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("NewStore(%s) did not return within 5s", tt.path)
			}
		})
	}

	t.Run("reload keeps the running policy", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "policy.json")
		if err := os.WriteFile(path, good, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := policy.NewStore(policy.StoreOptions{Path: path, Routes: gatewayBindings, ExtraPerms: handlerPerms})
		if err != nil {
			t.Fatal(err)
		}
		running := s.Policy()
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mkfifo(path, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := s.Reload(); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("Reload of a FIFO = %v, want it refused", err)
		}
		if s.Policy() != running {
			t.Error("the running policy changed")
		}
	})
}
