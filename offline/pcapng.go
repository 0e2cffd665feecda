package offline

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"github.com/m-lab/packet-headers/packet"
)

// pcapng block types (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html).
const (
	ngSectionHeader = 0x0a0d0d0a
	ngInterface     = 1
	ngObsoletePkt   = 2
	ngSimplePkt     = 3
	ngEnhancedPkt   = 6
	ngByteOrder     = 0x1a2b3c4d
)

// maxNgInterfaces bounds the interfaces of a pcapng file, all sections
// together.
const maxNgInterfaces = 1 << 16

// errNg is wrapped by the errors for a malformed pcapng file.
var errNg = errors.New("malformed pcapng")

// ngFile reads the packets of a pcapng file (enhanced, simple and obsolete
// packet blocks, any number of sections and interfaces, either byte order,
// any timestamp resolution and offset) straight out of its buffer; other
// blocks are skipped. pcapgo's reader kept only 8 bits of a link type
// (LINUX_SLL2 is 276).
type ngFile struct {
	buffered
	ifaces  []ngIface // of every section so far
	section int       // the current section's first interface in ifaces
}

type ngIface struct {
	linkType packet.LinkType
	snaplen  uint32
	resol    byte  // if_tsresol: 10^-n seconds, or 2^-n with the top bit set
	offset   int64 // if_tsoffset, seconds
}

// newNgFile reads the first section header.
func newNgFile(r io.Reader) (*ngFile, error) {
	f := &ngFile{buffered: newBuffered(r, 0)}
	if _, _, _, _, err := f.next(true); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return f, nil
}

// LinkType returns the link type of an interface (as Next numbers them).
func (f *ngFile) LinkType(ifc int) packet.LinkType {
	if ifc < len(f.ifaces) {
		return f.ifaces[ifc].linkType
	}
	return 0
}

// Next returns the next packet: its frame (valid until the next call), its
// timestamp in Unix nanoseconds, its original length and its interface,
// numbered across sections (the second section's first interface follows
// the first section's last). At the end of the file it returns io.EOF.
func (f *ngFile) Next() (data []byte, ts int64, origLen, ifc int, err error) {
	return f.next(false)
}

