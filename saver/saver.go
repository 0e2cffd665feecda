// Package saver writes each flow's headers into its own pcap file,
// <dir>/YYYY/MM/DD/<uuid>.pcap, dated by the flow's first packet (UTC).
//
// The demuxer appends records to a flow's record.Buffer (chunks of
// ready-made pcap records, so writing is a plain copy). Once the flow has
// a UUID it hands whole chunks to a Flow: a goroutine that owns the file.
// In buffer mode the Flow is started when the flow ends, with every chunk
// at once (or, for a long flow, once it holds a few hundred kilobytes,
// which it then gets at a time); in stream mode it is started when the
// flow is named and gets chunks as they fill.
// Handing chunks over takes the Flow's own mutex once per chunk (thousands
// of packets), never per packet, and never blocks the caller.
//
// # Publication
//
// A file is written in the partial directory, by default a sibling of the
// data directory (<parent>/.<name of datadir>.partial, on the same
// filesystem), under a name of its own, and renamed to its final name only
// when complete, without replacing an existing file. An uploader that
// watches the data directory recursively for IN_CLOSE_WRITE and IN_MOVED_TO
// (M-Lab's pusher) thus hears of each file exactly once, as one IN_MOVED_TO
// under its final YYYY/MM/DD/<uuid>.pcap[.gz] name, and of nothing else:
// no partial file is closed inside the watched tree, and a crash leaves
// nothing there (New removes what it left in the partial directory). The
// partial directory is never inside the data directory: where none can be
// made beside it on its filesystem, New fails and says to give one
// (dirs.go also says what New trusts in it). PrepareDays creates each day's
// directory a day ahead, so that a recursive watcher has its watch in place
// before the day's first file arrives (TestPublication in e2e guards it).
//
// A flow's final name is decided when its last chunk is written (Rename
// changes it until then), so a stream-mode file already being written can
// still take the authoritative source's UUID. A UUID that is not a plain
// file name (CheckUUID) is refused as a write error of its own ("name"),
// so nothing is written outside the data directory. On a write error the
// partial file is removed, the error counted and the flow's data dropped;
// other flows are unaffected (TestNoCrossWiring).
//
// # Flow index
//
// Each Flow's End gives its index record; the record is added once the
// file is published (by the flow's writer, or after it, on a goroutine of
// its own), never for a file that was not, to one partial file per day
// directory and hour of the flows' ends, written 64 KiB at a time and by
// each PublishIndex, which renames it into the day directory as
// flows-YYYYMMDDTHHZ.jsonl when the hour has closed (IndexGrace later) or
// at shutdown, never over an existing file. New publishes the whole
// records of the index files a crash left.
//
// The file format is classic pcap with nanosecond timestamps (magic
// 0xa1b23c4d), little-endian, with the snaplen and link type given. With
// Compress, each batch of records written is one gzip member, compressed
// straight from the buffered records (nothing is written twice).
package saver

import (
	"errors"
	"fmt"
	"log"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/metrics"
)

// FileHeaderLen is the size of a pcap file header.
const FileHeaderLen = 24

// Options configures a Saver.
type Options struct {
	Dir string // data directory; created if missing
	// PartialDir holds files being written; it must be outside Dir and on
	// its filesystem, owned by this process's user and not writable by
	// others. Default: <parent of Dir>/.<base of Dir>.partial.
	PartialDir string
	// Perm is the permission of the files written; directories get the
	// same with search permission where read is given. Default 0640: the
	// owner and its group (an uploader's) read, others nothing. It may
	// not give write permission beyond the owner's.
	Perm    os.FileMode
	Snaplen int // the snaplen written in file headers; default 256
	// MinFreeBytes and MinFreePercent: while the data directory's
	// filesystem has less free space than either, new files are not
	// written (their flows are counted as low_space), so the disk never
	// fills up. Zero disables each.
	MinFreeBytes   int64
	MinFreePercent float64
	// Compress writes <uuid>.pcap.gz: each batch of records written (the
	// whole file for most flows) is one gzip member, compressed from the
	// buffered records with a pooled compressor, so compression costs no
	// memory per live flow.
	Compress bool
}

