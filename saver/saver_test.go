package saver

import (
	"bytes"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/index"
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

// TestNewCleansLeftoversAndChecksDir: New removes what a crash left in the
// partial directory (its own names only, a link itself and never its
// target), refuses a partial directory it cannot make beside the data
// directory, and a data directory it cannot create.
func TestNewCleansLeftoversAndChecksDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	partial := filepath.Join(filepath.Dir(dir), ".data.partial")
	os.MkdirAll(partial, 0o750)
	victim := filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("keep"), 0o600)
	var left []string
	for _, n := range []string{"7.pcap", "probe-123", "flows.2026-11-25.1764111600.3.jsonl"} {
		left = append(left, filepath.Join(partial, n))
		os.WriteFile(left[len(left)-1], []byte("partial"), 0o640)
	}
	left = append(left, filepath.Join(partial, "8.pcap"))
	os.Symlink(victim, left[len(left)-1])
	foreign := filepath.Join(partial, "notes.txt")
	os.WriteFile(foreign, []byte("not ours"), 0o640)
	s, err := New(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if s.PartialDir() != partial {
		t.Errorf("PartialDir() = %s, want %s", s.PartialDir(), partial)
	}
	for _, l := range left {
		if _, err := os.Lstat(l); !os.IsNotExist(err) {
			t.Errorf("a partial file from an earlier run was not removed: %s", l)
		}
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "keep" {
		t.Errorf("the target of a link in the partial directory was touched: %q %v", b, err)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("a file the saver does not write was removed: %v", err)
	}
	file := filepath.Join(dir, "a-file")
	os.WriteFile(file, nil, 0o644)
	if _, err := New(Options{Dir: filepath.Join(file, "sub")}); err == nil {
		t.Error("New accepted a data directory that cannot be created")
	}
	// A data directory whose partial directory cannot be on its
	// filesystem (a mount point, as a container volume makes it): refused,
	// never a partial directory inside it.
	if _, err := os.Stat("/dev/shm"); err == nil {
		if _, err := New(Options{Dir: "/dev/shm/" + filepath.Base(t.TempDir()), PartialDir: filepath.Join(t.TempDir(), "p")}); err == nil || !strings.Contains(err.Error(), "filesystem") {
			t.Errorf("a partial directory on another filesystem: %v", err)
		}
	}
}

// TestPlantedPartialDir: a partial directory that another user planted (a
// link to a directory of the daemon's, or a directory of the other user's
// holding a link to a file of the daemon's and a forged index file) is
// refused before anything in it is read, removed or published; so is one
// that others can write. As root, the other user is 65534.
func TestPlantedPartialDir(t *testing.T) {
	for _, c := range []struct {
		name  string
		plant func(t *testing.T, partial, victimDir string)
		root  bool
	}{
		{"link", func(t *testing.T, partial, victimDir string) { os.Symlink(victimDir, partial) }, false},
		{"world-writable", func(t *testing.T, partial, victimDir string) {
			os.Mkdir(partial, 0o777)
			os.Chmod(partial, 0o777)
		}, false},
		{"another user's", func(t *testing.T, partial, victimDir string) {
			os.Mkdir(partial, 0o755)
			h := index.Hour(t0)
			forged := filepath.Join(partial, "flows.2026-11-25."+strconv.FormatInt(h.Unix(), 10)+".1.jsonl")
			os.Symlink(filepath.Join(victimDir, "secret"), forged)
			os.WriteFile(filepath.Join(partial, "flows.2026-11-25."+strconv.FormatInt(h.Unix(), 10)+".2.jsonl"), []byte("{\"uuid\":\"forged\"}\n"), 0o644)
			for _, p := range []string{partial, forged} {
				os.Lchown(p, 65534, 65534)
			}
		}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.root && os.Geteuid() != 0 {
				t.Skip("needs root, to give a directory to another user")
			}
			base := t.TempDir()
			victimDir := filepath.Join(base, "victim")
			os.Mkdir(victimDir, 0o700)
			secret := filepath.Join(victimDir, "secret")
			os.WriteFile(secret, []byte("line one\nline two, cut"), 0o600)
			os.WriteFile(filepath.Join(victimDir, "7.pcap"), []byte("the daemon's"), 0o600)
			dir := filepath.Join(base, "data")
			c.plant(t, filepath.Join(base, ".data.partial"), victimDir)
			_, err := New(Options{Dir: dir})
			if !errors.Is(err, ErrUnsafeDir) {
				t.Errorf("New = %v, want ErrUnsafeDir", err)
			}
			if b, _ := os.ReadFile(secret); string(b) != "line one\nline two, cut" {
				t.Errorf("a file of the daemon's was changed through the planted directory: %q", b)
			}
			if _, err := os.Stat(filepath.Join(victimDir, "7.pcap")); err != nil {
				t.Errorf("a file of the daemon's was removed through the planted directory")
			}
			if days, _ := filepath.Glob(filepath.Join(dir, "*", "*", "*", "flows-*")); len(days) != 0 {
				t.Errorf("planted index files were published: %v", days)
			}
		})
	}
}

// TestPermissions: files 0640 and directories 0750 by default, as Perm
// asks otherwise, and Perm refuses to let others write.
func TestPermissions(t *testing.T) {
	old := unix.Umask(0)
	t.Cleanup(func() { unix.Umask(old) })
	for _, c := range []struct {
		perm, file, dir os.FileMode
	}{{0, 0o640, 0o750}, {0o644, 0o644, 0o755}, {0o600, 0o600, 0o700}} {
		s, err := New(Options{Dir: filepath.Join(t.TempDir(), "data"), Perm: c.perm})
		if err != nil {
			t.Fatal(err)
		}
		saveRecorded(s, "perm", t0)
		s.Wait()
		s.PublishIndex(time.Time{})
		for _, p := range []string{s.Path("perm", t0), filepath.Dir(s.Path("perm", t0)), s.Dir(), s.PartialDir()} {
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			want := c.file
			if st.IsDir() {
				want = c.dir
			}
			if st.Mode().Perm() != want {
				t.Errorf("Perm %#o: %s has mode %#o, want %#o", c.perm, p, st.Mode().Perm(), want)
			}
		}
	}
	for _, bad := range []os.FileMode{0o666, 0o660, 0o755, 0o400} {
		if _, err := New(Options{Dir: t.TempDir(), Perm: bad}); err == nil {
			t.Errorf("Perm %#o accepted", bad)
		}
	}
}

func TestRelativeDir(t *testing.T) {
	wd, _ := os.Getwd()
	t.Cleanup(func() { os.Chdir(wd) })
	dir := t.TempDir()
	os.Chdir(dir)
	s, err := New(Options{Dir: "data"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Dir() != filepath.Join(dir, "data") {
		t.Errorf("Dir() = %s", s.Dir())
	}
}

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
	if CompressorsInUse() != 0 {
		t.Errorf("%d compressors still in use", CompressorsInUse())
	}
}

// queued returns the number of chunks a flow's writer has not taken yet.
func queued(f *Flow) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.queue)
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
