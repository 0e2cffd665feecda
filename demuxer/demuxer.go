// Package demuxer splits the packets of one capture into flows (TCP
// connections, keyed by their direction-independent 4-tuple) and drives each
// flow through its lifecycle until its headers are handed to the saver.
//
// # Flow lifecycle
//
//   - A flow starts at its first captured packet (unless -maxflows or
//     -maxheap is reached: then the packet is counted and dropped, and its
//     flow is not tracked; but at -maxflows a new flow first takes the place
//     of the oldest half-open one, see Fairness). Its headers are copied once into the flow's
//     chunked buffer, anonymized there, and never contain a payload byte.
//   - The flow claims its UUID from the names table: at its first packet,
//     then at every tick (every 100 ms, and at most a second after the last
//     packet when the traffic stops; every second when over ten thousand
//     flows wait, as in a SYN flood) until it has one. The announcement may
//     have come before or after the first packet. If no UUID comes within
//     -uuidwaitduration of the first packet, the buffered headers are
//     dropped and later packets of the flow are discarded cheaply (counted
//     as no_uuid).
//   - Packets later than -captureduration after the first packet are not
//     saved (counted as after_captureduration); the file is finished at once.
//   - A flow ends when no packet arrived for -flowtimeout, or a short linger
//     after both FINs or an RST that its receiver accepts, or after the UUID
//     source announced the connection closed. Deadlines are applied by Tick
//     and, exactly, before each packet of the flow: a packet that comes
//     after its flow's deadline starts a new flow, as it would have after
//     a tick (TestDeadlinesBeforePackets). An unnamed flow is kept until
//     its UUID deadline, in
//     case the announcement is late. When a flow with a UUID ends, its file
//     is finished: in buffer mode it is written in one go now, unless the
//     flow is long (once named, its chunks were handed to the saver
//     SpillBytes at a time, so that a flow holds little memory however long
//     it lasts); in stream mode (-stream) chunks were handed to the saver as
//     they filled since the flow was named. The last ones are handed now.
//   - A pure SYN on the 4-tuple of a tracked flow that does not repeat that
//     flow's SYN (another initial sequence number) ends the old flow at once
//     and starts a new one, so nothing of one connection lands in the
//     other's file, but only where the server's TCP would take it for a new
//     connection: when the old one was not synchronized yet, or had ended
//     (both FINs, or an accepted RST: a port reused, TIME_WAIT included).
//   - When a flow with a file is forgotten, its writer gets the flow's index
//     record (index.Record): how it ended (the packets' FINs or RST win over
//     a Close announcement applied first), the packets not saved, whether
//     the handshake was captured, and the capture's drops and failures
//     between the reading of its counters (Options.Capture, once per tick)
//     before the first packet and the first one after the last
//     (TestRecordEnds, TestRecordDrops). The flow keeps a few counters for
//     it, nothing per packet but a sum.
//
// # Fairness under a flood
//
// A flow is half-open while neither end has sent an ACK without SYN: a
// SYN, perhaps its SYN-ACK, nothing more, as every flow of a spoofed-SYN
// scan or flood stays. At -maxflows, a new flow evicts the oldest unnamed
// half-open flow of its demuxer instead of being refused, so a flood
// cannot keep a connection out: its SYN gets in, and once its handshake
// completes (its ACK) it is no longer evictable; if it was evicted before
// (a round trip longer than the flood's turnover), its ACK gets in. An
// unnamed half-open flow is forgotten at its UUID deadline, not kept until
// its timeout. Evicted flows are counted (pcap_flows_ended_total
// {outcome="evicted"}); TestHalfOpenEvicted, and e2e's TestSYNScanAtFlowLimit.
//
// # Packets the receiver ignores
//
// The trace keeps every packet, and a segment that the receiving TCP
// would not accept changes nothing else about its flow: a SYN on a
// synchronized connection (RFC 5961 section 4 answers it with a challenge
// ACK), an RST whose sequence number is not exactly the next one expected
// (section 3: an in-window RST gets a challenge ACK, others are dropped),
// a FIN that is neither in sequence nor acknowledged. What the receiver
// expects is followed per end: segments without a gap before them and the
// receiver's own acknowledgments move it (so the capture's drops do not
// stall it), and only segments within the window the receiver advertised
// (scaled, RFC 7323) count, so injected packets far out of window move
// nothing. An RST is also taken at the end of the highest in-window
// segment an end sent, where a sender's own RST is when the capture missed
// data before it (TestInjectedSegments; in e2e, TestInjection).
//
// # Cost model and concurrency
//
// A Demuxer belongs to the goroutine that reads its capture: Packet and
// Tick must be called from that goroutine only. Packet decodes into a
// reused struct, looks the flow up (the previous packet's flow first, then
// a map keyed by a comparable value), copies the headers once and counts
// outcomes in local fields: it allocates only when a flow starts or a chunk
// fills, takes no lock and makes no syscall. Tick checks the heap against
// Limits.MaxHeap, does the per-flow work (naming, timeouts) and publishes
// the counters: it visits the flows waiting for a UUID, and the others,
// SweepPerTick at a time, or a tenth of them when there are more, so that
// with tens of thousands of flows a deadline is applied up to a second
// late rather than costing a visit of every flow ten times a second. The
// only state shared with other goroutines is the names table (locked per
// flow, not per packet), the Limits (atomics, per flow) and the saver's
// flows (locked per chunk).
package demuxer