// ErrLowSpace is the reason a flow was not written: the filesystem has
// less free space than Options asks to keep.
var ErrLowSpace = errors.New("free space below -minfreespace")

// Counts are what a Saver counted. Safe for concurrent use.
type Counts struct {
	WriteErrors *metrics.Counters // failed file operations, by WriteOps
	Flows       *metrics.Counters // flows the saver ended, by Outcomes
	Packets     *metrics.Counters // their packets, by Outcomes
}

// WriteOps are the file operations counted in Counts.WriteErrors ("name":
// a UUID that cannot name a file).
var WriteOps = []string{"name", "mkdir", "create", "write", "close", "compress", "rename"}

// Outcomes are the ends of a flow handed to the saver: its file was
// written, a file operation failed, or free space was below the minimum.
var Outcomes = []string{"saved", "write_error", "low_space"}

// Counts returns the saver's counts.
func (s *Saver) Counts() *Counts { return &s.counts }

// Saver starts and owns the per-flow writer goroutines.
type Saver struct {
	dir           string   // absolute, for messages and index paths
	data, partial *heldDir // the data and partial directories, held
	perm, dirPerm os.FileMode
	snaplen       int
	minFree       int64
	minFreePct    float64
	compress      bool
	logs          rateLog
	wg            sync.WaitGroup
	active        atomic.Int64
	draining      atomic.Int64 // flows handed their last chunks, not written yet
	files, bytes  atomic.Int64
	errors        atomic.Int64
	counts        Counts
	// io bounds the writers doing file I/O at once: thousands of flows
	// ending together (a shutdown, the end of an offline input) would
	// otherwise park thousands of threads on the data directory's lock.
	io  chan struct{}
	day atomic.Pointer[day]
	seq atomic.Uint64 // numbers the partial files: two flows never share one
	// prepared is the last day PrepareDays made directories for.
	prepared atomic.Int64
	mu       sync.Mutex
	writing  map[*Flow]struct{} // started and not finished, for Writing
	pending  []*Flow            // pushed whole, waiting for a writer (enqueue)
	writers  int                // goroutines writing the pending flows
	index    *indexWriter
	// compressors are pooled gzip writers (-compress), shared by the
	// saver's writers, and counted for the metrics.
	compressors                          sync.Pool
	compressorsInUse, compressorsCreated atomic.Int64
}

