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
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
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
	dir, partial  string
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
	index    *indexWriter
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
	if err := os.MkdirAll(dir, s.dirPerm); err != nil {
		return nil, fmt.Errorf("datadir: %w", err)
	}
	if s.partial, err = s.partialDir(opts.PartialDir); err != nil {
		return nil, err
	}
	s.recoverIndex()
	if err := cleanPartial(s.partial); err != nil {
		return nil, fmt.Errorf("partial directory: %w", err)
	}
	// The probe is made in the partial directory only: a probe closed in the
	// data directory would be an upload.
	probe, err := os.CreateTemp(s.partial, probePrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("datadir %s is not writable: %w", dir, err)
	}
	probe.Close()
	if err := os.Remove(probe.Name()); err != nil {
		return nil, fmt.Errorf("partial directory: %w", err)
	}
	return s, nil
}

// PartialDir returns the absolute directory where files are written before
// they are published.
func (s *Saver) PartialDir() string { return s.partial }

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
		if err := os.MkdirAll(s.dayDir(time.Unix((n+i)*86400, 0)), s.dirPerm); err != nil {
			return fmt.Errorf("datadir: %w", err)
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

// dayDir returns <dir>/YYYY/MM/DD for the UTC day of t. The last day's is
// kept: formatting a date for every flow cost more than its file's path.
func (s *Saver) dayDir(t time.Time) string {
	n := dayNumber(t)
	if d := s.day.Load(); d != nil && d.n == n {
		return d.dir
	}
	d := &day{n: n, dir: filepath.Join(s.dir, t.UTC().Format("2006/01/02"))}
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

// Flow writes one flow's file. Its methods may be called from any one
// goroutine while the flow's writer runs in its own.
type Flow struct {
	s        *Saver
	uuid     string
	linkType packet.LinkType
	first    time.Time

	mu      sync.Mutex
	queue   []*record.Chunk
	final   bool
	rename  string // the name the flow takes instead of uuid, if not ""
	wake    chan struct{}
	rec     *index.Record // given by End
	settled bool          // the writer is done; res is its file if res.ok
	res     fileResult
}

// fileResult is what a flow's writer published.
type fileResult struct {
	ok                      bool
	uuid, path              string // path relative to the data directory
	packets, bytes, written int
}

// Start starts the writer of the flow named uuid, captured on a link of type
// lt, whose first packet was at first. It returns at once.
func (s *Saver) Start(uuid string, lt packet.LinkType, first time.Time) *Flow {
	f := &Flow{s: s, uuid: uuid, linkType: lt, first: first, wake: make(chan struct{}, 1)}
	s.wg.Add(1)
	s.active.Add(1)
	s.mu.Lock()
	s.writing[f] = struct{}{}
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer s.active.Add(-1)
		f.run()
		s.mu.Lock()
		delete(s.writing, f)
		s.mu.Unlock()
		f.mu.Lock()
		if f.final {
			s.draining.Add(-1)
		}
		f.mu.Unlock()
	}()
	return f
}

// Writing returns the UUIDs of the flows started and not finished yet,
// sorted: what a shutdown cut short did not write.
func (s *Saver) Writing() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.writing))
	for f := range s.writing {
		out = append(out, f.name())
	}
	sort.Strings(out)
	return out
}

// Push hands the writer buf's full chunks, or, when final is set, all of
// them and the end of the flow. It never blocks on I/O. After a final Push
// the Flow must not be used again.
func (f *Flow) Push(buf *record.Buffer, final bool) {
	cs, _ := buf.Take(final)
	if len(cs) == 0 && !final {
		return
	}
	f.mu.Lock()
	f.queue = append(f.queue, cs...)
	if final && !f.final {
		f.final = true
		f.s.draining.Add(1)
	}
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// Rename gives the flow another UUID, as long as its last chunks have not
// been pushed: the file is published under the last name given. It never
// blocks on I/O.
func (f *Flow) Rename(uuid string) {
	f.mu.Lock()
	f.rename = uuid
	f.mu.Unlock()
}

func (f *Flow) next() (cs []*record.Chunk, final bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cs, f.queue = f.queue, nil
	return cs, f.final
}

// name returns the flow's UUID as it is now.
func (f *Flow) name() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rename != "" {
		return f.rename
	}
	return f.uuid
}

