package offline

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"
	"testing/iotest"

	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/packet"
)

// ng builds pcapng files in one byte order.
type ng struct {
	o binary.AppendByteOrder
	b []byte
}

func (w *ng) block(typ uint32, body []byte) *ng {
	for len(body)%4 != 0 {
		body = append(body, 0)
	}
	w.b = w.o.AppendUint32(w.b, typ)
	w.b = w.o.AppendUint32(w.b, uint32(12+len(body)))
	w.b = append(w.b, body...)
	w.b = w.o.AppendUint32(w.b, uint32(12+len(body)))
	return w
}

func (w *ng) section() *ng {
	b := w.o.AppendUint32(nil, ngByteOrder)
	b = w.o.AppendUint16(b, 1)
	b = w.o.AppendUint16(b, 0)
	return w.block(ngSectionHeader, w.o.AppendUint64(b, ^uint64(0)))
}

// iface adds an interface; resol and offset are written as options when
// not zero.
func (w *ng) iface(lt uint16, snaplen uint32, resol byte, offset int64) *ng {
	b := w.o.AppendUint16(nil, lt)
	b = w.o.AppendUint16(b, 0)
	b = w.o.AppendUint32(b, snaplen)
	b = append(w.o.AppendUint16(w.o.AppendUint16(b, 2), 3), "eth0"[:3]...) // if_name, padded
	b = append(b, 0)
	if resol != 0 {
		b = append(w.o.AppendUint16(w.o.AppendUint16(b, 9), 1), resol, 0, 0, 0)
	}
	if offset != 0 {
		b = w.o.AppendUint64(w.o.AppendUint16(w.o.AppendUint16(b, 14), 8), uint64(offset))
	}
	return w.block(ngInterface, w.o.AppendUint32(b, 0)) // end of options
}

func (w *ng) epb(ifc uint32, units uint64, data []byte, orig uint32) *ng {
	b := w.o.AppendUint32(nil, ifc)
	b = w.o.AppendUint32(b, uint32(units>>32))
	b = w.o.AppendUint32(b, uint32(units))
	b = w.o.AppendUint32(b, uint32(len(data)))
	b = w.o.AppendUint32(b, orig)
	return w.block(ngEnhancedPkt, append(b, data...))
}

// ngPacket is what ngFile should read.
type ngPacket struct {
	data    string
	ts      int64
	orig    int
	ifc     int
	lt      packet.LinkType
	comment string
}

// TestNgFile: both byte orders, several sections and interfaces, decimal
// and binary resolutions with offsets, simple and obsolete packet blocks,
// skipped blocks, 16-bit link types, exact offsets; and read one byte or
// half a request at a time.
func TestNgFile(t *testing.T) {
	for _, o := range []binary.AppendByteOrder{binary.LittleEndian, binary.BigEndian} {
		w := &ng{o: o}
		w.section().iface(1, 0, 0, 0).iface(276, 96, 9, 0).iface(113, 0, 0x80|20, 1000)
		w.block(4, make([]byte, 40)) // a name resolution block, skipped
		w.epb(0, 1764000000123456, []byte("default microseconds"), 100)
		w.epb(1, 1764000000123456789, []byte("nanoseconds on SLL2"), 200)
		w.epb(2, 1764000000<<20|1<<19, []byte("binary, half a second, plus 1000 s"), 300)
		spb := append(o.AppendUint32(nil, 27), "a simple block: interface 0"...) // padded to 28 bytes
		w.block(ngSimplePkt, spb)
		opb := o.AppendUint16(nil, 1)
		opb = o.AppendUint16(opb, 0)
		opb = o.AppendUint32(opb, 0)
		opb = o.AppendUint32(opb, 5)
		opb = o.AppendUint32(opb, 3)
		opb = o.AppendUint32(opb, 4)
		w.block(ngObsoletePkt, append(opb, "obsolete"...))
		w.section().iface(228, 0, 3, -10) // a new section: interfaces start again
		w.epb(0, 1764000000123, []byte("milliseconds, minus 10 s"), 24)
		want := []ngPacket{
			{"default microseconds", 1764000000123456000, 100, 0, 1, ""},
			{"nanoseconds on SLL2", 1764000000123456789, 200, 1, 276, ""},
			{"binary, half a second, plus 1000 s", 1764001000500000000, 300, 2, 113, ""},
			{"a simple block: interface 0", 0, 27, 0, 1, "the padding is not data"},
			{"obs", 5, 4, 1, 276, "obsolete block: 3 of 4 bytes, 5 ns"},
			{"milliseconds, minus 10 s", 1763999990123000000, 24, 3, 228, "second section: its interface 0 is the fourth"},
		}
		for name, wrap := range map[string]func(io.Reader) io.Reader{"whole": func(r io.Reader) io.Reader { return r },
			"one byte": iotest.OneByteReader, "half": iotest.HalfReader} {
			f, err := newNgFile(wrap(bytes.NewReader(w.b)))
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range want {
				data, ts, orig, ifc, err := f.Next()
				if err != nil {
					t.Fatalf("%v, %s reads: packet %d: %v", o, name, i, err)
				}
				if string(data) != p.data || ts != p.ts || orig != p.orig || ifc != p.ifc || f.LinkType(ifc) != p.lt {
					t.Errorf("%v, %s reads: packet %d (%s): %q at %d, length %d, interface %d of link type %d; want %+v",
						o, name, i, p.comment, data, ts, orig, ifc, f.LinkType(ifc), p)
				}
			}
			if _, _, _, _, err := f.Next(); err != io.EOF {
				t.Errorf("%v, %s reads: after the last packet: %v", o, name, err)
			}
			if f.Offset() != int64(len(w.b)) {
				t.Errorf("%v, %s reads: offset %d at the end, want %d", o, name, f.Offset(), len(w.b))
			}
		}
	}
}

