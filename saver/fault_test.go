package saver

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// tmpfs mounts a small tmpfs for a test; it needs root.
func tmpfs(t *testing.T, size string) string {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// save writes one flow of n records of 200 bytes and waits for it.
func save(s *Saver, uuid string, n int) {
	var b record.Buffer
	hdr := make([]byte, 200)
	for i := 0; i < n; i++ {
		b.Append(t0, 1514, hdr)
	}
	s.Start(uuid, packet.LinkTypeEthernet, t0).Push(&b, true)
	s.Wait()
}

func exists(s *Saver, uuid string) bool {
	_, err := os.Stat(s.Path(uuid, t0))
	return err == nil
}

func partials(t *testing.T, s *Saver) int {
	entries, _ := os.ReadDir(s.PartialDir())
	return len(entries)
}

func TestDiskFull(t *testing.T) {
	dir := tmpfs(t, "256k")
	s, err := New(Options{Dir: filepath.Join(dir, "data")})
	if err != nil {
		t.Fatal(err)
	}
	writeErrs := s.Counts().WriteErrors.Get("write")
	save(s, "fits", 100) // 21 KB
	save(s, "too-big", 2000)
	if !exists(s, "fits") || exists(s, "too-big") {
		t.Fatalf("fits %v, too-big %v: want only the flow that fits", exists(s, "fits"), exists(s, "too-big"))
	}
	if s.Counts().WriteErrors.Get("write") == writeErrs {
		t.Error("the failed write was not counted")
	}
	if n := partials(t, s); n != 0 {
		t.Errorf("%d partial files left after the failed write", n)
	}
	save(s, "after", 100) // the failed flow's space was given back
	if !exists(s, "after") {
		t.Error("a flow that fits was not saved after the disk was full")
	}
}

func TestMinFreeSpace(t *testing.T) {
	dir := tmpfs(t, "1m")
	s, err := New(Options{Dir: filepath.Join(dir, "data"), MinFreePercent: 50})
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	os.WriteFile(filler, make([]byte, 600<<10), 0o644)
	low := s.Counts().Flows.Get("low_space")
	save(s, "refused", 10)
	if exists(s, "refused") || s.Counts().Flows.Get("low_space") != low+1 {
		t.Error("a flow was written below -minfreespace, or not counted")
	}
	os.Remove(filler)
	save(s, "accepted", 10)
	if !exists(s, "accepted") {
		t.Error("no flow written once space came back")
	}
}

func TestDataDirRemovedAndReadOnly(t *testing.T) {
	dir := tmpfs(t, "1m")
	data := filepath.Join(dir, "data")
	s, err := New(Options{Dir: data})
	if err != nil {
		t.Fatal(err)
	}
	save(s, "before", 5)
	os.RemoveAll(data) // the data directory deleted under the daemon
	save(s, "removed", 5)
	if !exists(s, "removed") {
		t.Error("no flow written after the data directory was removed and is creatable again")
	}
	if out, err := exec.Command("mount", "-o", "remount,ro", dir).CombinedOutput(); err != nil {
		t.Skipf("remount read-only: %v %s", err, out)
	}
	creates := s.Counts().WriteErrors.Get("create")
	save(s, "readonly", 5)
	if exists(s, "readonly") || s.Counts().WriteErrors.Get("create") != creates+1 {
		t.Error("a flow on a read-only datadir must fail, counted")
	}
	exec.Command("mount", "-o", "remount,rw", dir).Run()
	save(s, "writable", 5)
	if !exists(s, "writable") {
		t.Error("no flow written once the datadir is writable again")
	}
}

// TestBadUUIDStaysInside: a flow whose UUID is not a plain file name (a
// path out of the data directory, say) is not written anywhere and counted
// as a write error (op "name"); the next flow is saved as usual.
func TestBadUUIDStaysInside(t *testing.T) {
	root := t.TempDir()
	s, err := New(Options{Dir: filepath.Join(root, "data")})
	if err != nil {
		t.Fatal(err)
	}
	errs := s.Counts().WriteErrors.Get("name")
	for _, u := range []string{"../../../escaped", "../../../../escaped", "sub/dir", ".partial"} {
		save(s, u, 3)
	}
	save(s, "good", 3)
	var files []string
	filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	if want := []string{s.Path("good", t0)}; len(files) != 1 || files[0] != want[0] {
		t.Errorf("files written: %q, want only %q", files, want)
	}
	if got := s.Counts().WriteErrors.Get("name") - errs; got != 4 {
		t.Errorf("%v name errors counted, want 4", got)
	}
	if _, _, failed := s.Written(); failed != 4 {
		t.Errorf("%d flows failed, want 4", failed)
	}
}

// TestIndexDiskFull: a batch of index records that the full disk cuts
// short is cut back whole and counted lost; the records before and after
// it are whole lines, and every line of the published index is JSON.
func TestIndexDiskFull(t *testing.T) {
	dir := tmpfs(t, "256k")
	s, err := New(Options{Dir: filepath.Join(dir, "data")})
	if err != nil {
		t.Fatal(err)
	}
	ended := t0.Add(time.Minute)
	saveRecorded(s, "before", ended)
	s.Wait()
	s.PublishIndex(t0)        // written; the hour is open
	for i := 0; i < 20; i++ { // beyond the page the first record began
		saveRecorded(s, fmt.Sprintf("lost-%d", i), ended)
	}
	s.Wait()
	// Fill the disk but for a few hundred bytes: the batch's write is cut.
	filler := filepath.Join(dir, "filler")
	var st unix.Statfs_t
	unix.Statfs(dir, &st)
	os.WriteFile(filler, make([]byte, int64(st.Bavail)*st.Bsize-300), 0o644)
	s.PublishIndex(t0)
	if n := s.IndexCounts().Lost.Load(); n != 20 {
		t.Errorf("%d records counted lost, want the 20 of the cut batch", n)
	}
	os.Remove(filler)
	saveRecorded(s, "after", ended)
	s.Wait()
	s.PublishIndex(time.Time{})
	got := indexFiles(t, s) // fails the test on a line that is not JSON
	var uuids []string
	for _, lines := range got {
		for _, l := range lines {
			uuids = append(uuids, l.UUID)
		}
	}
	if len(got) != 1 || !slices.Equal(uuids, []string{"before", "after"}) {
		t.Errorf("index %v, want one file with the records of before and after", got)
	}
}
