package offline

import (
	"context"
	"encoding/binary"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/selection"
)

func serialize(t *testing.T, ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return append([]byte{}, buf.Bytes()...)
}

// TestHostileFrames replays malformed frames mixed with a valid connection
// through the whole pipeline: nothing crashes, the malformed frames are
// counted as undecodable, and no record holds a byte past a TCP header.
func TestHostileFrames(t *testing.T) {
	eth := func(et layers.EthernetType) *layers.Ethernet {
		return &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: et}
	}
	ip := func() *layers.IPv4 {
		return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{192, 0, 2, 9}, DstIP: net.IP{192, 0, 2, 1}}
	}
	tcp := func(ipl gopacket.NetworkLayer, syn, ack bool) *layers.TCP {
		l := &layers.TCP{SrcPort: 40000, DstPort: 80, SYN: syn, ACK: ack, Seq: 1, Window: 100}
		l.SetNetworkLayerForChecksum(ipl)
		return l
	}
	valid := func(syn, ack bool, payload int) []byte {
		i := ip()
		return serialize(t, eth(layers.EthernetTypeIPv4), i, tcp(i, syn, ack), gopacket.Payload(make([]byte, payload)))
	}
	var hostile [][]byte
	badIHL := valid(false, true, 10)
	badIHL[14] = 0x42 // IHL 2
	hostile = append(hostile, badIHL)
	hostile = append(hostile, valid(false, true, 0)[:14+20+8]) // truncated TCP
	past := valid(false, true, 0)
	past[14+20+12] = 0xf0 // data offset 60 in a 20-byte header
	hostile = append(hostile, past)
	i6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolIPv6HopByHop, SrcIP: net.ParseIP("2001:db8::9"), DstIP: net.ParseIP("2001:db8::1")}
	var chain []byte
	for n := 0; n < 20; n++ { // a chain of destination options headers, longer than the limit
		chain = append(chain, byte(layers.IPProtocolIPv6Destination), 0, 1, 4, 0, 0, 0, 0)
	}
	hostile = append(hostile, serialize(t, eth(layers.EthernetTypeIPv6), i6, gopacket.Payload(chain)))
	vl := []gopacket.SerializableLayer{eth(layers.EthernetTypeDot1Q)}
	for n := 0; n < 6; n++ {
		vl = append(vl, &layers.Dot1Q{VLANIdentifier: uint16(n), Type: layers.EthernetTypeDot1Q})
	}
	hostile = append(hostile, serialize(t, append(vl, gopacket.Payload(make([]byte, 60)))...))
	rng := rand.New(rand.NewSource(1))
	for n := 0; n < 200; n++ { // noise, some of it shaped like IP
		b := make([]byte, rng.Intn(120))
		rng.Read(b)
		if len(b) > 14 && n%2 == 0 {
			binary.BigEndian.PutUint16(b[12:], 0x0800)
		}
		hostile = append(hostile, b)
	}

	path := filepath.Join(t.TempDir(), "hostile.pcap")
	f, _ := os.Create(path)
	w := pcapgo.NewWriterNanos(f)
	w.WriteFileHeader(256, layers.LinkTypeEthernet)
	ts := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	write := func(b []byte) {
		ts = ts.Add(time.Millisecond)
		w.WritePacket(gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(b), Length: len(b) + 100}, b)
	}
	write(valid(true, false, 0))
	for _, b := range hostile {
		write(b)
	}
	write(valid(false, true, 100))
	f.Close()

	out := t.TempDir()
	sum, err := Run(context.Background(), options(out, path, ""))
	if err != nil {
		t.Fatal(err)
	}
	decodable := int(sum.Packets - sum.Undecodable)
	if sum.Undecodable < 200 || sum.Files < 1 {
		t.Errorf("%s: want the hostile frames counted as undecodable and the valid flow saved", sum)
	}
	records := 0
	for name, b := range tree(t, out) {
		_, data := readRecords(t, b)
		for _, d := range data {
			records++
			p := gopacket.NewPacket(d, layers.LayerTypeEthernet, gopacket.Default)
			if tl, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP); !ok || len(tl.Payload) != 0 {
				t.Errorf("%s: a record that is not TCP headers only: %x", name, d)
			}
		}
	}
	if records != decodable {
		t.Errorf("%d records saved, %d frames decoded", records, decodable)
	}
}

// TestImpossibleRecords: records whose headers no capture makes (a time
// fraction of a second or more, an original length of 0, shorter than the
// frame, or 4 GB) are refused one by one and counted; nothing of them is
// saved, none moves the clock, and the records around them are saved.
func TestImpossibleRecords(t *testing.T) {
	i := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{192, 0, 2, 9}, DstIP: net.IP{192, 0, 2, 1}}
	frame := func(syn bool, seq uint32) []byte {
		l := &layers.TCP{SrcPort: 40000, DstPort: 80, SYN: syn, ACK: !syn, Seq: seq, Window: 100}
		l.SetNetworkLayerForChecksum(i)
		return serialize(t, &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}, i, l)
	}
	sec := uint32(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).Unix())
	var b []byte
	le := binary.LittleEndian
	b = le.AppendUint32(b, 0xa1b23c4d) // nanoseconds
	b = le.AppendUint16(b, 2)
	b = le.AppendUint16(b, 4)
	b = append(b, make([]byte, 8)...)
	b = le.AppendUint32(b, 256)
	b = le.AppendUint32(b, 1)
	record := func(s, frac, orig uint32, f []byte) {
		b = le.AppendUint32(b, s)
		b = le.AppendUint32(b, frac)
		b = le.AppendUint32(b, uint32(len(f)))
		b = le.AppendUint32(b, orig)
		b = append(b, f...)
	}
	first := frame(true, 1)
	record(sec, 0, uint32(len(first)), first)
	record(sec, 4_000_000_000, 1514, frame(false, 2)) // 4 s of fraction
	record(sec, 1000, 0, frame(false, 3))
	record(sec, 2000, 20, frame(false, 4))
	record(sec, 3000, 0xffffffff, frame(false, 5))
	record(sec, 4000, 1514, frame(false, 6))
	path := filepath.Join(t.TempDir(), "impossible.pcap")
	os.WriteFile(path, b, 0o644)
	out := t.TempDir()
	sum, err := Run(context.Background(), options(out, path, ""))
	if err != nil {
		t.Fatal(err)
	}
	if sum.Impossible != 4 || sum.Packets != 2 {
		t.Errorf("%s: want 4 records refused and 2 read", sum)
	}
	var got []gopacket.CaptureInfo
	for _, f := range tree(t, out) {
		cis, _ := readRecords(t, f)
		got = append(got, cis...)
	}
	if len(got) != 2 || got[1].Length != 1514 || got[1].Timestamp.Sub(got[0].Timestamp) != 4*time.Microsecond {
		t.Errorf("saved %+v, want the first and last records, 4 µs apart", got)
	}
}

