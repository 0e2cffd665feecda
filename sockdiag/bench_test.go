package sockdiag

import (
	"context"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m-lab/uuid"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// BenchmarkNameFlows measures what naming costs per flow with the real
// kernel: 256 established loopback connections are requested at once and
// looked up in batches. It reports microseconds and netlink system calls
// per flow.
func BenchmarkNameFlows(b *testing.B) {
	const flows = 256
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var keys []packet.Key
	var conns []net.Conn
	for i := 0; i < flows; i++ {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c, s)
		keys = append(keys, packet.KeyFromAddrPorts(s.LocalAddr().(*net.TCPAddr).AddrPort(), s.RemoteAddr().(*net.TCPAddr).AddrPort()))
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	conn, err := Dial()
	if err != nil {
		b.Fatal(err)
	}
	var sink swapSink
	tbl := names.New(nil)
	sink.Store(tbl)
	src := NewSource(&sink, Options{Local: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, UUID: uuid.FromCookie})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); src.RunLookups(ctx, conn) }()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		for _, k := range keys {
			src.Request(k)
		}
		for _, k := range keys {
			for tbl.Claim(k, time.Unix(0, 1)) == nil {
				time.Sleep(20 * time.Microsecond)
			}
		}
		b.StopTimer()
		tbl = names.New(nil)
		sink.Store(tbl)
		b.StartTimer()
	}
	elapsed := time.Since(start)
	b.StopTimer()
	cancel()
	wg.Wait()
	n := float64(b.N * flows)
	b.ReportMetric(float64(elapsed.Microseconds())/n, "µs/flow")
	b.ReportMetric(float64(src.Sends.Load()+src.Receives.Load())/n, "syscalls/flow")
	b.ReportMetric(float64(src.Sends.Load())/n, "sends/flow")
}

// swapSink lets the benchmark start each round with an empty table.
type swapSink struct{ atomic.Pointer[names.Table] }

func (s *swapSink) Open(ts time.Time, u string, k packet.Key, source names.Source, cookie uint64) bool {
	return s.Load().Open(ts, u, k, source, cookie)
}
func (s *swapSink) Close(ts time.Time, u string) bool { return s.Load().Close(ts, u) }
func (s *swapSink) Final(u string, k packet.Key, cookie uint64, c *index.Kernel) bool {
	return s.Load().Final(u, k, cookie, c)
}
func (s *swapSink) NamedSince(k packet.Key, t time.Time) bool {
	return s.Load().NamedSince(k, t)
}

// BenchmarkParseDestroy measures the parse of one destroy broadcast, with
// the socket's tcp_info, as recorded from a real kernel: what each
// connection's end costs the destroy loop, with kernelCounters.
func BenchmarkParseDestroy(b *testing.B) {
	raw, err := os.ReadFile("testdata/destroy.bin")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		msgs, err := ParseMessages(raw)
		if err != nil || len(msgs) != 1 || msgs[0].Socket.Info == nil {
			b.Fatal(msgs, err)
		}
		kernelCounters(msgs[0].Socket)
	}
}
