package saver

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/index"
)

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

// TestSwappedDataDir: the data and partial directories swapped for links
// to another directory while the saver runs (by a user who can write their
// parent) change nothing: day directories, files and index files go on in
// the directories New checked, wherever they were moved, and nothing is
// made in the links' target.
func TestSwappedDataDir(t *testing.T) {
	base := t.TempDir()
	victim := filepath.Join(base, "victim")
	os.Mkdir(victim, 0o700)
	dir := filepath.Join(base, "data")
	s, err := New(Options{Dir: dir, Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	partial := s.PartialDir()
	moved, movedPartial := filepath.Join(base, "moved"), filepath.Join(base, "moved.partial")
	for from, to := range map[string]string{dir: moved, partial: movedPartial} {
		if err := os.Rename(from, to); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(victim, from); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.PrepareDays(t0); err != nil {
		t.Errorf("PrepareDays: %v", err)
	}
	saveRecorded(s, "swapped", t0)
	s.Wait()
	s.PublishIndex(time.Time{})
	if names, _ := os.ReadDir(victim); len(names) != 0 {
		t.Errorf("the link's target got %d entries, the first %s", len(names), names[0].Name())
	}
	rel, _ := filepath.Rel(dir, s.Path("swapped", t0))
	if _, err := os.Stat(filepath.Join(moved, rel)); err != nil {
		t.Errorf("the flow's file is not in the data directory New checked: %v", err)
	}
	if idx, _ := filepath.Glob(filepath.Join(moved, "*", "*", "*", "flows-*")); len(idx) != 1 {
		t.Errorf("index files in the data directory New checked: %v, want one", idx)
	}
	if next, _ := filepath.Glob(filepath.Join(moved, "2026", "11", "26")); len(next) != 1 {
		t.Error("the next day's directory was not made in the data directory New checked")
	}
}

// TestPlantedDataDir: a data directory that is a link, another user's or
// writable by others is refused at New (ErrUnsafeDir), before anything
// is made in it. As root, the other user is 65534.
func TestPlantedDataDir(t *testing.T) {
	for _, c := range []struct {
		name  string
		plant func(dir, victim string)
		root  bool
	}{
		{"link", func(dir, victim string) { os.Symlink(victim, dir) }, false},
		{"world-writable", func(dir, victim string) { os.Mkdir(dir, 0o777); os.Chmod(dir, 0o777) }, false},
		{"another user's", func(dir, victim string) { os.Mkdir(dir, 0o755); os.Lchown(dir, 65534, 65534) }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.root && os.Geteuid() != 0 {
				t.Skip("needs root, to give a directory to another user")
			}
			base := t.TempDir()
			victim := filepath.Join(base, "victim")
			os.Mkdir(victim, 0o700)
			dir := filepath.Join(base, "data")
			c.plant(dir, victim)
			if _, err := New(Options{Dir: dir}); !errors.Is(err, ErrUnsafeDir) {
				t.Errorf("New = %v, want ErrUnsafeDir", err)
			}
			if names, _ := os.ReadDir(victim); len(names) != 0 {
				t.Errorf("something was made in the link's target: %v", names)
			}
		})
	}
}
