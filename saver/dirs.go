package saver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"
)

// What the saver trusts of its directories. The daemon may run as root
// (offline, often) and with raw-socket capabilities, beside users who can
// write the data directory's parent (a spool or temporary directory shared
// with others). So the partial directory, which New empties and whose
// index files it reads, truncates and publishes into the upload tree, must
// be the daemon's own: not a symbolic link, owned by its effective user
// and not writable by others (a group-writable one is accepted: M-Lab's
// init container makes every directory of the experiment's volume 2775).
// Anything else is refused with ErrUnsafeDir before a file is touched.
// Only the names the saver itself writes are removed from it, with
// unlinkat relative to a descriptor opened without following links, and
// the files it reads are opened the same way (TestPlantedPartialDir).

// ErrUnsafeDir is the reason a data or partial directory is refused.
var ErrUnsafeDir = errors.New("not a directory of this user's that others cannot write")

// probePrefix begins the name of New's writability probe.
const probePrefix = "probe-"

// ownNames are the names the saver writes in the partial directory: flow
// files (<n>.pcap), index files (flows.<day>.<hour>.<n>.jsonl) and probes.
var ownNames = regexp.MustCompile(`^([0-9]+\.pcap|` + regexp.QuoteMeta(partialIndexPrefix) + `[0-9-]+\.[0-9]+\.[0-9]+\.jsonl|` + probePrefix + `[0-9]+)$`)

// perms returns the permissions of files and directories for Options.Perm.
func perms(p os.FileMode) (file, dir os.FileMode, err error) {
	if p == 0 {
		p = 0o640
	}
	if p&^0o644 != 0 || p&0o600 != 0o600 {
		return 0, 0, fmt.Errorf("file permissions %#o: the owner must read and write, others may only read", p)
	}
	return p, p | (p&0o444)>>2, nil
}

// partialDir opens (making it if missing) the directory where files are
// written before they are renamed into the data directory: want if given,
// else <parent>/.<base>.partial; it must be outside the data directory, on
// its filesystem, and the saver's own.
func (s *Saver) partialDir(want string) (*heldDir, error) {
	p := want
	if p == "" {
		parent, base := filepath.Split(s.dir)
		if base == "" {
			return nil, fmt.Errorf("the data directory %s has no parent for its partial directory: give -partialdir", s.dir)
		}
		p = filepath.Join(parent, "."+base+".partial")
	}
	p, err := filepath.Abs(p)
	if err != nil {
		return nil, fmt.Errorf("partial directory %s: %w", want, err)
	}
	if rel, err := filepath.Rel(s.dir, p); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return nil, fmt.Errorf("partial directory %s is inside the data directory %s: uploaders watching it would see partial files", p, s.dir)
	}
	d, err := openHeld(p, "partial directory", s.dirPerm)
	if err != nil {
		return nil, err
	}
	if !sameFS(s.data, d) {
		d.Close()
		hint := ""
		if want == "" {
			hint = ": give -partialdir, a directory outside the data directory on its filesystem (the data directory may be a mount point; mount its parent instead)"
		}
		return nil, fmt.Errorf("partial directory %s is not on the data directory's filesystem (files are renamed from one to the other)%s", p, hint)
	}
	return d, nil
}

// checkOwn checks that the open directory fd (what, at p) is owned by this
// process's user and not writable by others.
func checkOwn(fd int, what, p string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s %s: %w", what, p, err)
	}
	if uid := uint32(os.Geteuid()); st.Uid != uid {
		return fmt.Errorf("%s %s is owned by user %d, not this process's %d: %w", what, p, st.Uid, uid, ErrUnsafeDir)
	}
	if st.Mode&0o002 != 0 {
		return fmt.Errorf("%s %s is writable by others (mode %#o): %w", what, p, st.Mode&0o7777, ErrUnsafeDir)
	}
	return nil
}

// cleanPartial removes what an earlier run left in the partial directory:
// the regular files and links with the names the saver writes, nothing
// else, without following links.
func cleanPartial(d *heldDir) error {
	return d.control(func(dir int) error {
		names, err := readNames(dir)
		if err != nil {
			return err
		}
		for _, n := range names {
			if ownNames.MatchString(n) {
				unix.Unlinkat(dir, n, 0) // a link itself, never its target
			}
		}
		return nil
	})
}

// readNames returns the names in the open directory dir.
func readNames(dir int) ([]string, error) {
	fd, err := unix.Openat(dir, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), ".")
	defer f.Close()
	return f.Readdirnames(-1)
}

// readOwnFile reads the file name of the partial directory without
// following a link, and returns it open for writing, to truncate what a
// crash cut short through the descriptor, not the name.
func readOwnFile(d *heldDir, name string) (*os.File, []byte, error) {
	path := d.path + "/" + name
	var f *os.File
	err := d.control(func(dir int) error {
		fd, err := unix.Openat(dir, name, unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return &os.PathError{Op: "open", Path: path, Err: err}
		}
		f = os.NewFile(uintptr(fd), path)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Uid != uint32(os.Geteuid()) {
		f.Close()
		return nil, nil, fmt.Errorf("%s: not a regular file of this user's: %w", path, ErrUnsafeDir)
	}
	b := make([]byte, st.Size)
	n, err := f.ReadAt(b, 0)
	if err != nil && n < len(b) {
		f.Close()
		return nil, nil, err
	}
	return f, b, nil
}

// sameFS reports whether a and b are on one filesystem.
func sameFS(a, b *heldDir) bool {
	var sa, sb unix.Stat_t
	ea := a.control(func(fd int) error { return unix.Fstat(fd, &sa) })
	eb := b.control(func(fd int) error { return unix.Fstat(fd, &sb) })
	return ea == nil && eb == nil && sa.Dev == sb.Dev
}
