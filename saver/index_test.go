package saver

import (
	"bufio"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// indexLine is the part of a record these tests read back.
type indexLine struct {
	UUID      string `json:"uuid"`
	File      string `json:"file"`
	Packets   int    `json:"packets"`
	Bytes     int    `json:"bytes"`
	FileBytes int    `json:"file_bytes"`
	End       string `json:"end"`
}

// indexFiles reads every published index file of s: records by file name
// (relative to the data directory).
func indexFiles(t *testing.T, s *Saver) map[string][]indexLine {
	t.Helper()
	out := map[string][]indexLine{}
	filepath.Walk(s.Dir(), func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() || !strings.HasSuffix(p, ".jsonl") {
			return nil
		}
		rel, _ := filepath.Rel(s.Dir(), p)
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		out[rel] = []indexLine{}
		for sc.Scan() {
			var l indexLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Errorf("%s: %q: %v", rel, sc.Text(), err)
			}
			out[rel] = append(out[rel], l)
		}
		return nil
	})
	return out
}

func testRecord(ended time.Time) *index.Record {
	return &index.Record{Source: "test", Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.2:2"),
		First: t0, Last: t0, End: index.EndFIN, FlowEnd: index.EndFIN, Ended: ended}
}

// TestIndexRecords: a record is written for every published file, with
// what the file holds, whether End comes before its writer is done or after
// (a file finished at -captureduration), under the name the file was
// published with; a flow whose file failed gets none; the hour's file is
// published by PublishIndex, in the day directory of the flows' files
// (dated by their first packets), named for the hour of their ends.
func TestIndexRecords(t *testing.T) {
	s := newSaver(t)
	ended := t0.Add(2 * time.Second) // the next day's first hour
	var b record.Buffer

	fill(&b, 30)
	early := s.Start("early", packet.LinkTypeEthernet, t0)
	early.End(testRecord(ended)) // before the final push: the writer writes it
	early.Push(&b, true)

	fill(&b, 20)
	late := s.Start("late", packet.LinkTypeEthernet, t0)
	late.Rename("renamed")
	late.Push(&b, true)
	s.Wait()
	late.End(testRecord(ended)) // after: on a goroutine of its own

	fill(&b, 5)
	bad := s.Start("../bad", packet.LinkTypeEthernet, t0)
	bad.Push(&b, true)
	s.Wait()
	bad.End(testRecord(ended))
	fill(&b, 5)
	bad2 := s.Start("../bad2", packet.LinkTypeEthernet, t0)
	bad2.End(testRecord(ended)) // before: the writer has it
	bad2.Push(&b, true)

	s.Wait()
	if got := indexFiles(t, s); len(got) != 0 {
		t.Fatalf("index published before its hour closed: %v", got)
	}
	s.PublishIndex(ended.Add(time.Minute)) // the hour is not over
	if got := indexFiles(t, s); len(got) != 0 {
		t.Fatalf("index published before its hour closed: %v", got)
	}
	s.PublishIndex(index.Hour(ended).Add(time.Hour + IndexGrace))
	got := indexFiles(t, s)
	name := "2026/11/25/flows-20261126T00Z.jsonl"
	recs, ok := got[name]
	if len(got) != 1 || !ok {
		t.Fatalf("index files %v, want %s", got, name)
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].UUID < recs[j].UUID })
	if len(recs) != 2 || recs[0].UUID != "early" || recs[1].UUID != "renamed" {
		t.Fatalf("records %+v, want early and renamed", recs)
	}
	for i, want := range []int{30, 20} {
		r := recs[i]
		path := filepath.Join(s.Dir(), r.File)
		st, err := os.Stat(path)
		if err != nil {
			t.Errorf("%s: %v", r.UUID, err)
			continue
		}
		headers := 0
		for j := 0; j < want; j++ {
			headers += 54 + j%40 // as fill makes them
		}
		if r.File != "2026/11/25/"+r.UUID+".pcap" || r.Packets != want || countRecords(t, path) != want || r.FileBytes != int(st.Size()) || r.Bytes != headers || r.End != "fin" {
			t.Errorf("record %+v: file of %d bytes, want %d packets, %d header bytes", r, st.Size(), want, headers)
		}
	}
	if c := s.IndexCounts(); c.Records.Get("fin") != 2 || c.Incomplete.Get("no_handshake") != 2 || c.Files.Load() != 1 || c.Lost.Load() != 0 {
		t.Errorf("counts: %d records, %d files, %d lost", c.Records.Get("fin"), c.Files.Load(), c.Lost.Load())
	}
}

