package exporter

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/metrics"
)

// TestCollector: two collectors on registries of their own count apart
// (nothing is global), and each reads its parts' counts at scrape time,
// every declared label value included at 0.
func TestCollector(t *testing.T) {
	t.Parallel()
	for _, n := range []uint64{1, 5} {
		events := metrics.NewCounters("open", "close")
		h := metrics.NewHistogram(0.1, 1)
		c := &Collector{}
		c.Add(Family{Name: "pcap_events_total", Help: "Events.", Labels: []string{"type"}, Read: func(emit func(float64, ...string)) {
			for _, v := range events.Values() {
				emit(float64(events.Get(v)), v)
			}
		}})
		c.AddHistogram(HistogramFamily{Name: "pcap_wait_seconds", Help: "Wait.", Read: func() []*metrics.Histogram { return []*metrics.Histogram{h, h} }})
		reg := NewRegistry()
		reg.MustRegister(c)
		events.Add("open", n)
		h.Observe(0.05)
		h.Observe(3)
		want := `# HELP pcap_events_total Events.
# TYPE pcap_events_total counter
pcap_events_total{type="close"} 0
pcap_events_total{type="open"} ` + map[uint64]string{1: "1", 5: "5"}[n] + `
# HELP pcap_wait_seconds Wait.
# TYPE pcap_wait_seconds histogram
pcap_wait_seconds_bucket{le="0.1"} 2
pcap_wait_seconds_bucket{le="1"} 2
pcap_wait_seconds_bucket{le="+Inf"} 4
pcap_wait_seconds_sum 6.1
pcap_wait_seconds_count 4
`
		if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "pcap_events_total", "pcap_wait_seconds"); err != nil {
			t.Errorf("collector %d: %v", n, err)
		}
	}
}
