package demuxer

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/selection"
)

func TestMaxFlows(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, func(o *Options) { o.Limits = &Limits{MaxFlows: 1} })
	a, b := newConn(1000, 1), newConn(2000, 2)
	h.open(0, "a", a)
	h.open(0, "b", b)
	refused := float64(h.d.Stats().Refused[RefusedFlowLimit].Load())
	h.packet(1*ms, a.syn(t))
	h.packet(2*ms, b.syn(t))
	h.packet(3*ms, a.synack(t))
	h.packet(4*ms, b.synack(t))
	h.tick(100 * ms)
	if got := float64(h.d.Stats().Refused[RefusedFlowLimit].Load()) - refused; got != 1 {
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
	if h.d.Flows() != 1 || h.d.Counts().Packets[MemoryLimit] != 1 {
		t.Errorf("%d flows, %d packets refused for memory; want the first flow alone", h.d.Flows(), h.d.Counts().Packets[MemoryLimit])
	}
	h.lim.MaxHeap = 1 << 50
	h.tick(200 * ms)
	h.packet(201*ms, b.syn(t))
	if h.d.Flows() != 2 {
		t.Errorf("%d flows once the heap is below the limit again, want 2", h.d.Flows())
	}
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
	if got := h.d.Stats().Ended[EndedEvicted].Load(); got != 31 {
		t.Errorf("%d flows evicted, want 31 (one for the connection, 30 for the flood)", got)
	}
	if got := h.d.Stats().Refused[RefusedFlowLimit].Load(); got != 0 {
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
	if h2.d.Flows() != 3 || h2.d.Stats().Refused[RefusedFlowLimit].Load() != 1 || h2.d.Stats().Ended[EndedEvicted].Load() != 0 {
		t.Errorf("%d flows, %d refused, %d evicted: want the 3 established kept and the SYN refused",
			h2.d.Flows(), h2.d.Stats().Refused[RefusedFlowLimit].Load(), h2.d.Stats().Ended[EndedEvicted].Load())
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

// TestSpoofedACKsEvictable: a bare ACK (or a handshake whose ACK numbers do
// not answer each other) is no evidence of a connection. At -maxflows, a
// flood of spoofed ACKs to a service port takes no place a connection
// needs: each such flow is evictable as a SYN-only one, and forgotten at
// its UUID deadline rather than held until its timeout; a handshake seen
// whole makes its flow established, one with a wrong acknowledgment does
// not.
func TestSpoofedACKsEvictable(t *testing.T) {
	t.Parallel() // its counts are its demuxer's own
	h := newHarness(t, func(o *Options) { o.Limits = &Limits{MaxFlows: 10} })
	spoofed := func(i int) *conn {
		c := newConn(uint16(20000+i), uint32(7919*i))
		c.cli = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), c.cli.Port())
		return c
	}
	at := time.Duration(0)
	for i := 0; i < 10; i++ {
		at += ms
		h.packet(at, spoofed(i).ack(t, true))
	}
	legit := newConn(1000, 1)
	for _, b := range [][]byte{legit.syn(t), legit.synack(t), legit.ack(t, true)} {
		at += ms
		h.packet(at, b)
	}
	// A SYN and the server's SYN-ACK, then an ACK that does not
	// acknowledge the SYN-ACK (a blind attacker cannot know its number).
	blind := spoofed(500)
	at += ms
	h.packet(at, blind.syn(t))
	at += ms
	h.packet(at, blind.synack(t))
	at += ms
	h.packet(at, blind.frame(t, true, func(p *layers.TCP) { p.ACK, p.Ack = true, srvISN+7 }, 0))
	if f := h.d.flows[blind.key()]; f == nil || f.established() {
		t.Fatal("a handshake whose ACK does not answer the SYN-ACK made its flow established")
	}
	for i := 10; i < 40; i++ {
		at += ms
		h.packet(at, spoofed(i).ack(t, true))
	}
	if f := h.d.flows[legit.key()]; f == nil || !f.established() {
		t.Fatal("the connection was evicted by spoofed ACKs")
	}
	h.open(at, "legit", legit)
	h.tick(at + ms) // publishes the counts
	if got := h.d.Stats().Refused[RefusedFlowLimit].Load(); got != 0 {
		t.Errorf("%d flows refused, want none while the spoofed ACKs' flows can be evicted", got)
	}
	if got := h.d.Stats().Ended[EndedEvicted].Load(); got != 32 {
		t.Errorf("%d flows evicted, want 32 (one each for the connection and the blind handshake, 30 for the flood)", got)
	}
	if f := h.d.flows[legit.key()]; f == nil || f.st != named {
		t.Fatal("the connection was not named")
	}
	// At the UUID deadline the spoofed ACKs' flows are forgotten, as a
	// SYN flood's are, not held until their timeout.
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

// TestSpoofedFirstPacket: a blind attacker who spoofs, just before a
// client connects, a packet of the connection that looks like one this
// host opened (a SYN-ACK from the client's address and port, or a SYN
// from the server's) gets that verdict, outgoing, remembered for the
// four-tuple; the client's real SYN, which starts a connection whatever
// came before, is decided again, and the connection is saved whole. A
// spoofed bare ACK from the client, which looks incoming, starts the flow:
// it is in the file, before the connection's own packets.
func TestSpoofedFirstPacket(t *testing.T) {
	for _, spoof := range []string{"SYN-ACK from the client", "SYN from the server", "ACK from the client"} {
		t.Run(spoof, func(t *testing.T) {
			sel := &selection.Policy{Strict: true}
			sel.SetLocal([]netip.Addr{netip.MustParseAddr("192.0.2.1")})
			sel.SetListening(selection.Listeners{netip.MustParseAddrPort("0.0.0.0:443"): {1}})
			h := newHarness(t, func(o *Options) { o.Select = sel.Decide })
			c := newConn(40000, 100)
			forged := newConn(40000, 5555)
			want := 7
			switch spoof {
			case "SYN-ACK from the client":
				h.packet(0, forged.frame(t, true, func(p *layers.TCP) { p.SYN, p.ACK = true, true }, 0))
			case "SYN from the server":
				h.packet(0, forged.frame(t, false, func(p *layers.TCP) { p.SYN = true }, 0))
			default:
				h.packet(0, forged.ack(t, true))
				want = 8
			}
			h.open(50*ms, "real", c)
			for i, f := range [][]byte{c.syn(t), c.synack(t), c.ack(t, true), c.data(t, true, 10), c.fin(t, true), c.fin(t, false), c.ack(t, true)} {
				h.packet(100*ms+time.Duration(i)*ms, f)
			}
			h.tick(40 * time.Second)
			if got := len(h.file("real")); got != want {
				t.Errorf("the real connection's file has %d packets, want %d", got, want)
			}
		})
	}
}
