package demuxer

import (
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
	"github.com/m-lab/packet-headers/saver"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

// conn makes the frames of one TCP connection, as gopacket encodes them,
// with the sequence and acknowledgment numbers a real one would have.
type conn struct {
	cli, srv netip.AddrPort
	isn      uint32
	next     [2]uint32 // the next sequence number of the client and the server
}

// srvISN is the server's initial sequence number.
const srvISN = 7777

func newConn(cliPort uint16, isn uint32) *conn {
	return &conn{cli: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.5"), cliPort), srv: netip.MustParseAddrPort("192.0.2.1:443"), isn: isn,
		next: [2]uint32{isn, srvISN}}
}

func (c *conn) frame(t testing.TB, fromClient bool, f func(*layers.TCP), payload int) []byte {
	src, dst := c.cli, c.srv
	side := 0
	if !fromClient {
		src, dst = dst, src
		side = 1
	}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: c.next[side], Ack: c.next[1-side], Window: 1000}
	f(tcp)
	end := tcp.Seq + uint32(payload)
	if tcp.SYN {
		end++
	}
	if tcp.FIN {
		end++
	}
	if int32(end-c.next[side]) > 0 && !tcp.RST {
		c.next[side] = end
	}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload(make([]byte, payload)))
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func (c *conn) syn(t testing.TB) []byte {
	return c.frame(t, true, func(p *layers.TCP) { p.SYN, p.Seq = true, c.isn }, 0) // first or again
}
func (c *conn) synack(t testing.TB) []byte {
	return c.frame(t, false, func(p *layers.TCP) { p.SYN, p.ACK, p.Seq = true, true, srvISN }, 0)
}
func (c *conn) data(t testing.TB, fromClient bool, n int) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.ACK, p.PSH = true, true }, n)
}
func (c *conn) fin(t testing.TB, fromClient bool) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.FIN, p.ACK = true, true }, 0)
}
func (c *conn) ack(t testing.TB, fromClient bool) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.ACK = true }, 0)
}
func (c *conn) key() packet.Key { return packet.KeyFromAddrPorts(c.srv, c.cli) }

// harness is a demuxer with a real names table and a real saver writing to
// a temporary directory.
type harness struct {
	t     *testing.T
	d     *Demuxer
	names *names.Table
	sv    *saver.Saver
	lim   *Limits
}

func newHarness(t *testing.T, mod func(*Options)) *harness {
	sv, err := saver.New(saver.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, names: names.New(nil), sv: sv, lim: &Limits{}}
	t.Cleanup(func() { sv.Wait(); sv.PublishIndex(time.Time{}) }) // before the directory's removal
	o := Options{LinkType: packet.LinkTypeEthernet, MaxHeaderSize: 256,
		CaptureDuration: 30 * time.Second, FlowTimeout: 30 * time.Second, UUIDWait: 5 * time.Second,
		Names: h.names, Writer: WriterFunc(func(u string, lt packet.LinkType, first time.Time) FlowWriter { return sv.Start(u, lt, first) }), Limits: h.lim}
	if mod != nil {
		mod(&o)
	}
	h.d = New(o)
	return h
}

func (h *harness) packet(at time.Duration, b []byte) { h.d.Packet(b, t0.Add(at), len(b)) }
func (h *harness) tick(at time.Duration)             { h.d.Tick(t0.Add(at)) }
func (h *harness) open(at time.Duration, uuid string, c *conn) {
	h.names.Open(t0.Add(at), uuid, c.key(), "test", 0)
}

// file reads a saved flow back with gopacket; nil if there is none.
func (h *harness) file(uuid string) [][]byte {
	h.sv.Wait()
	f, err := os.Open(h.sv.Path(uuid, t0))
	if err != nil {
		return nil
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		h.t.Fatal(err)
	}
	var out [][]byte
	for {
		data, _, err := r.ReadPacketData()
		if err == io.EOF {
			return out
		}
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, data)
	}
}

func (h *harness) files() int {
	h.sv.Wait()
	n := 0
	filepath.Walk(h.sv.Dir(), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && filepath.Ext(p) == ".pcap" {
			n++
		}
		return nil
	})
	return n
}

const ms = time.Millisecond

