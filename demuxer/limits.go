package demuxer

import (
	"sync/atomic"
)

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
