package packet

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// build serializes layers with gopacket, an independent encoder.
func build(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

var (
	src4 = net.ParseIP("192.0.2.10").To4()
	dst4 = net.ParseIP("198.51.100.7").To4()
	src6 = net.ParseIP("2001:db8:1::10")
	dst6 = net.ParseIP("2001:db8:2::7")
)

func eth(et layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: et}
}

func ip4() *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src4, DstIP: dst4}
}

func ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: src6, DstIP: dst6}
}

func tcp(nl gopacket.NetworkLayer, opts bool) *layers.TCP {
	t := &layers.TCP{SrcPort: 40000, DstPort: 443, Seq: 12345, SYN: true, Window: 1000}
	if opts {
		t.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{5, 0xb4}},
			{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}
	}
	t.SetNetworkLayerForChecksum(nl)
	return t
}

func payload(n int) gopacket.Payload { return make(gopacket.Payload, n) }

func TestDecode(t *testing.T) {
	v4 := ip4()
	v4tcp := build(t, eth(layers.EthernetTypeIPv4), v4, tcp(v4, true), payload(100))
	v6 := ip6(layers.IPProtocolTCP)
	v6tcp := build(t, eth(layers.EthernetTypeIPv6), v6, tcp(v6, false), payload(10))

	// IPv6 with a hop-by-hop and a destination options header before TCP.
	v6e := ip6(layers.IPProtocolIPv6HopByHop)
	hop := []byte{byte(layers.IPProtocolIPv6Destination), 0, 1, 4, 0, 0, 0, 0}
	dst := []byte{byte(layers.IPProtocolTCP), 0, 1, 4, 0, 0, 0, 0}
	v6ext := build(t, eth(layers.EthernetTypeIPv6), v6e, gopacket.Payload(append(append(append([]byte{}, hop...), dst...), build(t, tcp(v6e, false))...)))

	vlan := build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{VLANIdentifier: 7, Type: layers.EthernetTypeDot1Q},
		&layers.Dot1Q{VLANIdentifier: 8, Type: layers.EthernetTypeIPv4}, v4, tcp(v4, false))
	// Linux cooked header: packet type, ARPHRD, address length, 8 address bytes, protocol.
	sllHdr := []byte{0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00}
	sll := append(sllHdr, build(t, v4, tcp(v4, false))...)
	raw := build(t, v4, tcp(v4, false))
	raw6 := build(t, v6, tcp(v6, false), payload(10))
	// BSD loopback: the address family in the capturing host's byte order
	// (NULL), or in network byte order (LOOP).
	nullLE := append([]byte{2, 0, 0, 0}, raw...)
	nullBE6 := append([]byte{0, 0, 0, 30}, raw6...) // macOS's AF_INET6, big-endian host
	loop6 := append([]byte{0, 0, 0, 24}, raw6...)
	nullOther := append([]byte{7, 0, 0, 0}, raw...)

	frag := build(t, eth(layers.EthernetTypeIPv4), &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src4, DstIP: dst4, FragOffset: 100}, payload(40))
	udp := build(t, eth(layers.EthernetTypeIPv4), &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src4, DstIP: dst4}, payload(20))
	arp := build(t, eth(layers.EthernetTypeARP), payload(28))

	badIHL := append([]byte{}, v4tcp...)
	badIHL[14] = 0x43
	smallDoff := append([]byte{}, v4tcp...)
	smallDoff[14+20+12] = 0x40
	doffPastEnd := append([]byte{}, raw...)
	doffPastEnd[20+12] = 0xf0 // 60 bytes of TCP header in a 40-byte packet
	manyVLAN := build(t, eth(layers.EthernetTypeDot1Q), &layers.Dot1Q{Type: layers.EthernetTypeDot1Q}, &layers.Dot1Q{Type: layers.EthernetTypeDot1Q},
		&layers.Dot1Q{Type: layers.EthernetTypeDot1Q}, &layers.Dot1Q{Type: layers.EthernetTypeDot1Q}, &layers.Dot1Q{Type: layers.EthernetTypeIPv4}, v4, tcp(v4, false))

	tests := []struct {
		name      string
		lt        LinkType
		b         []byte
		want      Kind
		ipv4      bool
		tcpOff    int
		headerEnd int
	}{
		{"ipv4 with options and payload", LinkTypeEthernet, v4tcp, TCP, true, 34, 34 + 36},
		{"ipv6", LinkTypeEthernet, v6tcp, TCP, false, 54, 74},
		{"ipv6 extension headers", LinkTypeEthernet, v6ext, TCP, false, 70, 90},
		{"two vlan tags", LinkTypeEthernet, vlan, TCP, true, 42, 62},
		{"linux sll", LinkTypeLinuxSLL, sll, TCP, true, 36, 56},
		{"raw ip", LinkTypeRaw, raw, TCP, true, 20, 40},
		{"bsd loopback ipv4, little-endian", LinkTypeNull, nullLE, TCP, true, 24, 44},
		{"bsd loopback ipv6 (macOS), big-endian", LinkTypeNull, nullBE6, TCP, false, 44, 64},
		{"openbsd loopback ipv6", LinkTypeLoop, loop6, TCP, false, 44, 64},
		{"bsd loopback, another family", LinkTypeNull, nullOther, UnknownLink, false, 0, 0},
		{"bsd loopback, truncated", LinkTypeNull, nullLE[:3], Truncated, false, 0, 0},
		{"truncated options still decode", LinkTypeEthernet, v4tcp[:60], TCP, true, 34, 70},
		{"truncated fixed tcp header", LinkTypeEthernet, v4tcp[:40], Truncated, true, 0, 0},
		{"truncated ethernet", LinkTypeEthernet, v4tcp[:10], Truncated, false, 0, 0},
		{"truncated ipv6", LinkTypeEthernet, v6tcp[:40], Truncated, false, 0, 0},
		{"non-first fragment", LinkTypeEthernet, frag, Fragment, false, 0, 0},
		{"udp", LinkTypeEthernet, udp, NotTCP, false, 0, 0},
		{"arp", LinkTypeEthernet, arp, UnknownLink, false, 0, 0},
		{"bad ihl", LinkTypeEthernet, badIHL, BadIP, false, 0, 0},
		{"data offset below 5", LinkTypeEthernet, smallDoff, BadTCP, false, 0, 0},
		{"data offset past the end", LinkTypeRaw, doffPastEnd, BadTCP, false, 0, 0},
		{"too many vlan tags", LinkTypeEthernet, manyVLAN, TooManyHeaders, false, 0, 0},
		{"unknown link type", LinkType(9999), v4tcp, UnknownLink, false, 0, 0},
		{"empty raw", LinkTypeRaw, nil, Truncated, false, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p Parsed
			got := p.Decode(tt.lt, tt.b)
			if got != tt.want {
				t.Fatalf("Decode = %v, want %v", got, tt.want)
			}
			if got != TCP {
				return
			}
			if p.IPv4 != tt.ipv4 || p.TCPOffset != tt.tcpOff || p.HeaderEnd != tt.headerEnd {
				t.Errorf("IPv4 %v TCPOffset %d HeaderEnd %d, want %v %d %d", p.IPv4, p.TCPOffset, p.HeaderEnd, tt.ipv4, tt.tcpOff, tt.headerEnd)
			}
			if p.SrcPort != 40000 || p.DstPort != 443 || p.Seq != 12345 || p.Flags&FlagSYN == 0 {
				t.Errorf("ports %d %d seq %d flags %x", p.SrcPort, p.DstPort, p.Seq, p.Flags)
			}
			wantSrc, wantDst := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.7")
			if !tt.ipv4 {
				wantSrc, wantDst = netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:2::7")
			}
			if p.SrcAddr() != wantSrc || p.DstAddr() != wantDst {
				t.Errorf("addresses %v %v, want %v %v", p.SrcAddr(), p.DstAddr(), wantSrc, wantDst)
			}
			alen := 16
			if tt.ipv4 {
				alen = 4
			}
			if a, _ := netip.AddrFromSlice(tt.b[p.SrcOffset : p.SrcOffset+alen]); a != wantSrc {
				t.Errorf("SrcOffset points at %v", a)
			}
			if a, _ := netip.AddrFromSlice(tt.b[p.DstOffset : p.DstOffset+alen]); a != wantDst {
				t.Errorf("DstOffset points at %v", a)
			}
		})
	}
}

