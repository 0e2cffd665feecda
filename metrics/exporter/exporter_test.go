package exporter

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

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

// TestIdleConnections: connections that send nothing cannot take the
// server's descriptors or keep a request out: at most MaxConns are held,
// each new one closing the oldest that is not in a request.
func TestIdleConnections(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	s, err := Listen("127.0.0.1:0", NewRegistry(), Options{Extra: map[string]http.Handler{"/healthz": ok}, MaxConns: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	get := func() error {
		c := http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get("http://" + s.Addr().String() + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	for i := 0; i < 200; i++ {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
		if i%50 == 49 {
			if err := get(); err != nil {
				t.Errorf("a request among %d idle connections: %v", i+1, err)
			}
		}
	}
	for deadline := time.Now().Add(2 * time.Second); s.ln.open() > 8 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := s.ln.open(); n > 8 {
		t.Errorf("%d connections held, want at most 8", n)
	}
	// pprof is not served unless asked for.
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + s.Addr().String() + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/debug/pprof/ answered %d without Options.Pprof", resp.StatusCode)
	}
}
