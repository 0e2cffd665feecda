package saver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/gz"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// flowFile is the state of a Flow's writer.
type flowFile struct {
	f         *Flow
	tmp       string   // the partial file's name in the partial directory
	file      int      // its descriptor, -1 when closed
	err       error    // the first error; nothing is written after it
	op        string   // what failed
	packets   int      // records written
	total     int      // records received
	written   int      // bytes written
	raw       int      // header bytes of the records written (without their record headers)
	published string   // the UUID the file was published under
	final     string   // and its path, relative to the data directory
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
			w.f.s.partial.remove(w.tmp)
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
		z = s.getCompressor()
		member, err := z.Compress(bufs) // the compressor's, until it is put back
		if err != nil {
			w.fail("compress", err)
		}
		z.iov[0] = member
		bufs = z.iov[:]
	}
	if w.err == nil && len(bufs) > 0 {
		if m, err := writeAll(w.file, bufs); err != nil {
			w.fail("write", &os.PathError{Op: "write", Path: s.partial.path + "/" + w.tmp, Err: err})
		} else {
			w.written += m
			w.packets += n
			w.raw += raw
		}
	}
	if z != nil {
		s.putCompressor(z)
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
			w.fail("close", &os.PathError{Op: "close", Path: s.partial.path + "/" + w.tmp, Err: err})
		}
	}
	uuid := w.f.name()
	if w.err == nil && uuid != w.f.uuid {
		if err := CheckUUID(uuid); err != nil {
			w.fail("name", err)
		}
	}
	if w.err == nil {
		final := s.relPath(uuid, w.f.first)
		if err := publish(s.partial, w.tmp, s.data, final); err != nil {
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

// compressor is a pooled gz.Compressor, with the one-buffer list its
// member is written from.
type compressor struct {
	*gz.Compressor
	iov [1][]byte
}

// CompressorsCreated returns the number of compressors the saver's pool
// made; steady when they are reused.
func (s *Saver) CompressorsCreated() int64 { return s.compressorsCreated.Load() }

// CompressorsInUse returns how many pooled compressors are compressing now.
func (s *Saver) CompressorsInUse() int64 { return s.compressorsInUse.Load() }

func (s *Saver) getCompressor() *compressor {
	s.compressorsInUse.Add(1)
	if z, ok := s.compressors.Get().(*compressor); ok {
		return z
	}
	s.compressorsCreated.Add(1)
	return &compressor{Compressor: gz.New()}
}

func (s *Saver) putCompressor(z *compressor) {
	z.iov[0] = nil
	s.compressors.Put(z)
	s.compressorsInUse.Add(-1)
}

// create creates the partial file name, making the partial directory
// again if it was removed (the data directory deleted under a running
// daemon). It returns a plain descriptor: an os.File would cost four fcntl
// and an epoll_ctl per file for a poller that regular files do not use.
func (s *Saver) create(name string) (int, error) {
	// O_EXCL: a partial file is never shared, even with what a crash left.
	return s.partial.createIn(name, s.perm)
}

// checkSpace returns ErrLowSpace while the filesystem has less free space
// than the options keep. One statfs per flow.
func (s *Saver) checkSpace() error {
	if s.minFree <= 0 && s.minFreePct <= 0 {
		return nil
	}
	free, total, err := s.Space()
	if err != nil {
		return nil // the write will tell what is wrong
	}
	if free < s.minFree || total > 0 && float64(free)*100 < s.minFreePct*float64(total) {
		return fmt.Errorf("%w: %d of %d bytes free in %s", ErrLowSpace, free, total, s.dir)
	}
	return nil
}

// Space returns the bytes free (to this user) and in all of the data
// directory's filesystem.
func (s *Saver) Space() (free, total int64, err error) {
	var st unix.Statfs_t
	err = s.data.control(func(fd int) error { return unix.Fstatfs(fd, &st) })
	return int64(st.Bavail) * st.Bsize, int64(st.Blocks) * st.Bsize, err
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

func fileHeader(snaplen int, lt packet.LinkType) []byte {
	h := make([]byte, FileHeaderLen)
	binary.LittleEndian.PutUint32(h[0:], 0xa1b23c4d) // nanosecond timestamps
	binary.LittleEndian.PutUint16(h[4:], 2)
	binary.LittleEndian.PutUint16(h[6:], 4)
	binary.LittleEndian.PutUint32(h[16:], uint32(snaplen))
	binary.LittleEndian.PutUint32(h[20:], uint32(lt))
	return h
}