import (
	"errors"
	"net"
	"os"
	rtmetrics "runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
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

// Limits bounds the number of flows tracked across all demuxers. The zero
// value sets no limit. It is safe for concurrent use.
type Limits struct {
	MaxFlows int64 // 0 means unlimited
	// MaxHeap, when not zero, is compared with the heap's objects (live
	// and not yet swept) at every Tick of every demuxer: while they exceed
	// it, no new flow is tracked.
	MaxHeap    uint64
	active     atomic.Int64
	overMemory atomic.Bool
}

// Active returns the number of flows tracked.
func (l *Limits) Active() int64 { return l.active.Load() }

// take counts one more flow unless MaxFlows are tracked already: the check
// and the count are one step, so demuxers starting flows at once never
// exceed it together (TestMaxFlowsAcrossDemuxers).
func (l *Limits) take() bool {
	for {
		n := l.active.Load()
		if l.MaxFlows > 0 && n >= l.MaxFlows {
			return false
		}
		if l.active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// SetOverMemory says whether the heap is above its limit; while it is, no
// new flow is tracked. Tick sets it when MaxHeap is set.
func (l *Limits) SetOverMemory(over bool) { l.overMemory.Store(over) }

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
	// Exclude, when set, says which connections are never tracked (see
	// package exclude): asked at each packet that has no flow, so a
	// connection it excludes costs a map miss and this call per packet,
	// and holds no memory.
	Exclude func(*packet.Key) bool
	// Interface names the capture in index records ("" offline).
	Interface string
	// Capture, when set, returns the capture's cumulative drops and
	// failures; Tick reads it once, and the index records of the flows
	// give the difference between the readings around each flow.
	Capture func() (dropped, failures uint64)
	// Monotonic, for Run, returns the time elapsed on a clock that no
	// step of the wall clock moves; default: Go's monotonic clock.
	Monotonic func() time.Duration
}

type state uint8

const (
	waiting   state = iota // collecting headers, no UUID yet
	named                  // collecting headers, UUID known
	finished               // file handed to the saver; later packets are dropped
	discarded              // no UUID in time; later packets are dropped
)

type flow struct {
	key          packet.Key
	st           state
	maskA, maskB bool
	anon         *flowAnon // per-flow anonymization state, computed once (cryptopan, timestamp offsets)
	syn          bool      // the flow began with a pure SYN; synSeq is its sequence number
	lookedUp     bool      // Options.Lookup was asked
	inWaiting    bool      // in Demuxer.waiting (else in Demuxer.settled)
	synced       bool      // a SYN-ACK was seen, or ACKs from both ends: RFC 5961 applies
	ended        bool      // both FINs or an accepted RST: a new SYN is a new connection
	sawSYN       bool      // a pure SYN was captured
	sawSYNACK    bool      // a SYN-ACK was captured
	firstFromA   bool      // the first packet's source is the key's A
	end          index.End // why endAt was set
	synSeq       uint32
	afterDur     uint32        // packets after -captureduration
	refused      [2]uint32     // packets refused by the limits before the flow was tracked (refusedTable)
	wire         uint64        // the original lengths of the packets kept
	start        captureCounts // the capture's counters before the first packet
	source       string        // the UUID source of the file's name, at its final Push
	ends         [2]end        // A and B
	first, last  int64         // unix nanoseconds, plus Demuxer.corr
	corr         int64         // Demuxer.corr at the first packet: first-corr is its wall time
	endAt        int64         // when non-zero, the flow ends at this time
	entry        *names.Entry
	out          FlowWriter // once named in stream mode, or once spilled
	outName      string     // the name out was started or renamed with
	buf          record.Buffer
	idx          int // position in its list
}

// end is what a flow knows of one end's sequence space.
type end struct {
	// nxt is the next sequence number the receiver expects, as far as
	// the capture shows: segments without a gap before them move it, and
	// so do the receiver's acknowledgments (which also cover the capture's
	// own drops). hi is the end of the highest in-window segment sent.
	nxt, hi uint32
	wnd     uint32 // the window it advertised last, scaled
	finPos  uint32 // the sequence number of its last in-window FIN
	seen    bool   // nxt and hi are set
	acked   bool   // it sent an ACK without SYN
	fin     bool   // its FIN was in sequence, or acknowledged
	finSeen bool   // finPos is set
	wsOK    bool   // its SYN had a window scale option
	wscale  uint8
}

// maxWindow is the window assumed when an end's is not known (a flow seen
// from its middle): the largest that RFC 7323 allows.
const maxWindow = 1 << 30

// minWindow is the least window the sequence check allows: a receiver
// that advertised a zero window still takes retransmissions and probes.
const minWindow = 1 << 16

// counters are counted per packet in plain fields and published by Tick.
type counters struct {
	captured, afterDur, noUUID, flowLimit, memLimit, shutdown uint64
	excluded, evicted, steps                                  uint64
	undecodable                                               [packet.NumKinds]uint64
	started, refusedFlows, refusedMem, uuidTimeout            uint64
	endedShutdown                                             uint64 // flows unnamed at Close
}

// Counts are a demuxer's totals since it started.
type Counts struct {
	Packets        uint64            // frames given to Packet
	Undecodable    uint64            // frames that were not decodable TCP/IP
	Flows          uint64            // flows started
	Named          map[string]uint64 // flows named, by the source that named them
	NoUUID         uint64            // packets of flows never named
	AfterDuration  uint64            // packets after -captureduration
	FlowLimit      uint64            // packets of flows refused by -maxflows
	MemoryLimit    uint64            // packets of flows refused by -maxheap
	ShutdownNoUUID uint64            // packets of flows still unnamed at Close
}

// Counts returns the demuxer's totals. Like Packet, it must be called from
// the demuxer's goroutine.
func (d *Demuxer) Counts() Counts {
	c := Counts{Packets: d.c.captured, Flows: d.c.started, NoUUID: d.c.noUUID, AfterDuration: d.c.afterDur,
		FlowLimit: d.c.flowLimit, MemoryLimit: d.c.memLimit, ShutdownNoUUID: d.c.shutdown, Named: map[string]uint64{}}
	for src, n := range d.named {
		c.Named[src] = n
	}
	for _, n := range d.c.undecodable {
		c.Undecodable += n
	}
	return c
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
	spill int                // a named flow's records are handed to the saver once it holds this many bytes
	heap  []rtmetrics.Sample // for Limits.MaxHeap
	named map[string]uint64  // flows named, by source
	// The capture's counters read at recent ticks (Options.Capture), and
	// the records of ended flows waiting for a reading after their last
	// packet.
	readings readings
	waitRead []pendingRecord
	refusals *refusedTable // allocated at the first refusal
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

// Stats are a demuxer's counts as published at its last tick, for readers
// on other goroutines (the daemon's metrics). Safe for concurrent use.
type Stats struct {
	Captured    atomic.Uint64     // frames given to Packet
	Started     atomic.Uint64     // flows started
	ClockSteps  atomic.Uint64     // steps of the wall clock seen by Run
	Packets     *metrics.Counters // frames not saved, by PacketOutcomes
	Undecodable *metrics.Counters // frames not decodable, by packet.Kind
	Refused     *metrics.Counters // new flows refused, by RefusalLimits
	Ended       *metrics.Counters // flows ended without a file, by EndOutcomes
	UUIDWait    *metrics.Histogram
	mu          sync.Mutex
	named       map[string]uint64
}

// Named returns the flows named, by the source that named them.
func (s *Stats) Named() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]uint64, len(s.named))
	for k, v := range s.named {
		out[k] = v
	}
	return out
}

