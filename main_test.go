package main

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the tests if any goroutine outlives them: a gateway started by run must leave
// nothing behind when its context ends.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
