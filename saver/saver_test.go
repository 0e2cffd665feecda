package saver

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var t0 = time.Date(2026, 11, 25, 23, 59, 59, 999999999, time.UTC)

// fill appends n records of varying sizes, as a flow would.
func fill(b *record.Buffer, n int) {
	for i := 0; i < n; i++ {
		hdr := bytes.Repeat([]byte{byte(i)}, 54+i%40)
		b.Append(t0.Add(time.Duration(i)*time.Millisecond), 1514, hdr)
	}
}

func newSaver(t *testing.T) *Saver {
	s, err := New(Options{Dir: t.TempDir(), Snaplen: 256})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestGoldenFile writes a flow in three pushes (stream mode) and checks the
// file byte for byte against testdata/golden.pcap (go test -update rewrites
// it), and that gopacket reads it back as written.
func TestGoldenFile(t *testing.T) {
	s := newSaver(t)
	var b record.Buffer
	fill(&b, 150)
	f := s.Start("host_1_000000000000ABCD", packet.LinkTypeEthernet, t0)
	f.Push(&b, false)
	fill(&b, 50)
	f.Push(&b, false)
	f.Push(&b, true)
	s.Wait()
	path := filepath.Join(s.Dir(), "2026/11/25/host_1_000000000000ABCD.pcap")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "golden.pcap")
	if *update {
		os.WriteFile(golden, got, 0o644)
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from %s", path, golden)
	}
	r, err := pcapgo.NewReader(bytes.NewReader(got))
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != layers.LinkTypeEthernet || r.Snaplen() != 256 {
		t.Errorf("link type %v snaplen %d", r.LinkType(), r.Snaplen())
	}
	for i := 0; ; i++ {
		data, ci, err := r.ReadPacketData()
		if err == io.EOF {
			if i != 200 {
				t.Errorf("%d records, want 200", i)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		j := i % 150
		if !ci.Timestamp.Equal(t0.Add(time.Duration(j)*time.Millisecond)) || ci.Length != 1514 || len(data) != 54+j%40 || data[0] != byte(j) {
			t.Fatalf("record %d: %v %d %d", i, ci.Timestamp, ci.Length, len(data))
		}
	}
	if entries, _ := os.ReadDir(s.PartialDir()); len(entries) != 0 {
		t.Errorf("%d files left in %s", len(entries), s.PartialDir())
	}
}

func TestNeverOverwrites(t *testing.T) {
	s := newSaver(t)
	for i, n := range []int{3, 5} {
		var b record.Buffer
		fill(&b, n)
		s.Start("same-uuid", packet.LinkTypeEthernet, t0).Push(&b, true)
		s.Wait()
		st, err := os.Stat(s.Path("same-uuid", t0))
		if err != nil {
			t.Fatal(err)
		}
		if want := int64(FileHeaderLen + 3*record.RecordHeaderLen + 54 + 55 + 56); st.Size() != want {
			t.Errorf("after flow %d the file has %d bytes, want the first flow's %d", i, st.Size(), want)
		}
	}
	if entries, _ := os.ReadDir(s.PartialDir()); len(entries) != 0 {
		t.Errorf("the refused file was left in %s", s.PartialDir())
	}
}

// queued returns the number of chunks a flow's writer has not taken yet.
func queued(f *Flow) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.queue)
}