func TestOpenBeforeAndAfterFirstPacket(t *testing.T) {
	for _, stream := range []bool{false, true} {
		h := newHarness(t, func(o *Options) { o.Stream = stream })
		a, b := newConn(1000, 1), newConn(2000, 2)
		h.open(0, "early", a)
		h.packet(1*ms, a.syn(t))
		h.packet(2*ms, b.syn(t))
		h.packet(3*ms, a.synack(t))
		h.packet(4*ms, b.synack(t))
		h.tick(100 * ms)
		h.open(150*ms, "late", b)
		h.packet(200*ms, a.data(t, true, 100))
		h.packet(201*ms, b.data(t, true, 100))
		h.tick(300 * ms)
		h.d.Close()
		for uuid, want := range map[string]int{"early": 3, "late": 3} {
			got := h.file(uuid)
			if len(got) != want {
				t.Errorf("stream=%v: %s: %d packets, want %d", stream, uuid, len(got), want)
			}
			for i, p := range got {
				if len(p) != 54 {
					t.Errorf("stream=%v: %s packet %d: %d bytes, want the 54 header bytes", stream, uuid, i, len(p))
				}
			}
		}
	}
}

func TestNoUUIDIsDiscarded(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, nil)
	c := newConn(1000, 1)
	before := float64(h.d.Stats().Packets.Get("no_uuid"))
	h.packet(0, c.syn(t))
	h.packet(1*ms, c.synack(t))
	h.packet(2*ms, c.data(t, true, 0)) // the handshake's ACK: not half-open
	h.tick(4 * time.Second)
	if h.d.flows[c.key()].st != waiting {
		t.Fatal("flow given up before -uuidwaitduration")
	}
	h.tick(5 * time.Second)
	h.packet(5100*ms, c.data(t, true, 10))
	h.open(5200*ms, "too-late", c)
	h.tick(5300 * ms)
	h.d.Close()
	if h.files() != 0 {
		t.Error("a file was written for a flow named after -uuidwaitduration")
	}
	if got := float64(h.d.Stats().Packets.Get("no_uuid")) - before; got != 4 {
		t.Errorf("%v packets counted as no_uuid, want 4", got)
	}
}

func TestNewSYNStartsNewFlow(t *testing.T) {
	h := newHarness(t, nil)
	c1 := newConn(1000, 111)
	c2 := newConn(1000, 222) // the same 4-tuple, another connection
	h.open(0, "first", c1)
	h.packet(1*ms, c1.syn(t))
	h.packet(2*ms, c1.synack(t))
	h.packet(3*ms, c1.fin(t, true))
	h.packet(4*ms, c1.fin(t, false))
	h.packet(5*ms, c1.ack(t, true))
	h.packet(10*ms, c1.syn(t)) // a retransmitted SYN of the first connection...
	h.packet(20*ms, c2.syn(t)) // ...and the SYN of the next one, within the linger
	h.packet(21*ms, c2.synack(t))
	h.open(30*ms, "second", c2)
	h.tick(100 * ms)
	h.packet(200*ms, c2.data(t, true, 5))
	h.d.Close()
	if got := len(h.file("first")); got != 6 {
		t.Errorf("first connection: %d packets, want 6", got)
	}
	if got := len(h.file("second")); got != 3 {
		t.Errorf("second connection: %d packets, want 3", got)
	}
}

func TestCaptureDuration(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, func(o *Options) { o.CaptureDuration = time.Second; o.UUIDWait = time.Second })
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(0, c.syn(t))
	h.packet(500*ms, c.data(t, true, 10))
	h.packet(1000*ms, c.data(t, true, 10)) // exactly at the limit: kept
	before := float64(h.d.Stats().Packets.Get("after_captureduration"))
	h.packet(1001*ms, c.data(t, true, 10))
	if got := len(h.file("u")); got != 3 {
		t.Errorf("%d packets saved, want the 3 within -captureduration (the file finished at once)", got)
	}
	h.packet(1500*ms, c.data(t, false, 10))
	h.tick(2 * time.Second)
	h.d.Close()
	if got := float64(h.d.Stats().Packets.Get("after_captureduration")) - before; got != 2 {
		t.Errorf("%v packets counted after captureduration, want 2", got)
	}
}

func TestQuietFlowFinishedByClock(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.CaptureDuration = time.Second; o.UUIDWait = time.Second })
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(0, c.syn(t))
	h.tick(1500 * ms) // within the allowance for late packets
	h.packet(900*ms, c.data(t, true, 10))
	h.tick(1000*ms + LateAllowance + 100*ms)
	if got := len(h.file("u")); got != 2 {
		t.Errorf("%d packets saved, want 2", got)
	}
	h.d.Close()
}

