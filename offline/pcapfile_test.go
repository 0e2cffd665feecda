package offline

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/internal/synth"
	"github.com/m-lab/packet-headers/packet"
)

// pcapBytes builds a pcap file: the given magic in the given byte order,
// link type lt, and one record per frame (frame i has timestamp i.(i+1)
// and original length len+3).
func pcapBytes(order binary.AppendByteOrder, magic uint32, lt uint32, frames ...[]byte) []byte {
	b := order.AppendUint32(nil, magic)
	b = order.AppendUint16(b, 2)
	b = order.AppendUint16(b, 4)
	b = append(b, make([]byte, 8)...)
	b = order.AppendUint32(b, 65535)
	b = order.AppendUint32(b, lt)
	for i, f := range frames {
		b = order.AppendUint32(b, uint32(i))
		b = order.AppendUint32(b, uint32(i+1))
		b = order.AppendUint32(b, uint32(len(f)))
		b = order.AppendUint32(b, uint32(len(f)+3))
		b = append(b, f...)
	}
	return b
}

// TestPcapFileFormats: both byte orders, both resolutions, the link type's
// 16 bits (LINUX_SLL2 is 276: pcapgo keeps 8 of them), exact offsets.
func TestPcapFileFormats(t *testing.T) {
	frames := [][]byte{[]byte("first frame"), {}, bytes.Repeat([]byte{7}, 300)}
	for _, tt := range []struct {
		order  binary.AppendByteOrder
		magic  uint32
		fracNs int64
	}{
		{binary.LittleEndian, 0xa1b2c3d4, 1000}, {binary.LittleEndian, 0xa1b23c4d, 1},
		{binary.BigEndian, 0xa1b2c3d4, 1000}, {binary.BigEndian, 0xa1b23c4d, 1},
	} {
		f, err := newPcapFile(bytes.NewReader(pcapBytes(tt.order, tt.magic, 0x0a000114, frames...)))
		if err != nil {
			t.Fatal(err)
		}
		if f.LinkType(0) != packet.LinkTypeLinuxSLL2 {
			t.Errorf("%x %v: link type %d, want %d", tt.magic, tt.order, f.LinkType(0), packet.LinkTypeLinuxSLL2)
		}
		offset := int64(24)
		for i, want := range frames {
			data, ts, orig, ifc, err := f.Next()
			if err != nil {
				t.Fatalf("%x %v: record %d: %v", tt.magic, tt.order, i, err)
			}
			offset += 16 + int64(len(want))
			if !bytes.Equal(data, want) || ts != int64(i)*1e9+int64(i+1)*tt.fracNs || orig != len(want)+3 || ifc != 0 || f.Offset() != offset {
				t.Errorf("%x %v: record %d: %q at %d, length %d, interface %d, offset %d", tt.magic, tt.order, i, data, ts, orig, ifc, f.Offset())
			}
		}
		if _, _, _, _, err := f.Next(); err != io.EOF {
			t.Errorf("after the last record: %v, want io.EOF", err)
		}
	}
}

// TestPcapFileCorrupt: a file cut anywhere inside a record is an
// unexpected end (pcapgo took a cut right after a record header for the
// end of the file); a record longer than MaxRecordBytes is an error,
// whatever the snapshot length says; unknown magic and versions are
// refused.
func TestPcapFileCorrupt(t *testing.T) {
	whole := pcapBytes(binary.LittleEndian, 0xa1b2c3d4, 1, []byte("0123456789"), []byte("abcdef"))
	checkCuts(t, whole, 24+16+10, func(r io.Reader) (source, error) { return newPcapFile(r) })
	huge := pcapBytes(binary.LittleEndian, 0xa1b2c3d4, 1, []byte("x"))
	binary.LittleEndian.PutUint32(huge[16:], 0xffffffff)   // snapshot length
	binary.LittleEndian.PutUint32(huge[24+8:], 2000000000) // captured length
	f, err := newPcapFile(bytes.NewReader(huge))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, _, err := f.Next(); !errors.Is(err, errTooLong) {
		t.Errorf("a 2 GB record: %v, want errTooLong", err)
	}
	for _, bad := range [][]byte{whole[:20], append([]byte{1, 2, 3, 4}, whole[4:]...), append(append(whole[:4:4], 3, 0), whole[6:]...)} {
		if _, err := newPcapFile(bytes.NewReader(bad)); err == nil {
			t.Errorf("header %x accepted", bad[:8])
		}
	}
}

