package saver

import (
	"crypto/rand"
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

// ext4 mounts a small ext4 image (errors=remount-ro, as distributions
// mount their disks) for a test; it needs root and e2fsprogs.
func ext4(t *testing.T) (dir, img string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount an image")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4 (e2fsprogs)")
	}
	dir, img = t.TempDir(), filepath.Join(t.TempDir(), "fs.img")
	if out, err := exec.Command("sh", "-c", "truncate -s 32M "+img+" && mkfs.ext4 -q "+img+" && mount -o loop,errors=remount-ro "+img+" "+dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount an ext4 image: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir, img
}

// TestEmergencyReadOnly: the filesystem turns read-only under the saver
// (ext4's errors=remount-ro after an I/O error, made with the abort mount
// option) while a compressed flow's file and the index file are open.
// Every failure is counted, Wait and the index's publishing return; once
// the daemon is stopped and the filesystem checked and mounted again, the
// flows published before (and committed by the journal) are whole, and a
// new saver removes the leftovers and publishes the index's whole records.
func TestEmergencyReadOnly(t *testing.T) {
	dir, img := ext4(t)
	data := filepath.Join(dir, "data")
	s, err := New(Options{Dir: data, Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	saveRecorded(s, "before", t0)
	s.Wait()
	s.PublishIndex(time.Time{}.Add(1)) // written, not published: the hour is open
	var b record.Buffer
	fill(&b, 200)
	f := s.Start("open", packet.LinkTypeEthernet, t0)
	f.Push(&b, false)
	deadline := time.Now().Add(10 * time.Second)
	for partials(t, s) < 2 && time.Now().Before(deadline) { // the flow's file and the index file
		time.Sleep(10 * time.Millisecond)
	}
	// What the journal committed so far survives the error (it commits
	// every 5 s; files are not synced one by one, as tcpdump's are not).
	unix.Sync()
	if out, err := exec.Command("mount", "-o", "remount,abort", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot abort the filesystem: %v %s", err, out)
	}
	fill(&b, 200)
	f.Push(&b, true)
	f.End(testRecord(t0))
	saveRecorded(s, "after", t0)
	done := make(chan struct{})
	go func() { s.Wait(); s.PublishIndex(time.Time{}); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the saver is stuck on the read-only filesystem")
	}
	failed := s.Counts().Flows.Get("write_error")
	if failed != 2 || exists(s, "open") || exists(s, "after") || !exists(s, "before") {
		t.Errorf("%d flows failed (open %v, after %v, before %v): want the two written on the read-only filesystem failed, the one before whole",
			failed, exists(s, "open"), exists(s, "after"), exists(s, "before"))
	}
	if s.IndexCounts().Errors.Get("rename")+s.IndexCounts().Errors.Get("write")+s.IndexCounts().Errors.Get("close") == 0 {
		t.Error("the index file's failure is not counted")
	}
	// The operator stops the daemon (which holds the directories open),
	// checks the filesystem and mounts it again.
	s.close()
	if out, err := exec.Command("sh", "-c", "umount "+dir+" && (e2fsck -fy "+img+" >/dev/null; true) && mount -o loop "+img+" "+dir).CombinedOutput(); err != nil {
		t.Fatalf("mount again: %v %s", err, out)
	}
	s2, err := New(Options{Dir: data, Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := partials(t, s2); n != 0 {
		t.Errorf("%d partial files left after the restart", n)
	}
	if !exists(s2, "before") || s2.IndexCounts().Recovered.Load() != 1 {
		t.Errorf("before %v, %d index files recovered: want the flow whole and its record published", exists(s2, "before"), s2.IndexCounts().Recovered.Load())
	}
}

// TestDiskFullCompressed: the disk fills while a compressed flow is being
// written batch by batch (incompressible headers, 1 MB into a 256 KiB
// tmpfs): the flow fails, counted, its partial file removed, every
// compressor goes back to the pool, and a flow that fits is saved once
// the space is given back.
func TestDiskFullCompressed(t *testing.T) {
	dir := tmpfs(t, "256k")
	s, err := New(Options{Dir: filepath.Join(dir, "data"), Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	f := s.Start("too-big", packet.LinkTypeEthernet, t0)
	hdr := make([]byte, 200)
	for batch := 0; batch < 20; batch++ {
		var b record.Buffer
		for i := 0; i < 250; i++ {
			rand.Read(hdr)
			b.Append(t0, 1514, hdr)
		}
		f.Push(&b, batch == 19)
		time.Sleep(5 * time.Millisecond) // a batch per wake, as a long flow's
	}
	s.Wait()
	if exists(s, "too-big") || s.Counts().WriteErrors.Get("write") != 1 || partials(t, s) != 0 {
		t.Errorf("too-big %v, %d write errors, %d partial files: want it failed, counted once, removed", exists(s, "too-big"), s.Counts().WriteErrors.Get("write"), partials(t, s))
	}
	if n := s.CompressorsInUse(); n != 0 {
		t.Errorf("%d compressors not given back after the failure", n)
	}
	save(s, "after", 100)
	if !exists(s, "after") {
		t.Error("a flow that fits was not saved after the disk was full")
	}
}
