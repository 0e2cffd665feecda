package offline

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/packet"
)

// TestUnannouncedFlowsGetFallbackNames: with events that announce only one
// of the capture's three connections (tcp-info misses short ones), the two
// others are written under fallback names instead of being dropped, and the
// summary says how many each source named.
func TestUnannouncedFlowsGetFallbackNames(t *testing.T) {
	f, err := os.Open("testdata/lab-events.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	var kept []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		if strings.Contains(s.Text(), "00000000000003C4") {
			kept = append(kept, s.Text())
		}
	}
	f.Close()
	events := filepath.Join(t.TempDir(), "events.jsonl")
	os.WriteFile(events, []byte(strings.Join(kept, "\n")+"\n"), 0o644)
	out := t.TempDir()
	sum, err := Run(context.Background(), options(out, "testdata/lab.pcap", events))
	if err != nil {
		t.Fatal(err)
	}
	if sum.Files != 3 || sum.NamedByEvents != 1 || sum.NamedByFallback != 2 || sum.NoUUID != 0 {
		t.Errorf("%d files, %d named by events, %d by fallback, %d packets without UUID; want 3, 1, 2, 0 (%s)", sum.Files, sum.NamedByEvents, sum.NamedByFallback, sum.NoUUID, sum)
	}
	files := tree(t, out)
	if _, ok := files[filepath.Join("2026/11/25", "vm_1795646195_unsafe_00000000000003C4.pcap")]; !ok {
		t.Errorf("the announced flow is not under tcp-info's name: %v", keys(files))
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// capture writes a pcapng of frames, each (interface, time, frame), with
// the interfaces' link types.
type frame struct {
	ifc  int
	at   time.Duration
	data []byte
}

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func writeCapture(t *testing.T, lts []layers.LinkType, frames []frame) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "in.pcapng")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := pcapgo.NewNgWriterInterface(f, pcapgo.NgInterface{LinkType: lts[0], SnapLength: 256, TimestampResolution: 9}, pcapgo.NgWriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, lt := range lts[1:] {
		if _, err := w.AddInterface(pcapgo.NgInterface{LinkType: lt, SnapLength: 256, TimestampResolution: 9}); err != nil {
			t.Fatal(err)
		}
	}
	for _, fr := range frames {
		ci := gopacket.CaptureInfo{Timestamp: t0.Add(fr.at), CaptureLength: len(fr.data), Length: len(fr.data), InterfaceIndex: fr.ifc}
		if err := w.WritePacket(ci, fr.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return path
}

// segment is one TCP segment of a connection 192.0.2.1:443 <->
// 203.0.113.5:port, behind Ethernet.
func segment(t *testing.T, port uint16, fromClient bool, seq, ack uint32, flags string, payload int) []byte {
	t.Helper()
	cli, srv := net.IP{203, 0, 113, 5}, net.IP{192, 0, 2, 1}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: cli, DstIP: srv}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(port), DstPort: 443, Seq: seq, Ack: ack, Window: 1000,
		SYN: strings.Contains(flags, "S"), ACK: strings.Contains(flags, "A"), FIN: strings.Contains(flags, "F"), RST: strings.Contains(flags, "R")}
	if !fromClient {
		ip.SrcIP, ip.DstIP = srv, cli
		tcp.SrcPort, tcp.DstPort = 443, layers.TCPPort(port)
	}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload(make([]byte, payload))); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestIdleGapStartsNewFlow: a keepalive session idle for longer than
// -flowtimeout between bursts (BGP, OpenFlow) ends its flow at the timeout,
// as live mode's clock would, and the next burst is a new flow with a file
// of its own: no packet is dropped, none lands in the old file.
func TestIdleGapStartsNewFlow(t *testing.T) {
	var frames []frame
	seq := uint32(100)
	frames = append(frames, frame{0, 0, segment(t, 1000, true, seq, 0, "S", 0)},
		frame{0, time.Millisecond, segment(t, 1000, false, 5000, seq+1, "SA", 0)})
	seq++
	for burst := 0; burst < 3; burst++ {
		at := time.Duration(burst) * 12 * time.Second // gaps of 12 s, -flowtimeout 5 s, -captureduration 30 s
		for i := 0; i < 3; i++ {
			frames = append(frames, frame{0, at + time.Duration(10+i)*time.Millisecond, segment(t, 1000, true, seq, 5001, "A", 19)})
			seq += 19
		}
	}
	in := writeCapture(t, []layers.LinkType{layers.LinkTypeEthernet}, frames)
	o := options(t.TempDir(), in, "")
	o.FlowTimeout = 5 * time.Second
	sum, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Files != 3 || sum.AfterDuration != 0 || sum.NoUUID != 0 {
		t.Errorf("%d files, %d packets after -captureduration, %d without UUID; want a file per burst and none dropped (%s)", sum.Files, sum.AfterDuration, sum.NoUUID, sum)
	}
	total := 0
	for _, b := range tree(t, o.Saver.Dir) {
		ci, _ := readRecords(t, b)
		total += len(ci)
	}
	if total != len(frames) {
		t.Errorf("%d packets in the files, want all %d", total, len(frames))
	}
}

