package demuxer

import (
	"errors"
	"net"
	"os"
	rtmetrics "runtime/metrics"
	"time"

	"github.com/m-lab/packet-headers/index"
)

// Tick names waiting flows, applies the timeouts at time now, and publishes
// the counters. It is called by Run every TickInterval.
func (d *Demuxer) Tick(now time.Time) {
	if l := d.o.Limits; l.MaxHeap > 0 {
		rtmetrics.Read(d.heap)
		l.SetOverMemory(d.heap[0].Value.Uint64() > l.MaxHeap)
	}
	nowN := now.UnixNano()
	d.now = nowN
	d.read(nowN)
	d.waitSweep.visit(&d.waiting, func(f *flow) bool {
		if !d.claim(f) {
			switch {
			case nowN-f.first < int64(d.o.UUIDWait):
				return false // an unnamed flow waits for its UUID deadline
			case !f.established() && d.o.Fallback == nil:
				d.remove(f, index.EndTimeout, nowN) // nothing more will come of it
				return true
			}
			d.nameOrDiscard(f, false)
		}
		d.untrack(f)
		d.track(f)
		d.check(f, nowN)
		return true
	})
	d.sweep.visit(&d.settled, func(f *flow) bool { return d.check(f, nowN) })
	d.trimStarts()
	d.publish()
}

// sweep is a position in a list of flows that Tick goes round.
type sweep struct {
	cursor int // the next flow to visit
	per    int // flows to visit per tick in this round
}

// quota returns how many flows to visit at this tick: SweepPerTick, or a
// tenth of the list as it is or as it was when the round began, whichever
// is larger (so that each flow is visited within about ten ticks, however
// many start or end meanwhile).
func (s *sweep) quota(n int) int {
	s.per = max(s.per, SweepPerTick, (n+9)/10)
	return s.per
}

// visit calls f for this tick's quota of the flows of *l, from the cursor
// on; f reports whether the flow left the list, whose last flow then took
// its place and is visited next.
func (s *sweep) visit(l *[]*flow, f func(*flow) bool) {
	for n := s.quota(len(*l)); n > 0 && len(*l) > 0; n-- {
		if s.cursor >= len(*l) {
			s.restart(len(*l))
		}
		if !f((*l)[s.cursor]) {
			s.cursor++
		}
	}
}

// restart begins a new round over a list of n flows.
func (s *sweep) restart(n int) {
	s.cursor = 0
	s.per = max(SweepPerTick, (n+9)/10)
}

// check applies the deadlines of a flow that has a UUID or never will, and
// reports whether it ended.
func (d *Demuxer) check(f *flow, nowN int64) bool {
	if f.st == named {
		if closed, ok := f.entry.Closed(); ok && f.endAt == 0 {
			f.endAt, f.end = max(closed.UnixNano()+d.corr, nowN)+int64(d.o.Linger), index.EndClose
		}
		// Packets are stamped when captured but may reach the demuxer a
		// ring-block timeout later: a quiet flow is finished by the clock
		// only once its late packets must have come. (A busy flow is
		// finished by its first packet past the duration, in Packet.)
		if nowN-f.first > int64(d.o.CaptureDuration+LateAllowance) {
			d.finish(f)
		}
	}
	if nowN-f.last >= int64(d.o.FlowTimeout) || f.endAt != 0 && nowN >= f.endAt {
		d.remove(f, f.endedOr(index.EndTimeout), nowN)
		return true
	}
	return false
}

// Close ends every flow at shutdown: flows with a UUID (one last claim is
// tried) are handed to the saver, the others are dropped and counted.
func (d *Demuxer) Close() {
	// In the lists' order, not the map's: offline fallback names are made
	// unique in the order flows are named, which must not vary.
	all := append(append(make([]*flow, 0, len(d.flows)), d.waiting...), d.settled...)
	now := d.now
	if d.clock != nil {
		now = max(now, d.readClock())
	}
	d.read(now) // the readings after every flow's last packet
	for _, f := range all {
		d.lastClaim(f, true)
		d.remove(f, f.endedOr(index.EndShutdown), now)
	}
	// Records still waiting: for a reading (their last packet came after
	// the clock's now: the last one will do) or for their sockets'
	// counters (none will come now).
	for i := range d.waitRead {
		if p := &d.waitRead[i]; !p.read && len(d.readings.r) > 0 {
			p.end, p.read = d.readings.at(len(d.readings.r)-1).captureCounts, true
		}
	}
	d.handOver(now, true)
	d.publish()
}

