package anonymize

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/packet"
)

// frame builds an Ethernet/IP/TCP frame with gopacket, checksums computed,
// between src and dst (IPv4 when both are IPv4, else IPv6 with the IPv4
// addresses in mapped form).
func frame(t testing.TB, src, dst netip.Addr, payload int) []byte {
	t.Helper()
	var nl gopacket.NetworkLayer
	var ipl gopacket.SerializableLayer
	et := layers.EthernetTypeIPv6
	if src.Is4() && dst.Is4() {
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Id: 777, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		nl, ipl, et = ip, ip, layers.EthernetTypeIPv4
	} else {
		s16, d16 := src.As16(), dst.As16()
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP, SrcIP: net.IP(s16[:]), DstIP: net.IP(d16[:])}
		nl, ipl = ip, ip
	}
	tcp := &layers.TCP{SrcPort: 5555, DstPort: 443, Seq: 99, Ack: 7, ACK: true, PSH: payload > 0, Window: 512,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: []byte{1, 2, 3, 4, 5, 6, 7, 8}}}}
	tcp.SetNetworkLayerForChecksum(nl)
	buf := gopacket.NewSerializeBuffer()
	pl := make([]byte, payload)
	for i := range pl {
		pl[i] = byte(i * 7)
	}
	err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: et},
		ipl, tcp, gopacket.Payload(pl))
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func mappedIfV6(a netip.Addr, v6 bool) netip.Addr {
	if v6 && a.Is4() {
		return netip.AddrFrom16(a.As16())
	}
	return a
}

func TestApplyMatchesIndependentEncoding(t *testing.T) {
	server4 := netip.MustParseAddr("192.0.2.1")
	server6 := netip.MustParseAddr("2001:db8:aaaa::1")
	tests := []struct {
		name             string
		src, dst         netip.Addr
		wantSrc, wantDst netip.Addr
		payload          int
	}{
		{"ipv4 inbound", netip.MustParseAddr("203.0.113.77"), server4, netip.MustParseAddr("203.0.113.0"), server4, 100},
		{"ipv4 outbound", server4, netip.MustParseAddr("198.51.100.255"), server4, netip.MustParseAddr("198.51.100.0"), 0},
		{"ipv6 inbound", netip.MustParseAddr("2001:db8:1234:5678:9abc::42"), server6, netip.MustParseAddr("2001:db8:1234::"), server6, 33},
		{"ipv6 outbound", server6, netip.MustParseAddr("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"), server6, netip.MustParseAddr("2001:db8:ffff::"), 1},
		{"ipv4-mapped in ipv6 header", netip.MustParseAddr("::ffff:203.0.113.77"), server6, netip.MustParseAddr("::ffff:203.0.113.0"), server6, 7},
		{"both remote", netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("198.51.100.9"), netip.MustParseAddr("203.0.113.0"), netip.MustParseAddr("198.51.100.0"), 20},
		{"already masked", netip.MustParseAddr("203.0.113.0"), server4, netip.MustParseAddr("203.0.113.0"), server4, 20},
	}
	a := New(Netblock, []netip.Addr{server4, server6})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := frame(t, tt.src, tt.dst, tt.payload)
			want := frame(t, tt.wantSrc, tt.wantDst, tt.payload)
			var p packet.Parsed
			if k := p.Decode(packet.LinkTypeEthernet, b); k != packet.TCP {
				t.Fatalf("decode: %v", k)
			}
			a.Apply(b, &p, a.ShouldMask(&p.Src), a.ShouldMask(&p.Dst))
			if !bytes.Equal(b, want) {
				t.Errorf("anonymized frame differs from the masked frame encoded by gopacket:\n got %x\nwant %x", b, want)
			}
		})
	}
}

func TestApplyKeepsChecksumErrors(t *testing.T) {
	// A wrong checksum (e.g. an offloaded one) stays wrong by the same
	// amount: the update reveals nothing and invents nothing.
	src, dst := netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("192.0.2.1")
	b := frame(t, src, dst, 50)
	want := frame(t, netip.MustParseAddr("203.0.113.0"), dst, 50)
	var p packet.Parsed
	p.Decode(packet.LinkTypeEthernet, b)
	off := p.TCPOffset + 16
	const errAmount = 0x10
	binary.BigEndian.PutUint16(b[off:], onesAdd(binary.BigEndian.Uint16(b[off:]), errAmount))
	New(Netblock, []netip.Addr{dst}).Apply(b, &p, true, false)
	if got, w := binary.BigEndian.Uint16(b[off:]), binary.BigEndian.Uint16(want[off:]); got != onesAdd(w, errAmount) {
		t.Errorf("checksum %04x, want the right one %04x off by the same %#x", got, w, errAmount)
	}
}

func onesAdd(a, b uint16) uint16 {
	s := uint32(a) + uint32(b)
	return uint16(s&0xffff + s>>16)
}