// TestFallbackNamesUnique: one connection seen on two pcapng interfaces
// with equal timestamps, and a capture whose timestamps jump back so that
// one 4-tuple starts two flows at one time, give a file each, with the same
// names on every run.
func TestFallbackNamesUnique(t *testing.T) {
	syn := segment(t, 1000, true, 100, 0, "S", 0)
	synack := segment(t, 1000, false, 5000, 101, "SA", 0)
	rst := segment(t, 1000, true, 101, 0, "R", 0)
	frames := []frame{
		{0, 0, syn}, {1, 0, syn}, {0, time.Millisecond, synack}, {1, time.Millisecond, synack},
		{0, 2 * time.Millisecond, rst}, {1, 2 * time.Millisecond, rst},
		// The clock jumps back: a new connection on the 4-tuple at the
		// first one's time.
		{0, 0, segment(t, 1000, true, 900, 0, "S", 0)}, {0, time.Millisecond, segment(t, 1000, false, 7000, 901, "SA", 0)},
	}
	in := writeCapture(t, []layers.LinkType{layers.LinkTypeEthernet, layers.LinkTypeEthernet}, frames)
	var first map[string][]byte
	for run := 0; run < 3; run++ {
		o := options(t.TempDir(), in, "")
		sum, err := Run(context.Background(), o)
		if err != nil || sum.WriteErrors != 0 {
			t.Fatalf("run %d: %v (%s)", run, err, sum)
		}
		files := tree(t, o.Saver.Dir)
		if len(files) != 3 {
			t.Fatalf("run %d: %d files, want 3: %v", run, len(files), keys(files))
		}
		if first == nil {
			first = files
			continue
		}
		compareTrees(t, "another run", files, first)
	}
}

// TestLinkTypes: a BSD loopback capture (macOS) is split like any other;
// an interface of a link type the decoder does not know is named in the
// summary with its type.
func TestLinkTypes(t *testing.T) {
	eth := segment(t, 1000, true, 100, 0, "S", 0)
	null := append([]byte{2, 0, 0, 0}, eth[14:]...) // AF_INET, little-endian
	in := writeCapture(t, []layers.LinkType{layers.LinkTypeNull, layers.LinkType(9)}, []frame{{0, 0, null}, {1, 0, eth}})
	sum, err := Run(context.Background(), options(t.TempDir(), in, ""))
	if err != nil {
		t.Fatal(err)
	}
	if sum.Files != 1 || sum.UnsupportedPackets != 1 || len(sum.Unsupported) != 1 || !strings.Contains(sum.Unsupported[0], "interface 1: link type 9, PPP is not supported") {
		t.Errorf("%d files, %d unsupported packets, %q", sum.Files, sum.UnsupportedPackets, sum.Unsupported)
	}
	if packet.LinkType(0).Supported() != true || packet.LinkType(9).Supported() {
		t.Error("Supported")
	}
}

// TestUnsupportedLinkTypes: a pcapng with thousands of interfaces of link
// types the decoder does not know gets one summary line per link type,
// with its interfaces and packets counted, not one line per interface.
func TestUnsupportedLinkTypes(t *testing.T) {
	eth := segment(t, 1000, true, 100, 0, "S", 0)
	lts := []layers.LinkType{layers.LinkTypeEthernet}
	frames := []frame{{0, 0, eth}}
	for i := 1; i <= 3000; i++ {
		lt := layers.LinkType(9) // PPP
		if i%3 == 0 {
			lt = 50 // PPP over serial (HDLC)
		}
		lts = append(lts, lt)
		frames = append(frames, frame{i, time.Duration(i) * time.Microsecond, eth})
	}
	sum, err := Run(context.Background(), options(t.TempDir(), writeCapture(t, lts, frames), ""))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"2000 interfaces (the first 1): link type 9, PPP is not supported", "1000 interfaces (the first 3): link type 50"}
	if sum.Files != 1 || sum.UnsupportedPackets != 3000 || len(sum.Unsupported) != 2 {
		t.Fatalf("%d files, %d unsupported packets, %d lines; want 1, 3000, 2", sum.Files, sum.UnsupportedPackets, len(sum.Unsupported))
	}
	for i, w := range want {
		if !strings.Contains(sum.Unsupported[i], w) || !strings.Contains(sum.Unsupported[i], fmt.Sprintf("%d packets not decoded", 2000-1000*i)) {
			t.Errorf("line %d: %q, want %q and its packets", i, sum.Unsupported[i], w)
		}
	}
}

