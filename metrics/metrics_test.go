package metrics

import "testing"

// TestUndeclaredValue: counting a label value not declared is a
// programming error, caught at once.
func TestUndeclaredValue(t *testing.T) {
	t.Parallel()
	defer func() {
		if recover() == nil {
			t.Error("an undeclared value was counted")
		}
	}()
	NewCounters("a").Inc("b")
}

// TestHistogram: observations land in the first bucket whose bound is not
// below them (as Prometheus's le), larger ones in +Inf, and add to the sum.
func TestHistogram(t *testing.T) {
	t.Parallel()
	h := NewHistogram(0.1, 1)
	for _, v := range []float64{0.05, 0.1, 0.5, 3} {
		h.Observe(v)
	}
	_, counts, sum := h.Snapshot()
	if want := []uint64{2, 1, 1}; len(counts) != 3 || counts[0] != want[0] || counts[1] != want[1] || counts[2] != want[2] || sum != 3.65 || h.Count() != 4 {
		t.Errorf("buckets %v, sum %v, count %d; want %v, 3.65, 4", counts, sum, h.Count(), want)
	}
}
