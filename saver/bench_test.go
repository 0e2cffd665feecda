package saver

import (
	"encoding/binary"
	"io"
	"os"
	"testing"
	"time"

	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// labHeaders returns the headers of a real capture's frames, cut where the
// TCP header ends, as the demuxer hands them over, with the offset of their
// TCP header.
func labHeaders(b *testing.B) ([][]byte, []int) {
	f, err := os.Open("../offline/testdata/lab.pcap")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		b.Fatal(err)
	}
	var out [][]byte
	var tcp []int
	for {
		data, _, err := r.ReadPacketData()
		if err == io.EOF {
			return out, tcp
		}
		var p packet.Parsed
		if p.Decode(packet.LinkTypeEthernet, data) == packet.TCP {
			out = append(out, data[:min(len(data), p.HeaderEnd)])
			tcp = append(tcp, p.TCPOffset)
		}
	}
}

// BenchmarkSaveFlow writes 1000-packet flows of real headers, plain and
// with -compress, and reports bytes on disk per flow and the ratio. The
// headers advance as a bulk transfer's do (sequence and acknowledgment
// numbers, timestamps), so that they compress as real ones.
func BenchmarkSaveFlow(b *testing.B) {
	hdrs, tcpOff := labHeaders(b)
	flow := make([][]byte, 1000)
	for j := range flow {
		h := append([]byte{}, hdrs[j%len(hdrs)]...)
		o := tcpOff[j%len(hdrs)]
		binary.BigEndian.PutUint32(h[o+4:], binary.BigEndian.Uint32(h[o+4:])+uint32(1448*j))
		binary.BigEndian.PutUint32(h[o+8:], binary.BigEndian.Uint32(h[o+8:])+uint32(37*j))
		if len(h) >= o+32 {
			binary.BigEndian.PutUint32(h[o+24:], binary.BigEndian.Uint32(h[o+24:])+uint32(j/3))
		}
		flow[j] = h
	}
	for _, v := range []struct {
		name              string
		compress, indexed bool
	}{{"plain", false, false}, {"gzip", true, false}, {"plain/indexed", false, true}} {
		compress := v.compress
		b.Run(v.name, func(b *testing.B) {
			s, err := New(Options{Dir: b.TempDir(), Compress: compress})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			raw := 0
			for i := 0; i < b.N; i++ {
				var buf record.Buffer
				for j, h := range flow {
					buf.Append(t0.Add(time.Duration(j)*137*time.Microsecond), 1514, h)
				}
				raw = FileHeaderLen + buf.Bytes()
				f := s.Start("bench", packet.LinkTypeEthernet, t0)
				if v.indexed { // the flow's index record too, written after the file
					f.End(testRecord(t0))
				}
				f.Push(&buf, true)
				s.Wait()
				os.Remove(s.Path("bench", t0))
			}
			_, bytes, _ := s.Written()
			perFlow := float64(bytes) / float64(b.N)
			b.ReportMetric(perFlow, "disk-bytes/flow")
			b.ReportMetric(perFlow/float64(raw), "disk/raw")
		})
	}
}