func TestDecodeGSOLength(t *testing.T) {
	v4 := ip4()
	b := build(t, v4, tcp(v4, false), payload(100))
	binary.BigEndian.PutUint16(b[2:], 0) // a GSO super-packet's unknown length
	var p Parsed
	if k := p.Decode(LinkTypeRaw, b); k != TCP || p.HeaderEnd != 40 {
		t.Errorf("Decode = %v, HeaderEnd %d; want tcp, 40", k, p.HeaderEnd)
	}
}

func TestKeyIsDirectionIndependent(t *testing.T) {
	v4 := ip4()
	fwd := build(t, v4, tcp(v4, false))
	rv4 := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: dst4, DstIP: src4}
	rt := &layers.TCP{SrcPort: 443, DstPort: 40000, ACK: true}
	rt.SetNetworkLayerForChecksum(rv4)
	rev := build(t, rv4, rt)
	var p, q Parsed
	p.Decode(LinkTypeRaw, fwd)
	q.Decode(LinkTypeRaw, rev)
	k1, a1 := p.Key()
	k2, a2 := q.Key()
	if k1 != k2 || a1 == a2 {
		t.Errorf("keys %v (%v) and %v (%v): want equal keys, opposite sides", k1, a1, k2, a2)
	}
	ev := KeyFromAddrPorts(netip.MustParseAddrPort("[::ffff:198.51.100.7]:443"), netip.MustParseAddrPort("192.0.2.10:40000"))
	if ev != k1 {
		t.Errorf("key from an event with IPv4-mapped addresses %v, want %v", ev, k1)
	}
}