// PacketOutcomes are the reasons the demuxer does not save a frame.
var PacketOutcomes = []string{"excluded", "no_uuid", "after_captureduration", "flow_limit", "memory_limit", "undecodable", "shutdown_no_uuid"}

// RefusalLimits are the limits that refuse new flows: -maxflows, -maxheap.
var RefusalLimits = []string{"flow_limit", "memory_limit"}

// EndOutcomes are the ends of flows that get no file: no UUID in time,
// none at shutdown, or evicted at -maxflows (half-open and unnamed).
var EndOutcomes = []string{"uuid_timeout", "shutdown", "evicted"}

// UUIDWaitBuckets are the bounds, in seconds, of Stats.UUIDWait.
var UUIDWaitBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10}

// Stats returns the demuxer's published counts.
func (d *Demuxer) Stats() *Stats { return &d.stats }

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
	d := &Demuxer{o: o, flows: map[packet.Key]*flow{}, spill: SpillBytes, named: map[string]uint64{},
		heap: []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}}
	if o.Stream {
		d.spill = 0 // every full chunk
	}
	d.stats.init()
	return d
}

// NewStats returns zero counts, to which the counts of demuxers that
// ended can be added (AddTo), so that sums over demuxers never go back.
func NewStats() *Stats {
	s := &Stats{}
	s.init()
	return s
}

