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

// tsFrame is an IPv4 TCP frame with a timestamps option after the given
// options (an odd number of NOPs puts it off the 16-bit word boundary).
func tsFrame(t testing.TB, before []layers.TCPOption, ack bool, tsval, tsecr uint32) []byte {
	ts := make([]byte, 8)
	binary.BigEndian.PutUint32(ts, tsval)
	binary.BigEndian.PutUint32(ts[4:], tsecr)
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{203, 0, 113, 7}, DstIP: net.IP{192, 0, 2, 1}}
	tcp := &layers.TCP{SrcPort: 5555, DstPort: 443, Seq: 1, Ack: 2, ACK: ack, SYN: !ack, Window: 512,
		Options: append(append([]layers.TCPOption{}, before...), layers.TCPOption{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: ts})}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload([]byte("data"))); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// TestShiftTimestamps: the shifted frame is the frame gopacket encodes
// with the shifted values (so the checksum is right), whether the option
// is word-aligned or not, with wrap-around, and TSecr is left alone in a
// segment without ACK.
func TestShiftTimestamps(t *testing.T) {
	nop := layers.TCPOption{OptionType: layers.TCPOptionKindNop, OptionLength: 1}
	for _, tt := range []struct {
		name   string
		before []layers.TCPOption
		ack    bool
	}{{"aligned", []layers.TCPOption{nop, nop}, true}, {"unaligned", []layers.TCPOption{nop}, true}, {"syn", nil, false}} {
		var val, ecr, dv, de uint32 = 0xfffffff0, 0x12345678, 0x20, 0x9abcdef0
		b := tsFrame(t, tt.before, tt.ack, val, ecr)
		wantEcr := ecr
		if tt.ack {
			wantEcr += de
		}
		want := tsFrame(t, tt.before, tt.ack, val+dv, wantEcr) // (val+dv wraps)
		var p packet.Parsed
		if p.Decode(packet.LinkTypeEthernet, b) != packet.TCP {
			t.Fatal("decode")
		}
		ShiftTimestamps(b, &p, dv, de)
		if !bytes.Equal(b, want) {
			t.Errorf("%s:\n got %x\nwant %x", tt.name, b, want)
		}
	}
}

// TestTSOffsets: the same key and 4-tuple give the same offsets (live and
// offline alike), another 4-tuple or key others, and each end its own.
func TestTSOffsets(t *testing.T) {
	k1 := packet.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:443"), netip.MustParseAddrPort("203.0.113.7:5555"))
	k2 := packet.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:443"), netip.MustParseAddrPort("203.0.113.7:5556"))
	a, err := NewConfig(Config{Mode: Netblock, Key: referenceKey, TSOffset: true})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewConfig(Config{Mode: Netblock, Key: referenceKey, TSOffset: true})
	other, _ := NewConfig(Config{Mode: Netblock, Key: bytes.Repeat([]byte{1}, KeySize), TSOffset: true})
	a1, b1 := a.TSOffsets(&k1)
	if x, y := b.TSOffsets(&k1); x != a1 || y != b1 {
		t.Error("one key gives two offsets for one flow")
	}
	if x, y := a.TSOffsets(&k2); x == a1 || y == b1 {
		t.Error("two flows share an offset")
	}
	if x, y := other.TSOffsets(&k1); x == a1 || y == b1 {
		t.Error("two keys give one offset")
	}
	if a1 == b1 || a1 == 0 {
		t.Errorf("offsets %d and %d", a1, b1)
	}
	if !a.PerFlow() || New(Netblock, nil).PerFlow() {
		t.Error("PerFlow is wrong")
	}
	if _, err := NewConfig(Config{Mode: Netblock, TSOffset: true}); err == nil {
		t.Error("timestamp offsets without a key")
	}
}

// TestZeroLinkAddrs: Ethernet's two addresses and a Linux cooked capture's
// one are zeroed, nothing else; without ZeroMAC nothing is.
func TestZeroLinkAddrs(t *testing.T) {
	a, _ := NewConfig(Config{Mode: None, ZeroMAC: true})
	for _, tt := range []struct {
		lt       packet.LinkType
		from, to int
	}{{packet.LinkTypeEthernet, 0, 12}, {packet.LinkTypeLinuxSLL, 6, 14}, {packet.LinkTypeLinuxSLL2, 12, 20}, {packet.LinkTypeRaw, 0, 0}} {
		b := bytes.Repeat([]byte{0xab}, 40)
		a.ZeroLinkAddrs(b, tt.lt)
		for i, c := range b {
			if (i >= tt.from && i < tt.to) != (c == 0) {
				t.Errorf("link type %v: byte %d is %#x", tt.lt, i, c)
			}
		}
		New(None, nil).ZeroLinkAddrs(b[:20], packet.LinkTypeEthernet)
	}
	b := bytes.Repeat([]byte{0xab}, 20)
	New(Netblock, nil).ZeroLinkAddrs(b, packet.LinkTypeEthernet)
	if b[0] == 0 {
		t.Error("zeroed without ZeroMAC")
	}
}

// BenchmarkShiftTimestamps measures the per-packet timestamp rewrite.
func BenchmarkShiftTimestamps(b *testing.B) {
	f := tsFrame(nil, []layers.TCPOption{{OptionType: layers.TCPOptionKindNop, OptionLength: 1}, {OptionType: layers.TCPOptionKindNop, OptionLength: 1}}, true, 1, 2)
	var p packet.Parsed
	p.Decode(packet.LinkTypeEthernet, f)
	b.ReportAllocs()
	for b.Loop() {
		ShiftTimestamps(f, &p, 3, 5)
	}
}