// run is the writer goroutine. Its state lives in a flowFile on the heap,
// and its steps are methods with small frames: the goroutine then opens its
// file within the 2 KiB stack it starts with, with no stack growth per flow
// (the lab's offline row, BenchmarkLab, measures the per-flow cost).
func (f *Flow) run() {
	// The name is checked before anything is created (and again when it
	// is published): never a path out of the data directory, and no path
	// cleaning needed. The partial file's name is the flow's own: two flows
	// named alike never share one (TestNoCrossWiring).
	w := &flowFile{f: f, file: -1}
	if err := CheckUUID(f.uuid); err != nil {
		w.op, w.err = "name", err
	} else {
		// Numbered, not named after the UUID, which may take all of a
		// file name's 255 bytes (TestLongestUUID).
		w.tmp = f.s.partial + "/" + strconv.FormatUint(f.s.seq.Add(1), 10) + ".pcap"
	}
	for {
		<-f.wake
		cs, final := f.next()
		f.s.io <- struct{}{}
		w.write(cs)
		if final {
			break
		}
		<-f.s.io
	}
	w.finish()
	<-f.s.io
	w.account()
	f.settle(w)
}

// settle records the writer's outcome, and writes the flow's index record
// if End gave it already.
func (f *Flow) settle(w *flowFile) {
	res := fileResult{ok: w.err == nil, uuid: w.published, path: strings.TrimPrefix(w.final, f.s.dir+"/"), packets: w.packets, bytes: w.raw, written: w.written}
	f.mu.Lock()
	f.settled, f.res = true, res
	rec := f.rec
	f.mu.Unlock()
	if rec != nil && res.ok {
		f.s.record(rec, &res, f.first)
	}
}

// End gives the flow's index record, once its file was pushed whole and the
// flow is over (the demuxer knows its last counts then); the Flow keeps r,
// which the caller must not change. The record is written once the file is
// published, never for a file that was not (TestIndexRecords). It never
// blocks on I/O.
func (f *Flow) End(r *index.Record) {
	f.mu.Lock()
	f.rec = r
	settled, res := f.settled, f.res
	f.mu.Unlock()
	if settled && res.ok {
		// The writer is gone (the file was finished at -captureduration,
		// and the flow went on): the record is written on a goroutine of
		// its own, as the writer would have.
		f.s.wg.Add(1)
		go func() {
			defer f.s.wg.Done()
			f.s.record(r, &res, f.first)
		}()
	}
}

// record completes a flow's index record with what its writer published,
// and writes it.
func (s *Saver) record(r *index.Record, res *fileResult, first time.Time) {
	r.UUID, r.File = res.uuid, res.path
	r.Packets, r.Bytes, r.FileBytes = uint64(res.packets), uint64(res.bytes), uint64(res.written)
	s.index.add(r, first)
}

// flowFile is the state of a Flow's writer.
type flowFile struct {
	f         *Flow
	tmp       string   // the partial file's path
	file      int      // its descriptor, -1 when closed
	err       error    // the first error; nothing is written after it
	op        string   // what failed
	packets   int      // records written
	total     int      // records received
	written   int      // bytes written
	raw       int      // header bytes of the records written (without their record headers)
	published string   // the UUID the file was published under
	final     string   // and its path
	iov       [][]byte // reused: one writev per batch of chunks
}

// closeFile closes the partial file's descriptor, once.
func (w *flowFile) closeFile() error {
	if w.file < 0 {
		return nil
	}
	err := unix.Close(w.file)
	w.file = -1 // closed even when close fails: the number may be another file's now
	return err
}

// fail records the first error and removes the partial file.
func (w *flowFile) fail(op string, err error) {
	if w.err == nil {
		w.op, w.err = op, err
		w.closeFile()
		if w.tmp != "" {
			os.Remove(w.tmp)
		}
	}
}

