// Package saver writes each flow's headers into its own pcap file,
// <dir>/YYYY/MM/DD/<uuid>.pcap, dated by the flow's first packet (UTC).
//
// The demuxer appends records to a flow's Buffer (chunks of ready-made pcap
// records, so writing is a plain copy). Once the flow has a UUID it hands
// whole chunks to a Flow: a goroutine that owns the file. In buffer mode the
// Flow is started when the flow ends, with every chunk at once (or, for a
// long flow, once it holds a few hundred kilobytes, which it then gets at a
// time); in stream mode it is started when the flow is named and gets
// chunks as they fill.
// Handing chunks over takes the Flow's own mutex once per chunk (thousands
// of packets), never per packet, and never blocks the caller.
//
// A file is written under <dir>/.partial/ and renamed to its final name only
// when complete (without replacing an existing file), so a pusher that
// uploads <uuid>.pcap files never sees a partial one, even after a crash;
// New removes what a crash left in .partial/. A UUID that is not a plain
// file name (names.CheckUUID) is refused as a write error of its own
// ("name"), so nothing is written outside the data directory. On a write
// error the partial file is removed, the error counted and the flow's data
// dropped; other flows are unaffected.
//
// The file format is classic pcap with nanosecond timestamps (magic
// 0xa1b23c4d), little-endian, with the snaplen and link type given.
package saver