// Source is a capture: the capture package's handles implement it.
type Source interface {
	Read() (data []byte, ts time.Time, origLen int, err error)
}

// Run reads src until it is closed, feeding the demuxer and calling Tick
// every TickInterval (by packet time, or by clock when no packet comes).
// At the end it closes the demuxer, handing every named flow to the saver.
// Read errors other than timeouts are passed to onError and reading goes on;
// Run returns nil when src reports net.ErrClosed; os.ErrDeadlineExceeded
// is a timeout (the capture package's errors wrap both).
func (d *Demuxer) Run(src Source, clock func() time.Time, onError func(error)) error {
	d.clock = clock
	if d.o.Monotonic == nil {
		start := time.Now()
		d.o.Monotonic = func() time.Duration { return time.Since(start) }
	}
	defer d.Close()
	// A first tick, so that the limits apply from the first packet on;
	// the next one is due TickInterval later.
	var ticks Schedule
	now := d.readClock()
	ticks.Due(now, TickInterval)
	d.Tick(time.Unix(0, now))
	var prev int64 // the last packet's time, plus corr
	for {
		data, ts, origLen, err := src.Read()
		switch {
		case err == nil:
			// The clock is read when a tick is due by the packet's time,
			// or when the packets' time went back by more than
			// StepThreshold (no clock read per packet): a step of the wall
			// clock either way is then seen, and corrected, before the
			// packet is taken (TestClockSteps).
			tsn := ts.UnixNano() + d.corr
			if !ticks.Pending(tsn) && tsn > prev-int64(StepThreshold) {
				prev = tsn
				d.Packet(data, ts, origLen)
				continue
			}
			if now = d.readClock(); ticks.Due(now, TickInterval) {
				d.Tick(time.Unix(0, now))
			}
			prev = ts.UnixNano() + d.corr
			d.Packet(data, ts, origLen)
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
		case errors.Is(err, net.ErrClosed):
			return nil
		default:
			onError(err)
			time.Sleep(TickInterval) // a failing capture must not spin
		}
		if now = d.readClock(); ticks.Due(now, TickInterval) {
			d.Tick(time.Unix(0, now))
		}
	}
}

// StepThreshold is how far the wall clock must move against the monotonic
// clock to count as a step (NTP at boot, a hypervisor's resync, an
// operator): NTP slews both clocks alike, so they drift apart only by
// steps.
const StepThreshold = time.Second

// readClock reads the wall and monotonic clocks, updates corr when the
// wall clock stepped, and returns the time deadlines use: the wall clock's
// plus corr.
func (d *Demuxer) readClock() int64 {
	wall := d.clock().UnixNano()
	mono := int64(d.o.Monotonic())
	if !d.clockSet {
		d.monoBase, d.clockSet = wall-mono, true
	}
	if c := d.monoBase + mono - wall; c-d.corr > int64(StepThreshold) || d.corr-c > int64(StepThreshold) {
		d.corr = c
		d.c.steps++
	}
	return wall + d.corr
}

// Schedule says when periodic work is due, in Unix nanoseconds of a
// clock: the wall clock live, the packets' time offline. The zero value is
// due at once.
type Schedule struct{ next int64 }

// Pending reports whether the work is due at now, without scheduling it.
func (s *Schedule) Pending(now int64) bool { return now >= s.next }

// Due reports whether the work is due at now; if it is, the next time is
// every later.
func (s *Schedule) Due(now int64, every time.Duration) bool {
	if now < s.next {
		return false
	}
	s.next = now + int64(every)
	return true
}