// write writes a batch of chunks (creating the file first) and recycles
// them.
func (w *flowFile) write(cs []*record.Chunk) {
	s := w.f.s
	w.iov = w.iov[:0]
	if w.err == nil && w.file < 0 {
		var err error
		if err = s.checkSpace(); err != nil {
			w.op, w.err = "low_space", err
		} else if w.file, err = s.create(w.tmp); err != nil {
			w.file = -1
			w.op, w.err = "create", err
		} else {
			w.iov = append(w.iov, fileHeader(s.snaplen, w.f.linkType))
		}
	}
	n, raw := 0, 0
	for _, c := range cs {
		w.total += c.Records()
		n += c.Records()
		raw += len(c.Bytes()) - record.RecordHeaderLen*c.Records()
		w.iov = append(w.iov, c.Bytes())
	}
	bufs := w.iov
	var z *compressor
	if w.err == nil && s.compress && len(bufs) > 0 {
		z = getCompressor()
		bufs = z.compress(bufs) // the compressor's, until it is put back
	}
	if w.err == nil && len(bufs) > 0 {
		if m, err := writeAll(w.file, bufs); err != nil {
			w.fail("write", &os.PathError{Op: "write", Path: w.tmp, Err: err})
		} else {
			w.written += m
			w.packets += n
			w.raw += raw
		}
	}
	if z != nil {
		putCompressor(z)
	}
	for _, c := range cs {
		c.Release()
	}
}

// finish closes the file and renames it into place under the flow's name
// as it is now.
func (w *flowFile) finish() {
	s := w.f.s
	if w.err == nil {
		if err := w.closeFile(); err != nil {
			w.fail("close", &os.PathError{Op: "close", Path: w.tmp, Err: err})
		}
	}
	uuid := w.f.name()
	if w.err == nil && uuid != w.f.uuid {
		if err := CheckUUID(uuid); err != nil {
			w.fail("name", err)
		}
	}
	if w.err == nil {
		final := s.Path(uuid, w.f.first)
		err := renameNoReplace(w.tmp, final)
		if errors.Is(err, os.ErrNotExist) { // the day's directory is new (or was removed)
			if merr := os.MkdirAll(filepath.Dir(final), s.dirPerm); merr != nil {
				w.fail("mkdir", merr)
			} else {
				err = renameNoReplace(w.tmp, final)
			}
		}
		if err != nil {
			w.fail("rename", err)
		} else {
			w.published, w.final = uuid, final
		}
	}
}

// account counts the flow's outcome and logs its error.
func (w *flowFile) account() {
	s := w.f.s
	switch {
	case errors.Is(w.err, ErrLowSpace):
		s.counts.Packets.Add("low_space", uint64(w.total))
		s.counts.Flows.Inc("low_space")
		s.logs.printf(w.op, "saver: not writing flows: %v", w.err)
		s.errors.Add(1)
	case w.err != nil:
		s.counts.WriteErrors.Inc(w.op)
		s.counts.Packets.Add("write_error", uint64(w.total))
		s.counts.Flows.Inc("write_error")
		s.logs.printf(w.op, "saver: %s: %v", w.op, w.err)
		s.errors.Add(1)
	default:
		s.files.Add(1)
		s.bytes.Add(int64(w.written))
		s.counts.Packets.Add("saved", uint64(w.packets))
		s.counts.Flows.Inc("saved")
	}
}

// compressor is a pooled gzip writer and the buffer it compresses into.
type compressor struct {
	zw  *gzip.Writer
	out bytes.Buffer
	iov [1][]byte
}

var (
	compressors = sync.Pool{New: func() any {
		compressorsCreated.Add(1)
		zw, _ := gzip.NewWriterLevel(nil, gzip.DefaultCompression)
		return &compressor{zw: zw}
	}}
	compressorsInUse   atomic.Int64
	compressorsCreated atomic.Int64
)

// CompressorsCreated returns the number of compressors the process's pool
// made; steady when they are reused.
func CompressorsCreated() int64 { return compressorsCreated.Load() }

func getCompressor() *compressor {
	compressorsInUse.Add(1)
	return compressors.Get().(*compressor)
}

func putCompressor(z *compressor) {
	z.iov[0] = nil
	z.out.Reset()
	compressors.Put(z)
	compressorsInUse.Add(-1)
}

