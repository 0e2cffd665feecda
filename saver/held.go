package saver

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// heldDir is a directory the saver works in through a descriptor: the data
// directory and the partial directory. Each is opened at New without
// following a link and checked (ownDir), and every file is then created,
// renamed and removed relative to the descriptor, the day directories
// below the data directory walked one name at a time without following
// links. So a path swapped for a link while the daemon runs (by a user who
// can write its parent) changes nothing: the daemon goes on in the
// directory it checked, wherever that has been moved (TestSwappedDataDir).
//
// A directory removed under a running daemon (its descriptor then names a
// directory with no links left) is opened again by its path, made again
// and checked as at New, when an operation in it fails for a missing name.
type heldDir struct {
	path string      // absolute, for messages and the reopening
	what string      // "datadir" or "partial directory", for messages
	perm os.FileMode // of the directories made
	mu   sync.Mutex  // held while reopening
	f    atomic.Pointer[os.File]
}

// openHeld makes the directory path (its parents too) if it is missing,
// opens it and checks that it is the saver's own (see ErrUnsafeDir).
func openHeld(path, what string, perm os.FileMode) (*heldDir, error) {
	d := &heldDir{path: path, what: what, perm: perm}
	f, err := d.open()
	if err != nil {
		return nil, err
	}
	d.f.Store(f)
	return d, nil
}

func (d *heldDir) open() (*os.File, error) {
	if err := os.MkdirAll(d.path, d.perm); err != nil {
		return nil, fmt.Errorf("%s: %w", d.what, err)
	}
	fd, err := unix.Open(d.path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return nil, fmt.Errorf("%s %s: a symbolic link or not a directory: %w", d.what, d.path, ErrUnsafeDir)
		}
		return nil, fmt.Errorf("%s %s: %w", d.what, d.path, err)
	}
	if err := checkOwn(fd, d.what, d.path); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), d.path), nil
}

// control calls fn with the descriptor. The descriptor stays valid while
// fn runs, even if a reopening closes the file meanwhile (the close waits
// for the calls in progress).
func (d *heldDir) control(fn func(fd int) error) error {
	for {
		f := d.f.Load()
		rc, err := f.SyscallConn()
		if err != nil {
			return err
		}
		var ferr error
		if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
			if d.f.Load() != f {
				continue // closed by a reopening: the new one
			}
			return err
		}
		return ferr
	}
}

// do calls fn with the descriptor; if fn fails for a missing name and the
// directory has been removed, once more with the directory made again.
func (d *heldDir) do(fn func(fd int) error) error {
	f := d.f.Load()
	err := d.control(fn)
	if errors.Is(err, unix.ENOENT) && d.removed(f) {
		if rerr := d.reopen(f); rerr != nil {
			return rerr
		}
		err = d.control(fn)
	}
	return err
}

// removed reports whether the directory f has been removed.
func (d *heldDir) removed(f *os.File) bool {
	var st unix.Stat_t
	rc, err := f.SyscallConn()
	if err != nil {
		return true // closed: reopened by another call already
	}
	rc.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) })
	return err == nil && st.Nlink == 0
}

// reopen replaces the removed directory f, unless another call did.
func (d *heldDir) reopen(f *os.File) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f.Load() != f {
		return nil
	}
	nf, err := d.open()
	if err != nil {
		return err
	}
	d.f.Store(nf)
	f.Close()
	return nil
}

// Close closes the descriptor.
func (d *heldDir) Close() error { return d.f.Load().Close() }

// walk opens the directory rel (slash-separated names, each a directory)
// below dir, making what is missing if create, without following a link
// at any step, and returns its descriptor (dir itself for "").
func walk(dir int, rel string, perm os.FileMode, create bool) (int, error) {
	fd := dir
	for name := range strings.SplitSeq(rel, "/") {
		if name == "" {
			continue
		}
		next, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if create && errors.Is(err, unix.ENOENT) {
			if err = unix.Mkdirat(fd, name, uint32(perm)); err == nil || errors.Is(err, unix.EEXIST) {
				next, err = unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			}
		}
		if fd != dir {
			unix.Close(fd)
		}
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return -1, fmt.Errorf("%s: a symbolic link or not a directory: %w", rel, ErrUnsafeDir)
		}
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

// mkdirs makes the directory rel below the held directory.
func (d *heldDir) mkdirs(rel string) error {
	err := d.do(func(dir int) error {
		fd, err := walk(dir, rel, d.perm, true)
		if err == nil && fd != dir {
			unix.Close(fd)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%s: %s: %w", d.what, rel, err)
	}
	return nil
}

// createIn creates the file name in the held directory, exclusively and
// without following a link.
func (d *heldDir) createIn(name string, perm os.FileMode) (int, error) {
	fd := -1
	err := d.do(func(dir int) error {
		for {
			var err error
			fd, err = unix.Openat(dir, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(perm))
			if err != unix.EINTR {
				return err
			}
		}
	})
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: d.path + "/" + name, Err: err}
	}
	return fd, nil
}

// remove removes the name in the held directory (a link itself, never its
// target).
func (d *heldDir) remove(name string) {
	d.control(func(dir int) error { return unix.Unlinkat(dir, name, 0) })
}

// publish renames the file name of the partial directory to rel below the
// data directory (making its directories), without replacing a file there:
// a UUID named twice can never overwrite a finished file.
func publish(partial *heldDir, name string, data *heldDir, rel string) error {
	parent, base := "", rel
	if i := strings.LastIndexByte(rel, '/'); i >= 0 {
		parent, base = rel[:i], rel[i+1:]
	}
	err := data.do(func(dir int) error {
		to, err := walk(dir, parent, data.perm, true)
		if err != nil {
			return err
		}
		if to != dir {
			defer unix.Close(to)
		}
		return partial.control(func(from int) error { return renameNoReplace(from, name, to, base) })
	})
	if err != nil {
		return fmt.Errorf("rename to %s/%s: %w", data.path, rel, err)
	}
	return nil
}

// renameNoReplace renames without replacing an existing file.
func renameNoReplace(fromDir int, from string, toDir int, to string) error {
	err := unix.Renameat2(fromDir, from, toDir, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: check, then rename.
		var st unix.Stat_t
		if unix.Fstatat(toDir, to, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			return os.ErrExist
		}
		return unix.Renameat(fromDir, from, toDir, to)
	}
	return err
}
