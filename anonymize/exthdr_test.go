package anonymize

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/m-lab/packet-headers/packet"
)

// ext6 builds an IPv6 TCP segment (no link header) with the extension
// header ext between the IPv6 header and TCP; its TCP checksum is right for
// the pseudo-header source psrc and destination pdst (RFC 8200 8.1).
func ext6(src, dst netip.Addr, nextHdr byte, ext []byte, psrc, pdst netip.Addr) []byte {
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 443)
	binary.BigEndian.PutUint16(tcp[2:], 5555)
	binary.BigEndian.PutUint32(tcp[4:], 1000)
	tcp[12], tcp[13] = 5<<4, 0x10
	binary.BigEndian.PutUint16(tcp[14:], 512)
	binary.BigEndian.PutUint16(tcp[16:], tcpChecksum(psrc, pdst, tcp))
	ip := make([]byte, 40)
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(tcp)))
	ip[6], ip[7] = nextHdr, 64
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(ip, ext...), tcp...)
}

func tcpChecksum(src, dst netip.Addr, tcp []byte) uint16 {
	s, d := src.As16(), dst.As16()
	var sum uint32
	for _, b := range [][]byte{s[:], d[:], tcp} {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	sum += uint32(len(tcp)) + 6
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// validTCP checks the segment's TCP checksum against a pseudo-header.
func validTCP(b []byte, tcpOff int, psrc, pdst netip.Addr) bool {
	tcp := append([]byte{}, b[tcpOff:]...)
	want := binary.BigEndian.Uint16(tcp[16:])
	tcp[16], tcp[17] = 0, 0
	return tcpChecksum(psrc, pdst, tcp) == want
}

func addrAt(b []byte, off int) netip.Addr { return netip.AddrFrom16([16]byte(b[off : off+16])) }

// TestExtensionHeaders: netblock masks every remote address an IPv6 header
// carries, in a Routing header (type 0 with segments left and none left,
// type 2, segment routing) and in the Home Address option, keeps the
// server's own, and keeps the TCP checksum right for the pseudo-header the
// receiver uses (the final destination, the home address), as zeek's
// ip6-route0-tcp-good-chksum and ip6-hoa-tcp-good-chksum traces have it.
func TestExtensionHeaders(t *testing.T) {
	server := netip.MustParseAddr("2001:db8:aaaa::1")
	client := netip.MustParseAddr("2001:db8:bbbb:1:2:3:4:5")
	hop := netip.MustParseAddr("2001:db8:cccc:9::9")
	home := netip.MustParseAddr("2001:db8:dddd:7::7")
	routing := func(typ, segLeft byte, addrs ...netip.Addr) []byte {
		h := []byte{6, byte(2 * len(addrs)), typ, segLeft, 0, 0, 0, 0}
		if typ == 4 {
			h[4] = byte(len(addrs) - 1)
		}
		for _, a := range addrs {
			a16 := a.As16()
			h = append(h, a16[:]...)
		}
		return h
	}
	// Destination options, 24 bytes: PadN of 4, then the Home Address
	// option at its alignment of 8n+6.
	haoHdr := append([]byte{6, 2, 1, 2, 0, 0, 0xc9, 16}, home.AsSlice()...)
	tests := []struct {
		name       string
		src, dst   netip.Addr
		next       byte
		ext        []byte
		psrc, pdst netip.Addr
		masked     []netip.Addr // addresses that must not appear
	}{
		{"routing type 0, segments left", server, hop, 43, routing(0, 1, client), server, client, []netip.Addr{hop, client}},
		{"routing type 0, none left", hop, server, 43, routing(0, 0, client), hop, server, []netip.Addr{hop, client}},
		{"routing type 2 to a mobile node", server, client, 43, routing(2, 1, home), server, home, []netip.Addr{client, home}},
		{"segment routing", client, hop, 43, routing(4, 1, server, hop), client, server, []netip.Addr{client, hop}},
		{"home address option", client, server, 60, haoHdr, home, server, []netip.Addr{client, home}},
	}
	a := New(Netblock, []netip.Addr{server})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := ext6(tt.src, tt.dst, tt.next, tt.ext, tt.psrc, tt.pdst)
			if !validTCP(b, 40+len(tt.ext), tt.psrc, tt.pdst) {
				t.Fatal("the test's own checksum is wrong")
			}
			var p packet.Parsed
			if k := p.Decode(packet.LinkTypeRaw, b); k != packet.TCP {
				t.Fatalf("Decode = %v", k)
			}
			srcA, dstA := p.SrcAddr(), p.DstAddr()
			s16, d16 := srcA.As16(), dstA.As16()
			a.Apply(b, &p, a.ShouldMask(&s16), a.ShouldMask(&d16))
			for off := 8; off+16 <= 40+len(tt.ext); off++ {
				got := addrAt(b, off)
				for _, m := range tt.masked {
					if got == m {
						t.Errorf("%v still at offset %d", m, off)
					}
				}
			}
			mask := func(x netip.Addr) netip.Addr {
				x16 := x.As16()
				if a.ShouldMask(&x16) {
					return MaskAddr(x)
				}
				return x
			}
			if !validTCP(b, 40+len(tt.ext), mask(tt.psrc), mask(tt.pdst)) {
				t.Error("the TCP checksum is wrong for the masked pseudo-header")
			}
		})
	}
}
