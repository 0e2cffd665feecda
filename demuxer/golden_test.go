package demuxer

import (
	"bufio"
	"bytes"
	"flag"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// TestLabCaptureGolden replays testdata/lab.pcap, a real capture from the
// namespace lab, with the tcp-info events recorded beside it
// (testdata/lab-events.jsonl; see testdata/README.md), through the demuxer
// and the saver, driving the clock by the packets' timestamps. The files
// must equal the golden ones byte for byte (go test -update rewrites them),
// and, checked independently with gopacket, hold every packet of each
// announced flow cut exactly at the end of its TCP header.
func TestLabCaptureGolden(t *testing.T) {
	for _, mode := range []struct {
		name   string
		anon   anonymize.Mode
		stream bool
	}{{"none-buffer", anonymize.None, false}, {"none-stream", anonymize.None, true}, {"netblock-buffer", anonymize.Netblock, false}} {
		t.Run(mode.name, func(t *testing.T) {
			out := t.TempDir()
			replay(t, out, mode.anon, mode.stream)
			golden := filepath.Join("testdata", "golden", mode.name)
			if *update {
				os.RemoveAll(golden)
				copyTree(t, out, golden)
			}
			got, want := tree(t, out), tree(t, golden)
			if len(got) != 3 {
				t.Errorf("%d files written, want one per announced flow (3)", len(got))
			}
			for name, b := range want {
				if !bytes.Equal(got[name], b) {
					t.Errorf("%s differs from the golden file", name)
				}
			}
			for name := range got {
				if _, ok := want[name]; !ok {
					t.Errorf("unexpected file %s", name)
				}
			}
			if mode.anon == anonymize.None {
				checkAgainstCapture(t, got)
			}
		})
	}
}

type labEvent struct {
	ts time.Time
	ev tcpeventsocket.Parsed
}

func replay(t *testing.T, out string, mode anonymize.Mode, stream bool) {
	ef, err := os.Open("testdata/lab-events.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	var events []labEvent
	s := bufio.NewScanner(ef)
	for s.Scan() {
		ev, err := tcpeventsocket.ParseLine(s.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, labEvent{ev.Timestamp, ev})
	}
	sv, err := saver.New(saver.Options{Dir: out, Snaplen: 256})
	if err != nil {
		t.Fatal(err)
	}
	tbl := names.New(nil)
	local := []netip.Addr{netip.MustParseAddr("10.99.0.2"), netip.MustParseAddr("fd99::2")}
	d := New(Options{Interface: "lab", LinkType: packet.LinkTypeEthernet, MaxHeaderSize: 256,
		CaptureDuration: 30 * time.Second, FlowTimeout: 30 * time.Second, UUIDWait: 5 * time.Second, Stream: stream,
		Names: tbl, Writer: SaverWriter{sv}, Anonymizer: anonymize.New(mode, local)})
	for _, rec := range readCapture(t) {
		for len(events) > 0 && !events[0].ts.After(rec.ts) {
			apply(tbl, events[0].ev)
			events = events[1:]
		}
		d.Packet(rec.data, rec.ts, rec.origLen)
		d.Tick(rec.ts)
	}
	for _, e := range events {
		apply(tbl, e.ev)
	}
	d.Close()
	sv.Wait()
	os.Remove(filepath.Join(out, saver.PartialDir))
}

func apply(tbl *names.Table, ev tcpeventsocket.Parsed) {
	if ev.Open {
		tbl.Open(ev.Timestamp, ev.UUID, packet.KeyFromAddrPorts(ev.Local, ev.Remote), "eventsocket", ev.Cookie)
	} else {
		tbl.Close(ev.Timestamp, ev.UUID)
	}
}

type capRecord struct {
	ts      time.Time
	data    []byte
	origLen int
}

func readCapture(t *testing.T) []capRecord {
	f, err := os.Open("testdata/lab.pcap")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var out []capRecord
	for {
		data, ci, err := r.ReadPacketData()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, capRecord{ci.Timestamp, data, ci.Length})
	}
}

// checkAgainstCapture checks the files with gopacket alone: the records of
// all files together are the capture's frames, each cut where gopacket says
// its TCP header ends, with the capture's timestamps.
func checkAgainstCapture(t *testing.T, files map[string][]byte) {
	var want []string
	for _, rec := range readCapture(t) {
		p := gopacket.NewPacket(rec.data, layers.LayerTypeEthernet, gopacket.Default)
		tl, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if !ok {
			continue
		}
		end := len(rec.data) - len(tl.Payload)
		want = append(want, rec.ts.Format(time.RFC3339Nano)+string(rec.data[:end]))
	}
	var got []string
	for _, b := range files {
		r, err := pcapgo.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		for {
			data, ci, err := r.ReadPacketData()
			if err != nil {
				break
			}
			got = append(got, ci.Timestamp.Format(time.RFC3339Nano)+string(data))
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	// The capture's flows are all announced and complete; some frames
	// belong to flows announced before capture started (none here).
	if len(got) != len(want) {
		t.Fatalf("%d records in the files, %d TCP frames in the capture", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("record %d differs from the capture's frame cut at its TCP header", i)
		}
	}
}

func tree(t *testing.T, dir string) map[string][]byte {
	out := map[string][]byte{}
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dir, p)
			out[rel] = b
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
