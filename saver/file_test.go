package saver

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// gunzip decompresses a file and returns its content and the number of
// gzip members it has.
func gunzip(t *testing.T, raw []byte) ([]byte, int) {
	t.Helper()
	br := bytes.NewReader(raw)
	var out []byte
	members := 0
	for br.Len() > 0 {
		zr, err := gzip.NewReader(br)
		if err != nil {
			t.Fatal(err)
		}
		zr.Multistream(false)
		b, err := io.ReadAll(zr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
		members++
	}
	return out, members
}

// TestCompressed writes the golden flow with -compress: a flow handed over
// at once (buffer mode) is one gzip member, a flow written as it goes
// (stream mode) one member per batch; both decompress to the golden file
// and are read back by gopacket, and by tshark when it is installed; the
// compressor is pooled.
func TestCompressed(t *testing.T) {
	s, err := New(Options{Dir: t.TempDir(), Snaplen: 256, Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	for i, uuid := range []string{"host_1_000000000000ABCD", "host_1_000000000000ABCE", "host_1_000000000000ABCF"} {
		stream := i == 2
		var b record.Buffer
		fill(&b, 150)
		f := s.Start(uuid, packet.LinkTypeEthernet, t0)
		if stream {
			f.Push(&b, false)
			for queued(f) > 0 { // the first batch is taken
				time.Sleep(time.Millisecond)
			}
		}
		fill(&b, 50)
		f.Push(&b, true)
		s.Wait()
		path := s.Path(uuid, t0)
		if !strings.HasSuffix(path, ".pcap.gz") {
			t.Fatalf("path %s", path)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		got, members := gunzip(t, raw)
		if !stream && members != 1 {
			t.Errorf("flow %d: %d gzip members, want 1", i, members)
		}
		want, _ := os.ReadFile(filepath.Join("testdata", "golden.pcap"))
		if !bytes.Equal(got, want) {
			t.Errorf("flow %d: decompressed file differs from the golden file", i)
		}
		zr, _ := gzip.NewReader(bytes.NewReader(raw)) // as M-Lab's ETL reads it: every member
		if r, err := pcapgo.NewReader(zr); err != nil || r.LinkType() != layers.LinkTypeEthernet {
			t.Errorf("gopacket cannot read it: %v", err)
		} else if n := readAll(r); n != 200 {
			t.Errorf("gopacket read %d records through gzip, want 200", n)
		}
		t.Logf("%d bytes compressed to %d (%.0f%%) in %d members", len(got), len(raw), 100*float64(len(raw))/float64(len(got)), members)
		if tshark, err := exec.LookPath("tshark"); err == nil {
			out, err := exec.Command(tshark, "-r", path, "-T", "fields", "-e", "frame.number").Output()
			if n := strings.Count(string(out), "\n"); err != nil || n != 200 {
				t.Errorf("tshark read %d frames (%v)", n, err)
			}
		}
	}
	if s.CompressorsInUse() != 0 {
		t.Errorf("%d compressors still in use", s.CompressorsInUse())
	}
}

func readAll(r *pcapgo.Reader) int {
	n := 0
	for {
		if _, _, err := r.ReadPacketData(); err != nil {
			return n
		}
		n++
	}
}

// TestCompressWritesOnce: with -compress, each flow's file is created and
// closed once, in the partial directory, and holds only compressed bytes
// (the records are compressed from the buffer, never written raw and read
// back).
func TestCompressWritesOnce(t *testing.T) {
	s, err := New(Options{Dir: t.TempDir(), Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, s.PartialDir(), unix.IN_CREATE|unix.IN_CLOSE_WRITE); err != nil {
		t.Fatal(err)
	}
	const flows = 20
	for i := 0; i < flows; i++ {
		var b record.Buffer
		fill(&b, 300)
		s.Start(fmt.Sprintf("flow-%d", i), packet.LinkTypeEthernet, t0).Push(&b, true)
	}
	s.Wait()
	buf := make([]byte, 1<<16)
	n, _ := unix.Read(fd, buf)
	creates, closes := 0, 0
	for off := 0; off+unix.SizeofInotifyEvent <= n; {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		if ev.Mask&unix.IN_CREATE != 0 {
			creates++
		}
		if ev.Mask&unix.IN_CLOSE_WRITE != 0 {
			closes++
		}
		off += unix.SizeofInotifyEvent + int(ev.Len)
	}
	if creates != flows || closes != flows {
		t.Errorf("%d files created and %d closed after writing for %d flows, want one each", creates, closes, flows)
	}
}

// TestBigFlow writes a flow of more chunks than one writev takes.
func TestBigFlow(t *testing.T) {
	s := newSaver(t)
	var b record.Buffer
	fill(&b, 200000) // about 2,500 chunks
	s.Start("big", packet.LinkTypeEthernet, t0).Push(&b, true)
	s.Wait()
	if n := countRecords(t, s.Path("big", t0)); n != 200000 {
		t.Errorf("big flow: %d records, want 200000", n)
	}
}

// countRecords counts the records of a pcap file, which must be whole.
func countRecords(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r, err := pcapgo.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	for n := 0; ; n++ {
		if _, _, err := r.ReadPacketData(); err == io.EOF {
			return n
		} else if err != nil {
			t.Fatalf("%s, record %d: %v", path, n, err)
		}
	}
}

// TestWritev writes every buffer (empty ones too) and reports errors.
func TestWritev(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "w")
	if err != nil {
		t.Fatal(err)
	}
	n, err := writeAll(int(f.Fd()), [][]byte{[]byte("abc"), {}, []byte("defg")})
	if err != nil || n != 7 {
		t.Errorf("wrote %d, %v", n, err)
	}
	if got, _ := os.ReadFile(f.Name()); string(got) != "abcdefg" {
		t.Errorf("file holds %q", got)
	}
	f.Close()
	if _, err := writeAll(int(f.Fd()), [][]byte{[]byte("x")}); err == nil {
		t.Error("a write to a closed descriptor succeeded")
	}
}

// TestCompressedStreams: compressed flows written in several batches each,
// many at once, each decompress to exactly their own records (a writer
// once kept the pooled compressor's buffer list as its own, so that two
// writers could write through one).
func TestCompressedStreams(t *testing.T) {
	s, err := New(Options{Dir: t.TempDir(), Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	const flows, batches = 40, 6
	fs := make([]*Flow, flows)
	bufs := make([]record.Buffer, flows)
	for i := range fs {
		fs[i] = s.Start(fmt.Sprintf("flow-%d", i), packet.LinkTypeEthernet, t0)
	}
	for b := 0; b < batches; b++ {
		for i := range fs {
			for j := 0; j < 200; j++ {
				bufs[i].Append(t0, 1514, bytes.Repeat([]byte{byte(i)}, 60))
			}
			fs[i].Push(&bufs[i], b == batches-1)
		}
		time.Sleep(time.Millisecond)
	}
	s.Wait()
	for i := range fs {
		raw, err := os.ReadFile(s.Path(fmt.Sprintf("flow-%d", i), t0))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := gunzip(t, raw)
		r, err := pcapgo.NewReader(bytes.NewReader(got))
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		n := 0
		for {
			data, _, err := r.ReadPacketData()
			if err != nil {
				break
			}
			if data[0] != byte(i) {
				t.Fatalf("flow %d: a record of flow %d", i, data[0])
			}
			n++
		}
		if n != batches*200 {
			t.Errorf("flow %d: %d records, want %d", i, n, batches*200)
		}
	}
}
