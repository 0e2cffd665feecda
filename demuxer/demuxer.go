package demuxer

import (
	rtmetrics "runtime/metrics"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
	"github.com/m-lab/packet-headers/selection"
)

// TickInterval is how often, in packet or wall-clock time, Run calls Tick.
// (When the traffic stops, the next tick may come up to the capture's BusyTimeout
// after the last packet, then every TickInterval.)
const TickInterval = 100 * time.Millisecond

// SweepPerTick is how many flows waiting for a UUID, and how many others,
// Tick visits at least; with more than ten times as many, each is visited
// every ten ticks (one second), so that tens of thousands of flows (a SYN
// flood) cost a bounded share of the CPU: a UUID is then claimed, and a
// deadline applied, up to a second late.
const SweepPerTick = 1000

// SpillBytes is how many bytes of records a named flow holds in buffer mode
// before they are handed to the saver (and its memory reused): a long flow
// is written a few thousand packets at a time instead of all at its end.
const SpillBytes = 256 << 10

// LateAllowance is how much later than its capture timestamp a packet may
// reach the demuxer (the kernel hands packets over in blocks, retired at
// the latest after -capture.batchdelay, at most a second). Clock-driven
// deadlines that would drop packets wait this much longer.
const LateAllowance = time.Second

// Namer gives flows their UUIDs. *names.Table implements it.
type Namer interface {
	Claim(k packet.Key, first time.Time) *names.Entry
	Release(e *names.Entry)
}

// Writer starts the writer of a named flow (the saver, adapted by the
// composition root with WriterFunc).
type Writer interface {
	Start(uuid string, lt packet.LinkType, first time.Time) FlowWriter
}

// WriterFunc adapts a function to Writer.
type WriterFunc func(uuid string, lt packet.LinkType, first time.Time) FlowWriter

// Start implements Writer.
func (f WriterFunc) Start(uuid string, lt packet.LinkType, first time.Time) FlowWriter {
	return f(uuid, lt, first)
}

// FlowWriter takes a flow's chunks; *saver.Flow implements it.
type FlowWriter interface {
	Push(buf *record.Buffer, final bool)
	// Rename changes the name the file is published under, until the
	// final Push.
	Rename(uuid string)
	// End gives the flow's index record when the flow is forgotten, after
	// the final Push: the writer keeps it, completes it with what it
	// published, and writes it if it published the file.
	End(r *index.Record)
}

// Options configures a Demuxer.
type Options struct {
	LinkType        packet.LinkType // of the capture
	MaxHeaderSize   int             // longest record kept per packet
	CaptureDuration time.Duration
	FlowTimeout     time.Duration
	UUIDWait        time.Duration
	Linger          time.Duration // after FINs, RST or a Close announcement; default min(1s, FlowTimeout)
	Stream          bool
	Names           Namer
	Writer          Writer
	Anonymizer      *anonymize.Anonymizer // nil masks nothing
	Limits          *Limits               // nil sets no limit
	// Fallback, when set, names a flow still unnamed when its UUID wait
	// ends or at Close, instead of dropping its headers: offline mode
	// loses no flow for lack of an announcement.
	Fallback func(k packet.Key, first time.Time) *names.Entry
	// Lookup, when set, is asked once per unnamed flow, at its first packet
	// with an ACK and no SYN (a connection past its handshake: a SYN flood
	// asks nothing), to find the flow's UUID elsewhere (the kernel). It must
	// not block.
	Lookup func(packet.Key)
	// Select, when set, decides at a flow's first packet whether its
	// connection is saved (package selection). A connection it rejects
	// holds no memory; its verdict is remembered for a second in a small
	// table, so each of its packets costs a map miss and a hash
	// (BenchmarkUnselected).
	Select func(k packet.Key, p *packet.Parsed, srcIsA bool) selection.Verdict
	// Sample, when set, chooses the connections saved among those named,
	// by their UUID (selection.Sample.Chosen), once per flow.
	Sample func(uuid string) bool
	// SampleRate is the sample's N, for the index records (0: none).
	SampleRate int
	// Interface names the capture in index records ("" offline).
	Interface string
	// Capture, when set, returns the capture's cumulative drops and
	// failures; Tick reads it once, and the index records of the flows
	// give the difference between the readings around each flow.
	Capture func() (dropped, failures uint64)
	// KernelCounters says that the names' entries get their sockets'
	// final counters (names.Entry.Final, from the kernel's destroy
	// broadcasts): an ended flow's record waits up to FinalWait for them,
	// to say whether its trace is complete by comparison.
	KernelCounters bool
	// Monotonic, for Run, returns the time elapsed on a clock that no
	// step of the wall clock moves; default: Go's monotonic clock.
	Monotonic func() time.Duration
}

