package saver

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
)

// IndexGrace is how long after its hour an index file stays open for the
// records of flows that ended in the hour but were still being written.
// A record later than that goes into another file of the same hour.
const IndexGrace = 10 * time.Second

// maxIndexNumber bounds the numbered files of one hour tried at publication.
const maxIndexNumber = 1000

// partialIndexPrefix begins the names of index files being written; the
// rest of the name says where each belongs, so that New can publish what
// a crash left.
const partialIndexPrefix = "flows."

// IndexOps are the index file operations counted in
// IndexCounts.Errors.
var IndexOps = []string{"create", "write", "close", "rename"}

// IncompleteReasons are why a record says its trace may be incomplete, as
// IndexCounts.Incomplete counts them: the SYN or SYN-ACK was not captured,
// packets came after -captureduration, a limit refused some before the
// flow was tracked, the capture may have dropped some, or it was down.
var IncompleteReasons = []string{"no_handshake", "captureduration", "limits", "capture_drops", "capture_down"}

// IndexCounts are what the flow index counted. Safe for concurrent use.
type IndexCounts struct {
	Records    *metrics.Counters // records added, by end (index.Ends)
	Incomplete *metrics.Counters // records added, by IncompleteReasons (a record may count for several)
	Files      atomic.Uint64     // index files published
	Recovered  atomic.Uint64     // index files a crash left, published by New
	Errors     *metrics.Counters // failed operations, by IndexOps
	Lost       atomic.Uint64     // records added but not written, for an error
}

// indexWriter appends the records of finished flows to one partial file per
// day directory and hour, and publishes each when its hour closes. Its
// lock is taken once per record (by flow writers, never by the demuxer).
type indexWriter struct {
	s      *Saver
	counts IndexCounts
	mu     sync.Mutex
	open   map[indexKey]*indexFile
}

// indexKey identifies an index file: the day of its flows' files and the
// hour of their ends.
type indexKey struct {
	day  int64 // dayNumber
	hour int64 // unix seconds of the hour's start
}

type indexFile struct {
	fd       int
	tmp      string // its name in the partial directory
	dayDir   string // relative to the data directory
	hour     time.Time
	pending  []byte // records not written yet
	pendingN uint64
	size     int64 // bytes of whole records written
}

// indexBatch is how many bytes of records are written at once: one write
// per hundred records or so, not one per record (the lab's offline row
// measures the cost per flow). PublishIndex writes what waits, each second
// live.
const indexBatch = 64 << 10

// flush writes the records that wait; on an error they are lost, and
// counted.
func (x *indexWriter) flush(f *indexFile) {
	if len(f.pending) == 0 {
		return
	}
	if _, err := writeAll(f.fd, [][]byte{f.pending}); err != nil {
		// A short write (a full disk) must not leave half a record, to
		// which the next batch would be glued: the file is cut back to its
		// last whole record and the batch counted lost
		// (TestIndexDiskFull).
		if terr := unix.Ftruncate(f.fd, f.size); terr == nil {
			_, terr = unix.Seek(f.fd, f.size, io.SeekStart)
			if terr != nil {
				err = errors.Join(err, terr)
			}
		} else {
			err = errors.Join(err, terr)
		}
		x.fail("write", &os.PathError{Op: "write", Path: x.s.partial.path + "/" + f.tmp, Err: err}, f.pendingN)
	} else {
		f.size += int64(len(f.pending))
	}
	f.pending, f.pendingN = f.pending[:0], 0
}

func newIndexWriter(s *Saver) *indexWriter {
	return &indexWriter{s: s, open: map[indexKey]*indexFile{}, counts: IndexCounts{Errors: metrics.NewCounters(IndexOps...),
		Records: metrics.NewCounters(index.Ends()...), Incomplete: metrics.NewCounters(IncompleteReasons...)}}
}

// IndexCounts returns the flow index's counts.
func (s *Saver) IndexCounts() *IndexCounts { return &s.index.counts }

