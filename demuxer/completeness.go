package demuxer

import (
	"encoding/binary"
	"net/netip"
	"time"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// This file is what the demuxer knows of a flow's completeness, for its
// index record: the capture's counters around the flow, and the packets of
// the flow that limits refused before it was tracked.

// reading is the capture's cumulative counters at a time.
type reading struct {
	t int64 // unix nanoseconds
	captureCounts
}

// captureCounts are the capture's cumulative drops and failures.
type captureCounts struct{ dropped, failures uint64 }

// readingsKept is how many ticks' readings are kept (about 100 s): a flow
// that ended within that long of its last packet gets the first reading
// after that packet; one that ended later (a long -flowtimeout), the oldest
// kept, a looser upper bound.
const readingsKept = 1024

// readings is a ring of the latest readings, oldest first.
type readings struct {
	r    []reading
	head int // where the next reading goes, once the ring is full
}

func (rs *readings) add(x reading) {
	if len(rs.r) < readingsKept {
		rs.r = append(rs.r, x)
		return
	}
	rs.r[rs.head] = x
	rs.head = (rs.head + 1) % readingsKept
}

// at returns the i-th oldest reading.
func (rs *readings) at(i int) reading {
	if len(rs.r) < readingsKept {
		return rs.r[i]
	}
	return rs.r[(rs.head+i)%readingsKept]
}

// search returns the number of readings taken before t (or at t, when
// atToo).
func (rs *readings) search(t int64, atToo bool) int {
	lo, hi := 0, len(rs.r)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if x := rs.at(m).t; x < t || atToo && x == t {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// before returns the latest reading at or before t, or zero counters when
// there is none (a capture's counters start at zero).
func (rs *readings) before(t int64) captureCounts {
	if i := rs.search(t, true); i > 0 {
		return rs.at(i - 1).captureCounts
	}
	return captureCounts{}
}

// after returns the earliest reading at or after t.
func (rs *readings) after(t int64) (reading, bool) {
	if i := rs.search(t, false); i < len(rs.r) {
		return rs.at(i), true
	}
	return reading{}, false
}

// pendingRecord is the record of an ended flow that waits for a reading of
// the capture's counters after its last packet, and, when the kernel
// reports sockets' final counters (Options.KernelCounters), for those of
// its socket, until FinalWait after its end.
type pendingRecord struct {
	out   FlowWriter
	rec   *index.Record
	start captureCounts
	end   captureCounts
	read  bool // end is a reading after the last packet
	v     verdict
	entry *names.Entry // whose final counters are awaited; nil: none are
	until int64
}

// FinalWait is how long after a flow's end its record waits for its
// socket's final counters: the kernel broadcasts them when the socket is
// destroyed, which may come after the capture's last packet of it (an
// active close's TIME_WAIT) or be read later than it.
const FinalWait = 2 * time.Second

// read takes a reading of the capture's counters at now, and hands over the
// records that waited for one (and for their sockets' counters).
func (d *Demuxer) read(now int64) {
	if d.o.Capture != nil {
		dropped, failures := d.o.Capture()
		x := reading{t: now, captureCounts: captureCounts{dropped, failures}}
		if n := len(d.readings.r); n > 0 && d.readings.at(n-1).t > now {
			x.t = d.readings.at(n - 1).t // the clock went back: keep them in order
		}
		d.readings.add(x)
		for i := range d.waitRead {
			if p := &d.waitRead[i]; !p.read {
				p.end, p.read = x.captureCounts, true
			}
		}
	}
	d.handOver(now, false)
}

// handOver ends the records that are ready at now, or all of them (at
// shutdown).
func (d *Demuxer) handOver(now int64, all bool) {
	kept := d.waitRead[:0]
	for _, p := range d.waitRead {
		if all || p.ready(now) {
			d.emit(&p)
		} else {
			kept = append(kept, p)
		}
	}
	clear(d.waitRead[len(kept):])
	d.waitRead = kept
}

// ready reports whether p's record has all it waits for at now.
func (p *pendingRecord) ready(now int64) bool {
	return p.read && (p.entry == nil || p.entry.Final() != nil || now >= p.until)
}

// emit completes p's record and hands it to its writer.
func (d *Demuxer) emit(p *pendingRecord) {
	r := p.rec
	if d.o.Capture != nil {
		r.DropsMax = p.end.dropped - min(p.start.dropped, p.end.dropped)
		r.Down = p.end.failures != p.start.failures
	}
	var k *index.Kernel
	if p.entry != nil {
		k = p.entry.Final()
	}
	p.v.apply(r, k)
	d.c.verified[r.Verified][r.VerifiedBy]++
	p.out.End(r)
}

// endRecord writes the index record of a flow that is forgotten with a
// file, ended at time at for the reason why.
func (d *Demuxer) endRecord(f *flow, why index.End, at int64) {
	r := index.Record{Source: string(f.source), Sample: d.o.SampleRate, First: f.firstWall(), Last: time.Unix(0, f.last-d.corr),
		WireBytes: f.wire, AfterDuration: uint64(f.afterDur), FlowLimit: uint64(f.refused[RefusedFlowLimit]), MemoryLimit: uint64(f.refused[RefusedMemoryLimit]),
		SYN: f.sawSYN, SYNACK: f.sawSYNACK, End: why, FlowEnd: why, Ended: time.Unix(0, max(at, f.last)-d.corr), Interface: d.o.Interface}
	if f.afterDur > 0 {
		r.End = index.EndCaptureDuration
	}
	a := netip.AddrPortFrom(d.savedAddr(f, 0), f.key.APort)
	b := netip.AddrPortFrom(d.savedAddr(f, 1), f.key.BPort)
	if r.Src, r.Dst = a, b; !f.firstFromA {
		r.Src, r.Dst = b, a
	}
	p := pendingRecord{out: f.out, rec: &r, start: f.start, v: verdictOf(f), read: d.o.Capture == nil}
	if d.o.KernelCounters && f.entry != nil && f.entry.Cookie != 0 {
		p.entry, p.until = f.entry, max(at, f.last)+int64(FinalWait)
	}
	if !p.read {
		if end, ok := d.readings.after(f.last); ok {
			p.end, p.read = end.captureCounts, true
		}
	}
	if p.ready(d.now) {
		d.emit(&p)
		return
	}
	// Not yet: the next reading after the last packet (the flow ended at
	// a packet, or at Close), or the socket's counters.
	d.waitRead = append(d.waitRead, p)
}

// savedAddr returns the address of end i (0: A, 1: B) as the file saves it.
func (d *Demuxer) savedAddr(f *flow, i int) netip.Addr {
	raw := &f.key.A
	if i == 1 {
		raw = &f.key.B
	}
	return f.anon.Saved(i, *raw)
}

// refusedSlots is the size of the table of refused connections: the
// packets of a connection refused by a limit are remembered until another
// refused connection takes its slot, so that the flow tracked once the
// limit allows says how many of its packets came before (at least).
const refusedSlots = 4096

type refusedSlot struct {
	key packet.Key
	n   [NumRefusals]uint32 // by limit
}

type refusedTable [refusedSlots]refusedSlot

// slot returns k's slot.
func (t *refusedTable) slot(k *packet.Key) *refusedSlot { return &t[keyHash(k)>>(64-12)] }

// keyHash mixes a flow key into 64 bits for the demuxer's direct-mapped
// tables, whose index is its top bits.
func keyHash(k *packet.Key) uint64 {
	h := binary.LittleEndian.Uint64(k.A[8:]) ^ binary.LittleEndian.Uint64(k.B[8:])<<1 ^
		binary.LittleEndian.Uint64(k.A[:8])>>1 ^ binary.LittleEndian.Uint64(k.B[:8]) ^ uint64(k.APort)<<16 ^ uint64(k.BPort)<<40
	return h * 0x9e3779b97f4a7c15
}

// refuse counts a packet of k refused by limit.
func (d *Demuxer) refuse(k *packet.Key, limit Refusal) {
	if d.refusals == nil {
		d.refusals = new(refusedTable)
	}
	s := d.refusals.slot(k)
	if s.key != *k {
		*s = refusedSlot{key: *k}
	}
	s.n[limit]++
}

// refusedBefore returns, and forgets, the packets of k that limits refused.
func (d *Demuxer) refusedBefore(k *packet.Key) [NumRefusals]uint32 {
	if d.refusals == nil {
		return [NumRefusals]uint32{}
	}
	s := d.refusals.slot(k)
	if s.key != *k {
		return [NumRefusals]uint32{}
	}
	n := s.n
	*s = refusedSlot{}
	return n
}
