// Package synth writes synthetic captures for benchmarks: many flows of
// small TCP segments, interleaved, 10 µs apart, each frame a 100-byte
// payload behind Ethernet, IPv4 and a TCP header with the timestamps option.
package synth

import (
	"bufio"
	"net"
	"os"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// Write writes a nanosecond pcap of n packets spread round-robin over the
// given number of flows (at most 65535).
func Write(path string, n, flows int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	w := pcapgo.NewWriterNanos(bw)
	if err := w.WriteFileHeader(256, layers.LinkTypeEthernet); err != nil {
		f.Close()
		return err
	}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: net.IP{10, 1, 0, 0}, DstIP: net.IP{10, 2, 0, 1}}
	tcp := &layers.TCP{SrcPort: 1, DstPort: 443, ACK: true, Window: 500,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload(make([]byte, 100))); err != nil {
		f.Close()
		return err
	}
	frame := buf.Bytes()
	ts := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for i := 0; i < n; i++ {
		flow := i % flows
		frame[14+12+2], frame[14+12+3] = byte(flow>>8), byte(flow) // source address
		frame[34], frame[35] = byte((1+flow)>>8), byte(1+flow)     // source port
		frame[38], frame[39], frame[40], frame[41] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		ts = ts.Add(10 * time.Microsecond)
		if err := w.WritePacket(gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(frame), Length: len(frame)}, frame); err != nil {
			f.Close()
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