func TestFlowEnds(t *testing.T) {
	tests := []struct {
		name string
		run  func(h *harness, c *conn)
	}{
		{"after both FINs and the linger", func(h *harness, c *conn) {
			h.packet(10*ms, c.fin(t, true))
			h.packet(11*ms, c.fin(t, false))
			h.packet(12*ms, c.ack(t, true))
			h.tick(1100 * ms)
		}},
		{"after an RST and the linger", func(h *harness, c *conn) {
			h.packet(10*ms, c.frame(t, true, func(p *layers.TCP) { p.RST = true }, 0))
			h.tick(1100 * ms)
		}},
		{"after a Close event and the linger", func(h *harness, c *conn) {
			h.names.Close(t0.Add(20*ms), "u")
			h.tick(100 * ms)
			h.tick(1200 * ms)
		}},
		{"after -flowtimeout", func(h *harness, c *conn) {
			h.tick(31 * time.Second)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			c := newConn(1000, 1)
			h.open(0, "u", c)
			h.packet(0, c.syn(t))
			h.packet(1*ms, c.synack(t))
			tt.run(h, c)
			if h.d.Flows() != 0 || h.lim.Active() != 0 {
				t.Errorf("%d flows still tracked (%d active)", h.d.Flows(), h.lim.Active())
			}
			if h.file("u") == nil {
				t.Error("no file written when the flow ended")
			}
		})
	}
}

func TestRepeatedOpenChangesNothing(t *testing.T) {
	h := newHarness(t, nil)
	c := newConn(1000, 1)
	h.open(0, "u", c)
	h.packet(1*ms, c.syn(t))
	h.open(50*ms, "u", c) // tcp-info restarted
	h.tick(100 * ms)
	h.packet(150*ms, c.synack(t))
	h.d.Close()
	if h.files() != 1 || len(h.file("u")) != 2 {
		t.Errorf("%d files, %d packets in u; want 1 file with 2 packets", h.files(), len(h.file("u")))
	}
}

func TestMaxFlows(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, func(o *Options) { o.Limits = &Limits{MaxFlows: 1} })
	a, b := newConn(1000, 1), newConn(2000, 2)
	h.open(0, "a", a)
	h.open(0, "b", b)
	refused := float64(h.d.Stats().Refused.Get("flow_limit"))
	h.packet(1*ms, a.syn(t))
	h.packet(2*ms, b.syn(t))
	h.packet(3*ms, a.synack(t))
	h.packet(4*ms, b.synack(t))
	h.tick(100 * ms)
	if got := float64(h.d.Stats().Refused.Get("flow_limit")) - refused; got != 1 {
		t.Errorf("%v flows refused, want 1", got)
	}
	h.d.Close()
	if len(h.file("a")) != 2 || h.file("b") != nil {
		t.Error("the first flow must be saved whole and the second not at all")
	}
}

func TestMemoryLimit(t *testing.T) {
	h := newHarness(t, nil)
	a := newConn(1000, 1)
	h.lim.SetOverMemory(true)
	h.open(0, "a", a)
	h.packet(1*ms, a.syn(t))
	h.lim.SetOverMemory(false)
	h.packet(2*ms, a.synack(t)) // the flow starts only now
	h.d.Close()
	if got := len(h.file("a")); got != 1 {
		t.Errorf("%d packets saved, want 1", got)
	}
}

func TestShutdown(t *testing.T) {
	h := newHarness(t, nil)
	named, unnamed := newConn(1000, 1), newConn(2000, 2)
	h.packet(1*ms, named.syn(t))
	h.packet(2*ms, unnamed.syn(t))
	h.open(3*ms, "named", named) // arrives after the last tick: Close claims it
	h.d.Close()
	if h.files() != 1 || len(h.file("named")) != 1 {
		t.Error("at shutdown, exactly the named flow must be saved")
	}
	if h.lim.Active() != 0 {
		t.Errorf("%d flows still active", h.lim.Active())
	}
}

func TestUndecodableCounted(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, nil)
	before := float64(h.d.Stats().Undecodable.Get("truncated"))
	h.packet(0, []byte{1, 2, 3})
	h.tick(time.Second)
	if got := float64(h.d.Stats().Undecodable.Get("truncated")) - before; got != 1 {
		t.Errorf("%v truncated frames counted, want 1", got)
	}
}

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

