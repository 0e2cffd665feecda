package offline

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/saver"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden/")

func options(dir, read, events string) Options {
	return Options{Read: read, Events: events, Config: pipeline.Config{Saver: saver.Options{Dir: dir}, MaxHeaderSize: 256,
		CaptureDuration: 30 * time.Second, FlowTimeout: 30 * time.Second, UUIDWait: 5 * time.Second}}
}

// TestGolden splits testdata/lab.pcap, a real capture from the namespace lab
// (testdata/README.md says how it was made), with the tcp-info events
// recorded beside it, in every mode. The files must equal the golden ones
// byte for byte (go test ./offline -update rewrites them), whatever the
// input's format: pcap, pcapng or gzip-compressed.
func TestGolden(t *testing.T) {
	inputs := []struct{ read, events string }{
		{"testdata/lab.pcap", "testdata/lab-events.jsonl"},
		{"testdata/lab.pcapng", "testdata/lab-events.jsonl"},
		{"testdata/lab.pcap.gz", "testdata/lab-events.jsonl.gz"},
	}
	for _, mode := range []struct {
		name   string
		anon   anonymize.Mode
		stream bool
	}{{"none-buffer", anonymize.None, false}, {"none-stream", anonymize.None, true},
		{"netblock-buffer", anonymize.Netblock, false}, {"netblock-stream", anonymize.Netblock, true}} {
		t.Run(mode.name, func(t *testing.T) {
			golden := filepath.Join("testdata", "golden", mode.name)
			for i, in := range inputs {
				out := t.TempDir()
				o := options(out, in.read, in.events)
				o.Anonymize, o.Stream = mode.anon, mode.stream
				sum, err := Run(context.Background(), o)
				if err != nil {
					t.Fatalf("%s: %v", in.read, err)
				}
				if sum.Files != 3 || sum.Packets != 71 || sum.NoUUID != 0 {
					t.Errorf("%s: %s", in.read, sum)
				}
				if *update && i == 0 {
					os.RemoveAll(golden)
					copyTree(t, out, golden)
					for rel, lines := range indexLines(t, out) {
						os.WriteFile(filepath.Join(golden, rel), []byte(lines), 0o644)
					}
				}
				compareTrees(t, in.read, tree(t, out), tree(t, golden))
				if got, want := indexLines(t, out), indexLines(t, golden); len(want) != 1 || fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("%s: flow index %v, want the golden %v", in.read, got, want)
				}
				if mode.anon == anonymize.None {
					checkAgainstCapture(t, tree(t, out))
				} else {
					checkMasked(t, tree(t, out))
				}
			}
		})
	}
}