// TestFutureFrame: one frame dated a day ahead of the others, in the
// middle of a connection, is set aside and counted; it does not move the
// clock, so the connection is not ended by it and stays one file. Nor do
// ConfirmJump frames in a row that are not TCP (ARP, dated 2100). A jump
// that ConfirmJump TCP segments in a row confirm (a pause in the capture)
// is taken, and its frames saved.
func TestFutureFrame(t *testing.T) {
	i := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{192, 0, 2, 9}, DstIP: net.IP{192, 0, 2, 1}}
	frame := func(sport uint16, syn, ack bool) []byte {
		l := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: 80, SYN: syn, ACK: ack, Seq: 1, Window: 100}
		l.SetNetworkLayerForChecksum(i)
		return serialize(t, &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}, i, l)
	}
	path := filepath.Join(t.TempDir(), "future.pcap")
	f, _ := os.Create(path)
	w := pcapgo.NewWriterNanos(f)
	w.WriteFileHeader(256, layers.LinkTypeEthernet)
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	write := func(ts time.Time, b []byte) {
		w.WritePacket(gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(b), Length: len(b)}, b)
	}
	write(t0, frame(40000, true, false))
	for s := 1; s <= 40; s++ { // a connection busy for 40 s, beyond -flowtimeout
		if s == 20 {
			write(t0.Add(24*time.Hour), frame(40001, true, false)) // the odd frame
		}
		if s == 30 {
			arp := serialize(t, &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeARP},
				&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4, Operation: layers.ARPRequest,
					SourceHwAddress: []byte{2, 0, 0, 0, 0, 1}, SourceProtAddress: []byte{192, 0, 2, 9}, DstHwAddress: make([]byte, 6), DstProtAddress: []byte{192, 0, 2, 1}})
			for j := 0; j < ConfirmJump; j++ {
				write(time.Date(2100, 1, 1, 0, 0, j, 0, time.UTC), arp)
			}
		}
		write(t0.Add(time.Duration(s)*time.Second), frame(40000, false, true))
	}
	// A pause of a day, then a connection of ConfirmJump frames.
	for s := 0; s < ConfirmJump; s++ {
		write(t0.Add(48*time.Hour+time.Duration(s)*time.Millisecond), frame(40002, s == 0, s > 0))
	}
	f.Close()
	out := t.TempDir()
	sum, err := Run(context.Background(), options(out, path, ""))
	if err != nil {
		t.Fatal(err)
	}
	if sum.OddTimes != 1+ConfirmJump || sum.Files != 2 {
		t.Errorf("%s: want the odd frames set aside and counted, and 2 files (the connection whole, and the one after the pause)", sum)
	}
	for name, b := range tree(t, out) {
		cis, _ := readRecords(t, b)
		if strings.Contains(name, "_40000_") && len(cis) != 41 || strings.Contains(name, "_40002_") && len(cis) != ConfirmJump {
			t.Errorf("%s: %d packets", name, len(cis))
		}
	}
}

// TestLoopbackCapture splits a real capture taken on loopback: by default
// offline keeps its seven connections (tcp-info's local rule is live's),
// and the summary says no connection was left out; with ExcludeLocal
// (-exclude-local) none is kept, and the summary says how many the rule
// left out, and which; -localport leaves them out as another port.
func TestLoopbackCapture(t *testing.T) {
	for _, tt := range []struct {
		name       string
		keepLocal  bool
		ports      string
		files      int
		summary    string
		excluded   uint64
		otherPorts uint64
	}{
		{"default", true, "", 7, "left out no connection", 0, 0},
		{"-exclude-local", false, "", 0, "left out 7 connections (7 excluded)", 7, 0},
		{"-localport 443", true, "443", 0, "left out 7 connections (7 other_port)", 0, 7},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out := t.TempDir()
			o := options(out, "testdata/loopback.pcap", "")
			o.KeepLocal = tt.keepLocal
			if tt.ports != "" {
				o.Ports = &selection.Ports{}
				o.Ports.Add(tt.ports)
			}
			sum, err := Run(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			if sum.Files != int64(tt.files) || sum.LeftOut[selection.Excluded] != tt.excluded || sum.LeftOut[selection.OtherPort] != tt.otherPorts || !strings.Contains(sum.String(), tt.summary) {
				t.Errorf("%s: want %d files and %q", sum, tt.files, tt.summary)
			}
			for name, b := range tree(t, out) {
				if cis, _ := readRecords(t, b); len(cis) != 14 {
					t.Errorf("%s: %d packets, want 14", name, len(cis))
				}
			}
		})
	}
}
