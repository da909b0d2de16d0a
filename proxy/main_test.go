package proxy_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every stream, proxy and
// middleware goroutine must end with its request.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
