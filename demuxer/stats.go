package demuxer

import (
	"sync"
	"sync/atomic"

	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/packet"
)

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
