package voice

import (
	"net"
	"syscall"
)

// tcpNotSentLowat is TCP_NOTSENT_LOWAT of linux/tcp.h, which package syscall does not name.
const tcpNotSentLowat = 0x19

// limitUnsent makes a write to c wait once unsentLimit bytes are queued in the kernel and not
// yet sent (see unsentLimit). Sockets that are not TCP (tests' in-memory ones) are left alone.
func limitUnsent(c net.Conn) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, unsentLimit)
	})
}