// TestSweep: with many more flows than SweepPerTick, each tick visits a
// tenth of the waiting flows and a tenth of the others, and every flow still
// meets its deadline within a sweep (a second, plus what the flows ended
// meanwhile took); a lone waiting flow is visited at every tick.
func TestSweep(t *testing.T) {
	const n = 12500 // 1,250 visited per tick
	h := newHarness(t, func(o *Options) { o.FlowTimeout = 10 * time.Second })
	for i := 0; i < n; i++ {
		c := newConn(uint16(1000+i), 1)
		c.cli = netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), c.cli.Port())
		h.packet(time.Duration(i)*time.Microsecond, c.syn(t))
		h.packet(time.Duration(i)*time.Microsecond, c.data(t, true, 0)) // not half-open: kept until its timeout
	}
	if len(h.d.waiting) != n {
		t.Fatalf("%d flows waiting for a UUID, want %d", len(h.d.waiting), n)
	}
	// Past their UUID deadline, they are discarded a tenth per tick.
	for at := 5*time.Second + TickInterval; at <= 6*time.Second+2*TickInterval; at += TickInterval {
		before := len(h.d.waiting)
		h.tick(at)
		if d := before - len(h.d.waiting); d > (n+9)/10 {
			t.Fatalf("tick at %v discarded %d flows, more than a tenth", at, d)
		}
	}
	late := newConn(9, 1) // waiting for its UUID when the others end
	h.packet(9*time.Second, late.syn(t))
	if h.d.Flows() != n+1 || len(h.d.waiting) != 1 || len(h.d.settled) != n {
		t.Fatalf("%d flows, %d waiting, %d settled", h.d.Flows(), len(h.d.waiting), len(h.d.settled))
	}
	// The idle deadline is at 10 s: none ends before it, no tick ends more
	// than a tenth of them, and all have ended a sweep (a second, plus the
	// ticks the flows ended meanwhile took) later.
	var ended []int
	for at := 9900 * time.Millisecond; at <= 11500*time.Millisecond; at += TickInterval {
		before := h.d.Flows()
		h.tick(at)
		if at == 10*time.Second+TickInterval {
			h.open(at, "late", late) // named at the next tick
		}
		ended = append(ended, before-h.d.Flows())
	}
	if ended[0] != 0 {
		t.Errorf("%d flows ended before their deadline", ended[0])
	}
	for i, e := range ended[1:] {
		if e > (n+9)/10 {
			t.Errorf("tick %d ended %d flows, more than a tenth", i+1, e)
		}
	}
	if h.d.Flows() != 1 || len(h.d.waiting) != 0 || len(h.d.settled) != 1 {
		t.Errorf("at 11.5 s: %d flows (%d waiting, %d settled), want only the late one, named", h.d.Flows(), len(h.d.waiting), len(h.d.settled))
	}
	h.d.Close()
	if got := len(h.file("late")); got != 1 {
		t.Errorf("the late flow's file has %d packets, want its SYN", got)
	}
}

// TestSweepQuota: a round visits a tenth of its list per tick (at least
// SweepPerTick), keeps its pace while the list shrinks, and speeds up at
// once when the list grows (a flood begins in the middle of a round).
func TestSweepQuota(t *testing.T) {
	var s sweep
	steps := []struct{ n, want int }{
		{10, SweepPerTick}, {50000, 5000}, {20000, 5000}, {200000, 20000},
	}
	for _, st := range steps {
		if got := s.quota(st.n); got != st.want {
			t.Errorf("quota(%d) = %d, want %d", st.n, got, st.want)
		}
	}
	s.restart(20000)
	if got := s.quota(20000); got != 2000 || s.cursor != 0 {
		t.Errorf("after a restart: quota %d, cursor %d", got, s.cursor)
	}
}

// TestSpill: in buffer mode, a long named flow is handed to the saver
// SpillBytes at a time, so that it never holds much more, while an unnamed
// one keeps everything until it is named; the file has every packet, in
// order.
func TestSpill(t *testing.T) {
	h := newHarness(t, nil)
	c := newConn(5000, 1)
	const n = 3 * SpillBytes / 70 // records of 16+54 bytes: three spills
	frame := func(i int) []byte {
		return c.frame(t, true, func(p *layers.TCP) { p.ACK, p.Seq = true, uint32(i) }, 10)
	}
	at := func(i int) time.Duration { return time.Duration(i) * time.Millisecond }
	for i := 0; i < n/2; i++ { // before the UUID: all held
		h.packet(at(i), frame(i))
	}
	f := h.d.flows[c.key()]
	if got := f.buf.Bytes(); got < SpillBytes {
		t.Fatalf("an unnamed flow holds %d bytes, want all %d records (no spill before its UUID)", got, n/2)
	}
	h.open(at(n/2), "long", c)
	h.tick(at(n / 2))
	if f.out == nil || f.buf.Bytes() >= record.ChunkSize {
		t.Fatalf("once named, the flow holds %d bytes (writer started: %v); want its full chunks handed over", f.buf.Bytes(), f.out != nil)
	}
	for i := n / 2; i < n; i++ {
		h.packet(at(i), frame(i))
		if got := f.buf.Bytes(); got >= SpillBytes+record.ChunkSize {
			t.Fatalf("packet %d: the named flow holds %d bytes, more than SpillBytes and a chunk", i, got)
		}
	}
	h.d.Close()
	got := h.file("long")
	if len(got) != n {
		t.Fatalf("the file has %d packets, want %d", len(got), n)
	}
	for i, p := range got {
		var tcp layers.TCP
		if err := tcp.DecodeFromBytes(p[34:], gopacket.NilDecodeFeedback); err != nil || tcp.Seq != uint32(i) {
			t.Fatalf("packet %d of the file: seq %d (%v), want %d", i, tcp.Seq, err, i)
		}
	}
}