// Demuxer demultiplexes one capture into flows.
type Demuxer struct {
	o     Options
	p     packet.Parsed
	flows map[packet.Key]*flow
	// Every flow is in one of two lists, for Tick: waiting (no UUID yet)
	// and settled (named, finished or discarded), each swept SweepPerTick
	// or a tenth at a time.
	waiting, settled []*flow
	waitSweep, sweep sweep
	// last is the flow of the previous packet: packets come in runs of
	// one flow (a bulk transfer, a block of the ring), which then skip the
	// map's hashing and probing.
	last  *flow
	c     counters
	stats Stats
	spill int                     // a named flow's records are handed to the saver once it holds this many bytes
	heap  []rtmetrics.Sample      // for Limits.MaxHeap
	named map[names.Source]uint64 // flows named, by source
	// The capture's counters read at recent ticks (Options.Capture), and
	// the records of ended flows waiting for a reading after their last
	// packet.
	readings readings
	waitRead []pendingRecord
	refusals *refusedTable            // allocated at the first refusal
	rejects  *[rejectSlots]rejectSlot // connections not saved, allocated at the first
	// starts holds the flows in the order they started, from startsHead
	// on, for eviction: a flow that is no longer an unnamed half-open one
	// is skipped, and dropped from the front at each tick.
	starts     []*flow
	startsHead int
	now        int64            // the time of the last tick
	clock      func() time.Time // Run's, for Close
	// corr is added to the wall clock's times (the packets' timestamps,
	// the clock Run reads) to give the time that deadlines use, which
	// follows Options.Monotonic: a step of the wall clock changes corr,
	// not a flow's fate (see Run). monoBase is the wall time at the
	// monotonic clock's zero, read at Run's first reading.
	corr, monoBase int64
	clockSet       bool
}

// New returns a demuxer with no flows.
func New(o Options) *Demuxer {
	if o.Linger <= 0 {
		o.Linger = min(time.Second, o.FlowTimeout)
	}
	if o.Limits == nil {
		o.Limits = &Limits{}
	}
	if o.MaxHeaderSize <= 0 {
		o.MaxHeaderSize = 256
	}
	d := &Demuxer{o: o, flows: map[packet.Key]*flow{}, spill: SpillBytes, named: map[names.Source]uint64{},
		heap: []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}}
	if o.Stream {
		d.spill = 0 // every full chunk
	}
	d.stats.init()
	return d
}

// Packet processes one captured frame. data is borrowed: it is read, and
// the bytes to keep are copied, before Packet returns.
func (d *Demuxer) Packet(data []byte, ts time.Time, origLen int) {
	d.c.captured++
	kind := d.p.Decode(d.o.LinkType, data)
	if kind != packet.TCP {
		d.c.undecodable[kind]++
		d.c.packets[Undecodable]++
		return
	}
	p := &d.p
	f, srcIsA := d.lookup(p)
	tsn := ts.UnixNano() + d.corr
	pureSYN := p.Flags&(packet.FlagSYN|packet.FlagACK) == packet.FlagSYN
	if f != nil && (tsn-f.last >= int64(d.o.FlowTimeout) || f.endAt != 0 && tsn >= f.endAt) {
		d.remove(f, f.endedOr(index.EndTimeout), tsn) // its deadline came before this packet, as a tick would have seen
		f = nil
	}
	// A new connection on the 4-tuple of an old one: after another SYN, or
	// after both ends' packets and the old one's end. After packets of one
	// end alone (a blind attacker's spoofed ACK just before the client's
	// SYN), the SYN goes on in the same flow: split there, the real
	// connection's name would go to the spoofed packet (TestSpoofedFirstPacket).
	if f != nil && pureSYN && (f.syn && f.synSeq != p.Seq && (!f.synced || f.ended) || !f.syn && f.synced && f.ended) {
		d.remove(f, f.endedOr(index.EndReused), tsn)
		f = nil
	}
	if f == nil {
		k, firstIsA := p.Key()
		if v := d.selectFlow(&k, p, firstIsA, tsn); v != selection.Save {
			d.c.packets[verdictOutcome[v]]++
			return
		}
		if f = d.start(k, tsn, pureSYN, p.Seq); f == nil {
			return
		}
		f.firstFromA = firstIsA
	}
	d.last = f
	f.last = tsn
	if srcIsA {
		f.ends[0].count(p, data, p.PayloadLen, &f.ends[1])
	} else {
		f.ends[1].count(p, data, p.PayloadLen, &f.ends[0])
	}
	if e := f.track(p, data, srcIsA); e != index.EndNone {
		// The packets tell how it ended, even when tcp-info's Close was
		// applied first (its event may come before the capture's block
		// with the FINs: TestRecordEnds).
		if f.endAt == 0 {
			f.endAt = tsn + int64(d.o.Linger)
		}
		if f.end == index.EndNone || f.end == index.EndClose {
			f.end = e
		}
	}
	if f.st == waiting && !f.lookedUp && p.Flags&(packet.FlagSYN|packet.FlagACK) == packet.FlagACK && d.o.Lookup != nil {
		f.lookedUp = true
		d.o.Lookup(f.key)
	}
	switch f.st {
	case finished:
		d.c.packets[AfterCaptureDuration]++
		f.afterDur++
		return
	case discarded:
		d.c.packets[NoUUID]++
		return
	case unsampled:
		d.c.packets[NotSampled]++
		return
	}
	if tsn-f.first > int64(d.o.CaptureDuration) {
		d.c.packets[AfterCaptureDuration]++
		f.afterDur++
		if f.st == named {
			d.finish(f)
		}
		return
	}
	end := min(p.HeaderEnd, len(data), d.o.MaxHeaderSize)
	rec := f.buf.Append(ts, origLen, data[:end])
	f.wire += uint64(origLen)
	f.anon.Apply(rec, p, srcIsA, d.o.LinkType)
	if f.st == named && f.buf.Bytes() >= d.spill && f.buf.Full() {
		d.push(f)
	}
}
