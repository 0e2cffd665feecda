package demuxer

import (
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

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
	before := float64(h.d.Stats().Packets[NoUUID].Load())
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
	if got := float64(h.d.Stats().Packets[NoUUID].Load()) - before; got != 4 {
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
	before := float64(h.d.Stats().Packets[AfterCaptureDuration].Load())
	h.packet(1001*ms, c.data(t, true, 10))
	if got := len(h.file("u")); got != 3 {
		t.Errorf("%d packets saved, want the 3 within -captureduration (the file finished at once)", got)
	}
	h.packet(1500*ms, c.data(t, false, 10))
	h.tick(2 * time.Second)
	h.d.Close()
	if got := float64(h.d.Stats().Packets[AfterCaptureDuration].Load()) - before; got != 2 {
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
	before := float64(h.d.Stats().Undecodable[packet.Truncated].Load())
	h.packet(0, []byte{1, 2, 3})
	h.tick(time.Second)
	if got := float64(h.d.Stats().Undecodable[packet.Truncated].Load()) - before; got != 1 {
		t.Errorf("%v truncated frames counted, want 1", got)
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
	if h.d.Flows() != 1 || h.d.Counts().Started != 2 {
		t.Errorf("%d flows tracked, %d started; want the late packet to start a second flow", h.d.Flows(), h.d.Counts().Started)
	}
	if got := len(h.file("first")); got != 2 {
		t.Errorf("the first flow's file has %d packets, want its 2", got)
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

// TestSample: a named flow outside the sample writes no file, its packets
// (before and after its naming) are counted as not_sampled; one inside it
// is saved whole.
func TestSample(t *testing.T) {
	for _, stream := range []bool{false, true} {
		h := newHarness(t, func(o *Options) {
			o.Stream = stream
			o.Sample = func(u string) bool { return u == "in" }
		})
		in, out := newConn(1000, 1), newConn(2000, 2)
		h.packet(1*ms, in.syn(t))
		h.packet(2*ms, out.syn(t))
		h.open(3*ms, "in", in)
		h.open(3*ms, "out", out)
		h.tick(100 * ms)
		h.packet(200*ms, in.data(t, true, 100))
		h.packet(201*ms, out.data(t, true, 100))
		h.packet(202*ms, out.data(t, true, 100))
		h.tick(300 * ms)
		h.d.Close()
		if n := len(h.file("in")); n != 2 {
			t.Errorf("stream=%v: the sampled flow has %d packets, want 2", stream, n)
		}
		if h.files() != 1 {
			t.Errorf("stream=%v: %d files, want the sampled flow's alone", stream, h.files())
		}
		s := h.d.Stats()
		if got := s.Packets[NotSampled].Load(); got != 3 {
			t.Errorf("stream=%v: %d packets not sampled, want 3", stream, got)
		}
		if got := s.Ended[EndedNotSampled].Load(); got != 1 {
			t.Errorf("stream=%v: %d flows not sampled, want 1", stream, got)
		}
	}
}