// TestNgFileCorrupt: cut anywhere inside a block, a bad length, a packet
// on an unknown interface or longer than its block, a packet before an
// interface: errors, never a panic; a cut between blocks is the end.
func TestNgFileCorrupt(t *testing.T) {
	w := &ng{o: binary.LittleEndian}
	w.section().iface(1, 0, 0, 0).epb(0, 1, []byte("0123456789"), 10)
	first := len(w.b)
	w.epb(0, 2, []byte("abc"), 3)
	checkCuts(t, w.b, first, func(r io.Reader) (source, error) { return newNgFile(r) })
	bad := func(name string, mend func(b []byte) []byte) {
		t.Helper()
		b := mend(append([]byte(nil), w.b...))
		f, err := newNgFile(bytes.NewReader(b))
		for i := 0; err == nil && i < 3; i++ {
			_, _, _, _, err = f.Next()
		}
		if err == nil || err == io.EOF {
			t.Errorf("%s: %v, want an error", name, err)
		}
	}
	epb := first - 44 // the first packet block (12 + 20 + 12 bytes)
	bad("length not a multiple of 4", func(b []byte) []byte { b[epb+4]++; return b })
	bad("trailing length differs", func(b []byte) []byte { b[first-4]++; return b })
	bad("unknown interface", func(b []byte) []byte { b[epb+8] = 1; return b })
	bad("packet longer than its block", func(b []byte) []byte { b[epb+8+12] = 200; return b })
	bad("packet before an interface", func(b []byte) []byte {
		section := 28
		return append(b[:section:section], b[epb:]...)
	})
	bad("no section header", func(b []byte) []byte { return b[28:] })
	bad("byte-order magic", func(b []byte) []byte { b[8] = 0; return b })
	bad("version 2", func(b []byte) []byte { b[12] = 2; return b })
	many := (&ng{o: binary.LittleEndian}).section()
	for i := 0; i <= maxNgInterfaces; i++ {
		many.iface(1, 0, 0, 0)
	}
	many.epb(0, 1, []byte("x"), 1)
	bad("too many interfaces", func([]byte) []byte { return many.b })
	for _, size := range []int{MaxRecordBytes + 1, 2 << 20} { // in the buffer, and beyond it
		huge := &ng{o: binary.LittleEndian}
		huge.section().iface(1, 0, 0, 0).epb(0, 1, make([]byte, size), uint32(size))
		f, err := newNgFile(bytes.NewReader(huge.b))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, _, _, err := f.Next(); !errors.Is(err, errTooLong) {
			t.Errorf("a packet of %d bytes: %v, want errTooLong", size, err)
		}
	}
}

// TestNgFileAgreesWithPcapgo: the lab's pcapng and a two-interface file,
// read by ngFile and by pcapgo, give the same packets.
func TestNgFileAgreesWithPcapgo(t *testing.T) {
	lab, err := os.ReadFile("testdata/lab.pcapng")
	if err != nil {
		t.Fatal(err)
	}
	w := &ng{o: binary.BigEndian}
	w.section().iface(1, 0, 0, 0).iface(113, 0, 9, 0)
	for i := 0; i < 100; i++ {
		w.epb(uint32(i%2), uint64(i)*1e6+7, bytes.Repeat([]byte{byte(i)}, i*13), uint32(i*13+5))
	}
	for name, in := range map[string][]byte{"lab": lab, "two interfaces": w.b} {
		f, err := newNgFile(bytes.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		opts := pcapgo.DefaultNgReaderOptions
		opts.WantMixedLinkType = true
		ref, err := pcapgo.NewNgReader(bytes.NewReader(in), opts)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for ; ; n++ {
			data, ts, orig, ifc, err := f.Next()
			want, ci, rerr := ref.ReadPacketData()
			if err != nil || rerr != nil {
				if err != io.EOF || rerr != io.EOF {
					t.Errorf("%s: packet %d: %v, pcapgo %v", name, n, err, rerr)
				}
				break
			}
			if !bytes.Equal(data, want) || ts != ci.Timestamp.UnixNano() || orig != ci.Length || ifc != ci.InterfaceIndex {
				t.Fatalf("%s: packet %d: %d bytes at %d of %d on %d; pcapgo %d bytes at %d of %d on %d",
					name, n, len(data), ts, orig, ifc, len(want), ci.Timestamp.UnixNano(), ci.Length, ci.InterfaceIndex)
			}
		}
		if n < 50 {
			t.Errorf("%s: %d packets compared", name, n)
		}
	}
}

// FuzzNgFile: on any input, ngFile returns errors, never panics, and every
// packet it returns lies within its block and names an interface it has.
func FuzzNgFile(f *testing.F) {
	lab, err := os.ReadFile("testdata/lab.pcapng")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(lab[:1500])
	w := &ng{o: binary.BigEndian}
	w.section().iface(276, 0, 0x80|10, 5).epb(0, 99, []byte("frame"), 9)
	f.Add(w.b)
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := newNgFile(bytes.NewReader(in))
		if err != nil {
			return
		}
		for {
			data, _, _, ifc, err := r.Next()
			if err != nil {
				return
			}
			if ifc >= len(r.ifaces) || len(data) > len(in) || r.Offset() > int64(len(in)) {
				t.Fatalf("%d bytes on interface %d of %d, offset %d of %d", len(data), ifc, len(r.ifaces), r.Offset(), len(in))
			}
		}
	})
}