// TestNoCrossWiring: flows whose names are taken already (a rerun into a
// directory that still holds some of its files) fail alone, while others
// write at the same time: every missing file is written with exactly its
// own packets, no existing file changes, and no descriptor is closed twice
// (a flow whose rename was refused used to close its descriptor again,
// which by then was another writer's file).
func TestNoCrossWiring(t *testing.T) {
	s := newSaver(t)
	const flows = 600
	rec := func(i int) []byte { return bytes.Repeat([]byte{byte(i), byte(i >> 8)}, 40) }
	for i := 0; i < flows; i += 2 { // every other name exists already
		os.MkdirAll(filepath.Dir(s.Path("x", t0)), 0o755)
		os.WriteFile(s.Path(fmt.Sprintf("flow-%d", i), t0), []byte("earlier run"), 0o644)
	}
	for i := 0; i < flows; i++ {
		var b record.Buffer
		for j := 0; j < 3+i%5; j++ {
			b.Append(t0, 1514, rec(i))
		}
		s.Start(fmt.Sprintf("flow-%d", i), packet.LinkTypeEthernet, t0).Push(&b, true)
		if i%3 == 0 { // and the same name twice at once
			var b record.Buffer
			b.Append(t0, 1514, rec(i))
			s.Start(fmt.Sprintf("flow-%d", i), packet.LinkTypeEthernet, t0).Push(&b, true)
		}
	}
	s.Wait()
	for i := 0; i < flows; i++ {
		got, err := os.ReadFile(s.Path(fmt.Sprintf("flow-%d", i), t0))
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		if i%2 == 0 {
			if string(got) != "earlier run" {
				t.Errorf("flow %d: an existing file was changed", i)
			}
			continue
		}
		r, err := pcapgo.NewReader(bytes.NewReader(got))
		if err != nil {
			t.Errorf("flow %d: %v", i, err)
			continue
		}
		n := 0
		for {
			data, _, err := r.ReadPacketData()
			if err != nil {
				break
			}
			if !bytes.Equal(data, rec(i)) {
				t.Errorf("flow %d: holds another flow's record", i)
				break
			}
			n++
		}
		if n != 3+i%5 && !(i%3 == 0 && n == 1) {
			t.Errorf("flow %d: %d records, want %d (or 1 from its twin)", i, n, 3+i%5)
		}
	}
	if entries, _ := os.ReadDir(s.PartialDir()); len(entries) != 0 {
		t.Errorf("%d files left in %s", len(entries), s.PartialDir())
	}
}

// TestRename: a flow renamed before its last chunk is published under the
// new name only, in buffer and stream mode.
func TestRename(t *testing.T) {
	s := newSaver(t)
	for _, stream := range []bool{false, true} {
		old, renamed := fmt.Sprintf("kernel-%v", stream), fmt.Sprintf("tcpinfo-%v", stream)
		var b record.Buffer
		fill(&b, 300)
		f := s.Start(old, packet.LinkTypeEthernet, t0)
		if stream {
			f.Push(&b, false)
		}
		f.Rename(renamed)
		f.Push(&b, true)
		s.Wait()
		if _, err := os.Stat(s.Path(old, t0)); !os.IsNotExist(err) {
			t.Errorf("stream %v: a file under the old name", stream)
		}
		if got, err := os.ReadFile(s.Path(renamed, t0)); err != nil || len(got) < 300*(record.RecordHeaderLen+54) {
			t.Errorf("stream %v: the renamed file: %d bytes, %v", stream, len(got), err)
		}
	}
	f := s.Start("good", packet.LinkTypeEthernet, t0)
	f.Rename("../bad")
	var b record.Buffer
	fill(&b, 3)
	f.Push(&b, true)
	s.Wait()
	if _, _, failed := s.Written(); failed != 1 {
		t.Errorf("a rename to a path: %d failed flows, want 1", failed)
	}
}

// TestPrepareDays: today's and tomorrow's directories exist before any file
// is written in them.
func TestPrepareDays(t *testing.T) {
	s := newSaver(t)
	if err := s.PrepareDays(t0); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"2026/11/25", "2026/11/26"} {
		if st, err := os.Stat(filepath.Join(s.Dir(), d)); err != nil || !st.IsDir() {
			t.Errorf("%s: %v", d, err)
		}
	}
}

