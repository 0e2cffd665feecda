// Package metrics holds the counting types that the daemon's components
// keep for themselves: Counters by a label's value, and Histogram. It has
// no dependency: package exporter reads the counts at scrape time for
// Prometheus.
//
// Components own their counts and know nothing of Prometheus; the
// composition root (main) describes each exported family with a function
// that reads them (exporter.Family), on a registry of its own. Nothing is
// global: two daemons, or tests in parallel, never share a count. Hot loops
// never touch a count per packet: the demuxer counts in plain fields and
// publishes them to its Counters once per tick.
package metrics

import (
	"math"
	"sort"
	"sync/atomic"
)

// Counters counts events by the value of one label. The values are fixed
// when it is made, so that every series exists (at 0) before its first
// event. Safe for concurrent use: Add is a map read and one atomic add.
type Counters struct {
	m      map[string]*atomic.Uint64
	values []string
}

// NewCounters returns counters for the given label values, in that order.
func NewCounters(values ...string) *Counters {
	c := &Counters{m: make(map[string]*atomic.Uint64, len(values)), values: values}
	for _, v := range values {
		c.m[v] = new(atomic.Uint64)
	}
	return c
}

// Add adds n to the counter of value, which must be one of the values the
// counters were made with.
func (c *Counters) Add(value string, n uint64) {
	v, ok := c.m[value]
	if !ok {
		panic("metrics: counter value " + value + " was not declared")
	}
	v.Add(n)
}

// Store sets the counter of value to n: for a counter with one writer
// that keeps its totals itself (the demuxer, which publishes them at each
// tick).
func (c *Counters) Store(value string, n uint64) {
	v, ok := c.m[value]
	if !ok {
		panic("metrics: counter value " + value + " was not declared")
	}
	v.Store(n)
}

// Inc adds one to the counter of value.
func (c *Counters) Inc(value string) { c.Add(value, 1) }

// Get returns the count of value (0 for a value not declared).
func (c *Counters) Get(value string) uint64 {
	if v, ok := c.m[value]; ok {
		return v.Load()
	}
	return 0
}

// Values returns the label values, in their declared order.
func (c *Counters) Values() []string { return c.values }

// Histogram counts observations in buckets with the given upper bounds, as
// a Prometheus histogram does. Safe for concurrent use.
type Histogram struct {
	bounds []float64
	counts []atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	sum    atomic.Uint64   // float64 bits
}

// NewHistogram returns a histogram with the given increasing upper bounds.
func NewHistogram(bounds ...float64) *Histogram {
	return &Histogram{bounds: bounds, counts: make([]atomic.Uint64, len(bounds)+1)}
}

// Observe counts v.
func (h *Histogram) Observe(v float64) {
	i := sort.SearchFloat64s(h.bounds, v)
	h.counts[i].Add(1)
	for {
		old := h.sum.Load()
		if h.sum.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// Count returns the number of observations.
func (h *Histogram) Count() uint64 {
	var n uint64
	for i := range h.counts {
		n += h.counts[i].Load()
	}
	return n
}

// Snapshot returns the upper bounds, the count of each bucket (not
// cumulative; one more than the bounds, the last for +Inf) and the sum.
func (h *Histogram) Snapshot() (bounds []float64, counts []uint64, sum float64) {
	counts = make([]uint64, len(h.counts))
	for i := range h.counts {
		counts[i] = h.counts[i].Load()
	}
	return h.bounds, counts, math.Float64frombits(h.sum.Load())
}

// Merge adds o's observations to h; both have the same bounds.
func (h *Histogram) Merge(o *Histogram) {
	_, counts, sum := o.Snapshot()
	for i, n := range counts {
		h.counts[i].Add(n)
	}
	for {
		old := h.sum.Load()
		if h.sum.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+sum)) {
			return
		}
	}
}
