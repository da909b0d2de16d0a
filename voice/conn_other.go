//go:build !linux

package voice

import "net"

// limitUnsent does nothing here: only Linux bounds the unsent bytes of a socket (see
// unsentLimit), so elsewhere what a peer that stops reading has queued before a write waits is
// as much as the kernel's send buffer takes.
func limitUnsent(net.Conn) {}
