package demuxer

import (
	"sync"
	"sync/atomic"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// PacketOutcome is why the demuxer saved no copy of a frame: a value of
// pcap_packets_total's outcome label (the saver counts the others:
// saved, write_error, low_space).
type PacketOutcome uint8

// The demuxer's packet outcomes.
const (
	Excluded             PacketOutcome = iota // tcp-info's exclusion rules (package exclude)
	NoUUID                                    // its flow got no UUID within -uuidwaitduration
	AfterCaptureDuration                      // later than -captureduration after its flow's first packet
	FlowLimit                                 // its flow was refused, or evicted, at -maxflows
	MemoryLimit                               // its flow was refused at -maxheap
	Undecodable                               // not decodable TCP/IP (by kind: packet.Kind)
	ShutdownNoUUID                            // its flow was still unnamed at shutdown
	NotLocal                                  // neither end of its connection is this host's
	Outgoing                                  // its connection is one this host opened (saved with -outgoing)
	OtherPort                                 // its connection's local port is not one of -localport's
	NotSampled                                // its connection is not in the sample (-sample)
	OtherCgroup                               // its connection's local port is not a listener's of -cgroup's cgroups
	NumPacketOutcomes
)

var packetOutcomes = [NumPacketOutcomes]string{"excluded", "no_uuid", "after_captureduration", "flow_limit", "memory_limit", "undecodable", "shutdown_no_uuid", "not_local", "outgoing", "other_port", "not_sampled", "other_cgroup"}

func (o PacketOutcome) String() string { return packetOutcomes[o] }

// Refusal is the limit that kept a new flow out: a value of
// pcap_flows_refused_total's limit label, counted on the flow's SYN.
type Refusal uint8

// The limits.
const (
	RefusedFlowLimit   Refusal = iota // -maxflows
	RefusedMemoryLimit                // -maxheap
	NumRefusals
)

var refusals = [NumRefusals]string{"flow_limit", "memory_limit"}

func (r Refusal) String() string { return refusals[r] }

// EndOutcome is how a tracked flow ended without a file: a value of
// pcap_flows_ended_total's outcome label (the saver counts those with one).
type EndOutcome uint8

// The ends of flows without a file.
const (
	EndedUUIDTimeout EndOutcome = iota // no UUID within -uuidwaitduration
	EndedShutdown                      // none at shutdown
	EndedEvicted                       // half-open and unnamed, its place taken at -maxflows
	EndedNotSampled                    // named, and not in the sample (-sample)
	NumEndOutcomes
)

var endOutcomes = [NumEndOutcomes]string{"uuid_timeout", "shutdown", "evicted", "not_sampled"}

func (o EndOutcome) String() string { return endOutcomes[o] }

// counters are a demuxer's counts, kept in plain fields by its goroutine
// (no atomic, no lock per packet) and published to Stats by Tick.
type counters struct {
	captured, started, steps uint64
	packets                  [NumPacketOutcomes]uint64 // frames not saved
	undecodable              [packet.NumKinds]uint64   // by kind; their sum is packets[Undecodable]
	refused                  [NumRefusals]uint64       // new flows
	ended                    [NumEndOutcomes]uint64    // flows without a file
	verified                 [index.NumVerdicts][index.NumMethods]uint64
}

// Counts are a demuxer's totals since it started, as counted.
type Counts struct {
	Captured uint64                    // frames given to Packet
	Started  uint64                    // flows started
	Packets  [NumPacketOutcomes]uint64 // frames not saved, by outcome
	Ended    [NumEndOutcomes]uint64    // flows ended without a file, by outcome
	Named    map[names.Source]uint64   // flows named, by the source that named them
}

// Counts returns the demuxer's totals. Like Packet, it must be called from
// the demuxer's goroutine.
func (d *Demuxer) Counts() Counts {
	c := Counts{Captured: d.c.captured, Started: d.c.started, Packets: d.c.packets, Ended: d.c.ended, Named: map[names.Source]uint64{}}
	for src, n := range d.named {
		c.Named[src] = n
	}
	return c
}

// Stats are a demuxer's counts as published at its last tick, for readers
// on other goroutines (the daemon's metrics). Safe for concurrent use.
type Stats struct {
	Captured    atomic.Uint64                    // frames given to Packet
	Started     atomic.Uint64                    // flows started
	ClockSteps  atomic.Uint64                    // steps of the wall clock seen by Run
	Packets     [NumPacketOutcomes]atomic.Uint64 // frames not saved
	Undecodable [packet.NumKinds]atomic.Uint64   // frames not decodable, by kind
	Refused     [NumRefusals]atomic.Uint64       // new flows refused
	Ended       [NumEndOutcomes]atomic.Uint64    // flows ended without a file
	// Verified counts the index records written, by verdict and method
	// (index.Verdict, index.Method), at Verified[verdict*NumMethods+method].
	Verified [int(index.NumVerdicts) * int(index.NumMethods)]atomic.Uint64
	UUIDWait *metrics.Histogram
	mu       sync.Mutex
	named    map[names.Source]uint64
}

// Named returns the flows named, by the source that named them.
func (s *Stats) Named() map[names.Source]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[names.Source]uint64, len(s.named))
	for k, v := range s.named {
		out[k] = v
	}
	return out
}

// UUIDWaitBuckets are the bounds, in seconds, of Stats.UUIDWait.
var UUIDWaitBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10}

// Stats returns the demuxer's published counts.
func (d *Demuxer) Stats() *Stats { return &d.stats }

// NewStats returns zero counts, to which the counts of demuxers that
// ended can be added (AddTo), so that sums over demuxers never go back.
func NewStats() *Stats {
	s := &Stats{}
	s.init()
	return s
}

func (s *Stats) init() {
	s.UUIDWait, s.named = metrics.NewHistogram(UUIDWaitBuckets...), map[names.Source]uint64{}
}

// AddTo adds s's counts to dst's.
func (s *Stats) AddTo(dst *Stats) {
	dst.Captured.Add(s.Captured.Load())
	dst.Started.Add(s.Started.Load())
	dst.ClockSteps.Add(s.ClockSteps.Load())
	addAll(dst.Packets[:], s.Packets[:])
	addAll(dst.Undecodable[:], s.Undecodable[:])
	addAll(dst.Refused[:], s.Refused[:])
	addAll(dst.Ended[:], s.Ended[:])
	addAll(dst.Verified[:], s.Verified[:])
	dst.UUIDWait.Merge(s.UUIDWait)
	named := s.Named()
	dst.mu.Lock()
	for src, n := range named {
		dst.named[src] += n
	}
	dst.mu.Unlock()
}

func addAll(dst, src []atomic.Uint64) {
	for i := range src {
		dst[i].Add(src[i].Load())
	}
}

func storeAll(dst []atomic.Uint64, src []uint64) {
	for i := range src {
		dst[i].Store(src[i])
	}
}

// publish stores the counters into Stats, at each tick and at Close.
func (d *Demuxer) publish() {
	st, c := &d.stats, &d.c
	st.Captured.Store(c.captured)
	st.Started.Store(c.started)
	st.ClockSteps.Store(c.steps)
	storeAll(st.Packets[:], c.packets[:])
	storeAll(st.Undecodable[:], c.undecodable[:])
	storeAll(st.Refused[:], c.refused[:])
	storeAll(st.Ended[:], c.ended[:])
	for v := range c.verified {
		storeAll(st.Verified[v*int(index.NumMethods):(v+1)*int(index.NumMethods)], c.verified[v][:])
	}
	st.mu.Lock()
	for src, n := range d.named {
		st.named[src] = n
	}
	st.mu.Unlock()
}