// CompressorsInUse returns how many pooled compressors are compressing now.
func CompressorsInUse() int64 { return compressorsInUse.Load() }

// compress compresses bufs (the file header and records of one batch) as
// one gzip member and returns it as one buffer, valid until z is put back.
// Writing to a bytes.Buffer cannot fail.
func (z *compressor) compress(bufs [][]byte) [][]byte {
	z.out.Reset()
	z.zw.Reset(&z.out)
	for _, b := range bufs {
		z.zw.Write(b)
	}
	z.zw.Close()
	z.iov[0] = z.out.Bytes()
	return z.iov[:]
}

// create creates a partial file, making the partial directory again if it
// was removed (the data directory deleted under a running daemon). It
// returns a plain descriptor: an os.File would cost four fcntl and an
// epoll_ctl per file for a poller that regular files do not use.
func (s *Saver) create(path string) (int, error) {
	open := func() (int, error) {
		for {
			// O_EXCL: a partial file is never shared, even with what a
			// crash left.
			fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(s.perm))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return -1, &os.PathError{Op: "open", Path: path, Err: err}
			}
			return fd, nil
		}
	}
	fd, err := open()
	if errors.Is(err, os.ErrNotExist) {
		// The partial directory was removed: made again, and checked
		// again, as at start.
		if merr := s.ownDir(s.partial); merr != nil {
			return -1, merr
		}
		fd, err = open()
	}
	return fd, err
}

// checkSpace returns ErrLowSpace while the filesystem has less free space
// than the options keep. One statfs per flow.
func (s *Saver) checkSpace() error {
	if s.minFree <= 0 && s.minFreePct <= 0 {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return nil // the write will tell what is wrong
	}
	free := int64(st.Bavail) * st.Bsize
	total := int64(st.Blocks) * st.Bsize
	if free < s.minFree || total > 0 && float64(free)*100 < s.minFreePct*float64(total) {
		return fmt.Errorf("%w: %d of %d bytes free in %s", ErrLowSpace, free, total, s.dir)
	}
	return nil
}

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

// iovMax is the most buffers one writev takes (IOV_MAX on Linux).
const iovMax = 1024

// writeAll writes all of bufs to the file fd with writev(2), IOV_MAX
// buffers at a time and again after a short write, and returns the number
// of bytes written. It goes through Go's system-call bookkeeping, which
// lets the runtime hand the processor on while the kernel waits: a write
// that bypassed it (a raw system call, once used here to spare the
// monitor thread's wake-ups) held the only processor of -maxprocs 1 for as
// long as a frozen or stuck filesystem blocked it, and stopped the capture,
// the timers and the signal handling with it (TestStuckDisk in e2e).
func writeAll(fd int, bufs [][]byte) (int, error) {
	total := 0
	for len(bufs) > 0 {
		n, err := unix.Writev(fd, bufs[:min(len(bufs), iovMax)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return total, err
		}
		if n == 0 {
			return total, io.ErrShortWrite
		}
		total += n
		for n > 0 && len(bufs) > 0 { // skip what was written
			if n >= len(bufs[0]) {
				n -= len(bufs[0])
				bufs = bufs[1:]
			} else {
				bufs[0] = bufs[0][n:]
				n = 0
			}
		}
	}
	return total, nil
}

// renameNoReplace renames without replacing an existing file, so that a
// UUID named twice can never overwrite a finished file.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: check, then rename.
		if _, serr := os.Lstat(to); serr == nil {
			return fmt.Errorf("rename %s: %w", to, os.ErrExist)
		}
		return os.Rename(from, to)
	}
	if err != nil {
		return fmt.Errorf("rename %s: %w", to, err)
	}
	return nil
}

func fileHeader(snaplen int, lt packet.LinkType) []byte {
	h := make([]byte, FileHeaderLen)
	binary.LittleEndian.PutUint32(h[0:], 0xa1b23c4d) // nanosecond timestamps
	binary.LittleEndian.PutUint16(h[4:], 2)
	binary.LittleEndian.PutUint16(h[6:], 4)
	binary.LittleEndian.PutUint32(h[16:], uint32(snaplen))
	binary.LittleEndian.PutUint32(h[20:], uint32(lt))
	return h
}