func (s *Stats) init() {
	kinds := make([]string, 0, packet.NumKinds-1)
	for k := packet.Kind(1); k < packet.NumKinds; k++ {
		kinds = append(kinds, k.String())
	}
	s.Packets, s.Undecodable = metrics.NewCounters(PacketOutcomes...), metrics.NewCounters(kinds...)
	s.Refused, s.Ended = metrics.NewCounters(RefusalLimits...), metrics.NewCounters(EndOutcomes...)
	s.UUIDWait, s.named = metrics.NewHistogram(UUIDWaitBuckets...), map[string]uint64{}
}

// AddTo adds s's counts to dst's.
func (s *Stats) AddTo(dst *Stats) {
	dst.Captured.Add(s.Captured.Load())
	dst.Started.Add(s.Started.Load())
	dst.ClockSteps.Add(s.ClockSteps.Load())
	for _, c := range [][2]*metrics.Counters{{s.Packets, dst.Packets}, {s.Undecodable, dst.Undecodable}, {s.Refused, dst.Refused}, {s.Ended, dst.Ended}} {
		for _, v := range c[0].Values() {
			c[1].Add(v, c[0].Get(v))
		}
	}
	dst.UUIDWait.Merge(s.UUIDWait)
	named := s.Named()
	dst.mu.Lock()
	for src, n := range named {
		dst.named[src] += n
	}
	dst.mu.Unlock()
}

// Flows returns the number of flows tracked by this demuxer.
func (d *Demuxer) Flows() int { return len(d.flows) }

