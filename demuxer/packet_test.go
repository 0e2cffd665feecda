package demuxer

import (
	"net/netip"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/selection"
)

func TestAnonymizedInBuffer(t *testing.T) {
	local := netip.MustParseAddr("192.0.2.1")
	h := newHarness(t, func(o *Options) { o.Anonymizer = anonymize.New(anonymize.Netblock, []netip.Addr{local}) })
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(0, c.syn(t))
	h.packet(1*ms, c.synack(t))
	h.d.Close()
	for i, p := range h.file("u") {
		var parsed packet.Parsed
		parsed.Decode(packet.LinkTypeEthernet, p)
		if parsed.SrcAddr() == c.cli.Addr() || parsed.DstAddr() == c.cli.Addr() {
			t.Errorf("packet %d: the client address is not masked", i)
		}
		if parsed.SrcAddr() != local && parsed.DstAddr() != local {
			t.Errorf("packet %d: the server address was masked", i)
		}
	}
}

// TestMappedInBuffer: in cryptopan mode each packet of a flow carries the
// client address's Crypto-PAn mapping, in both directions, and the
// server's address as it is.
func TestMappedInBuffer(t *testing.T) {
	local := netip.MustParseAddr("192.0.2.1")
	anon, err := anonymize.NewKeyed(make([]byte, anonymize.KeySize), []netip.Addr{local})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(o *Options) { o.Anonymizer = anon })
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(0, c.syn(t))
	h.packet(1*ms, c.synack(t))
	h.packet(2*ms, c.data(t, true, 10))
	h.d.Close()
	want := anon.Anonymized(c.cli.Addr())
	if want == c.cli.Addr() || want.Is4() != c.cli.Addr().Is4() {
		t.Fatalf("the client %v maps to %v", c.cli.Addr(), want)
	}
	pkts := h.file("u")
	if len(pkts) != 3 {
		t.Fatalf("%d packets saved, want 3", len(pkts))
	}
	for i, p := range pkts {
		var parsed packet.Parsed
		parsed.Decode(packet.LinkTypeEthernet, p)
		client, server := parsed.SrcAddr(), parsed.DstAddr()
		if i == 1 {
			client, server = server, client
		}
		if client != want || server != local {
			t.Errorf("packet %d: %v -> %v, want the client as %v and the server as %v", i, parsed.SrcAddr(), parsed.DstAddr(), want, local)
		}
	}
}

func TestPacketSteadyStateDoesNotAllocate(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Anonymizer = anonymize.New(anonymize.Netblock, []netip.Addr{netip.MustParseAddr("192.0.2.1")})
	})
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(0, c.syn(t))
	b := c.data(t, true, 1400)
	at := t0
	allocs := testing.AllocsPerRun(20000, func() {
		at = at.Add(time.Microsecond)
		h.d.Packet(b, at, len(b))
		if f := h.d.flows[c.key()]; f.buf.Full() {
			f.buf.Reset() // stand in for the saver taking full chunks
		}
	})
	if allocs > 0.05 {
		t.Errorf("%v allocations per packet", allocs)
	}
}

// BenchmarkPacket measures the per-packet path: decode, flow lookup, header
// copy and netblock anonymization, for 1000 interleaved flows, and for runs
// of 100 packets of each (as a bulk transfer gives).
// BenchmarkPacket measures the demuxer's step per packet with netblock
// masking, and with cryptopan's mapping (computed once per flow, so the
// step costs the same).
func BenchmarkPacket(b *testing.B) {
	server := []netip.Addr{netip.MustParseAddr("192.0.2.1")}
	netblock := anonymize.New(anonymize.Netblock, server)
	keyed, err := anonymize.NewKeyed(make([]byte, anonymize.KeySize), server)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("interleaved", func(b *testing.B) { benchmarkPacket(b, 1, netblock) })
	b.Run("runs", func(b *testing.B) { benchmarkPacket(b, 100, netblock) })
	b.Run("interleaved/cryptopan", func(b *testing.B) { benchmarkPacket(b, 1, keyed) })
	b.Run("runs/cryptopan", func(b *testing.B) { benchmarkPacket(b, 100, keyed) })
}