// add adds the record of a published file to its index file, written
// when indexBatch bytes wait, or by the next PublishIndex.
func (x *indexWriter) add(r *index.Record, first time.Time) {
	hour := index.Hour(r.Ended)
	k := indexKey{day: dayNumber(first), hour: hour.Unix()}
	x.mu.Lock()
	defer x.mu.Unlock()
	f := x.open[k]
	if f == nil {
		dayDir := x.s.dayDir(first)
		f = &indexFile{fd: -1, dayDir: dayDir, hour: hour,
			tmp: partialIndexPrefix + first.UTC().Format("2006-01-02") +
				"." + strconv.FormatInt(hour.Unix(), 10) + "." + strconv.FormatUint(x.s.seq.Add(1), 10) + ".jsonl"}
		fd, err := x.s.create(f.tmp)
		if err != nil {
			x.fail("create", err, 1)
			return
		}
		f.fd = fd
		x.open[k] = f
	}
	f.pending = r.AppendJSON(f.pending)
	if f.pendingN++; len(f.pending) >= indexBatch {
		x.flush(f)
	}
	c := &x.counts
	c.Records.Inc(r.End.String())
	if !r.SYN || !r.SYNACK {
		c.Incomplete.Inc("no_handshake")
	}
	if r.AfterDuration > 0 {
		c.Incomplete.Inc("captureduration")
	}
	if r.FlowLimit+r.MemoryLimit > 0 {
		c.Incomplete.Inc("limits")
	}
	if r.DropsMax > 0 {
		c.Incomplete.Inc("capture_drops")
	}
	if r.Down {
		c.Incomplete.Inc("capture_down")
	}
}

func (x *indexWriter) fail(op string, err error, lost uint64) {
	x.counts.Errors.Inc(op)
	x.counts.Lost.Add(lost)
	x.s.logs.printf("index-"+op, "saver: flow index: %v", err)
}

// PublishIndex publishes the index files of the hours that closed by now
// (IndexGrace ago): it does nothing if a record or another call holds the
// index (a stuck disk must not hold the caller's other work, the
// housekeeping), and the next call publishes what this one left. With a
// zero time (at shutdown, after Wait) it waits for the index and
// publishes every file.
func (s *Saver) PublishIndex(now time.Time) {
	x := s.index
	if now.IsZero() {
		x.mu.Lock()
	} else if !x.mu.TryLock() {
		return
	}
	defer x.mu.Unlock()
	for k, f := range x.open {
		x.flush(f)
		if !now.IsZero() && now.Before(f.hour.Add(time.Hour+IndexGrace)) {
			continue
		}
		delete(x.open, k)
		if err := unix.Close(f.fd); err != nil {
			x.fail("close", &os.PathError{Op: "close", Path: s.partial.path + "/" + f.tmp, Err: err}, 0)
			s.partial.remove(f.tmp)
			continue
		}
		if err := s.publishIndex(f.tmp, f.dayDir, f.hour); err != nil {
			x.fail("rename", err, 0)
			s.partial.remove(f.tmp)
			continue
		}
		x.counts.Files.Add(1)
	}
}

// publishIndex renames a closed index file (its name in the partial
// directory) into its day directory, under the first free name of its
// hour.
func (s *Saver) publishIndex(tmp, dayDir string, hour time.Time) error {
	var err error
	for n := 1; n <= maxIndexNumber; n++ {
		err = publish(s.partial, tmp, s.data, dayDir+"/"+index.Name(hour, n))
		if !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return err
}

// recoverIndex publishes the index files a crash left in the partial
// directory, without a record cut short by the crash: the records of files
// that were published stay findable.
func (s *Saver) recoverIndex() {
	var names []string
	if s.partial.control(func(dir int) (err error) { names, err = readNames(dir); return err }) != nil {
		return
	}
	for _, tmp := range names {
		dayDir, hour, ok := s.parsePartialIndex(tmp)
		if !ok {
			continue
		}
		f, b, err := readOwnFile(s.partial, tmp)
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, '\n')
		if i >= 0 && i+1 < len(b) {
			err = f.Truncate(int64(i + 1))
		}
		f.Close()
		if i < 0 || err != nil {
			continue // nothing whole (cleanPartial removes it), or not truncated
		}
		if err := s.publishIndex(tmp, dayDir, hour); err == nil {
			s.index.counts.Recovered.Add(1)
		}
	}
}

// parsePartialIndex reads a partial index file's name:
// flows.YYYY-MM-DD.<hour, unix seconds>.<n>.jsonl.
func (s *Saver) parsePartialIndex(name string) (dayDir string, hour time.Time, ok bool) {
	rest, ok := strings.CutPrefix(name, partialIndexPrefix)
	if !ok {
		return "", time.Time{}, false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 4 || parts[3] != "jsonl" {
		return "", time.Time{}, false
	}
	day, err := time.Parse("2006-01-02", parts[0])
	if err != nil {
		return "", time.Time{}, false
	}
	sec, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil || sec%3600 != 0 {
		return "", time.Time{}, false
	}
	return day.Format("2006/01/02"), time.Unix(sec, 0).UTC(), true
}
