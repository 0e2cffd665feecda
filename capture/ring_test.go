package capture

import (
	"testing"
	"time"
	"unsafe"
)

// fakeRing returns a reader over a ring of size bytes with no thread:
// frames are put in as the C side puts them, by put.
func fakeRing(size int) *ringReader {
	mem := make([]byte, 4096+size)
	return &ringReader{mem: mem, data: mem[4096:], mask: uint64(size - 1), nano: true}
}

// put writes a frame at the producer position w (wrapping as ph_copy does)
// and returns the new position.
func (rr *ringReader) put(w uint64, sec int64, frac int32, data []byte, origLen int) uint64 {
	hl := uint64(unsafe.Sizeof(recHeader{}))
	need := hl + uint64(len(data)+7)&^7
	pos := w & rr.mask
	if size := uint64(len(rr.data)); size-pos < need {
		if size-pos >= hl {
			*(*recHeader)(unsafe.Pointer(&rr.data[pos])) = recHeader{wrap: 1}
		}
		w += size - pos
		pos = 0
	}
	*(*recHeader)(unsafe.Pointer(&rr.data[pos])) = recHeader{sec: sec, frac: frac, caplen: uint32(len(data)), len: uint32(origLen)}
	copy(rr.data[pos+hl:], data)
	return w + need
}

// next reads a frame without the thread's control block (the ring's head
// and tail are kept by the test).
func (rr *ringReader) next(tail uint64) ([]byte, time.Time, int, bool) {
	if !rr.ready(tail) {
		return nil, time.Time{}, 0, false
	}
	data, ts, n := rr.take()
	return data, ts, n, true
}

// TestRingLayout reads frames back as the C side lays them out, across
// the ring's end: timestamps, lengths and bytes.
func TestRingLayout(t *testing.T) {
	rr := fakeRing(1024)
	w := uint64(0)
	for round := 0; round < 40; round++ {
		for i := 0; i < 3; i++ {
			caplen := 54 + (round*7+i)%61 // odd lengths exercise the padding
			data := make([]byte, caplen)
			for j := range data {
				data[j] = byte(round + i + j)
			}
			w = rr.put(w, int64(round), int32(i), data, caplen+1000)
		}
		for i := 0; i < 3; i++ {
			data, ts, origLen, ok := rr.next(w)
			caplen := 54 + (round*7+i)%61
			if !ok || !ts.Equal(time.Unix(int64(round), int64(i))) || origLen != caplen+1000 || len(data) != caplen || cap(data) != caplen {
				t.Fatalf("round %d frame %d: %v %v, %d bytes (cap %d) of %d", round, i, ok, ts, len(data), cap(data), origLen)
			}
			for j, b := range data {
				if b != byte(round+i+j) {
					t.Fatalf("round %d frame %d byte %d: %d", round, i, j, b)
				}
			}
		}
		if _, _, _, ok := rr.next(w); ok {
			t.Fatal("a frame more than was put")
		}
	}
	if w < 3*1024 {
		t.Fatalf("the test did not go round the ring (%d bytes)", w)
	}
	rr.nano = false
	w = rr.put(w, 5, 7, make([]byte, 60), 60)
	if _, ts, _, _ := rr.next(w); ts.Nanosecond() != 7000 {
		t.Errorf("microsecond precision: %v", ts)
	}
}

// BenchmarkRingRead measures the per-frame step of a read from the ring:
// no allocation, no lock, no call into C.
func BenchmarkRingRead(b *testing.B) {
	rr := fakeRing(1 << 16)
	frame := make([]byte, 66)
	w := uint64(0)
	b.ReportAllocs()
	for b.Loop() {
		if rr.pos == w {
			w = rr.put(w, 1764072000, 0, frame, 66)
		}
		if _, _, _, ok := rr.next(w); !ok {
			b.Fatal("no frame")
		}
	}
}