// TestEndedFlowForgotten: once a flow has ended, a packet of its 4-tuple
// starts a new flow (the previous packet's flow is not reused).
func TestEndedFlowForgotten(t *testing.T) {
	h := newHarness(t, nil)
	c := newConn(7000, 1)
	h.open(0, "first", c)
	h.packet(0, c.syn(t))
	h.packet(time.Millisecond, c.synack(t))
	h.tick(31 * time.Second) // idle past -flowtimeout: ended
	if h.d.Flows() != 0 {
		t.Fatalf("%d flows after the timeout", h.d.Flows())
	}
	h.packet(32*time.Second, c.data(t, true, 10))
	if h.d.Flows() != 1 || h.d.Counts().Flows != 2 {
		t.Errorf("%d flows tracked, %d started; want the late packet to start a second flow", h.d.Flows(), h.d.Counts().Flows)
	}
	if got := len(h.file("first")); got != 2 {
		t.Errorf("the first flow's file has %d packets, want its 2", got)
	}
}

// TestMaxHeapAtTick: with Limits.MaxHeap set, each Tick compares the heap
// with it: below, flows start; above, they are refused until a Tick finds
// the heap below again.
func TestMaxHeapAtTick(t *testing.T) {
	h := newHarness(t, nil)
	a, b := newConn(1000, 1), newConn(1001, 1)
	h.lim.MaxHeap = 1 << 50
	h.tick(0)
	h.packet(1*ms, a.syn(t))
	h.lim.MaxHeap = 1 // any heap is over it
	h.tick(100 * ms)
	h.packet(101*ms, b.syn(t))
	if h.d.Flows() != 1 || h.d.Counts().MemoryLimit != 1 {
		t.Errorf("%d flows, %d packets refused for memory; want the first flow alone", h.d.Flows(), h.d.Counts().MemoryLimit)
	}
	h.lim.MaxHeap = 1 << 50
	h.tick(200 * ms)
	h.packet(201*ms, b.syn(t))
	if h.d.Flows() != 2 {
		t.Errorf("%d flows once the heap is below the limit again, want 2", h.d.Flows())
	}
}

// TestInjectedSegments: on an established connection, segments that its
// receiver would drop or answer with a challenge ACK (RFC 5961), sent as
// either end, are kept in the flow's file and neither end it (after the
// linger) nor split it; the connection's later packets land in the same
// file. The exact RST ends it.
func TestInjectedSegments(t *testing.T) {
	tests := []struct {
		name       string
		fromClient bool
		mod        func(p *layers.TCP, next uint32)
		ends       bool
	}{
		{"RST in window, client", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+500 }, false},
		{"RST in window, server", false, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+500 }, false},
		{"RST far out of window", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+1<<31 }, false},
		{"RST just before", false, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n-10 }, false},
		{"RST with ACK in window", true, func(p *layers.TCP, n uint32) { p.RST, p.ACK, p.Seq = true, true, n+1 }, false},
		{"SYN with a fresh ISN, client", true, func(p *layers.TCP, n uint32) { p.SYN, p.Seq = true, 999999 }, false},
		{"SYN with a fresh ISN, server", false, func(p *layers.TCP, n uint32) { p.SYN, p.Seq = true, 999999 }, false},
		{"SYN-ACK, server", false, func(p *layers.TCP, n uint32) { p.SYN, p.ACK, p.Seq = true, true, 5 }, false},
		{"FIN far out of window", true, func(p *layers.TCP, n uint32) { p.FIN, p.ACK, p.Seq = true, true, n+1<<30 }, false},
		{"FIN ahead of a gap", false, func(p *layers.TCP, n uint32) { p.FIN, p.ACK, p.Seq = true, true, n+300 }, false},
		{"data far out of window", true, func(p *layers.TCP, n uint32) { p.ACK, p.Seq = true, n+1<<31 }, false},
		{"the exact RST, client", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n }, true},
		{"the exact RST, server", false, func(p *layers.TCP, n uint32) { p.RST, p.ACK, p.Seq = true, true, n }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			c := newConn(1000, 1)
			h.open(0, "u", c)
			h.packet(0, c.syn(t))
			h.packet(1*ms, c.synack(t))
			h.packet(2*ms, c.ack(t, true))
			h.packet(3*ms, c.data(t, true, 100))
			h.packet(4*ms, c.data(t, false, 200))
			side := 0
			if !tt.fromClient {
				side = 1
			}
			spoof := *c // the injector's numbers, not the connection's
			injected := spoof.frame(t, tt.fromClient, func(p *layers.TCP) { tt.mod(p, c.next[side]) }, 0)
			h.packet(10*ms, injected)
			h.tick(1500 * ms) // past the linger
			if tt.ends {
				if h.d.Flows() != 0 {
					t.Fatal("the exact RST did not end the flow")
				}
				if got := len(h.file("u")); got != 6 {
					t.Errorf("%d packets in the file, want 6", got)
				}
				return
			}
			h.packet(1600*ms, c.data(t, true, 100))
			h.packet(1700*ms, c.fin(t, true))
			h.packet(1701*ms, c.fin(t, false))
			h.packet(1702*ms, c.ack(t, true))
			h.tick(1800 * ms)
			if h.d.Flows() != 1 {
				t.Errorf("%d flows after the connection's last packets, want its one", h.d.Flows())
			}
			h.tick(3 * time.Second) // the linger after the real FINs
			if h.d.Flows() != 0 {
				t.Error("the real FINs did not end the flow")
			}
			got := h.file("u")
			if len(got) != 10 {
				t.Fatalf("%d packets in the file, want all 10, the injected one included", len(got))
			}
			if string(got[5]) != string(injected[:min(len(injected), len(got[5]))]) {
				t.Error("the injected packet is not the file's sixth")
			}
		})
	}
}