// TestRepeatedOpen: tcp-info repeats the Opens of open connections when it
// restarts. A repeated Open changes nothing: the connection, 3 s long, is
// one file under its UUID, with every packet, and its Close ends it.
func TestRepeatedOpen(t *testing.T) {
	frames := []frame{{0, 0, segment(t, 1000, true, 100, 0, "S", 0)},
		{0, time.Millisecond, segment(t, 1000, false, 5000, 101, "SA", 0)}}
	seq := uint32(101)
	for i := 0; i < 6; i++ {
		frames = append(frames, frame{0, time.Duration(i+1) * 500 * time.Millisecond, segment(t, 1000, true, seq, 5001, "A", 19)})
		seq += 19
	}
	in := writeCapture(t, []layers.LinkType{layers.LinkTypeEthernet}, frames)
	open := func(at time.Duration) string {
		return `{"Event":0,"Timestamp":"` + t0.Add(at).Format(time.RFC3339Nano) + `","UUID":"host_1_00000000000000AA","ID":{"SPort":443,"DPort":1000,"SrcIP":"192.0.2.1","DstIP":"203.0.113.5","Cookie":170}}`
	}
	closeEv := `{"Event":1,"Timestamp":"` + t0.Add(3100*time.Millisecond).Format(time.RFC3339Nano) + `","UUID":"host_1_00000000000000AA"}`
	events := filepath.Join(t.TempDir(), "events.jsonl")
	os.WriteFile(events, []byte(strings.Join([]string{open(time.Millisecond), open(200 * time.Millisecond), closeEv}, "\n")+"\n"), 0o644)
	o := options(t.TempDir(), in, events)
	sum, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	files := tree(t, o.Saver.Dir)
	b, ok := files[filepath.Join("2026/11/25", "host_1_00000000000000AA.pcap")]
	if !ok || len(files) != 1 {
		t.Fatalf("files %v, want one, under the announced UUID (%s)", keys(files), sum)
	}
	if ci, _ := readRecords(t, b); len(ci) != len(frames) {
		t.Errorf("%d packets in the file, want all %d", len(ci), len(frames))
	}
}

// TestCloseAfterCapture: the end of the input is the capture's shutdown. A
// connection that tcp-info announced closed before it ends "close"; one it
// announced closed only after (the events were recorded longer than the
// packets) ends "shutdown", as the live daemon stopped with the capture
// records it (the end-to-end TestEndToEnd compares the two).
func TestCloseAfterCapture(t *testing.T) {
	var frames []frame
	for i, port := range []uint16{1000, 1001} {
		at := time.Duration(i) * 10 * time.Millisecond
		frames = append(frames, frame{0, at, segment(t, port, true, 100, 0, "S", 0)},
			frame{0, at + time.Millisecond, segment(t, port, false, 5000, 101, "SA", 0)},
			frame{0, at + 2*time.Millisecond, segment(t, port, true, 101, 5001, "A", 10)})
	}
	frames = append(frames, frame{0, 3 * time.Second, segment(t, 1001, true, 111, 5001, "A", 10)})
	in := writeCapture(t, []layers.LinkType{layers.LinkTypeEthernet}, frames)
	ev := func(kind int, at time.Duration, port uint16) string {
		return fmt.Sprintf(`{"Event":%d,"Timestamp":"%s","UUID":"host_1_%016X","ID":{"SPort":443,"DPort":%d,"SrcIP":"192.0.2.1","DstIP":"203.0.113.5","Cookie":%d}}`,
			kind, t0.Add(at).Format(time.RFC3339Nano), port, port, port)
	}
	events := filepath.Join(t.TempDir(), "events.jsonl")
	lines := []string{ev(0, 5*time.Millisecond, 1000), ev(0, 15*time.Millisecond, 1001),
		ev(1, 2*time.Second, 1001), ev(1, 3001*time.Millisecond, 1000)}
	os.WriteFile(events, []byte(strings.Join(lines, "\n")+"\n"), 0o644)
	o := options(t.TempDir(), in, events)
	sum, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Events != 4 || sum.NamedByEvents != 2 {
		t.Errorf("%d events, %d flows named by them; want 4 and 2 (%s)", sum.Events, sum.NamedByEvents, sum)
	}
	ends := map[string]string{}
	for _, text := range indexLines(t, o.Saver.Dir) {
		for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
			var r struct{ UUID, End string }
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("index line %q: %v", line, err)
			}
			ends[r.UUID] = r.End
		}
	}
	want := map[string]string{"host_1_00000000000003E8": "shutdown", "host_1_00000000000003E9": "close"}
	if fmt.Sprint(ends) != fmt.Sprint(want) {
		t.Errorf("flow ends %v, want %v", ends, want)
	}
}