// TestPathDays: the day directory follows each flow's UTC day, whatever
// day the path before it had (the last day's directory is kept).
func TestPathDays(t *testing.T) {
	s := newSaver(t)
	for _, at := range []string{"2026-11-25T23:59:59.999999999Z", "2026-11-26T00:00:00Z", "2026-11-25T12:00:00+02:00",
		"2026-11-26T01:00:00+02:00", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "1969-12-31T00:00:00Z", "1969-12-30T23:59:59Z"} {
		first, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			t.Fatal(err)
		}
		want := filepath.Join(s.Dir(), first.UTC().Format("2006/01/02"), "u.pcap")
		if got := s.Path("u", first); got != want {
			t.Errorf("Path at %s = %s, want %s", at, got, want)
		}
	}
}

// TestLongestUUID: a UUID as long as CheckUUID allows names a file, plain
// and compressed.
func TestLongestUUID(t *testing.T) {
	for _, compress := range []bool{false, true} {
		s, err := New(Options{Dir: t.TempDir(), Compress: compress})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 100; i++ { // a daemon that has written some flows already
			var b record.Buffer
			fill(&b, 1)
			s.Start(fmt.Sprintf("f%d", i), packet.LinkTypeEthernet, t0).Push(&b, true)
		}
		s.Wait()
		u := strings.Repeat("u", MaxUUIDLen)
		var b record.Buffer
		fill(&b, 3)
		s.Start(u, packet.LinkTypeEthernet, t0).Push(&b, true)
		s.Wait()
		if _, err := os.Stat(s.Path(u, t0)); err != nil {
			t.Errorf("compress %v: %v", compress, err)
		}
	}
}

// TestDrainingBounded: flows handed their last chunks count as draining
// until written, and WaitDraining holds its caller (offline mode's reader)
// while more than its bound are: with the disk's writers held, the reader
// waits; once they go on, it goes on.
func TestDrainingBounded(t *testing.T) {
	s := newSaver(t)
	for range cap(s.io) { // every writer slot taken: a disk that does not keep up
		s.io <- struct{}{}
	}
	streaming := s.Start("streaming", packet.LinkTypeEthernet, t0) // not final: not waited for
	for i := 0; i < 20; i++ {
		var b record.Buffer
		fill(&b, 3)
		s.Start(fmt.Sprintf("flow-%d", i), packet.LinkTypeEthernet, t0).Push(&b, true)
	}
	if n := s.Draining(); n != 20 {
		t.Fatalf("%d flows draining, want 20", n)
	}
	waited := make(chan struct{})
	go func() { s.WaitDraining(5); close(waited) }()
	select {
	case <-waited:
		t.Fatal("WaitDraining returned with 20 flows draining")
	case <-time.After(50 * time.Millisecond):
	}
	for range cap(s.io) {
		<-s.io
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("WaitDraining still waits once the writers go on")
	}
	var b record.Buffer
	fill(&b, 1)
	streaming.Push(&b, true)
	s.Wait()
	if n := s.Draining(); n != 0 {
		t.Errorf("%d flows draining after every one was written", n)
	}
}

// TestManyFlowsEndAtOnce: 20,000 flows held, then ended together (the end
// of an offline capture of a SYN scan), are all written by a few
// goroutines, not one each.
func TestManyFlowsEndAtOnce(t *testing.T) {
	s := newSaver(t)
	const n = 20000
	flows := make([]*Flow, n)
	bufs := make([]record.Buffer, n)
	before := runtime.NumGoroutine()
	for i := range flows {
		flows[i] = s.Start("many"+strconv.Itoa(i), packet.LinkTypeEthernet, t0)
		fill(&bufs[i], 2)
	}
	if g := runtime.NumGoroutine() - before; g > 0 {
		t.Errorf("%d goroutines for %d flows held", g, n)
	}
	most := 0
	for i, f := range flows {
		f.Push(&bufs[i], true)
		if i%100 == 0 {
			most = max(most, runtime.NumGoroutine()-before)
		}
	}
	s.Wait()
	if files, _, failed := s.Written(); files != n || failed != 0 {
		t.Errorf("%d files, %d failed; want %d, 0", files, failed, n)
	}
	if limit := 2*cap(s.io) + 2; most > limit {
		t.Errorf("%d goroutines writing %d flows ended at once, want at most %d", most, n, limit)
	}
}
