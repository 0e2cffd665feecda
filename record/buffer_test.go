package record

import (
	"bytes"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 25, 23, 59, 59, 999999999, time.UTC)

// fill appends n records of varying sizes, as a flow would.
func fill(b *Buffer, n int) {
	for i := 0; i < n; i++ {
		hdr := bytes.Repeat([]byte{byte(i)}, 54+i%40)
		b.Append(t0.Add(time.Duration(i)*time.Millisecond), 1514, hdr)
	}
}

func TestBufferChunks(t *testing.T) {
	var b Buffer
	fill(&b, 1)
	if b.Full() || len(b.chunks) != 1 || cap(b.chunks[0].b) != firstChunk {
		t.Fatalf("one record: %d chunks, first of cap %d", len(b.chunks), cap(b.chunks[0].b))
	}
	fill(&b, 300)
	if !b.Full() || b.Packets() != 301 {
		t.Fatalf("Full %v, Packets %d", b.Full(), b.Packets())
	}
	total := b.Bytes()
	cs, n := b.Take(false)
	if len(b.chunks) != 1 || n+b.Packets() != 301 || len(cs) == 0 {
		t.Errorf("take(false) took %d chunks, %d packets; %d chunks and %d packets left", len(cs), n, len(b.chunks), b.Packets())
	}
	sum := b.Bytes()
	for _, c := range cs {
		sum += len(c.b)
	}
	if sum != total {
		t.Errorf("bytes %d after take, want %d", sum, total)
	}
	b.Reset()
	if b.Packets() != 0 || b.Bytes() != 0 || len(b.chunks) != 0 {
		t.Error("Reset left records")
	}
}

func TestAppendSteadyStateDoesNotAllocate(t *testing.T) {
	var b Buffer
	hdr := make([]byte, 66)
	allocs := testing.AllocsPerRun(10000, func() {
		b.Append(t0, 1514, hdr)
		if b.Full() {
			cs, _ := b.Take(false)
			for _, c := range cs {
				putChunk(c)
			}
		}
	})
	// A chunk holds ~100 such records: handing it over costs one small
	// slice, amortized to well under one allocation per packet.
	if allocs > 0.05 {
		t.Errorf("%v allocations per appended packet", allocs)
	}
}

func BenchmarkAppend(b *testing.B) {
	var buf Buffer
	hdr := make([]byte, 66)
	b.ReportAllocs()
	for b.Loop() {
		buf.Append(t0, 1514, hdr)
		if buf.Full() {
			cs, _ := buf.Take(false)
			for _, c := range cs {
				putChunk(c)
			}
		}
	}
}
