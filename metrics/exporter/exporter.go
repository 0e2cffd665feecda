// Package exporter exports the daemon's counts to Prometheus: a Collector
// of families, each read at scrape time from the component that keeps the
// count, a registry of the daemon's own, and the server of /metrics and
// pprof.
package exporter

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/m-lab/packet-headers/metrics"
)

// Family is one exported metric: its name, help, type and label names, and
// the function that reads its values at scrape time, emitting one value per
// combination of label values.
type Family struct {
	Name, Help string
	Gauge      bool // else a counter
	Labels     []string
	Read       func(emit func(v float64, labelValues ...string))
}

// HistogramFamily is an exported histogram without labels, the sum of the
// histograms Read returns.
type HistogramFamily struct {
	Name, Help string
	Read       func() []*metrics.Histogram
}

// Collector collects families at scrape time.
type Collector struct {
	fams  []Family
	descs []*prometheus.Desc
	hists []HistogramFamily
	hdesc []*prometheus.Desc
}

// Add adds families.
func (c *Collector) Add(fams ...Family) {
	for _, f := range fams {
		c.fams = append(c.fams, f)
		c.descs = append(c.descs, prometheus.NewDesc(f.Name, f.Help, f.Labels, nil))
	}
}

// AddHistogram adds a histogram family.
func (c *Collector) AddHistogram(f HistogramFamily) {
	c.hists = append(c.hists, f)
	c.hdesc = append(c.hdesc, prometheus.NewDesc(f.Name, f.Help, nil, nil))
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
	for _, d := range c.hdesc {
		ch <- d
	}
}

// Collect implements prometheus.Collector, reading every family now.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	for i, f := range c.fams {
		t := prometheus.CounterValue
		if f.Gauge {
			t = prometheus.GaugeValue
		}
		f.Read(func(v float64, lv ...string) {
			ch <- prometheus.MustNewConstMetric(c.descs[i], t, v, lv...)
		})
	}
	for i, f := range c.hists {
		var bounds []float64
		var counts []uint64
		var sum float64
		for _, h := range f.Read() {
			b, cs, s := h.Snapshot()
			if bounds == nil {
				bounds, counts = b, make([]uint64, len(cs))
			}
			for j := range cs {
				counts[j] += cs[j]
			}
			sum += s
		}
		buckets := make(map[float64]uint64, len(bounds))
		var cum uint64
		for j, b := range bounds {
			cum += counts[j]
			buckets[b] = cum
		}
		if counts != nil {
			cum += counts[len(counts)-1]
		}
		ch <- prometheus.MustNewConstHistogram(c.hdesc[i], cum, sum, buckets)
	}
}

// NewRegistry returns a registry with the Go runtime's and the process's
// collectors (go_*, process_*); the daemon registers its own on it.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