// next reads blocks up to the next packet, or up to the end of the first
// section header when header is set.
func (f *ngFile) next(header bool) (data []byte, ts int64, origLen, ifc int, err error) {
	for {
		if err := f.fill(12); err != nil {
			return nil, 0, 0, 0, err
		}
		h := f.buf[f.off : f.off+12]
		typ := f.u32(h)
		if typ == ngSectionHeader { // the section's byte order, from its magic
			switch binary.LittleEndian.Uint32(h[8:]) {
			case ngByteOrder:
				f.bigEnd = false
			case bits.ReverseBytes32(ngByteOrder):
				f.bigEnd = true
			default:
				return nil, 0, 0, 0, fmt.Errorf("%w: byte-order magic %x", errNg, h[8:12])
			}
		} else if header {
			return nil, 0, 0, 0, fmt.Errorf("%w: block %d before the section header", errNg, typ)
		}
		n := f.u32(h[4:])
		if n < 12 || n%4 != 0 {
			return nil, 0, 0, 0, fmt.Errorf("%w: block %d of %d bytes", errNg, typ, n)
		}
		if int(n) > len(f.buf) {
			if typ == ngEnhancedPkt || typ == ngSimplePkt || typ == ngObsoletePkt {
				return nil, 0, 0, 0, fmt.Errorf("%w: %d bytes", errTooLong, n)
			}
			if err := f.skip(int64(n)); err != nil {
				return nil, 0, 0, 0, err
			}
			continue
		}
		if err := f.fill(int(n)); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, 0, 0, 0, err
		}
		block := f.buf[f.off : f.off+int(n)]
		if f.u32(block[n-4:]) != n {
			return nil, 0, 0, 0, fmt.Errorf("%w: block %d's lengths differ", errNg, typ)
		}
		body := block[8 : n-4]
		switch typ {
		case ngSectionHeader:
			if len(body) < 16 {
				return nil, 0, 0, 0, fmt.Errorf("%w: section header of %d bytes", errNg, n)
			}
			if v := f.u16(body[4:]); v != 1 {
				return nil, 0, 0, 0, fmt.Errorf("%w: section header of version %d", errNg, v)
			}
			f.section = len(f.ifaces)
			if header {
				f.off += int(n)
				return nil, 0, 0, 0, nil
			}
		case ngInterface:
			if len(body) < 8 || len(f.ifaces) == maxNgInterfaces {
				return nil, 0, 0, 0, fmt.Errorf("%w: interface block of %d bytes after %d interfaces", errNg, n, len(f.ifaces))
			}
			f.ifaces = append(f.ifaces, f.iface(body))
		case ngEnhancedPkt, ngObsoletePkt:
			if len(body) < 20 {
				return nil, 0, 0, 0, fmt.Errorf("%w: packet block of %d bytes", errNg, n)
			}
			id := uint64(f.u32(body))
			if typ == ngObsoletePkt {
				id = uint64(f.u16(body))
			}
			caplen, orig := f.u32(body[12:]), f.u32(body[16:])
			if caplen > MaxRecordBytes {
				return nil, 0, 0, 0, fmt.Errorf("%w: %d", errTooLong, caplen)
			}
			if id >= uint64(len(f.ifaces)-f.section) || caplen > uint32(len(body)-20) {
				return nil, 0, 0, 0, fmt.Errorf("%w: packet of %d bytes on interface %d in a block of %d bytes (%d interfaces)", errNg, caplen, id, n, len(f.ifaces)-f.section)
			}
			ifc := f.section + int(id)
			f.off += int(n)
			units := uint64(f.u32(body[4:]))<<32 | uint64(f.u32(body[8:]))
			return body[20 : 20+caplen], f.ifaces[ifc].nanos(units), int(orig), ifc, nil
		case ngSimplePkt: // the section's first interface, no timestamp
			if len(f.ifaces) == f.section || len(body) < 4 {
				return nil, 0, 0, 0, fmt.Errorf("%w: simple packet block of %d bytes (%d interfaces)", errNg, n, len(f.ifaces)-f.section)
			}
			orig := f.u32(body)
			caplen := min(orig, uint32(len(body)-4))
			if s := f.ifaces[f.section].snaplen; s != 0 {
				caplen = min(caplen, s)
			}
			if caplen > MaxRecordBytes {
				return nil, 0, 0, 0, fmt.Errorf("%w: %d", errTooLong, caplen)
			}
			f.off += int(n)
			return body[4 : 4+caplen], 0, int(orig), f.section, nil
		}
		f.off += int(n)
	}
}

// iface reads an interface description block's body.
func (f *ngFile) iface(body []byte) ngIface {
	i := ngIface{linkType: packet.LinkType(f.u16(body)), snaplen: f.u32(body[4:]), resol: 6}
	for opts := body[8:]; len(opts) >= 4; {
		code, n := f.u16(opts), int(f.u16(opts[2:]))
		if code == 0 || 4+n > len(opts) {
			break
		}
		v := opts[4 : 4+n]
		switch {
		case code == 9 && n >= 1: // if_tsresol
			i.resol = v[0]
		case code == 14 && n >= 8: // if_tsoffset
			i.offset = int64(f.u64(v))
		}
		opts = opts[min(len(opts), 4+(n+3)&^3):]
	}
	return i
}

// nanos converts a timestamp in the interface's units to Unix nanoseconds.
func (i *ngIface) nanos(units uint64) int64 {
	e := uint(i.resol & 0x7f)
	var ns uint64
	switch {
	case i.resol&0x80 == 0: // 10^-e seconds
		for ns = units; e < 9; e++ {
			ns *= 10
		}
		for ; e > 9 && ns > 0; e-- {
			ns /= 10
		}
	case e < 64: // 2^-e seconds: whole seconds, and the fraction's nanoseconds
		hi, lo := bits.Mul64(units&(1<<e-1), 1e9)
		ns = units>>e*1e9 + (lo>>e | hi<<(64-e))
	default: // under a second
		hi, _ := bits.Mul64(units, 1e9)
		ns = hi >> (e - 64)
	}
	return int64(ns) + i.offset*1e9
}