// checkCuts opens whole cut at every length from second, the offset of
// its second record, on: the first record reads, then the end of the file
// (cut at second) or io.ErrUnexpectedEOF (cut inside the second record),
// with the offset still at second.
func checkCuts(t *testing.T, whole []byte, second int, open func(io.Reader) (source, error)) {
	t.Helper()
	for cut := second; cut < len(whole); cut++ {
		f, err := open(bytes.NewReader(whole[:cut]))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, _, _, err := f.Next(); err != nil {
			t.Fatalf("cut at %d: first record: %v", cut, err)
		}
		want := io.ErrUnexpectedEOF
		if cut == second {
			want = io.EOF
		}
		if _, _, _, _, err := f.Next(); err != want {
			t.Errorf("cut at %d: %v, want %v", cut, err, want)
		}
		if f.Offset() != int64(second) {
			t.Errorf("cut at %d: offset %d, want %d", cut, f.Offset(), second)
		}
	}
}

// TestPcapFileAgreesWithPcapgo reads the lab capture, and a file of
// records that straddle the buffer's end many times, through readers that
// return one byte or half of what is asked at a time: every record is the
// one pcapgo reads.
func TestPcapFileAgreesWithPcapgo(t *testing.T) {
	lab, err := os.ReadFile("testdata/lab.pcap")
	if err != nil {
		t.Fatal(err)
	}
	var frames [][]byte
	for i := 0; len(frames) < 3000; i++ {
		frames = append(frames, bytes.Repeat([]byte{byte(i)}, i%1500))
	}
	big := pcapBytes(binary.LittleEndian, 0xa1b23c4d, 1, frames...)
	for name, in := range map[string][]byte{"lab": lab, "straddling": big} {
		for rname, wrap := range map[string]func(io.Reader) io.Reader{"whole": func(r io.Reader) io.Reader { return r },
			"one byte": iotest.OneByteReader, "half": iotest.HalfReader} {
			n := comparePcapgo(t, wrap(bytes.NewReader(in)), in)
			if n == 0 {
				t.Errorf("%s, %s reads: no record compared", name, rname)
			}
		}
	}
}

