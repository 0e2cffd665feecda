package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// BenchmarkSoak runs a daemon with the default flags beside tcp-info
// while clients open about 210 short connections a second (each sends a
// line and reads the answer), for PH_SOAK_SECONDS (default 150), and
// reports the daemon's RSS at the start, its peak and at the end, and the
// growth over the second half: memory must be flat once the table of
// connections has reached its steady size (docs/performance.md). Run by
// scripts/bench.sh, not by the test suite.
func BenchmarkSoak(b *testing.B) {
	secs := 150
	if s, err := strconv.Atoi(os.Getenv("PH_SOAK_SECONDS")); err == nil && s > 0 {
		secs = s
	}
	for i := 0; i < b.N; i++ {
		l := newLab(b, 37)
		l.startTCPInfo("tcp-info.log", "")
		l.server(8093)
		d := &daemon{name: "soak"}
		cmd := l.startDaemon(d, 9990, "-tcpinfo.eventsocket", l.tcpinfoSock, "-interface", l.nsIf)
		waitFor(b, 10*time.Second, "the eventsocket connection", func() bool {
			v, _ := metricValue(scrape(d.metrics), "pcap_eventsocket_connected")
			return v == 1
		})
		done := make(chan struct{})
		var made atomic.Int64
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { // ~210 connections a second, 21 every 100 ms
			defer wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-done:
					return
				case <-tick.C:
				}
				for j := 0; j < 21; j++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						c, err := net.DialTimeout("tcp", netip.AddrPortFrom(l.srv4, 8093).String(), 2*time.Second)
						if err != nil {
							return
						}
						defer c.Close()
						c.SetDeadline(time.Now().Add(2 * time.Second))
						c.Write([]byte("s hello\n"))
						c.Read(make([]byte, 64))
						made.Add(1)
					}()
				}
			}
		}()
		start := time.Now()
		first := rss(cmd.Process.Pid)
		var peak, mid int64
		for el := 0; el < secs; el += 10 {
			time.Sleep(10 * time.Second)
			r := rss(cmd.Process.Pid)
			peak = max(peak, r)
			if el+10 >= secs/2 && mid == 0 {
				mid = r
			}
			v, _ := metricValue(scrape(d.metrics), "pcap_flows_active")
			u, _ := metricValue(scrape(d.metrics), "pcap_uuid_announcements")
			fmt.Fprintf(os.Stderr, "soak: %4.0f s: RSS %5.1f MB, %5.0f flows active, %5.0f announcements, %d connections\n",
				time.Since(start).Seconds(), float64(r)/(1<<20), v, u, made.Load())
		}
		close(done)
		wg.Wait()
		last := rss(cmd.Process.Pid)
		b.ReportMetric(float64(first)/(1<<20), "MB-rss-start")
		b.ReportMetric(float64(peak)/(1<<20), "MB-rss-peak")
		b.ReportMetric(float64(last)/(1<<20), "MB-rss-end")
		b.ReportMetric(float64(last-mid)/(1<<20), "MB-growth-2nd-half")
		b.ReportMetric(float64(made.Load())/time.Since(start).Seconds(), "conns/s")
		if _, err := stop(b, cmd, syscall.SIGTERM, 30*time.Second); err != nil {
			b.Errorf("daemon: %v", err)
		}
	}
}