// TestPortReuseAfterRST: a connection reset at the exact sequence number,
// then a new one on the same 4-tuple, each in its own file.
func TestPortReuseAfterRST(t *testing.T) {
	h := newHarness(t, nil)
	c1, c2 := newConn(1000, 111), newConn(1000, 90000)
	h.open(0, "first", c1)
	h.packet(1*ms, c1.syn(t))
	h.packet(2*ms, c1.synack(t))
	h.packet(3*ms, c1.ack(t, true))
	h.packet(4*ms, c1.frame(t, false, func(p *layers.TCP) { p.RST = true }, 0))
	h.packet(20*ms, c2.syn(t)) // within the linger
	h.open(21*ms, "second", c2)
	h.packet(22*ms, c2.synack(t))
	h.packet(23*ms, c2.ack(t, true))
	h.d.Close()
	if a, b := len(h.file("first")), len(h.file("second")); a != 4 || b != 3 {
		t.Errorf("first %d packets (want 4), second %d (want 3)", a, b)
	}
}

// TestDeadlinesBeforePackets: a packet that comes after its flow's
// -flowtimeout, or after the linger of its FINs, with no tick between
// (offline mode, or a busy capture), starts a new flow, as it would have
// if a tick had come at the deadline: the old file holds none of it.
func TestDeadlinesBeforePackets(t *testing.T) {
	for _, linger := range []bool{false, true} {
		h := newHarness(t, func(o *Options) { o.FlowTimeout = 5 * time.Second })
		c := newConn(1000, 1)
		h.open(0, "u", c)
		h.packet(0, c.syn(t))
		h.packet(1*ms, c.synack(t))
		h.packet(2*ms, c.ack(t, true))
		at := 6 * time.Second // past the flow timeout
		if linger {
			h.packet(3*ms, c.fin(t, true))
			h.packet(4*ms, c.fin(t, false))
			at = 1500 * ms // past the linger, within the timeout
		}
		h.packet(at, c.data(t, true, 10))
		if got := len(h.file("u")); got != 3+2*btoi(linger) {
			t.Errorf("linger %v: the old flow's file has %d packets, want %d", linger, got, 3+2*btoi(linger))
		}
		if h.d.Flows() != 1 {
			t.Errorf("linger %v: %d flows, want the new one", linger, h.d.Flows())
		}
		h.d.Close()
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestMaxFlowsAcrossDemuxers: demuxers that start flows at once on two
// goroutines never track more than -maxflows together.
func TestMaxFlowsAcrossDemuxers(t *testing.T) {
	lim := &Limits{MaxFlows: 50}
	var ds [4]*Demuxer
	frames := make([][][]byte, len(ds))
	for i := range ds {
		h := newHarness(t, func(o *Options) { o.Limits = lim })
		ds[i] = h.d
		for j := 0; j < 200; j++ {
			frames[i] = append(frames[i], newConn(uint16(1+i*1000+j), 1).syn(t))
		}
	}
	done := make(chan struct{})
	for i := range ds {
		go func() {
			defer func() { done <- struct{}{} }()
			for _, f := range frames[i] {
				ds[i].Packet(f, t0, len(f))
			}
		}()
	}
	for range ds {
		<-done
	}
	total := 0
	for _, d := range ds {
		total += d.Flows()
	}
	if total != 50 || lim.Active() != 50 {
		t.Errorf("%d flows tracked (%d active), want exactly -maxflows 50", total, lim.Active())
	}
}

// TestRenamedFlow: a flow named by one source, then renamed by the
// authority (in buffer mode before its writer starts, in stream mode
// after), is published under the authority's name only.
func TestRenamedFlow(t *testing.T) {
	for _, stream := range []bool{false, true} {
		tb := names.New(&names.Options{Authority: "eventsocket"})
		h := newHarness(t, func(o *Options) { o.Stream = stream; o.Names = tb })
		h.names = tb
		c := newConn(1000, 1)
		tb.Open(t0, "kernel-name", c.key(), "kernel", 42)
		h.packet(0, c.syn(t))
		h.packet(1*ms, c.synack(t))
		tb.Open(t0.Add(2*ms), "tcpinfo-name", c.key(), "eventsocket", 42)
		h.packet(3*ms, c.ack(t, true))
		h.d.Close()
		if h.file("kernel-name") != nil || len(h.file("tcpinfo-name")) != 3 {
			t.Errorf("stream %v: kernel's file %v, tcp-info's %d packets", stream, h.file("kernel-name") != nil, len(h.file("tcpinfo-name")))
		}
	}
}

// TestSplitClaimsLastChance: a connection so short that no tick came
// between its name's arrival and a new connection on its 4-tuple (a
// loaded machine, or traffic that stopped: the next tick may be a second
// away) is named when the new SYN ends it, not dropped; so is a flow whose
// timeout a packet applies.
func TestSplitClaimsLastChance(t *testing.T) {
	h := newHarness(t, nil)
	c1, c2 := newConn(1000, 111), newConn(1000, 90000)
	h.packet(0, c1.syn(t))
	h.packet(1*ms, c1.synack(t))
	h.packet(2*ms, c1.ack(t, true))
	h.packet(3*ms, c1.fin(t, false))
	h.packet(4*ms, c1.fin(t, true))
	h.packet(5*ms, c1.ack(t, false))
	h.open(6*ms, "first", c1) // the kernel's name, with no tick since
	h.packet(200*ms, c2.syn(t))
	h.open(201*ms, "second", c2)
	h.packet(202*ms, c2.synack(t))
	h.d.Close()
	if a, b := len(h.file("first")), len(h.file("second")); a != 6 || b != 2 {
		t.Errorf("first %d packets (want 6), second %d (want 2)", a, b)
	}

	h = newHarness(t, func(o *Options) { o.FlowTimeout = time.Second })
	c := newConn(2000, 1)
	h.packet(0, c.syn(t))
	h.open(1*ms, "timed-out", c)
	h.packet(2*time.Second, c.data(t, true, 10)) // past the timeout, before any tick
	h.d.Close()
	if got := len(h.file("timed-out")); got != 1 {
		t.Errorf("the timed-out flow: %d packets, want its SYN", got)
	}
}

// TestHalfOpenEvicted: at -maxflows, a flood of half-open flows cannot keep
// a connection out: its SYN takes the place of the oldest half-open flow,
// and once its handshake completes the flood cannot evict it; established
// flows are never evicted (a new flow is refused instead); an unnamed
// half-open flow is forgotten at its UUID deadline.
func TestHalfOpenEvicted(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, func(o *Options) { o.Limits = &Limits{MaxFlows: 10} })
	spoofed := func(i int) *conn {
		c := newConn(uint16(20000+i), 1)
		c.cli = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), c.cli.Port())
		return c
	}
	at := time.Duration(0)
	for i := 0; i < 10; i++ {
		at += ms
		h.packet(at, spoofed(i).syn(t))
	}
	legit := newConn(1000, 1)
	for _, b := range [][]byte{legit.syn(t), legit.synack(t), legit.ack(t, true)} {
		at += ms
		h.packet(at, b)
	}
	for i := 10; i < 40; i++ {
		at += ms
		h.packet(at, spoofed(i).syn(t))
	}
	h.open(at, "legit", legit)
	h.tick(at + ms)
	if f := h.d.flows[legit.key()]; f == nil || f.st != named {
		t.Fatal("the connection was kept out by the flood")
	}
	if got := h.d.Stats().Ended.Get("evicted"); got != 31 {
		t.Errorf("%d flows evicted, want 31 (one for the connection, 30 for the flood)", got)
	}
	if got := h.d.Stats().Refused.Get("flow_limit"); got != 0 {
		t.Errorf("%d flows refused, want none while half-open flows can be evicted", got)
	}
	// Established flows are not evicted: with the table full of them, a
	// new flow is refused.
	h2 := newHarness(t, func(o *Options) { o.Limits = &Limits{MaxFlows: 3} })
	for i := 0; i < 3; i++ {
		c := newConn(uint16(3000+i), 1)
		h2.packet(ms, c.syn(t))
		h2.packet(2*ms, c.synack(t))
		h2.packet(3*ms, c.ack(t, true))
	}
	h2.packet(4*ms, spoofed(99).syn(t))
	h2.tick(5 * ms)
	if h2.d.Flows() != 3 || h2.d.Stats().Refused.Get("flow_limit") != 1 || h2.d.Stats().Ended.Get("evicted") != 0 {
		t.Errorf("%d flows, %d refused, %d evicted: want the 3 established kept and the SYN refused",
			h2.d.Flows(), h2.d.Stats().Refused.Get("flow_limit"), h2.d.Stats().Ended.Get("evicted"))
	}
	// Past the UUID deadline the flood's flows are forgotten.
	h.tick(at + 5*time.Second + 2*ms)
	h.tick(at + 5*time.Second + 2*ms + time.Second)
	if n := h.d.Flows(); n != 1 {
		t.Errorf("%d flows after the flood's UUID deadline, want the connection alone", n)
	}
	h.d.Close()
	if got := h.file("legit"); len(got) != 3 {
		t.Errorf("the connection's file has %d packets, want its whole handshake", len(got))
	}
}

