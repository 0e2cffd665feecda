// Package anonymize masks the remote addresses of captured headers before
// they reach disk.
//
// Netblock mode keeps the network and hides the host: IPv4 addresses are
// masked to their /24, IPv6 addresses to their /48, and IPv4-mapped IPv6
// addresses as IPv4. The server's own addresses are left as they are. So
// are the addresses that IPv6 extension headers carry: a Routing header's
// (types 0, 2 and 4; other types' data is zeroed) and the Home Address
// option's. The IPv4 header checksum and the TCP checksum cover addresses
// (the TCP pseudo-header's being the home address and the final
// destination where those headers are present), so an unadjusted checksum
// would reveal the masked bits; both are updated incrementally (RFC 1624,
// eqn. 3), which keeps a right checksum right and turns any checksum into
// the one the masked header would have had.
//
// CryptoPAn mode maps remote addresses with the keyed prefix-preserving
// Crypto-PAn (see CryptoPAn): two clients of one network stay distinct and
// keep their common prefix, and the same key gives the same mapping on
// every server and across restarts. The mapping costs some dozens of AES
// blocks, so the demuxer computes it once per flow (Map) and rewrites each
// packet with it (ApplyMapped, as cheap as netblock's Apply); addresses in
// IPv6 extension headers are mapped per packet. Checksums are updated as
// in netblock mode.
//
// An Anonymizer is immutable after New and safe for concurrent use. Apply
// and ApplyMapped work in place, cost a few dozen instructions and never
// allocate.
package anonymize

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/m-lab/packet-headers/packet"
)

// Mode is an anonymization method.
type Mode int

// The supported modes.
const (
	None     Mode = iota // addresses are written as captured
	Netblock             // remote addresses are masked to /24 (IPv4) or /48 (IPv6)
	Keyed                // remote addresses are mapped by Crypto-PAn ("cryptopan")
)

// Modes lists the mode names accepted by ParseMode, in order.
var Modes = []string{"none", "netblock", "cryptopan"}

// ParseMode parses a mode name.
func ParseMode(s string) (Mode, error) {
	for i, name := range Modes {
		if s == name {
			return Mode(i), nil
		}
	}
	return None, fmt.Errorf("unknown anonymization mode %q (want one of %v)", s, Modes)
}