// Packet processes one captured frame. data is borrowed: it is read, and
// the bytes to keep are copied, before Packet returns.
func (d *Demuxer) Packet(data []byte, ts time.Time, origLen int) {
	d.c.captured++
	kind := d.p.Decode(d.o.LinkType, data)
	if kind != packet.TCP {
		d.c.undecodable[kind]++
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
	if f != nil && pureSYN && (!f.syn || f.synSeq != p.Seq) && (!f.synced || f.ended) {
		d.remove(f, f.endedOr(index.EndReused), tsn) // a new connection on the 4-tuple of an old one
		f = nil
	}
	if f == nil {
		k, firstIsA := p.Key()
		if d.o.Exclude != nil && d.o.Exclude(&k) {
			d.c.excluded++
			return
		}
		if f = d.start(k, tsn, pureSYN, p.Seq); f == nil {
			return
		}
		f.firstFromA = firstIsA
	}
	d.last = f
	f.last = tsn
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
		d.c.afterDur++
		f.afterDur++
		return
	case discarded:
		d.c.noUUID++
		return
	}
	if tsn-f.first > int64(d.o.CaptureDuration) {
		d.c.afterDur++
		f.afterDur++
		if f.st == named {
			d.finish(f)
		}
		return
	}
	end := min(p.HeaderEnd, len(data), d.o.MaxHeaderSize)
	rec := f.buf.Append(ts, origLen, data[:end])
	f.wire += uint64(origLen)
	if fa := f.anon; fa != nil && fa.mapped {
		src, dst := f.side(0), f.side(1)
		if !srcIsA {
			src, dst = dst, src
		}
		d.o.Anonymizer.ApplyMapped(rec, p, src, dst)
	} else if f.maskA || f.maskB {
		maskSrc, maskDst := f.maskA, f.maskB
		if !srcIsA {
			maskSrc, maskDst = maskDst, maskSrc
		}
		d.o.Anonymizer.Apply(rec, p, maskSrc, maskDst)
	}
	if fa := f.anon; fa != nil && fa.shiftTS {
		valOff, ecrOff := fa.ts[0], fa.ts[1] // the sender's clock, the echoed one
		if !srcIsA {
			valOff, ecrOff = ecrOff, valOff
		}
		anonymize.ShiftTimestamps(rec, p, valOff, ecrOff)
	}
	d.o.Anonymizer.ZeroLinkAddrs(rec, d.o.LinkType)
	if f.st == named && f.buf.Bytes() >= d.spill && f.buf.Full() {
		d.push(f)
	}
}

// flowAnon is a flow's anonymization state, computed at its first packet.
type flowAnon struct {
	addr    [2][16]byte // A's and B's addresses as saved (cryptopan)
	mapped  bool        // addr applies
	ts      [2]uint32   // A's and B's timestamp offsets
	shiftTS bool
}

// side returns the saved address of end i (0: A, 1: B) in cryptopan mode,
// or nil when it is kept.
func (f *flow) side(i int) *[16]byte {
	if i == 0 && f.maskA || i == 1 && f.maskB {
		return &f.anon.addr[i]
	}
	return nil
}

// track follows the sequence space of the segment's sender (src is A when
// srcIsA) and returns how the segment ends the connection, if it does: an
// RST the receiver accepts, or the second FIN in sequence. Segments the receiver
// would drop or answer with a challenge ACK change nothing
// (TestInjectedSegments).
func (f *flow) track(p *packet.Parsed, data []byte, srcIsA bool) index.End {
	src, dst := &f.ends[0], &f.ends[1]
	if !srcIsA {
		src, dst = dst, src
	}
	flags := p.Flags
	syn := flags&packet.FlagSYN != 0
	if syn {
		src.wscale, src.wsOK = p.WindowScale(data)
		if flags&packet.FlagACK != 0 {
			f.synced, f.sawSYNACK = true, true
		} else {
			f.sawSYN = true
		}
	} else if flags&packet.FlagACK != 0 {
		src.acked = true
		f.synced = f.synced || dst.acked
	}
	if flags&packet.FlagRST != 0 {
		// RFC 5961 3.2: only an RST at exactly the next sequence number
		// resets a synchronized connection (Linux also takes the FIN's own
		// number); one answering a SYN must acknowledge it.
		var ok bool
		switch {
		case src.seen:
			ok = p.Seq == src.nxt || p.Seq == src.hi || src.fin && p.Seq == src.nxt-1
		case dst.seen:
			ok = flags&packet.FlagACK != 0 && p.Ack == dst.nxt
		default:
			ok = true // a lone RST: nothing to check it against
		}
		f.ended = f.ended || ok
		if ok {
			return index.EndRST
		}
		return index.EndNone
	}
	seqEnd := p.Seq + uint32(p.PayloadLen)
	if syn {
		seqEnd++
	}
	fin := flags&packet.FlagFIN != 0
	if !src.seen {
		if fin {
			src.finPos, src.finSeen, src.fin = seqEnd, true, true
			seqEnd++
		}
		src.nxt, src.hi, src.seen = seqEnd, seqEnd, true
	} else if w, dStart, dEnd := int32(dst.window()), int32(p.Seq-src.nxt), int32(seqEnd-src.nxt); dEnd >= -w && dStart <= w {
		// In the receiver's window; nothing is missing before it when it
		// reaches the next number expected.
		if fin {
			src.finPos, src.finSeen = seqEnd, true
			if dStart <= 0 && dEnd >= 0 {
				src.fin = true
				seqEnd++
			}
		}
		if dStart <= 0 && int32(seqEnd-src.nxt) > 0 {
			src.nxt = seqEnd
		}
		if int32(seqEnd-src.hi) > 0 {
			src.hi = seqEnd
		}
	}
	if flags&packet.FlagACK != 0 && dst.seen {
		// What src acknowledges of dst's data is what it received.
		switch a := p.Ack; {
		case dst.finSeen && a == dst.finPos+1:
			dst.fin = true
			dst.nxt, dst.hi = a, a
		case int32(a-dst.nxt) > 0 && int32(a-dst.hi) <= 0:
			dst.nxt = a
		}
	}
	if !syn {
		src.wnd = uint32(p.Window)
		if src.wsOK && dst.wsOK {
			src.wnd <<= src.wscale
		}
	}
	if src.fin && dst.fin && !f.ended {
		f.ended = true
		return index.EndFIN
	}
	return index.EndNone
}

