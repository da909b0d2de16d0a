package policy_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: a Store's Watch must end
// with its context, and handlers held open by the concurrency tests must all return.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
