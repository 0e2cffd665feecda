package offline

import (
	"bufio"
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// writeSynthetic writes a capture of n packets in flows flows, 10 µs apart.
func writeSynthetic(b *testing.B, path string, n, flows int) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	w := pcapgo.NewWriterNanos(bw)
	w.WriteFileHeader(256, layers.LinkTypeEthernet)
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{10, 1, 0, 0}, DstIP: net.IP{10, 2, 0, 1}}
	tcp := &layers.TCP{SrcPort: 1, DstPort: 443, ACK: true, Window: 500,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload(make([]byte, 100)))
	frame := buf.Bytes()
	ts := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for i := 0; i < n; i++ {
		flow := i % flows
		frame[14+12+2], frame[14+12+3] = byte(flow>>8), byte(flow)
		frame[34], frame[35] = byte((1+flow%60000)>>8), byte(1+flow%60000)
		frame[38], frame[39], frame[40], frame[41] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		ts = ts.Add(10 * time.Microsecond)
		w.WritePacket(gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(frame), Length: len(frame)}, frame)
	}
	bw.Flush()
	f.Close()
}

// BenchmarkRun splits a 200k-packet, 2k-flow capture; it reports packets/s.
func BenchmarkRun(b *testing.B) {
	in := filepath.Join(b.TempDir(), "in.pcap")
	const n = 200000
	writeSynthetic(b, in, n, 2000)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		out, _ := os.MkdirTemp("/dev/shm", "offline-bench")
		defer os.RemoveAll(out)
		o := options(out, in, "") // tmpfs: the pipeline, not the disk, is measured
		if _, err := Run(context.Background(), o); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "packets/s")
}