func TestDecodeDoesNotAllocate(t *testing.T) {
	v6 := ip6(layers.IPProtocolTCP)
	b := build(t, eth(layers.EthernetTypeIPv6), v6, tcp(v6, true), payload(100))
	var p Parsed
	if n := testing.AllocsPerRun(1000, func() { p.Decode(LinkTypeEthernet, b); p.Key() }); n != 0 {
		t.Errorf("Decode allocates %v times per packet", n)
	}
}

func BenchmarkDecode(b *testing.B) {
	v4 := ip4()
	pkt := build(b, eth(layers.EthernetTypeIPv4), v4, tcp(v4, true), payload(1400))
	var p Parsed
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		if p.Decode(LinkTypeEthernet, pkt) != TCP {
			b.Fatal("not tcp")
		}
		p.Key()
	}
}

// FuzzDecode checks that no input crashes the decoder and that what it calls
// TCP is consistent: the offsets lie inside the frame and the TCP header
// starts after the addresses.
func FuzzDecode(f *testing.F) {
	v4 := ip4()
	f.Add(uint32(LinkTypeEthernet), build(f, eth(layers.EthernetTypeIPv4), v4, tcp(v4, true), payload(10)))
	v6 := ip6(layers.IPProtocolTCP)
	f.Add(uint32(LinkTypeEthernet), build(f, eth(layers.EthernetTypeIPv6), v6, tcp(v6, false)))
	f.Add(uint32(LinkTypeRaw), build(f, v4, tcp(v4, false)))
	f.Add(uint32(LinkTypeLinuxSLL), []byte{0, 0, 1, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0x86, 0xdd, 0x60})
	f.Fuzz(func(t *testing.T, lt uint32, b []byte) {
		var p Parsed
		if p.Decode(LinkType(lt), b) != TCP {
			return
		}
		alen := 16
		if p.IPv4 {
			alen = 4
		}
		if p.SrcOffset+alen > len(b) || p.DstOffset+alen > len(b) || p.TCPOffset+20 > len(b) {
			t.Fatalf("offsets past the frame: %+v len %d", p, len(b))
		}
		if p.TCPOffset < p.DstOffset+alen || p.HeaderEnd < p.TCPOffset+20 || p.HeaderEnd > p.TCPOffset+60 {
			t.Fatalf("inconsistent offsets: %+v", p)
		}
	})
}

// TestLess: endpoints are ordered by address bytes, then port, as
// bytes.Compare orders the addresses.
func TestLess(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 100000; i++ {
		var a, b [16]byte
		for j := range a {
			a[j] = byte(rng.IntN(3)) // few values: many equal prefixes
			b[j] = byte(rng.IntN(3))
		}
		if i%4 == 0 {
			b = a
		}
		ap, bp := uint16(rng.IntN(3)), uint16(rng.IntN(3))
		c := bytes.Compare(a[:], b[:])
		want := c < 0 || c == 0 && ap < bp
		if got := less(&a, ap, &b, bp); got != want {
			t.Fatalf("less(%x:%d, %x:%d) = %v, want %v", a, ap, b, bp, got, want)
		}
	}
}

// TestMSS: the MSS option of a SYN is read; a header without it, or cut
// inside it, has none.
func TestMSS(t *testing.T) {
	v4 := ip4()
	b := build(t, v4, tcp(v4, true))
	var p Parsed
	if p.Decode(LinkTypeRaw, b) != TCP {
		t.Fatal("not decoded")
	}
	if mss, ok := p.MSS(b); !ok || mss != 1460 {
		t.Errorf("MSS = %d, %v; want 1460", mss, ok)
	}
	if _, ok := p.MSS(b[:p.TCPOffset+22]); ok {
		t.Error("an MSS option cut by the capture was read")
	}
	b = build(t, v4, tcp(v4, false))
	p.Decode(LinkTypeRaw, b)
	if _, ok := p.MSS(b); ok {
		t.Error("an MSS read from a header without the option")
	}
}