func compareTrees(t *testing.T, what string, got, want map[string][]byte) {
	t.Helper()
	if len(want) == 0 {
		t.Fatal("no golden files: run go test ./offline -update")
	}
	for name, b := range want {
		if !bytes.Equal(got[name], b) {
			t.Errorf("%s: %s differs from the golden file", what, name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s: unexpected file %s", what, name)
		}
	}
}

// readRecords reads a pcap with gopacket.
func readRecords(t *testing.T, b []byte) (out []gopacket.CaptureInfo, data [][]byte) {
	r, err := pcapgo.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	for {
		d, ci, err := r.ReadPacketData()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		out, data = append(out, ci), append(data, d)
	}
}

// checkAgainstCapture checks the files with gopacket alone: all their
// records together are the capture's frames, each cut where gopacket says
// its TCP header ends, with the capture's timestamps and lengths.
func checkAgainstCapture(t *testing.T, files map[string][]byte) {
	f, err := os.Open("testdata/lab.pcap")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	capture, _ := io.ReadAll(f)
	cis, frames := readRecords(t, capture)
	var want []string
	for i, frame := range frames {
		p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
		tl, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if !ok {
			continue
		}
		end := len(frame) - len(tl.Payload)
		want = append(want, cis[i].Timestamp.Format(time.RFC3339Nano)+string(rune(cis[i].Length))+string(frame[:end]))
	}
	var got []string
	for _, b := range files {
		cis, data := readRecords(t, b)
		for i := range data {
			got = append(got, cis[i].Timestamp.Format(time.RFC3339Nano)+string(rune(cis[i].Length))+string(data[i]))
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("the files' %d records are not the capture's %d TCP frames cut at their TCP headers", len(got), len(want))
	}
}

// checkMasked checks that no client address (10.99.0.1, fd99::1) is in the
// files and that the server's are.
func checkMasked(t *testing.T, files map[string][]byte) {
	for name, b := range files {
		_, data := readRecords(t, b)
		for _, d := range data {
			p := gopacket.NewPacket(d, layers.LayerTypeEthernet, gopacket.Default)
			src, dst := p.NetworkLayer().NetworkFlow().Endpoints()
			for _, e := range []string{src.String(), dst.String()} {
				if e == "10.99.0.1" || e == "fd99::1" {
					t.Fatalf("%s: unmasked client address %s", name, e)
				}
			}
		}
	}
}

func TestFallbackNames(t *testing.T) {
	var trees []map[string][]byte
	for i := 0; i < 2; i++ {
		out := t.TempDir()
		o := options(out, "testdata/lab.pcap", "")
		o.Anonymize = anonymize.Netblock
		o.Local = []netip.Addr{netip.MustParseAddr("10.99.0.2"), netip.MustParseAddr("fd99::2")}
		if _, err := Run(context.Background(), o); err != nil {
			t.Fatal(err)
		}
		trees = append(trees, tree(t, out))
	}
	compareTrees(t, "second run", trees[1], trees[0])
	if len(trees[0]) != 3 {
		t.Fatalf("%d files, want 3", len(trees[0]))
	}
	for name := range trees[0] {
		if strings.Contains(name, "10.99.0.1") || strings.Contains(name, "fd99--1_") {
			t.Errorf("file name %s shows a masked address", name)
		}
		if !strings.HasPrefix(filepath.Base(name), "offline_20261125T2327") {
			t.Errorf("file name %s is not a fallback name", name)
		}
	}
	checkMasked(t, trees[0])
}

func TestTruncatedCapture(t *testing.T) {
	full, err := os.ReadFile("testdata/lab.pcap")
	if err != nil {
		t.Fatal(err)
	}
	in := filepath.Join(t.TempDir(), "cut.pcap")
	os.WriteFile(in, full[:3000], 0o644)
	out := t.TempDir()
	sum, err := Run(context.Background(), options(out, in, "testdata/lab-events.jsonl"))
	if err == nil || !strings.Contains(err.Error(), "offset 2892") || !strings.Contains(err.Error(), "after packet 18") {
		t.Fatalf("error %v, want one naming offset 2892 after packet 18", err)
	}
	if sum.Packets != 18 || sum.Files != 1 {
		t.Errorf("%s: want the 18 packets read before the cut saved", sum)
	}
	for _, b := range tree(t, out) {
		if cis, _ := readRecords(t, b); len(cis) != 18 {
			t.Errorf("the flow read before the cut has %d packets, want 18", len(cis))
		}
	}
}

func TestBadEventLines(t *testing.T) {
	events, _ := os.ReadFile("testdata/lab-events.jsonl")
	bad := append([]byte("this is not json\n{\"Event\":0}\n"), events...)
	path := filepath.Join(t.TempDir(), "events.jsonl")
	os.WriteFile(path, bad, 0o644)
	sum, err := Run(context.Background(), options(t.TempDir(), "testdata/lab.pcap", path))
	if err != nil {
		t.Fatal(err)
	}
	if sum.BadEvents != 2 || sum.Events != 6 || sum.Files != 3 {
		t.Errorf("%s: want 2 bad event lines skipped and 3 files", sum)
	}
}

func TestNotACapture(t *testing.T) {
	if _, err := Run(context.Background(), options(t.TempDir(), "testdata/README.md", "")); err == nil || !strings.Contains(err.Error(), "not a pcap") {
		t.Errorf("error %v", err)
	}
}

func TestStdin(t *testing.T) {
	f, err := os.Open("testdata/lab.pcap.gz")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := t.TempDir()
	o := options(out, "-", "testdata/lab-events.jsonl")
	o.Stdin = f
	if _, err := Run(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	compareTrees(t, "stdin", tree(t, out), tree(t, filepath.Join("testdata", "golden", "none-buffer")))
}

// tree returns the flow files below dir (not the index), by relative path.
func tree(t *testing.T, dir string) map[string][]byte {
	out := map[string][]byte{}
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if _, _, ierr := index.ParseName(filepath.Base(p)); err == nil && !info.IsDir() && ierr != nil {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dir, p)
			out[rel] = b
		}
		return nil
	})
	return out
}