func benchmarkPacket(b *testing.B, run int, anon *anonymize.Anonymizer) {
	sv, _ := saver.New(saver.Options{Dir: b.TempDir()})
	tbl := names.New(nil)
	d := New(Options{LinkType: packet.LinkTypeEthernet, MaxHeaderSize: 256,
		CaptureDuration: time.Hour, FlowTimeout: time.Hour, UUIDWait: time.Hour, Names: tbl, Writer: WriterFunc(func(u string, lt packet.LinkType, first time.Time) FlowWriter { return sv.Start(u, lt, first) }),
		Anonymizer: anon})
	var frames [][]byte
	for i := 0; i < 1000; i++ {
		c := newConn(uint16(10000+i), uint32(i))
		tbl.Open(t0, "u"+c.cli.String(), c.key(), "bench", 0)
		frames = append(frames, c.data(b, i%2 == 0, 1400))
	}
	at := t0
	b.ReportAllocs()
	b.SetBytes(int64(len(frames[0])))
	i := 0
	for b.Loop() {
		at = at.Add(time.Microsecond)
		d.Packet(frames[i/run%1000], at, 1454)
		i++
		if i%1000 == 0 {
			for _, f := range d.flows {
				if f.buf.Full() {
					f.buf.Reset() // the saver's part is not measured here
				}
			}
		}
	}
}

// BenchmarkUnselected measures the cost per packet when 90% of the traffic
// belongs to connections the selection rejects (their local port is not
// one of -localport's), against the same traffic all selected: a rejected
// connection's packets cost a map miss and a hash (the table of recent
// verdicts), and hold no memory.
func BenchmarkUnselected(b *testing.B) {
	for _, tt := range []struct {
		name  string
		ports string
	}{{"all selected", ""}, {"90% not selected", "443"}} {
		b.Run(tt.name, func(b *testing.B) {
			sel := &selection.Policy{Strict: true}
			sel.SetLocal([]netip.Addr{netip.MustParseAddr("192.0.2.1")})
			sel.SetListening(selection.Listeners{netip.MustParseAddrPort("0.0.0.0:443"): {1}, netip.MustParseAddrPort("[::]:8080"): {1}})
			if tt.ports != "" {
				sel.Ports = &selection.Ports{}
				sel.Ports.Add(tt.ports)
			}
			sv, _ := saver.New(saver.Options{Dir: b.TempDir()})
			tbl := names.New(nil)
			d := New(Options{LinkType: packet.LinkTypeEthernet, MaxHeaderSize: 256,
				CaptureDuration: time.Hour, FlowTimeout: time.Hour, UUIDWait: time.Hour, Names: tbl, Writer: WriterFunc(func(u string, lt packet.LinkType, first time.Time) FlowWriter { return sv.Start(u, lt, first) }),
				Select: sel.Decide})
			var frames [][]byte
			for i := 0; i < 1000; i++ {
				c := newConn(uint16(10000+i), uint32(i))
				if i%10 != 0 {
					c.srv = netip.AddrPortFrom(c.srv.Addr(), 8080)
				}
				tbl.Open(t0, "u"+c.cli.String(), c.key(), "bench", 0)
				frames = append(frames, c.data(b, i%2 == 0, 1400))
			}
			at := t0
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				at = at.Add(time.Microsecond)
				d.Packet(frames[i%1000], at, 1454)
				i++
				if i%1000 == 0 {
					for _, f := range d.flows {
						if f.buf.Full() {
							f.buf.Reset()
						}
					}
				}
			}
			b.ReportMetric(float64(d.Flows()), "flows")
		})
	}
}
