package packet

import (
	"encoding/binary"
	"net/netip"
)

// Key identifies a TCP connection independently of the direction of the
// packet it was made from: the endpoint that sorts lower is always A. It is a
// comparable value, cheap to hash, and is built without allocating.
type Key struct {
	A, B         [16]byte // addresses, IPv4 as IPv4-mapped IPv6
	APort, BPort uint16
}

// Key returns the flow key of a decoded packet and whether the packet's
// source is the key's A endpoint.
func (p *Parsed) Key() (k Key, srcIsA bool) {
	return MakeKey(&p.Src, p.SrcPort, &p.Dst, p.DstPort)
}

// MakeKey builds the key of the connection between two endpoints and says
// whether the first endpoint is the key's A.
func MakeKey(a *[16]byte, aPort uint16, b *[16]byte, bPort uint16) (k Key, firstIsA bool) {
	if less(a, aPort, b, bPort) {
		return Key{A: *a, B: *b, APort: aPort, BPort: bPort}, true
	}
	return Key{A: *b, B: *a, APort: bPort, BPort: aPort}, false
}

// KeyFromAddrPorts builds the key of the connection between two endpoints
// given as netip values; IPv4-mapped IPv6 addresses name the same key as
// their IPv4 form.
func KeyFromAddrPorts(a, b netip.AddrPort) Key {
	a16 := a.Addr().Unmap().As16()
	b16 := b.Addr().Unmap().As16()
	k, _ := MakeKey(&a16, a.Port(), &b16, b.Port())
	return k
}

// less orders endpoints by address bytes, then port: the addresses are
// compared as two big-endian words each.
func less(a *[16]byte, aPort uint16, b *[16]byte, bPort uint16) bool {
	if x, y := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(b[:8]); x != y {
		return x < y
	}
	if x, y := binary.BigEndian.Uint64(a[8:]), binary.BigEndian.Uint64(b[8:]); x != y {
		return x < y
	}
	return aPort < bPort
}