// indexLines returns the flow index files below dir, by relative path,
// each as its sorted lines (their order is the writers').
func indexLines(t *testing.T, dir string) map[string]string {
	out := map[string]string{}
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if _, _, ierr := index.ParseName(filepath.Base(p)); err == nil && !info.IsDir() && ierr == nil {
			b, _ := os.ReadFile(p)
			lines := strings.SplitAfter(string(b), "\n")
			sort.Strings(lines)
			rel, _ := filepath.Rel(dir, p)
			out[rel] = strings.Join(lines, "")
		}
		return nil
	})
	return out
}

func copyTree(t *testing.T, from, to string) {
	for rel, b := range tree(t, from) {
		os.MkdirAll(filepath.Dir(filepath.Join(to, rel)), 0o755)
		if err := os.WriteFile(filepath.Join(to, rel), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLinuxSLL2 splits the lab capture as tcpdump -i any records it (Linux
// cooked v2 headers, link type 276), in pcap and in pcapng: the same flows,
// files and packets as from the Ethernet capture, nothing undecodable.
func TestLinuxSLL2(t *testing.T) {
	lab, err := os.ReadFile("testdata/lab.pcap")
	if err != nil {
		t.Fatal(err)
	}
	cis, frames := readRecords(t, lab)
	in := pcapBytes(binary.LittleEndian, 0xa1b23c4d, uint32(packet.LinkTypeLinuxSLL2))
	ng := (&ng{o: binary.LittleEndian}).section().iface(uint16(packet.LinkTypeLinuxSLL2), 0, 9, 0)
	for i, frame := range frames {
		sll := make([]byte, 20, 20+len(frame)-14)
		copy(sll, frame[12:14])                // protocol
		binary.BigEndian.PutUint32(sll[4:], 2) // interface index
		binary.BigEndian.PutUint16(sll[8:], 1) // ARPHRD_ETHER
		sll[11] = 6                            // address length
		copy(sll[12:], frame[6:12])            // source address
		sll = append(sll, frame[14:]...)
		ts, orig := cis[i].Timestamp.UnixNano(), uint32(cis[i].Length-14+20)
		in = binary.LittleEndian.AppendUint32(in, uint32(ts/1e9))
		in = binary.LittleEndian.AppendUint32(in, uint32(ts%1e9))
		in = binary.LittleEndian.AppendUint32(in, uint32(len(sll)))
		in = append(binary.LittleEndian.AppendUint32(in, orig), sll...)
		ng.epb(0, uint64(ts), sll, orig)
	}
	ethernet := t.TempDir()
	if _, err := Run(context.Background(), options(ethernet, "testdata/lab.pcap", "")); err != nil {
		t.Fatal(err)
	}
	want := tree(t, ethernet)
	for name, b := range map[string][]byte{"sll2.pcap": in, "sll2.pcapng": ng.b} {
		path := filepath.Join(t.TempDir(), name)
		os.WriteFile(path, b, 0o644)
		out := t.TempDir()
		sum, err := Run(context.Background(), options(out, path, ""))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if sum.Packets != 71 || sum.Undecodable != 0 || sum.Files != 3 {
			t.Errorf("%s: %s", name, sum)
		}
		got := tree(t, out)
		for file, b := range want {
			g, ok := got[file]
			if !ok {
				t.Errorf("%s: no %s", name, file)
				continue
			}
			if w, g := len(records(t, b)), len(records(t, g)); g != w {
				t.Errorf("%s: %s has %d records, want %d", name, file, g, w)
			}
		}
	}
}

// records returns the records of a file.
func records(t *testing.T, b []byte) []gopacket.CaptureInfo {
	cis, _ := readRecords(t, b)
	return cis
}