// fakeCapture is a capture whose packets are stamped by a fake wall
// clock, which a script advances, with the monotonic clock beside it, and
// steps.
type fakeCapture struct {
	steps      []fakeStep
	i          int
	wall, mono int64
}

type fakeStep struct {
	advance time.Duration // both clocks
	jump    time.Duration // the wall clock alone, first
	frame   []byte        // nil: a read that times out
}

func (c *fakeCapture) Read() ([]byte, time.Time, int, error) {
	if c.i >= len(c.steps) {
		return nil, time.Time{}, 0, net.ErrClosed
	}
	s := c.steps[c.i]
	c.i++
	c.wall += int64(s.jump + s.advance)
	c.mono += int64(s.advance)
	if s.frame == nil {
		return nil, time.Time{}, 0, os.ErrDeadlineExceeded
	}
	return s.frame, time.Unix(0, c.wall), len(s.frame), nil
}

// TestClockSteps: a step of the wall clock, back or forward by an hour, in
// the middle of a capture changes no flow's fate: the named connection
// stays one file with every packet, the unnamed one meets its UUID
// deadline on time (a step back stopped every deadline for the step's
// length), and the step is counted.
func TestClockSteps(t *testing.T) {
	for _, jump := range []time.Duration{-time.Hour, time.Hour} {
		h := newHarness(t, nil)
		capt := &fakeCapture{wall: t0.UnixNano()}
		h.d.o.Monotonic = func() time.Duration { return time.Duration(capt.mono) }
		a, b := newConn(1000, 1), newConn(2000, 2)
		h.open(0, "a", a)
		var steps []fakeStep
		add := func(advance time.Duration, frame []byte) {
			steps = append(steps, fakeStep{advance: advance, frame: frame})
		}
		for _, c := range []*conn{a, b} {
			add(ms, c.syn(t))
			add(ms, c.synack(t))
			add(ms, c.ack(t, true))
		}
		packets := 3
		for i := 0; i < 70; i++ { // 7 s of a's data, the step at 2 s
			if i == 20 {
				steps = append(steps, fakeStep{jump: jump})
			}
			add(100*ms, a.data(t, true, 10))
			packets++
		}
		for i := 0; i < 10; i++ {
			add(100*ms, nil)
		}
		capt.steps = steps
		stepsBefore := h.d.Stats().ClockSteps.Load()
		h.d.Run(capt, func() time.Time { return time.Unix(0, capt.wall) }, func(err error) { t.Error(err) })
		if got := h.d.Stats().Ended.Get("uuid_timeout"); got != 1 {
			t.Errorf("step %v: %d flows ended at their UUID deadline, want the unnamed one", jump, got)
		}
		if got := h.d.Stats().ClockSteps.Load() - stepsBefore; got != 1 {
			t.Errorf("step %v: %d steps counted, want 1", jump, got)
		}
		if got := len(h.file("a")); got != packets {
			t.Errorf("step %v: the named connection's file has %d packets, want %d", jump, got, packets)
		}
	}
}
