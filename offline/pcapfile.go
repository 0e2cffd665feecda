package offline

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/m-lab/packet-headers/packet"
)

// MaxRecordBytes is the longest captured frame a classic pcap record may
// hold: libpcap's largest snapshot length. A longer one is a corrupt file,
// not a reason to allocate gigabytes.
const MaxRecordBytes = 256 << 10

// errTooLong is wrapped by the error for a record longer than MaxRecordBytes.
var errTooLong = fmt.Errorf("record longer than %d bytes", MaxRecordBytes)

// pcapFile reads the records of a classic pcap file straight out of its
// own buffer. gopacket's pcapgo reader copies every record twice and
// returned a gopacket.CaptureInfo for each (about a tenth of an offline
// run's CPU); it also allocates whatever length a record header claims,
// and takes a file that ends right after a record header for a complete
// one. pcapng files are still read by pcapgo.
type pcapFile struct {
	r        io.Reader
	bigEnd   bool
	fracNs   int64 // nanoseconds per unit of a timestamp's fraction
	linkType packet.LinkType
	buf      []byte
	off, end int   // unread bytes are buf[off:end]
	base     int64 // offset in the file of buf[0]
}

// newPcapFile reads the file header.
func newPcapFile(r io.Reader) (*pcapFile, error) {
	var h [24]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, fmt.Errorf("file header: %w", err)
	}
	f := &pcapFile{r: r, fracNs: 1000, buf: make([]byte, 1<<20), base: int64(len(h))}
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

func (f *pcapFile) u16(b []byte) uint16 {
	if f.bigEnd {
		return binary.BigEndian.Uint16(b)
	}
	return binary.LittleEndian.Uint16(b)
}

func (f *pcapFile) u32(b []byte) uint32 {
	if f.bigEnd {
		return binary.BigEndian.Uint32(b)
	}
	return binary.LittleEndian.Uint32(b)
}

// Offset returns the offset in the file just past the last record read.
func (f *pcapFile) Offset() int64 { return f.base + int64(f.off) }

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
	return data, int64(sec)*1e9 + int64(frac)*f.fracNs, int(orig), 0, nil
}

// fill reads until buf[off:] holds at least n bytes (n ≤ len(buf)). It
// returns io.EOF if the file ended with no byte of them, and
// io.ErrUnexpectedEOF if it ended with some.
func (f *pcapFile) fill(n int) error {
	if len(f.buf)-f.off < n { // move the unread bytes to the front
		f.base += int64(f.off)
		f.end = copy(f.buf, f.buf[f.off:f.end])
		f.off = 0
	}
	for f.end-f.off < n {
		m, err := f.r.Read(f.buf[f.end:])
		f.end += m
		if f.end-f.off >= n {
			return nil
		}
		if errors.Is(err, io.EOF) {
			if f.end == f.off {
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