// New prepares the data directory: it creates it and its partial directory,
// removes files a crash left there, and checks that it is writable.
func New(opts Options) (*Saver, error) {
	if opts.Snaplen <= 0 {
		opts.Snaplen = 256
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("datadir %s: %w", opts.Dir, err)
	}
	s := &Saver{dir: dir, snaplen: opts.Snaplen,
		minFree: opts.MinFreeBytes, minFreePct: opts.MinFreePercent, compress: opts.Compress,
		io: make(chan struct{}, max(2, runtime.GOMAXPROCS(0))), writing: map[*Flow]struct{}{},
		counts: Counts{WriteErrors: metrics.NewCounters(WriteOps...), Flows: metrics.NewCounters(Outcomes...), Packets: metrics.NewCounters(Outcomes...)}}
	s.prepared.Store(math.MinInt64)
	if s.perm, s.dirPerm, err = perms(opts.Perm); err != nil {
		return nil, err
	}
	s.index = newIndexWriter(s)
	if s.data, err = openHeld(dir, "datadir", s.dirPerm); err != nil {
		return nil, err
	}
	if s.partial, err = s.partialDir(opts.PartialDir); err != nil {
		s.data.Close()
		return nil, err
	}
	if err := s.prepare(); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// prepare publishes the index files and removes the other files a crash
// left, and checks that the directories are writable.
func (s *Saver) prepare() error {
	s.recoverIndex()
	if err := cleanPartial(s.partial); err != nil {
		return fmt.Errorf("partial directory: %w", err)
	}
	// The probe is made in the partial directory only: a probe closed in the
	// data directory would be an upload.
	probe := probePrefix + strconv.Itoa(os.Getpid())
	fd, err := s.partial.createIn(probe, s.perm)
	if err != nil {
		return fmt.Errorf("datadir %s is not writable: %w", s.dir, err)
	}
	unix.Close(fd)
	s.partial.remove(probe)
	return nil
}

// close closes the data and partial directories' descriptors, when New
// fails. A Saver holds them for the life of the process.
func (s *Saver) close() {
	s.data.Close()
	s.partial.Close()
}

// PartialDir returns the absolute directory where files are written before
// they are published.
func (s *Saver) PartialDir() string { return s.partial.path }

// PrepareDays makes the directories of the UTC day of now and of the next
// day, once per day: a recursive watcher of the data directory (pusher's)
// adds its watch on a new directory after hearing of it, and would miss a
// file renamed into it meanwhile.
func (s *Saver) PrepareDays(now time.Time) error {
	n := dayNumber(now)
	if s.prepared.Load() == n {
		return nil
	}
	for i := int64(0); i < 2; i++ {
		if err := s.data.mkdirs(s.dayDir(time.Unix((n+i)*86400, 0))); err != nil {
			return err
		}
	}
	s.prepared.Store(n)
	return nil
}

// Dir returns the absolute data directory.
func (s *Saver) Dir() string { return s.dir }

// Path returns the final path of the file for a flow named uuid whose first
// packet was at first.
func (s *Saver) Path(uuid string, first time.Time) string {
	return s.dir + "/" + s.relPath(uuid, first)
}

// relPath returns Path relative to the data directory.
func (s *Saver) relPath(uuid string, first time.Time) string {
	name := uuid + ".pcap"
	if s.compress {
		name += ".gz"
	}
	return s.dayDir(first) + "/" + name
}

// day is the directory of one UTC day's files.
type day struct {
	n   int64 // days since 1970-01-01
	dir string
}

// dayDir returns YYYY/MM/DD for the UTC day of t, the directory of its
// files relative to the data directory. The last day's is kept: formatting
// a date for every flow cost more than its file's path.
func (s *Saver) dayDir(t time.Time) string {
	n := dayNumber(t)
	if d := s.day.Load(); d != nil && d.n == n {
		return d.dir
	}
	d := &day{n: n, dir: t.UTC().Format("2006/01/02")}
	s.day.Store(d)
	return d.dir
}

// dayNumber returns the number of t's UTC day since 1970-01-01.
func dayNumber(t time.Time) int64 {
	sec := t.Unix()
	n := sec / 86400
	if sec < 0 && sec%86400 != 0 {
		n-- // round down before 1970
	}
	return n
}

// Active returns the number of flows being written.
func (s *Saver) Active() int64 { return s.active.Load() }

// Draining returns the number of flows handed their last chunks and not
// written yet.
func (s *Saver) Draining() int64 { return s.draining.Load() }

// WaitDraining waits while more than max flows have been handed their
// last chunks and are not written yet. A reader faster than the disk
// (offline mode) calls it, so that the records waiting to be written, and
// the writers' goroutines, stay bounded (TestDrainingBounded); flows still
// being captured are not waited for.
func (s *Saver) WaitDraining(max int64) {
	for s.draining.Load() > max {
		time.Sleep(100 * time.Microsecond)
	}
}

// Written returns the number of files and bytes written, and of flows lost
// to write errors, since New.
func (s *Saver) Written() (files, bytes, failed int64) {
	return s.files.Load(), s.bytes.Load(), s.errors.Load()
}

// Wait waits until every started Flow has finished. Flows finish once they
// have been pushed their final chunks.
func (s *Saver) Wait() { s.wg.Wait() }

// rateLog logs each kind of message at most once per logInterval, with
// the number of messages it held back.
type rateLog struct {
	mu   sync.Mutex
	last map[string]time.Time
	held map[string]int
}

const logInterval = 10 * time.Second

func (r *rateLog) printf(kind, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last == nil {
		r.last, r.held = map[string]time.Time{}, map[string]int{}
	}
	if time.Since(r.last[kind]) < logInterval {
		r.held[kind]++
		return
	}
	if n := r.held[kind]; n > 0 {
		format += fmt.Sprintf(" (and %d more like it since the last report)", n)
	}
	r.last[kind], r.held[kind] = time.Now(), 0
	log.Printf(format, args...)
}
