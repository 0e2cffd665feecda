package saver

import (
	"context"
	"fmt"
	"log"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Retention is what a host without an uploader keeps of its traces
// (-retention.*): whole day directories are deleted, oldest first, while
// the filesystem has less free space than MinFreeBytes or MinFreePercent,
// or the days take more than MaxBytes, or a day is older than the MaxDays
// days before today. The zero Retention deletes nothing. An uploader that deletes
// what it has sent (M-Lab's pusher) must be the only one deleting.
type Retention struct {
	MinFreeBytes   int64
	MinFreePercent float64
	MaxBytes       int64
	MaxDays        int
}

// On reports whether r deletes anything.
func (r Retention) On() bool {
	return r.MinFreeBytes > 0 || r.MinFreePercent > 0 || r.MaxBytes > 0 || r.MaxDays > 0
}

// RetentionCounts are what a Retainer did, for the metrics.
type RetentionCounts struct {
	Days, Files, Bytes atomic.Int64 // deleted
	Errors             atomic.Int64 // runs that failed to delete what they chose
	Oldest             atomic.Int64 // Unix seconds of the oldest day kept; 0: none
}

// Retainer applies a Retention to the saver's data directory. Its Run is
// called from one goroutine (live's, every few seconds), off the capture
// and the writers: deletion takes the time it takes.
type Retainer struct {
	s      *Saver
	r      Retention
	sizes  map[int64]int64 // bytes of the closed days (before yesterday), which no longer change
	Counts RetentionCounts
}

// NewRetainer returns the Retainer of r for the saver's data directory.
func (s *Saver) NewRetainer(r Retention) *Retainer {
	return &Retainer{s: s, r: r, sizes: map[int64]int64{}}
}

// dayEntry is a day directory: YYYY/MM/DD below the data directory.
type dayEntry struct {
	n    int64  // dayNumber
	path string // YYYY/MM/DD
}

// Run deletes the oldest day directories while the retention does not
// hold, never the UTC day of now or a later one (today's, and the one made
// ahead), and returns the first error. It stops when ctx is done.
func (t *Retainer) Run(ctx context.Context, now time.Time) error {
	days, err := t.days()
	if err != nil {
		return t.fail(err)
	}
	today := dayNumber(now)
	var total int64
	sizes := map[int64]int64{}
	if t.r.MaxBytes > 0 {
		for _, d := range days {
			size, ok := t.sizes[d.n]
			if !ok {
				if size, err = t.size(d.path); err != nil {
					return t.fail(err)
				}
				if d.n < today-1 {
					t.sizes[d.n] = size
				}
			}
			sizes[d.n] = size
			total += size
		}
	}
	kept := 0
	for _, d := range days {
		if d.n >= today || ctx.Err() != nil {
			break
		}
		old := t.r.MaxDays > 0 && d.n < today-int64(t.r.MaxDays)
		if !old && !(t.r.MaxBytes > 0 && total > t.r.MaxBytes) && !t.lowSpace() {
			break
		}
		files, bytes, err := t.remove(d.path)
		t.Counts.Files.Add(files)
		t.Counts.Bytes.Add(bytes)
		delete(t.sizes, d.n)
		if err != nil {
			return t.fail(fmt.Errorf("retention: deleting %s/%s: %w", t.s.dir, d.path, err))
		}
		t.Counts.Days.Add(1)
		log.Printf("saver: retention: deleted %s/%s (%d files, %d bytes)", t.s.dir, d.path, files, bytes)
		total -= sizes[d.n]
		kept++
	}
	t.Counts.Oldest.Store(0)
	if kept < len(days) {
		t.Counts.Oldest.Store(days[kept].n * 86400)
	}
	return nil
}

func (t *Retainer) fail(err error) error {
	t.Counts.Errors.Add(1)
	return err
}

// lowSpace reports whether the filesystem has less free space than the
// retention keeps.
func (t *Retainer) lowSpace() bool {
	if t.r.MinFreeBytes <= 0 && t.r.MinFreePercent <= 0 {
		return false
	}
	free, total, err := t.s.Space()
	if err != nil {
		return false
	}
	return free < t.r.MinFreeBytes || total > 0 && float64(free)*100 < t.r.MinFreePercent*float64(total)
}

// days returns the day directories of the data directory, oldest first:
// the names YYYY/MM/DD of a valid date, as the saver makes them; anything
// else (a link, another name) is never a day, and never deleted.
func (t *Retainer) days() ([]dayEntry, error) {
	var days []dayEntry
	err := t.s.data.control(func(root int) error {
		years, err := readNames(root)
		if err != nil {
			return err
		}
		for _, y := range years {
			if !digits(y, 4) {
				continue
			}
			months, err := namesIn(root, y)
			if err != nil {
				continue // not a directory, or a link
			}
			for _, m := range months {
				if !digits(m, 2) {
					continue
				}
				ds, err := namesIn(root, y+"/"+m)
				if err != nil {
					continue
				}
				for _, d := range ds {
					p := y + "/" + m + "/" + d
					at, err := time.Parse("2006/01/02", p)
					if !digits(d, 2) || err != nil || !isDir(root, p) {
						continue
					}
					days = append(days, dayEntry{n: dayNumber(at), path: p})
				}
			}
		}
		return nil
	})
	slices.SortFunc(days, func(a, b dayEntry) int { return int(a.n - b.n) })
	return days, err
}

// digits reports whether s is n decimal digits.
func digits(s string, n int) bool {
	if len(s) != n {
		return false
	}
	_, err := strconv.ParseUint(s, 10, 32)
	return err == nil
}

// namesIn returns the names in the directory rel below root, refusing a
// link at any step.
func namesIn(root int, rel string) ([]string, error) {
	fd, err := walkExisting(root, rel)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return readNames(fd)
}

// isDir reports whether rel below root is a directory reached without a
// link.
func isDir(root int, rel string) bool {
	fd, err := walkExisting(root, rel)
	if err == nil {
		unix.Close(fd)
	}
	return err == nil
}

// walkExisting opens the existing directory rel (not "") below root
// without following a link at any step.
func walkExisting(root int, rel string) (int, error) { return walk(root, rel, 0, false) }

// size returns the bytes the files of the day directory rel take on disk.
func (t *Retainer) size(rel string) (int64, error) {
	var total int64
	err := t.s.data.control(func(root int) error {
		fd, err := walkExisting(root, rel)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		names, err := readNames(fd)
		if err != nil {
			return err
		}
		for _, n := range names {
			var st unix.Stat_t
			if unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total, err
}

// remove deletes the day directory rel and what it holds, never following
// a link (a link is deleted itself), and returns the files and bytes
// deleted.
func (t *Retainer) remove(rel string) (files, bytes int64, err error) {
	i := len(rel) - 1
	for i >= 0 && rel[i] != '/' {
		i--
	}
	parentRel, name := rel[:max(i, 0)], rel[i+1:]
	err = t.s.data.control(func(root int) error {
		parent, err := walkExisting(root, parentRel)
		if err != nil {
			return err
		}
		defer unix.Close(parent)
		return removeTree(parent, name, &files, &bytes)
	})
	return files, bytes, err
}

// removeTree deletes name in the directory dir, and what it holds if it
// is a directory, counting the files and their bytes.
func removeTree(dir int, name string, files, bytes *int64) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(dir, name, 0); err != nil {
			return err
		}
		*files++
		*bytes += st.Blocks * 512
		return nil
	}
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readNames(fd)
	for _, n := range names {
		if err == nil {
			err = removeTree(fd, n, files, bytes)
		}
	}
	unix.Close(fd)
	if err != nil {
		return err
	}
	return unix.Unlinkat(dir, name, unix.AT_REMOVEDIR)
}