// comparePcapgo reads in through f and pcapgo side by side, fails the test
// where they disagree on a record both accept, and returns how many
// records were compared. Where the two disagree on validity, only these
// differences are allowed: pcapgo refuses records longer than the snapshot
// or original length, which pcapFile (like libpcap) reads; pcapFile
// refuses records longer than MaxRecordBytes and records cut short at the
// end of the file, which pcapgo reads or takes for the end, and reads past
// records with an impossible time fraction (errImpossible).
func comparePcapgo(t *testing.T, r io.Reader, in []byte) int {
	t.Helper()
	ref, rerr := pcapgo.NewReader(bytes.NewReader(in))
	f, ferr := newPcapFile(r)
	if rerr == nil && ferr != nil {
		t.Fatalf("pcapgo reads the header, pcapFile: %v", ferr)
	}
	if rerr != nil || ferr != nil {
		return 0
	}
	if ref.Snaplen() > MaxRecordBytes {
		ref.SetSnaplen(MaxRecordBytes) // else pcapgo allocates up to 4 GB a record
	}
	if uint8(f.LinkType(0)) != uint8(ref.LinkType()) {
		t.Errorf("link type %d, pcapgo %d", f.LinkType(0), ref.LinkType())
	}
	var order binary.ByteOrder = binary.LittleEndian
	if in[0] == 0xa1 {
		order = binary.BigEndian
	}
	fracNs := int64(1000)
	if order.Uint32(in) == 0xa1b23c4d {
		fracNs = 1
	}
	for n := 0; ; n++ {
		off := f.Offset()
		data, ts, orig, _, ferr := f.Next()
		want, ci, rerr := ref.ReadPacketData()
		switch {
		case rerr == io.EOF:
			if ferr != io.EOF && ferr != io.ErrUnexpectedEOF && !errors.Is(ferr, errTooLong) {
				t.Errorf("record %d: pcapgo ends, pcapFile: %v", n, ferr)
			}
			return n
		case rerr != nil:
			if ferr == nil && !strings.Contains(rerr.Error(), "exceeds") {
				t.Errorf("record %d: pcapgo: %v, pcapFile reads it", n, rerr)
			}
			return n
		case errors.Is(ferr, errImpossible):
			// Refused, and read past: a time fraction of a second or more.
			if sec, frac := order.Uint32(in[off:]), order.Uint32(in[off+4:]); int64(frac)*fracNs < 1e9 {
				t.Errorf("record %d (%d.%d): refused as impossible: %v", n, sec, frac, ferr)
			}
			continue
		case ferr != nil:
			if !errors.Is(ferr, io.ErrUnexpectedEOF) && !errors.Is(ferr, errTooLong) {
				t.Errorf("record %d: pcapgo reads it, pcapFile: %v", n, ferr)
			}
			return n
		}
		if !bytes.Equal(data, want) || orig != ci.Length {
			t.Fatalf("record %d: %d bytes of %d, pcapgo %d bytes of %d", n, len(data), orig, len(want), ci.Length)
		}
		// The timestamp, from the record header (pcapgo multiplies
		// microseconds in 32 bits, and overflows past 4.29 s).
		if sec, frac := order.Uint32(in[off:]), order.Uint32(in[off+4:]); ts != int64(sec)*1e9+int64(frac)*fracNs {
			t.Fatalf("record %d: timestamp %d, want %d.%d", n, ts, sec, frac)
		}
	}
}

// FuzzPcapFile: on any input, pcapFile reads what pcapgo reads, within the
// differences comparePcapgo allows, and never panics.
func FuzzPcapFile(f *testing.F) {
	lab, err := os.ReadFile("testdata/lab.pcap")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(lab[:2000])
	f.Add(pcapBytes(binary.BigEndian, 0xa1b2c3d4, 276, []byte("ab"), []byte("cde")))
	f.Add(pcapBytes(binary.LittleEndian, 0xa1b23c4d, 1, []byte("x"))[:40])
	f.Fuzz(func(t *testing.T, in []byte) {
		comparePcapgo(t, bytes.NewReader(in), in)
	})
}

// BenchmarkRead reads the records of a synthetic capture (182-byte frames)
// from memory, with pcapFile and with pcapgo side by side: per record.
func BenchmarkRead(b *testing.B) {
	path := filepath.Join(b.TempDir(), "in.pcap")
	if err := synth.Write(path, 100000, 100); err != nil {
		b.Fatal(err)
	}
	in, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("pcapFile", func(b *testing.B) {
		var f *pcapFile
		b.ReportAllocs()
		for b.Loop() {
			if f == nil {
				f, _ = newPcapFile(bytes.NewReader(in))
			}
			if _, _, _, _, err := f.Next(); err != nil {
				f = nil
			}
		}
	})
	b.Run("pcapgo", func(b *testing.B) {
		var r *pcapgo.Reader
		b.ReportAllocs()
		for b.Loop() {
			if r == nil {
				r, _ = pcapgo.NewReader(bufio.NewReaderSize(bytes.NewReader(in), 1<<16))
			}
			if _, _, err := r.ZeroCopyReadPacketData(); err != nil {
				r = nil
			}
		}
	})
}