import (
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// PartialDir is the subdirectory of the data directory that holds files
// being written.
const PartialDir = ".partial"

// FileHeaderLen is the size of a pcap file header.
const FileHeaderLen = 24

// Options configures a Saver.
type Options struct {
	Dir     string // data directory; created if missing
	Snaplen int    // the snaplen written in file headers; default 256
	// MinFreeBytes and MinFreePercent: while the data directory's
	// filesystem has less free space than either, new files are not
	// written (their flows are counted as low_space), so the disk never
	// fills up. Zero disables each.
	MinFreeBytes   int64
	MinFreePercent float64
	// Compress writes <uuid>.pcap.gz, one gzip member per file. A finished
	// flow is compressed in one go with a pooled compressor, so compression
	// costs no memory per live flow.
	Compress bool
}

// ErrLowSpace is the reason a flow was not written: the filesystem has
// less free space than Options asks to keep.
var ErrLowSpace = errors.New("free space below -minfreespace")

// Saver starts and owns the per-flow writer goroutines.
type Saver struct {
	dir, partial string
	snaplen      int
	minFree      int64
	minFreePct   float64
	compress     bool
	logs         rateLog
	wg           sync.WaitGroup
	active       atomic.Int64
	files, bytes atomic.Int64
	errors       atomic.Int64
	// io bounds the writers doing file I/O at once: thousands of flows
	// ending together (a shutdown, the end of an offline input) would
	// otherwise park thousands of threads on the data directory's lock.
	io chan struct{}
	// raw is the one slot for a raw write (see rawWritev); nil where
	// writes may wait on more than this machine's memory and disks.
	raw    chan struct{}
	rawOff atomic.Bool // a raw write was slow: writes are made the usual way
	day    atomic.Pointer[day]
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
	s := &Saver{dir: dir, partial: filepath.Join(dir, PartialDir), snaplen: opts.Snaplen,
		minFree: opts.MinFreeBytes, minFreePct: opts.MinFreePercent, compress: opts.Compress,
		io: make(chan struct{}, max(2, runtime.GOMAXPROCS(0)))}
	if localFS(dir) {
		s.raw = make(chan struct{}, 1)
	}
	if err := os.MkdirAll(s.partial, 0o755); err != nil {
		return nil, fmt.Errorf("datadir: %w", err)
	}
	leftovers, err := os.ReadDir(s.partial)
	if err != nil {
		return nil, fmt.Errorf("datadir: %w", err)
	}
	for _, e := range leftovers {
		os.Remove(filepath.Join(s.partial, e.Name()))
	}
	probe, err := os.CreateTemp(s.partial, "probe-*")
	if err != nil {
		return nil, fmt.Errorf("datadir %s is not writable: %w", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	return s, nil
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
	sec := t.Unix()
	n := sec / 86400
	if sec < 0 && sec%86400 != 0 {
		n-- // round down before 1970
	}
	if d := s.day.Load(); d != nil && d.n == n {
		return d.dir
	}
	d := &day{n: n, dir: filepath.Join(s.dir, t.UTC().Format("2006/01/02"))}
	s.day.Store(d)
	return d.dir
}

// Active returns the number of flows being written.
func (s *Saver) Active() int64 { return s.active.Load() }

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

	mu    sync.Mutex
	queue []*chunk
	final bool
	wake  chan struct{}
}

// Start starts the writer of the flow named uuid, captured on a link of type
// lt, whose first packet was at first. It returns at once.
func (s *Saver) Start(uuid string, lt packet.LinkType, first time.Time) *Flow {
	f := &Flow{s: s, uuid: uuid, linkType: lt, first: first, wake: make(chan struct{}, 1)}
	s.wg.Add(1)
	s.active.Add(1)
	go func() {
		defer s.wg.Done()
		defer s.active.Add(-1)
		f.run()
	}()
	return f
}

// Push hands the writer buf's full chunks, or, when final is set, all of
// them and the end of the flow. It never blocks on I/O. After a final Push
// the Flow must not be used again.
func (f *Flow) Push(buf *Buffer, final bool) {
	cs, _ := buf.take(final)
	if len(cs) == 0 && !final {
		return
	}
	f.mu.Lock()
	f.queue = append(f.queue, cs...)
	f.final = f.final || final
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

func (f *Flow) next() (cs []*chunk, final bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cs, f.queue = f.queue, nil
	return cs, f.final
}

// run is the writer goroutine. Its state lives in a flowFile on the heap,
// and its steps are methods with small frames: the goroutine then opens its
// file within the 2 KiB stack it starts with (growing it cost about 2.5 µs
// a flow, copying frames).
func (f *Flow) run() {
	// The name is checked before anything is created: never a path out of
	// the data directory, and no path cleaning needed.
	w := &flowFile{f: f, tmp: f.s.partial + "/" + f.uuid + ".pcap", file: -1}
	if err := names.CheckUUID(f.uuid); err != nil {
		w.op, w.err = "name", err
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
}

// flowFile is the state of a Flow's writer.
type flowFile struct {
	f       *Flow
	tmp     string       // the partial file's path
	file    int          // its descriptor, -1 when closed
	err     error        // the first error; nothing is written after it
	op      string       // what failed
	packets int          // records written
	total   int          // records received
	written int          // bytes written
	iov     [][]byte     // reused: one writev per batch of chunks
	vec     []unix.Iovec // reused by raw writes
}

// fail records the first error and removes the partial file.
func (w *flowFile) fail(op string, err error) {
	if w.err == nil {
		w.op, w.err = op, err
		if w.file >= 0 {
			unix.Close(w.file)
			w.file = -1
		}
		os.Remove(w.tmp)
	}
}

// write writes a batch of chunks (creating the file first) and recycles
// them.
func (w *flowFile) write(cs []*chunk) {
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
	n := 0
	for _, c := range cs {
		w.total += c.n
		n += c.n
		w.iov = append(w.iov, c.b)
	}
	if w.err == nil && len(w.iov) > 0 {
		if m, err := s.writev(w.file, w.iov, &w.vec); err != nil {
			w.fail("write", &os.PathError{Op: "write", Path: w.tmp, Err: err})
		} else {
			w.written += m
			w.packets += n
		}
	}
	for _, c := range cs {
		putChunk(c)
	}
}

// finish closes the file, compresses it if asked, and renames it into
// place.
func (w *flowFile) finish() {
	s := w.f.s
	if w.err == nil {
		if err := unix.Close(w.file); err != nil {
			w.file = -1
			w.fail("close", &os.PathError{Op: "close", Path: w.tmp, Err: err})
		}
	}
	if w.err == nil && s.compress {
		gz := w.tmp + ".gz"
		if n, err := compressFile(w.tmp, gz); err != nil {
			os.Remove(gz)
			w.fail("compress", err)
		} else {
			os.Remove(w.tmp)
			w.tmp, w.written = gz, int(n)
		}
	}
	if w.err == nil {
		final := s.Path(w.f.uuid, w.f.first)
		err := renameNoReplace(w.tmp, final)
		if errors.Is(err, os.ErrNotExist) { // the day's directory is new (or was removed)
			if merr := os.MkdirAll(filepath.Dir(final), 0o755); merr != nil {
				w.fail("mkdir", merr)
			} else {
				err = renameNoReplace(w.tmp, final)
			}
		}
		if err != nil {
			w.fail("rename", err)
		}
	}
}

// account counts the flow's outcome and logs its error.
func (w *flowFile) account() {
	s := w.f.s
	switch {
	case errors.Is(w.err, ErrLowSpace):
		metrics.PacketsTotal.WithLabelValues(metrics.OutcomeLowSpace).Add(float64(w.total))
		metrics.FlowsEnded.WithLabelValues(metrics.FlowLowSpace).Inc()
		s.logs.printf(w.op, "saver: not writing flows: %v", w.err)
		s.errors.Add(1)
	case w.err != nil:
		metrics.WriteErrors.WithLabelValues(w.op).Inc()
		metrics.PacketsTotal.WithLabelValues(metrics.OutcomeWriteError).Add(float64(w.total))
		metrics.FlowsEnded.WithLabelValues(metrics.FlowWriteError).Inc()
		s.logs.printf(w.op, "saver: %s: %v", w.op, w.err)
		s.errors.Add(1)
	default:
		s.files.Add(1)
		s.bytes.Add(int64(w.written))
		metrics.FilesWritten.Inc()
		metrics.BytesWritten.Add(float64(w.written))
		packetsSaved.Add(float64(w.packets))
		flowsSaved.Inc()
	}
}

// The success counters, resolved once: every flow ends in them.
var (
	packetsSaved = metrics.PacketsTotal.WithLabelValues(metrics.OutcomeSaved)
	flowsSaved   = metrics.FlowsEnded.WithLabelValues(metrics.FlowSaved)
)

var (
	compressors = sync.Pool{New: func() any {
		metrics.CompressorsCreated.Inc()
		w, _ := gzip.NewWriterLevel(nil, gzip.DefaultCompression)
		return w
	}}
	compressorsInUse atomic.Int64
)

// CompressorsInUse returns how many pooled compressors are compressing now.
func CompressorsInUse() int64 { return compressorsInUse.Load() }

// compressFile compresses from into to as one gzip member, with a pooled
// compressor, and returns the compressed size.
func compressFile(from, to string) (int64, error) {
	in, err := os.Open(from)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, err
	}
	zw := compressors.Get().(*gzip.Writer)
	compressorsInUse.Add(1)
	defer func() {
		zw.Reset(nil) // keep no reference to the file
		compressors.Put(zw)
		compressorsInUse.Add(-1)
	}()
	zw.Reset(out)
	_, err = io.Copy(zw, in)
	if cerr := zw.Close(); err == nil {
		err = cerr
	}
	var size int64
	if st, serr := out.Stat(); serr == nil {
		size = st.Size()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return size, err
}

// create creates a partial file, making the partial directory again if it
// was removed (the data directory deleted under a running daemon). It
// returns a plain descriptor: an os.File would cost four fcntl and an
// epoll_ctl per file for a poller that regular files do not use.
func (s *Saver) create(path string) (int, error) {
	open := func() (int, error) {
		for {
			fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o644)
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
		if merr := os.MkdirAll(s.partial, 0o755); merr != nil {
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

// writev writes all of bufs to the file fd in as few system calls as the
// kernel allows (usually one) and returns the number of bytes written. It
// writes raw (see rawWritev) when the raw slot is free, else through Go's
// system-call bookkeeping; vec is scratch space for raw writes.
func (s *Saver) writev(fd int, bufs [][]byte, vec *[]unix.Iovec) (int, error) {
	if s.takeRaw() {
		defer s.giveRaw(time.Now())
		return writeAll(fd, bufs, func(fd int, b [][]byte) (int, error) { return rawWritev(fd, b, vec) })
	}
	return writeAll(fd, bufs, unix.Writev)
}

// takeRaw takes the raw slot if raw writes are allowed and it is free.
func (s *Saver) takeRaw() bool {
	if s.rawOff.Load() {
		return false
	}
	select {
	case s.raw <- struct{}{}: // never ready when s.raw is nil
		return true
	default:
		return false
	}
}

// giveRaw gives the raw slot back after a write that began at start, and
// turns raw writes off for good if it was slow.
func (s *Saver) giveRaw(start time.Time) {
	<-s.raw
	if d := time.Since(start); d > slowRawWrite && !s.rawOff.Swap(true) {
		log.Printf("saver: a write took %v: writing the usual way from now on", d.Round(time.Millisecond))
	}
}

// writeAll writes all of bufs with write, a writev, IOV_MAX buffers at a
// time and again after a short write.
func writeAll(fd int, bufs [][]byte, write func(int, [][]byte) (int, error)) (int, error) {
	total := 0
	for len(bufs) > 0 {
		n, err := write(fd, bufs[:min(len(bufs), iovMax)])
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

// slowRawWrite is how long a raw write may take before writes are made
// the usual way for good. A variable for tests only.
var slowRawWrite = 100 * time.Millisecond

// rawWritev is writev(2) without Go's system-call bookkeeping. That
// bookkeeping wakes the runtime's monitor thread (sysmon) whenever it
// sleeps, and sysmon then polls every 20 µs for a millisecond or more: in
// the lab each 256 KiB write of a long flow cost tens of context switches,
// 15-20% of the daemon's CPU on this VM. A raw write keeps its processor
// (P) while the kernel copies into the page cache, well under a
// millisecond; with one P (-maxprocs) the capture waits meanwhile, its
// frames held in the kernel's buffer. So: one raw writer at a time; only
// on a local filesystem (ext4, XFS, btrfs, tmpfs, overlayfs), whose
// buffered writes wait on nothing but memory and the dirty-page throttle
// (a pause of at most 200 ms); and never again once one has taken longer
// than slowRawWrite (a disk that cannot keep up).
func rawWritev(fd int, bufs [][]byte, vec *[]unix.Iovec) (int, error) {
	v := (*vec)[:0]
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		iv := unix.Iovec{Base: &b[0]}
		iv.SetLen(len(b))
		v = append(v, iv)
	}
	*vec = v
	if len(v) == 0 {
		return 0, nil
	}
	n, _, e := unix.RawSyscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&v[0])), uintptr(len(v)))
	clear(v) // keep no pointer to the chunks
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// localFS reports whether dir is on a local filesystem (see rawWritev).
func localFS(dir string) bool {
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) != nil {
		return false
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC, unix.XFS_SUPER_MAGIC, unix.BTRFS_SUPER_MAGIC, unix.TMPFS_MAGIC, unix.OVERLAYFS_SUPER_MAGIC:
		return true
	}
	return false
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
