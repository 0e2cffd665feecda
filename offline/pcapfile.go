package offline

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/m-lab/packet-headers/packet"
)

// MaxRecordBytes is the longest captured frame a pcap record or pcapng
// packet block may hold: libpcap's largest snapshot length. A longer one is
// a corrupt file, not a reason to allocate gigabytes.
const MaxRecordBytes = 256 << 10

// errTooLong is wrapped by the error for a record longer than MaxRecordBytes.
var errTooLong = fmt.Errorf("record longer than %d bytes", MaxRecordBytes)

// MaxOrigLen is the longest original length a frame may claim: above the
// largest GSO/GRO super-packet Linux makes (512 KiB with BIG TCP).
const MaxOrigLen = 1 << 20

// errImpossible is wrapped by the error for a record whose header is
// impossible (a time fraction of a second or more, an original length of
// 0, shorter than the frame or above MaxOrigLen): the record is read and
// refused, the file goes on (TestImpossibleRecords).
var errImpossible = errors.New("impossible record header")

// plausible checks a record's original length against its frame.
func plausible(data []byte, origLen int) error {
	if origLen == 0 || origLen < len(data) || origLen > MaxOrigLen {
		return fmt.Errorf("%w: original length %d for %d captured bytes", errImpossible, origLen, len(data))
	}
	return nil
}

// pcapFile reads the records of a classic pcap file straight out of its
// own buffer. gopacket's pcapgo reader copies every record twice and
// returned a gopacket.CaptureInfo for each (about a tenth of an offline
// run's CPU); it also keeps only 8 bits of the link type (LINUX_SLL2, 276,
// which tcpdump -i any writes, became 20), allocates whatever length a
// record header claims, and takes a file that ends right after a record
// header for a complete one.
type pcapFile struct {
	buffered
	fracNs   int64 // nanoseconds per unit of a timestamp's fraction
	linkType packet.LinkType
}

// buffered reads a file through a buffer that records are sliced from.
type buffered struct {
	r        io.Reader
	buf      []byte
	off, end int   // unread bytes are buf[off:end]
	base     int64 // offset in the file of buf[0]
	bigEnd   bool  // the byte order of the file's (or section's) numbers
}

func newBuffered(r io.Reader, offset int64) buffered {
	return buffered{r: r, buf: make([]byte, 1<<20), base: offset}
}

// Offset returns the offset in the file just past the last record read; a
// failed Next does not move it.
func (b *buffered) Offset() int64 { return b.base + int64(b.off) }

// fill reads until buf[off:] holds at least n bytes (n ≤ len(buf)). It
// returns io.EOF if the file ended with no byte of them, and
// io.ErrUnexpectedEOF if it ended with some.
func (b *buffered) fill(n int) error {
	if len(b.buf)-b.off < n { // move the unread bytes to the front
		b.base += int64(b.off)
		b.end = copy(b.buf, b.buf[b.off:b.end])
		b.off = 0
	}
	for b.end-b.off < n {
		m, err := b.r.Read(b.buf[b.end:])
		b.end += m
		if b.end-b.off >= n {
			return nil
		}
		if errors.Is(err, io.EOF) {
			if b.end == b.off {
				return io.EOF
			}
			return io.ErrUnexpectedEOF
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (b *buffered) u16(p []byte) uint16 {
	if b.bigEnd {
		return binary.BigEndian.Uint16(p)
	}
	return binary.LittleEndian.Uint16(p)
}

func (b *buffered) u32(p []byte) uint32 {
	if b.bigEnd {
		return binary.BigEndian.Uint32(p)
	}
	return binary.LittleEndian.Uint32(p)
}

func (b *buffered) u64(p []byte) uint64 {
	if b.bigEnd {
		return binary.BigEndian.Uint64(p)
	}
	return binary.LittleEndian.Uint64(p)
}

// skip consumes n bytes, however many the buffer holds.
func (b *buffered) skip(n int64) error {
	for n > 0 {
		if b.end == b.off {
			if err := b.fill(1); err != nil {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return err
			}
		}
		m := min(n, int64(b.end-b.off))
		b.off += int(m)
		n -= m
	}
	return nil
}

// newPcapFile reads the file header.
func newPcapFile(r io.Reader) (*pcapFile, error) {
	var h [24]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, fmt.Errorf("file header: %w", err)
	}
	f := &pcapFile{buffered: newBuffered(r, int64(len(h))), fracNs: 1000}
	switch binary.LittleEndian.Uint32(h[:4]) {
	case 0xa1b2c3d4:
	case 0xa1b23c4d:
		f.fracNs = 1
	case 0xd4c3b2a1:
		f.bigEnd = true
	case 0x4d3cb2a1:
		f.bigEnd, f.fracNs = true, 1
	default:
		return nil, fmt.Errorf("unknown magic %x", h[:4])
	}
	if major := f.u16(h[4:]); major != 2 {
		return nil, fmt.Errorf("unknown major version %d", major)
	}
	f.linkType = packet.LinkType(f.u32(h[20:]) & 0xffff) // the upper bits may hold FCS information
	return f, nil
}

// LinkType returns the file's link type.
func (f *pcapFile) LinkType(int) packet.LinkType { return f.linkType }

// Next returns the next record: its frame (valid until the next call), its
// timestamp in Unix nanoseconds and the frame's original length; the
// interface is always 0. At the end of the file it returns io.EOF; a file
// cut inside a record gives io.ErrUnexpectedEOF.
func (f *pcapFile) Next() (data []byte, ts int64, origLen, ifc int, err error) {
	if f.end-f.off < 16 {
		if err := f.fill(16); err != nil {
			return nil, 0, 0, 0, err
		}
	}
	h := f.buf[f.off : f.off+16]
	sec, frac := f.u32(h[0:]), f.u32(h[4:])
	caplen, orig := f.u32(h[8:]), f.u32(h[12:])
	if caplen > MaxRecordBytes {
		return nil, 0, 0, 0, fmt.Errorf("%w: %d", errTooLong, caplen)
	}
	n := 16 + int(caplen)
	if f.end-f.off < n {
		if err := f.fill(n); err != nil { // the header is there: never io.EOF
			return nil, 0, 0, 0, err
		}
	}
	data = f.buf[f.off+16 : f.off+n]
	f.off += n
	if int64(frac)*f.fracNs >= 1e9 {
		// It would move the packet by up to 71 minutes.
		return nil, 0, 0, 0, fmt.Errorf("%w: a time fraction of %d", errImpossible, frac)
	}
	return data, int64(sec)*1e9 + int64(frac)*f.fracNs, int(orig), 0, nil
}
