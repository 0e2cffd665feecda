package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// AppendListenDump appends to b a netlink request that dumps the listening
// TCP sockets of family (unix.AF_INET or unix.AF_INET6).
func AppendListenDump(b []byte, seq uint32, family uint8) []byte {
	start := len(b)
	b = append(b, make([]byte, nlmsgHdrLen+reqV2Len)...)
	m := b[start:]
	binary.NativeEndian.PutUint32(m[0:], nlmsgHdrLen+reqV2Len)
	binary.NativeEndian.PutUint16(m[4:], sockDiagByFamily)
	binary.NativeEndian.PutUint16(m[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(m[8:], seq)
	r := m[nlmsgHdrLen:]
	r[0], r[1] = family, unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], 1<<StateListen)
	binary.NativeEndian.PutUint32(r[8+40:], noCookie)
	binary.NativeEndian.PutUint32(r[8+44:], noCookie)
	return b
}

// dumpDone reports whether a datagram of a dump's replies holds its end
// (NLMSG_DONE, or an error).
func dumpDone(b []byte) bool {
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if typ := binary.NativeEndian.Uint16(b[4:]); typ == unix.NLMSG_DONE || typ == unix.NLMSG_ERROR {
			return true
		}
		if l < nlmsgHdrLen {
			return true // malformed: ParseMessages says so
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	return false
}

// Listeners returns the listening TCP sockets of this network namespace,
// IPv4 and IPv6, by local address (unspecified for a wildcard, IPv4-mapped
// ones unmapped) and port, each with the cgroup v2 ids of the sockets bound
// there (0 if the kernel does not say), dumped through c (a socket of Dial,
// which it uses alone meanwhile), waiting at most timeout for the kernel's
// answers. A connection to one of them is one this host accepted (package
// selection), when the capture missed its SYN; the cgroup tells which
// service accepted it. Keyed by address too, since a port may have several
// listeners of different owners (a user's on [::1] beside a service's on
// 0.0.0.0).
func Listeners(c Conn, timeout time.Duration) (map[netip.AddrPort][]uint64, error) {
	ls := map[netip.AddrPort][]uint64{}
	buf := make([]byte, 64<<10)
	if d, ok := c.(interface{ SetReadDeadline(time.Time) error }); ok {
		d.SetReadDeadline(time.Now().Add(timeout))
		defer d.SetReadDeadline(time.Time{})
	}
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		seq := uint32(1<<31 | i)
		if err := c.Send(AppendListenDump(nil, seq, family)); err != nil {
			return nil, fmt.Errorf("sock_diag listener dump: %w", err)
		}
		for done := false; !done; {
			n, err := c.Receive(buf)
			if err != nil {
				return nil, fmt.Errorf("sock_diag listener dump: %w", err)
			}
			done = dumpDone(buf[:n])
			msgs, err := ParseMessages(buf[:n])
			if err != nil {
				return nil, err
			}
			for _, m := range msgs {
				switch {
				case m.Seq != seq:
				case m.Err != nil && !errors.Is(m.Err, ErrNotFound):
					return nil, m.Err
				case m.Err == nil && m.Socket.State == StateListen:
					at := netip.AddrPortFrom(m.Socket.Local.Addr().Unmap(), m.Socket.Local.Port())
					if !slices.Contains(ls[at], m.Socket.Cgroup) {
						ls[at] = append(ls[at], m.Socket.Cgroup)
					}
				}
			}
		}
	}
	return ls, nil
}