// window returns the receive window an end allows (see minWindow and
// maxWindow).
func (e *end) window() uint32 {
	switch {
	case !e.seen && e.wnd == 0:
		return maxWindow
	case e.wnd < minWindow:
		return minWindow
	}
	return min(e.wnd, maxWindow)
}

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
		d.c.memLimit++
		if pureSYN {
			d.c.refusedMem++
		}
		d.refuse(&k, 1)
		return nil
	}
	if !l.take() && !(d.evict(tsn) && l.take()) {
		d.c.flowLimit++
		if pureSYN {
			d.c.refusedFlows++
		}
		d.refuse(&k, 0)
		return nil
	}
	d.c.started++
	f := &flow{key: k, first: tsn, corr: d.corr, syn: pureSYN, synSeq: seq, refused: d.refusedBefore(&k)}
	if d.o.Capture != nil {
		f.start = d.readings.before(tsn)
	}
	f.maskA = d.o.Anonymizer.ShouldMask(&k.A)
	f.maskB = d.o.Anonymizer.ShouldMask(&k.B)
	if d.o.Anonymizer.PerFlow() {
		// A mapping costs dozens of AES blocks, the timestamp offsets
		// three: once per flow, not per packet (BenchmarkMap,
		// BenchmarkPacket/*/cryptopan).
		fa := &flowAnon{mapped: d.o.Anonymizer.Mode() == anonymize.Keyed && (f.maskA || f.maskB)}
		if fa.mapped && f.maskA {
			fa.addr[0] = d.o.Anonymizer.Map(k.A)
		}
		if fa.mapped && f.maskB {
			fa.addr[1] = d.o.Anonymizer.Map(k.B)
		}
		fa.ts[0], fa.ts[1] = d.o.Anonymizer.TSOffsets(&k)
		fa.shiftTS = fa.ts != [2]uint32{}
		f.anon = fa
	}
	d.flows[k] = f
	if e := d.o.Names.Claim(k, time.Unix(0, tsn)); e != nil {
		d.name(f, e)
	}
	d.track(f)
	if l.MaxFlows > 0 {
		d.starts = append(d.starts, f)
	}
	return f
}

// firstWall returns the wall time of f's first packet, for names, dates
// and the UUID sources' times.
func (f *flow) firstWall() time.Time { return time.Unix(0, f.first-f.corr) }

// halfOpen reports whether neither end of f sent an ACK without SYN.
func (f *flow) halfOpen() bool { return !f.ends[0].acked && !f.ends[1].acked }

// evictable reports whether f may give its place to a new flow.
func (d *Demuxer) evictable(f *flow) bool {
	return f.st == waiting && f.halfOpen() && d.flows[f.key] == f
}

