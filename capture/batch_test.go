package capture

import (
	"testing"
	"time"
	"unsafe"
)

// filledBatch returns a batch reader whose buffer holds n frames laid out
// as ph_copy lays them out, without libpcap.
func filledBatch(t testing.TB, n, caplen int) *batchReader {
	recSize := int(unsafe.Sizeof(recHeader{})) + (caplen+7)&^7
	r := &batchReader{buf: make([]byte, n*recSize), nano: true}
	for i := 0; i < n; i++ {
		h := (*recHeader)(unsafe.Pointer(&r.buf[i*recSize]))
		*h = recHeader{sec: 1764072000 + int64(i), frac: int32(i), caplen: uint32(caplen), len: uint32(caplen + 1000)}
		for j := 0; j < caplen; j++ {
			r.buf[i*recSize+int(unsafe.Sizeof(recHeader{}))+j] = byte(i + j)
		}
	}
	r.left = n
	return r
}

// TestBatchLayout reads frames back from a batch laid out as the C side
// lays it out: timestamps, lengths and bytes.
func TestBatchLayout(t *testing.T) {
	const n, caplen = 5, 61 // an odd length exercises the padding
	r := filledBatch(t, n, caplen)
	for i := 0; i < n; i++ {
		data, ts, origLen, err := r.read()
		if err != nil {
			t.Fatal(err)
		}
		if want := time.Unix(1764072000+int64(i), int64(i)); !ts.Equal(want) || origLen != caplen+1000 || len(data) != caplen || cap(data) != caplen {
			t.Fatalf("frame %d: %v, %d bytes (cap %d) of %d, want %v, %d of %d", i, ts, len(data), cap(data), origLen, want, caplen, caplen+1000)
		}
		for j, b := range data {
			if b != byte(i+j) {
				t.Fatalf("frame %d byte %d: %d", i, j, b)
			}
		}
	}
	r.nano = false // the second frame's fraction, 1, is then a microsecond
	r.pos, r.left = int(unsafe.Sizeof(recHeader{}))+(caplen+7)&^7, 1
	if _, ts, _, _ := r.read(); ts.Nanosecond() != 1000 {
		t.Errorf("microsecond precision: %v", ts)
	}
}

// BenchmarkBatchRead measures the per-frame step of a batched read (what
// remains per frame once one cgo call has copied a batch): no allocation.
func BenchmarkBatchRead(b *testing.B) {
	r := filledBatch(b, batchFrames, 66)
	b.ReportAllocs()
	for b.Loop() {
		if r.left == 0 {
			r.pos, r.left = 0, batchFrames
		}
		if _, _, _, err := r.read(); err != nil {
			b.Fatal(err)
		}
	}
}