// String returns the mode's name.
func (m Mode) String() string {
	if m >= 0 && int(m) < len(Modes) {
		return Modes[m]
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Anonymizer masks addresses according to a mode. The zero value masks
// nothing.
type Anonymizer struct {
	mode    Mode
	local   [][16]byte
	cp      *CryptoPAn // in Keyed mode
	zeroMAC bool       // see Config
	ts      *tsKey     // with Config.TSOffset
}

// New returns an anonymizer for the mode (None or Netblock) that never
// masks the given local addresses.
func New(mode Mode, local []netip.Addr) *Anonymizer {
	a := &Anonymizer{mode: mode}
	for _, l := range local {
		a.local = append(a.local, l.Unmap().As16())
	}
	return a
}

// NewKeyed returns a Crypto-PAn anonymizer with key (KeySize bytes) that
// never maps the given local addresses.
func NewKeyed(key []byte, local []netip.Addr) (*Anonymizer, error) {
	cp, err := NewCryptoPAn(key)
	if err != nil {
		return nil, err
	}
	a := New(Keyed, local)
	a.cp = cp
	return a, nil
}

// Map returns what the address (IPv4 as IPv4-mapped IPv6) becomes when it
// is masked: its netblock, or its Crypto-PAn mapping.
func (a *Anonymizer) Map(addr [16]byte) [16]byte {
	if a.cp != nil {
		return a.cp.map16(addr)
	}
	return MaskAddr(netip.AddrFrom16(addr)).As16()
}

// Anonymized returns the address as saved: masked or mapped when
// ShouldMask says so, else as it is.
func (a *Anonymizer) Anonymized(addr netip.Addr) netip.Addr {
	b := addr.Unmap().As16()
	if !a.ShouldMask(&b) {
		return addr
	}
	if a.cp != nil {
		return a.cp.Map(addr)
	}
	return MaskAddr(addr)
}

// Mode returns the anonymizer's mode.
func (a *Anonymizer) Mode() Mode { return a.mode }

// ShouldMask reports whether an address (IPv4 as IPv4-mapped IPv6) is
// masked: in netblock and cryptopan modes, every address that is not local.
func (a *Anonymizer) ShouldMask(addr *[16]byte) bool {
	if a == nil || a.mode == None {
		return false
	}
	for i := range a.local {
		if a.local[i] == *addr {
			return false
		}
	}
	return true
}

// Apply masks, in the header bytes b decoded as p, the source address when
// maskSrc is set and the destination address when maskDst is set, and
// updates the checksums that cover them. Fields that lie past the end of b
// (a truncated capture) are left alone.
func (a *Anonymizer) Apply(b []byte, p *packet.Parsed, maskSrc, maskDst bool) {
	if a == nil || a.mode != Netblock {
		return // (Keyed mode rewrites with ApplyMapped)
	}
	if p.IPv4 {
		var delta uint32
		if maskSrc {
			delta += mask(b, p.SrcOffset, true)
		}
		if maskDst {
			delta += mask(b, p.DstOffset, true)
		}
		updateChecksum(b, p.IPOffset+10, delta)
		updateChecksum(b, p.TCPOffset+16, delta)
		return
	}
	srcPseudo, dstPseudo := pseudoOffsets(p)
	var delta uint32
	maskAt := func(off int) {
		if d := mask(b, off, false); off == srcPseudo || off == dstPseudo {
			delta += d
		}
	}
	if maskSrc {
		maskAt(p.SrcOffset)
	}
	if maskDst {
		maskAt(p.DstOffset)
	}
	if p.HomeOffset != 0 && (maskSrc || a.shouldMaskAt(b, p.HomeOffset)) {
		maskAt(p.HomeOffset)
	}
	for i := 0; i < p.RouteAddrs; i++ {
		if off := p.RouteOffset + 16*i; a.shouldMaskAt(b, off) {
			maskAt(off)
		}
	}
	if p.RouteOpaque != 0 && p.RouteOpaqueEnd <= len(b) {
		clear(b[p.RouteOpaque:p.RouteOpaqueEnd]) // addresses in a form not located
	}
	updateChecksum(b, p.TCPOffset+16, delta)
}

// ApplyMapped writes, in the header bytes b decoded as p, the flow's
// mapped source address when src is not nil and its mapped destination
// when dst is not nil (both as Map returns them), maps the addresses of
// IPv6 extension headers, and updates the checksums that cover them, as
// Apply does. BenchmarkApply measures both.
func (a *Anonymizer) ApplyMapped(b []byte, p *packet.Parsed, src, dst *[16]byte) {
	if a == nil || a.cp == nil {
		return
	}
	if p.IPv4 {
		var delta uint32
		if src != nil {
			delta += rewrite(b, p.SrcOffset, 4, src[12:])
		}
		if dst != nil {
			delta += rewrite(b, p.DstOffset, 4, dst[12:])
		}
		updateChecksum(b, p.IPOffset+10, delta)
		updateChecksum(b, p.TCPOffset+16, delta)
		return
	}
	srcPseudo, dstPseudo := pseudoOffsets(p)
	var delta uint32
	write := func(off int, to []byte) {
		if d := rewrite(b, off, 16, to); off == srcPseudo || off == dstPseudo {
			delta += d
		}
	}
	mapAt := func(off int) {
		if a.shouldMaskAt(b, off) {
			m := a.cp.map16([16]byte(b[off : off+16]))
			write(off, m[:])
		}
	}
	if src != nil {
		write(p.SrcOffset, src[:])
	}
	if dst != nil {
		write(p.DstOffset, dst[:])
	}
	if p.HomeOffset != 0 {
		mapAt(p.HomeOffset)
	}
	for i := 0; i < p.RouteAddrs; i++ {
		mapAt(p.RouteOffset + 16*i)
	}
	if p.RouteOpaque != 0 && p.RouteOpaqueEnd <= len(b) {
		clear(b[p.RouteOpaque:p.RouteOpaqueEnd]) // addresses in a form not located
	}
	updateChecksum(b, p.TCPOffset+16, delta)
}

// rewrite writes the n bytes of to over the address at off, and returns
// the RFC 1624 delta of its 16-bit words; an address past the end of b (a
// truncated capture) is left alone.
func rewrite(b []byte, off, n int, to []byte) uint32 {
	if off+n > len(b) {
		return 0
	}
	var delta uint32
	for i := 0; i < n; i += 2 {
		old, nw := binary.BigEndian.Uint16(b[off+i:]), binary.BigEndian.Uint16(to[i:])
		delta += uint32(^old) + uint32(nw)
	}
	copy(b[off:off+n], to[:n])
	return delta
}

// pseudoOffsets returns where the TCP pseudo-header's addresses of an IPv6
// packet are: its source is the Home Address option's address when there
// is one, its destination the Routing header's final one while segments
// are left; only their deltas go into the checksum (TestExtensionHeaders).
func pseudoOffsets(p *packet.Parsed) (src, dst int) {
	src, dst = p.SrcOffset, p.DstOffset
	if p.HomeOffset != 0 {
		src = p.HomeOffset
	}
	if p.RouteFinal != 0 {
		dst = p.RouteFinal
	}
	return src, dst
}

// shouldMaskAt reports whether the 16-byte address at off in b is masked.
func (a *Anonymizer) shouldMaskAt(b []byte, off int) bool {
	if off+16 > len(b) {
		return false
	}
	return a.ShouldMask((*[16]byte)(b[off : off+16]))
}

// MaskAddr returns the masked form of an address, as Apply writes it.
func MaskAddr(addr netip.Addr) netip.Addr {
	if addr.Is4() || addr.Is4In6() {
		b := addr.Unmap().As4()
		b[3] = 0
		return netip.AddrFrom4(b)
	}
	b := addr.As16()
	clear(b[6:])
	return netip.AddrFrom16(b)
}

// mask masks the address at off in place and returns the one's complement
// sum of (~old + new) over its 16-bit words, the delta of RFC 1624.
func mask(b []byte, off int, v4 bool) uint32 {
	var from, n int
	switch {
	case v4:
		from, n = off+2, 2 // the last two bytes of an IPv4 address hold the masked byte
	case isMapped(b, off):
		from, n = off+14, 2
	default:
		from, n = off+6, 10
	}
	if from+n > len(b) {
		return 0
	}
	var delta uint32
	for i := from; i < from+n; i += 2 {
		old := binary.BigEndian.Uint16(b[i:])
		var nw uint16
		if v4 || n == 2 {
			nw = old & 0xff00 // keep the third byte of the IPv4 address
		}
		binary.BigEndian.PutUint16(b[i:], nw)
		delta += uint32(^old) + uint32(nw)
	}
	return delta
}

func isMapped(b []byte, off int) bool {
	if off+16 > len(b) {
		return false
	}
	for _, c := range b[off : off+10] {
		if c != 0 {
			return false
		}
	}
	return b[off+10] == 0xff && b[off+11] == 0xff
}

// updateChecksum applies RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), to the
// checksum at off.
func updateChecksum(b []byte, off int, delta uint32) {
	if off+2 > len(b) || delta == 0 {
		return
	}
	sum := uint32(^binary.BigEndian.Uint16(b[off:])) + delta
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(b[off:], ^uint16(sum))
}