// evict forgets the oldest unnamed half-open flow, if there is one, and
// reports whether it did.
func (d *Demuxer) evict(tsn int64) bool {
	for d.startsHead < len(d.starts) {
		f := d.starts[d.startsHead]
		d.starts[d.startsHead] = nil
		d.startsHead++
		if !d.evictable(f) {
			continue
		}
		if e := d.o.Names.Claim(f.key, f.firstWall()); e != nil {
			d.name(f, e) // named since the last tick: no longer evictable
			d.untrack(f)
			d.track(f)
			continue
		}
		// Its packets count as the limit's, not as a missing UUID.
		d.c.evicted++
		d.c.flowLimit += uint64(f.buf.Packets())
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

func (d *Demuxer) name(f *flow, e *names.Entry) {
	f.entry = e
	f.st = named
	d.stats.UUIDWait.Observe(max(0, e.OpenedAt.Sub(f.firstWall()).Seconds()))
	d.named[e.Source]++
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
		d.name(f, d.o.Fallback(f.key, f.firstWall()))
		return
	}
	d.discard(f, shutdown)
}

// discard drops the headers of a flow that got no UUID.
func (d *Demuxer) discard(f *flow, shutdown bool) {
	if shutdown {
		d.c.shutdown += uint64(f.buf.Packets())
		d.c.endedShutdown++
	} else {
		d.c.noUUID += uint64(f.buf.Packets())
		d.c.uuidTimeout++
	}
	f.buf.Reset()
	f.buf = record.Buffer{}
	f.st = discarded
}

// remove ends a flow at time at, for the reason why: its file is finished
// if it has a UUID, its index record written if it has a file, and it is
// forgotten.
func (d *Demuxer) remove(f *flow, why index.End, at int64) {
	if f.st == waiting {
		// One last claim: its name may have come since the last tick, which
		// may be a second away when the traffic stops, or late on a loaded
		// machine (a connection ended by a new one on its 4-tuple, a
		// deadline applied at a packet; TestSplitClaimsLastChance).
		if e := d.o.Names.Claim(f.key, f.firstWall()); e != nil {
			d.name(f, e)
		} else {
			d.nameOrDiscard(f, false)
		}
	}
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
		if e := d.o.Names.Claim(f.key, f.firstWall()); e != nil {
			d.name(f, e)
		} else if nowN-f.first >= int64(d.o.UUIDWait) && f.halfOpen() && d.o.Fallback == nil {
			d.remove(f, index.EndTimeout, nowN) // nothing more will come of it
			return true
		} else if nowN-f.first >= int64(d.o.UUIDWait) {
			d.nameOrDiscard(f, false)
		} else {
			return false // an unnamed flow waits for its UUID deadline
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

// endedOr returns how the flow ended if its FINs, RST or Close came (its
// linger may be over, or cut short by a timeout, a new connection or the
// shutdown), else why.
func (f *flow) endedOr(why index.End) index.End {
	if f.end != index.EndNone {
		return f.end
	}
	return why
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
		if f.st == waiting {
			if e := d.o.Names.Claim(f.key, f.firstWall()); e != nil {
				d.name(f, e)
			} else {
				d.nameOrDiscard(f, true)
			}
		}
		d.remove(f, f.endedOr(index.EndShutdown), now)
	}
	if n := len(d.readings.r); n > 0 {
		d.handOver(d.readings.at(n - 1).captureCounts) // flows whose last packet came after the clock's now
	}
	d.publish()
}

func (d *Demuxer) publish() {
	st, c := &d.stats, &d.c
	st.Captured.Store(c.captured)
	st.Started.Store(c.started)
	st.Packets.Store("after_captureduration", c.afterDur)
	st.Packets.Store("no_uuid", c.noUUID)
	st.Packets.Store("excluded", c.excluded)
	st.Packets.Store("flow_limit", c.flowLimit)
	st.Packets.Store("memory_limit", c.memLimit)
	st.Packets.Store("shutdown_no_uuid", c.shutdown)
	st.Refused.Store("flow_limit", c.refusedFlows)
	st.Refused.Store("memory_limit", c.refusedMem)
	st.Ended.Store("uuid_timeout", c.uuidTimeout)
	st.Ended.Store("shutdown", c.endedShutdown)
	st.Ended.Store("evicted", c.evicted)
	st.ClockSteps.Store(c.steps)
	var undecodable uint64
	for k := packet.Kind(1); k < packet.NumKinds; k++ {
		undecodable += c.undecodable[k]
		st.Undecodable.Store(k.String(), c.undecodable[k])
	}
	st.Packets.Store("undecodable", undecodable)
	st.mu.Lock()
	for src, n := range d.named {
		st.named[src] = n
	}
	st.mu.Unlock()
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
