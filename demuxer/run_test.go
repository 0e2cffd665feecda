package demuxer

import (
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
)

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
		h.packet(time.Duration(i)*time.Microsecond, c.synack(t))
		h.packet(time.Duration(i)*time.Microsecond, c.ack(t, true)) // established: kept until its timeout
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
		if got := h.d.Stats().Ended[EndedUUIDTimeout].Load(); got != 1 {
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
