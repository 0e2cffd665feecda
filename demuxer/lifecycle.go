package demuxer

import (
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/record"
)

// writer returns the writer of a named flow, starting it, or renaming it
// if the flow's UUID changed since (the authoritative source's name came
// after another source's).
func (d *Demuxer) writer(f *flow) FlowWriter {
	name := f.entry.Name()
	switch {
	case f.out == nil:
		f.out = d.o.Writer.Start(name, d.o.LinkType, f.firstWall())
	case name != f.outName:
		f.out.Rename(name)
	}
	f.outName = name
	return f.out
}

// push hands the full chunks of a named flow to its writer, starting it.
func (d *Demuxer) push(f *flow) {
	d.writer(f).Push(&f.buf, false)
}

// claim names f if its UUID has come, and reports whether it did.
func (d *Demuxer) claim(f *flow) bool {
	if e := d.o.Names.Claim(f.key, f.firstWall()); e != nil {
		d.name(f, e)
		return true
	}
	return false
}

// lastClaim settles a waiting flow that is about to be forgotten: its name
// may have come since the last tick, which may be a second away when the
// traffic stops, or late on a loaded machine (a connection ended by a new
// one on its 4-tuple, a deadline applied at a packet;
// TestSplitClaimsLastChance); else it takes the fallback name or its
// headers are dropped.
func (d *Demuxer) lastClaim(f *flow, shutdown bool) {
	if f.st == waiting && !d.claim(f) {
		d.nameOrDiscard(f, shutdown)
	}
}

// name gives f its UUID's entry: waiting -> named, or unsampled.
func (d *Demuxer) name(f *flow, e *names.Entry) {
	f.entry = e
	d.stats.UUIDWait.Observe(max(0, e.OpenedAt.Sub(f.firstWall()).Seconds()))
	d.named[e.Source]++
	if d.o.Sample != nil && !d.o.Sample(e.Name()) {
		// waiting -> unsampled: its entry is released when it ends.
		d.c.packets[NotSampled] += uint64(f.buf.Packets())
		d.c.ended[EndedNotSampled]++
		f.buf.Reset()
		f.buf = record.Buffer{}
		f.st = unsampled
		return
	}
	f.st = named
	if d.o.Stream {
		d.writer(f)
	}
	if f.buf.Bytes() >= d.spill && f.buf.Full() {
		d.push(f)
	}
}

// finish hands the whole file of a named flow to the saver. Its writer
// is kept for the flow's index record.
func (d *Demuxer) finish(f *flow) {
	d.writer(f).Push(&f.buf, true)
	_, f.source = f.entry.NameSource()
	f.buf = record.Buffer{}
	f.st = finished
}

// nameOrDiscard names a flow that got no UUID by the fallback, or drops
// its headers.
func (d *Demuxer) nameOrDiscard(f *flow, shutdown bool) {
	if d.o.Fallback != nil {
		if e := d.o.Fallback(f.key, f.firstWall()); e != nil {
			d.name(f, e)
			return
		}
	}
	d.discard(f, shutdown)
}

// discard drops the headers of a flow that got no UUID.
func (d *Demuxer) discard(f *flow, shutdown bool) {
	if shutdown {
		d.c.packets[ShutdownNoUUID] += uint64(f.buf.Packets())
		d.c.ended[EndedShutdown]++
	} else {
		d.c.packets[NoUUID] += uint64(f.buf.Packets())
		d.c.ended[EndedUUIDTimeout]++
	}
	f.buf.Reset()
	f.buf = record.Buffer{}
	f.st = discarded
}