func TestHeadersOnlyRecord(t *testing.T) {
	// Records are cut at the end of the TCP header: masking still works and
	// never reaches past the bytes it is given.
	src, dst := netip.MustParseAddr("2001:db8:1:2:3:4:5:6"), netip.MustParseAddr("2001:db8::1")
	b := frame(t, src, dst, 500)
	var p packet.Parsed
	p.Decode(packet.LinkTypeEthernet, b)
	for _, cut := range []int{p.HeaderEnd, p.TCPOffset + 17, p.TCPOffset + 10, p.DstOffset + 3} {
		rec := bytes.Clone(b[:cut])
		New(Netblock, []netip.Addr{dst}).Apply(rec, &p, true, false)
		if cut >= p.SrcOffset+16 && !bytes.Equal(rec[p.SrcOffset+6:p.SrcOffset+16], make([]byte, 10)) {
			t.Errorf("cut at %d: source not masked: %x", cut, rec[p.SrcOffset:p.SrcOffset+16])
		}
	}
}

func TestNoneAndLocal(t *testing.T) {
	a := New(None, nil)
	x := netip.MustParseAddr("203.0.113.77").As16()
	if a.ShouldMask(&x) {
		t.Error("mode none masks")
	}
	local := netip.MustParseAddr("192.0.2.1")
	n := New(Netblock, []netip.Addr{local})
	l16 := local.As16()
	if n.ShouldMask(&l16) || !n.ShouldMask(&x) {
		t.Error("netblock must mask remote addresses only")
	}
	var nilA *Anonymizer
	if nilA.ShouldMask(&x) {
		t.Error("a nil anonymizer masks")
	}
}

func TestParseMode(t *testing.T) {
	for _, s := range Modes {
		m, err := ParseMode(s)
		if err != nil || m.String() != s {
			t.Errorf("ParseMode(%q) = %v, %v", s, m, err)
		}
	}
	if _, err := ParseMode("sha256"); err == nil {
		t.Error("ParseMode accepts an unknown mode")
	}
}

func TestMaskAddr(t *testing.T) {
	for in, want := range map[string]string{
		"203.0.113.77":        "203.0.113.0",
		"::ffff:203.0.113.77": "203.0.113.0",
		"2001:db8:1:2:3::4":   "2001:db8:1::",
	} {
		if got := MaskAddr(netip.MustParseAddr(in)); got != netip.MustParseAddr(want) {
			t.Errorf("MaskAddr(%s) = %v, want %s", in, got, want)
		}
	}
}

func BenchmarkApply(b *testing.B) {
	src, dst := netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("192.0.2.1")
	f := frame(b, src, dst, 0)
	var p packet.Parsed
	p.Decode(packet.LinkTypeEthernet, f)
	a := New(Netblock, []netip.Addr{dst})
	b.ReportAllocs()
	for b.Loop() {
		a.Apply(f, &p, true, false)
	}
}

// FuzzApply checks, for any pair of addresses and any payload length, that
// anonymizing a frame gives exactly the frame gopacket encodes with the
// masked addresses (so checksums are right), and that arbitrary truncation
// never makes Apply write out of bounds.
func FuzzApply(f *testing.F) {
	f.Add([]byte{203, 0, 113, 77}, []byte{192, 0, 2, 1}, uint16(10), uint8(3))
	f.Add(bytes.Repeat([]byte{0xfe}, 16), bytes.Repeat([]byte{0x20}, 16), uint16(0), uint8(1))
	f.Fuzz(func(t *testing.T, s, d []byte, payload uint16, cut uint8) {
		src, ok1 := netip.AddrFromSlice(s)
		dst, ok2 := netip.AddrFromSlice(d)
		if !ok1 || !ok2 || src == dst {
			return
		}
		v6 := !(src.Is4() && dst.Is4())
		src, dst = mappedIfV6(src, v6), mappedIfV6(dst, v6)
		b := frame(t, src, dst, int(payload%2000))
		var p packet.Parsed
		if p.Decode(packet.LinkTypeEthernet, b) != packet.TCP {
			t.Fatal("gopacket frame does not decode")
		}
		want := frame(t, mappedIfV6(MaskAddr(src), v6 && !src.Is4In6()), dst, int(payload%2000))
		if src.Is4In6() {
			want = frame(t, netip.AddrFrom16(MaskAddr(src).As16()), dst, int(payload%2000))
		}
		trunc := bytes.Clone(b[:max(0, len(b)-int(cut))])
		a := New(Netblock, []netip.Addr{dst})
		a.Apply(b, &p, true, false)
		if !bytes.Equal(b, want) {
			t.Fatalf("anonymized %v -> %v:\n got %x\nwant %x", src, dst, b, want)
		}
		a.Apply(trunc, &p, true, true)
	})
}
