package demuxer

import (
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// Flows returns the number of flows tracked by this demuxer.
func (d *Demuxer) Flows() int { return len(d.flows) }

// lookup returns the flow of a decoded packet (nil if it has none) and
// whether the packet's source is the flow key's A end. The previous
// packet's flow is tried first, without building the key (the reverse
// direction first, as MakeKey orders identical ends). It returns no key:
// a copy of one, just built with stores of other widths, stalled the CPU.
func (d *Demuxer) lookup(p *packet.Parsed) (*flow, bool) {
	if f := d.last; f != nil {
		if f.key.APort == p.DstPort && f.key.BPort == p.SrcPort && f.key.A == p.Dst && f.key.B == p.Src {
			return f, false
		}
		if f.key.APort == p.SrcPort && f.key.BPort == p.DstPort && f.key.A == p.Src && f.key.B == p.Dst {
			return f, true
		}
	}
	k, srcIsA := p.Key()
	return d.flows[k], srcIsA
}

// start begins tracking a flow, unless a limit refuses it.
func (d *Demuxer) start(k packet.Key, tsn int64, pureSYN bool, seq uint32) *flow {
	l := d.o.Limits
	if l.overMemory.Load() {
		d.c.packets[MemoryLimit]++
		if pureSYN {
			d.c.refused[RefusedMemoryLimit]++
		}
		d.refuse(&k, RefusedMemoryLimit)
		return nil
	}
	if !l.take() && !(d.evict(tsn) && l.take()) {
		d.c.packets[FlowLimit]++
		if pureSYN {
			d.c.refused[RefusedFlowLimit]++
		}
		d.refuse(&k, RefusedFlowLimit)
		return nil
	}
	d.c.started++
	f := &flow{key: k, first: tsn, corr: d.corr, syn: pureSYN, synSeq: seq, refused: d.refusedBefore(&k)}
	if d.o.Capture != nil {
		f.start = d.readings.before(tsn)
	}
	f.anon = d.o.Anonymizer.Flow(&k)
	d.flows[k] = f
	d.claim(f)
	d.track(f)
	if l.MaxFlows > 0 {
		d.starts = append(d.starts, f)
	}
	return f
}

// evictable reports whether f may give its place to a new flow.
func (d *Demuxer) evictable(f *flow) bool {
	return f.st == waiting && !f.established() && d.flows[f.key] == f
}

// evict forgets the oldest unnamed flow not established, if there is one, and
// reports whether it did.
func (d *Demuxer) evict(tsn int64) bool {
	for d.startsHead < len(d.starts) {
		f := d.starts[d.startsHead]
		d.starts[d.startsHead] = nil
		d.startsHead++
		if !d.evictable(f) {
			continue
		}
		if d.claim(f) { // named since the last tick: no longer evictable
			d.untrack(f)
			d.track(f)
			continue
		}
		// Its packets count as the limit's, not as a missing UUID.
		d.c.ended[EndedEvicted]++
		d.c.packets[FlowLimit] += uint64(f.buf.Packets())
		f.buf.Reset()
		f.buf = record.Buffer{}
		f.st = discarded
		d.remove(f, index.EndTimeout, tsn)
		return true
	}
	return false
}

// trimStarts drops from the front of starts the flows that can no longer
// be evicted, and gives back the slice's space once most of it is behind.
func (d *Demuxer) trimStarts() {
	for d.startsHead < len(d.starts) && !d.evictable(d.starts[d.startsHead]) {
		d.starts[d.startsHead] = nil
		d.startsHead++
	}
	if d.startsHead > 1024 && d.startsHead*2 > len(d.starts) {
		n := copy(d.starts, d.starts[d.startsHead:])
		clear(d.starts[n:])
		d.starts, d.startsHead = d.starts[:n], 0
	}
}

// track adds f to the list its state belongs in.
func (d *Demuxer) track(f *flow) {
	l := &d.settled
	if f.inWaiting = f.st == waiting; f.inWaiting {
		l = &d.waiting
	}
	f.idx = len(*l)
	*l = append(*l, f)
}

// untrack takes f out of its list (the last flow of the list takes its
// place).
func (d *Demuxer) untrack(f *flow) {
	l := &d.settled
	if f.inWaiting {
		l = &d.waiting
	}
	last := len(*l) - 1
	moved := (*l)[last]
	(*l)[f.idx] = moved
	moved.idx = f.idx
	(*l)[last] = nil
	*l = (*l)[:last]
}

// remove ends a flow at time at, for the reason why: its file is finished
// if it has a UUID, its index record written if it has a file, and it is
// forgotten.
func (d *Demuxer) remove(f *flow, why index.End, at int64) {
	d.lastClaim(f, false)
	if f.st == named {
		d.finish(f)
	}
	if f.out != nil {
		d.endRecord(f, why, at)
		f.out = nil
	}
	if f.entry != nil {
		d.o.Names.Release(f.entry)
	}
	d.untrack(f)
	delete(d.flows, f.key)
	if d.last == f {
		d.last = nil
	}
	d.o.Limits.active.Add(-1)
}