// TestIndexHours: each hour's records go into a file of their own; a
// record that comes after its hour's file was published goes into another
// one, numbered; at shutdown (a zero time) every open file is published.
// saveRecorded saves a flow of 3 packets whose record says it ended then.
func saveRecorded(s *Saver, uuid string, ended time.Time) {
	var b record.Buffer
	fill(&b, 3)
	f := s.Start(uuid, packet.LinkTypeEthernet, t0)
	f.Push(&b, true)
	f.End(testRecord(ended))
}

func TestIndexHours(t *testing.T) {
	s := newSaver(t)
	h := index.Hour(t0.Add(time.Hour)) // 2026-11-26T00
	save := func(uuid string, ended time.Time) {
		saveRecorded(s, uuid, ended)
		s.Wait()
	}
	save("a", h.Add(time.Minute))
	save("b", h.Add(time.Hour+time.Minute))
	s.PublishIndex(h.Add(time.Hour + IndexGrace))
	save("c", h.Add(59*time.Minute)) // late for its hour
	s.PublishIndex(time.Time{})
	want := map[string]string{
		"2026/11/25/flows-20261126T00Z.jsonl":   "a",
		"2026/11/25/flows-20261126T01Z.jsonl":   "b",
		"2026/11/25/flows-20261126T00Z-2.jsonl": "c",
	}
	got := indexFiles(t, s)
	for name, uuid := range want {
		if recs := got[name]; len(recs) != 1 || recs[0].UUID != uuid {
			t.Errorf("%s: %+v, want %s", name, recs, uuid)
		}
	}
	if len(got) != len(want) {
		t.Errorf("index files %v, want %v", got, want)
	}
}

// TestIndexRecovery: the index files a crash left being written are
// published by the next New, without their last record if the crash cut it
// short; one with no whole record is removed.
func TestIndexRecovery(t *testing.T) {
	s := newSaver(t)
	h := index.Hour(t0)
	saveRecorded(s, "a", t0)
	saveRecorded(s, "b", t0)
	s.Wait()
	s.PublishIndex(t0) // writes the records that wait, as every second live; the hour is open
	// As a crash leaves them: the open file, one cut short, an empty one.
	partials, _ := filepath.Glob(filepath.Join(s.PartialDir(), partialIndexPrefix+"*"))
	if len(partials) != 1 {
		t.Fatalf("partial index files %v", partials)
	}
	f, _ := os.OpenFile(partials[0], os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"uuid":"cut`)
	f.Close()
	os.WriteFile(filepath.Join(s.PartialDir(), "flows.2026-11-25."+strconv.FormatInt(h.Unix(), 10)+".99.jsonl"), []byte(`{"uuid":"x`), 0o644)
	s2, err := New(Options{Dir: s.Dir()})
	if err != nil {
		t.Fatal(err)
	}
	got := indexFiles(t, s2)
	name := "2026/11/25/flows-20261125T23Z.jsonl"
	if recs := got[name]; len(got) != 1 || len(recs) != 2 {
		t.Errorf("index files %v, want %s with 2 records", got, name)
	}
	if left, _ := os.ReadDir(s2.PartialDir()); len(left) != 0 {
		t.Errorf("%d files left in the partial directory", len(left))
	}
	if n := s2.IndexCounts().Recovered.Load(); n != 1 {
		t.Errorf("%d recovered", n)
	}
}
