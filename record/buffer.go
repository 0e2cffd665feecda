// Package record encodes captured frames as pcap records and holds a
// flow's records in pooled chunks: the demuxer appends to a Buffer, the
// saver takes its Chunks and writes them as they are.
//
// A Buffer belongs to one goroutine at a time; Take transfers chunks, and
// Release gives a chunk back to its pool once written. Appending copies a
// frame's headers once and allocates only when a chunk fills
// (TestAppendSteadyStateDoesNotAllocate, BenchmarkAppend).
package record

import (
	"encoding/binary"
	"sync"
	"time"
)

// RecordHeaderLen is the size of a pcap record header.
const RecordHeaderLen = 16

// Chunk sizes: a flow starts small (a SYN-only flow, such as one of a SYN
// flood, costs one 128-byte chunk, which holds one SYN record of either
// family) and grows in larger steps (1 KiB holds about ten more packets,
// then 8 KiB at a time), so that memory tracks header bytes closely for
// short flows and per-chunk overhead stays low for long ones.
const (
	firstChunk  = 128
	secondChunk = 1 << 10
	// ChunkSize is the size of a long flow's chunks: the unit in which
	// records are handed to a Flow.
	ChunkSize = 8 << 10
)

// Chunk is a block of whole pcap records. Chunks are pooled by capacity.
type Chunk struct {
	b []byte
	n int // records in b
}

// Bytes returns the chunk's records, valid until Release.
func (c *Chunk) Bytes() []byte { return c.b }

// Records returns the number of records in the chunk.
func (c *Chunk) Records() int { return c.n }

// Release gives the chunk back to its pool; it must not be used again.
func (c *Chunk) Release() { putChunk(c) }

var (
	smallPool  = sync.Pool{New: func() any { return &Chunk{b: make([]byte, 0, firstChunk)} }}
	mediumPool = sync.Pool{New: func() any { return &Chunk{b: make([]byte, 0, secondChunk)} }}
	largePool  = sync.Pool{New: func() any { return &Chunk{b: make([]byte, 0, ChunkSize)} }}
)

// getChunk returns a chunk for a buffer that has n chunks already, with room
// for at least need bytes.
func getChunk(n, need int) *Chunk {
	switch {
	case n == 0 && need <= firstChunk:
		return smallPool.Get().(*Chunk)
	case n <= 1 && need <= secondChunk:
		return mediumPool.Get().(*Chunk)
	case need <= ChunkSize:
		return largePool.Get().(*Chunk)
	}
	return &Chunk{b: make([]byte, 0, need)} // a -maxheadersize larger than a chunk
}

func putChunk(c *Chunk) {
	c.b, c.n = c.b[:0], 0 // keep no stale length; bytes are overwritten before reuse
	switch cap(c.b) {
	case firstChunk:
		smallPool.Put(c)
	case secondChunk:
		mediumPool.Put(c)
	case ChunkSize:
		largePool.Put(c)
	}
}

// Buffer holds a flow's pcap records in chunks. The zero value is an empty
// buffer. A Buffer belongs to one goroutine at a time; handing its chunks to
// a Flow transfers them.
type Buffer struct {
	chunks  []*Chunk
	packets int
	bytes   int
}

// Append adds one record for a frame captured at ts whose length on the wire
// was origLen, holding a copy of hdr, and returns the copy so that the
// caller may rewrite it in place (anonymization). It copies hdr once and
// allocates only when a chunk is full.
func (b *Buffer) Append(ts time.Time, origLen int, hdr []byte) []byte {
	need := RecordHeaderLen + len(hdr)
	var c *Chunk
	if n := len(b.chunks); n > 0 && cap(b.chunks[n-1].b)-len(b.chunks[n-1].b) >= need {
		c = b.chunks[n-1]
	} else {
		c = getChunk(len(b.chunks), need)
		b.chunks = append(b.chunks, c)
	}
	start := len(c.b)
	c.b = c.b[:start+need]
	r := c.b[start:]
	ns := ts.UnixNano()
	binary.LittleEndian.PutUint32(r[0:], uint32(ns/1e9))
	binary.LittleEndian.PutUint32(r[4:], uint32(ns%1e9))
	binary.LittleEndian.PutUint32(r[8:], uint32(len(hdr)))
	binary.LittleEndian.PutUint32(r[12:], uint32(origLen))
	copy(r[RecordHeaderLen:], hdr)
	c.n++
	b.packets++
	b.bytes += need
	return r[RecordHeaderLen:]
}

// Packets returns the number of records held.
func (b *Buffer) Packets() int { return b.packets }

// Bytes returns the number of record bytes held.
func (b *Buffer) Bytes() int { return b.bytes }

// Full reports whether the buffer holds chunks that can take no more
// records: all but the last one.
func (b *Buffer) Full() bool { return len(b.chunks) > 1 }

// Reset empties the buffer and returns its chunks to their pools.
func (b *Buffer) Reset() {
	for i, c := range b.chunks {
		putChunk(c)
		b.chunks[i] = nil
	}
	b.chunks = b.chunks[:0]
	b.packets, b.bytes = 0, 0
}

// Take removes and returns the chunks, all of them when all is set, else
// all but the last (the one still being filled), with their packet count.
func (b *Buffer) Take(all bool) (cs []*Chunk, packets int) {
	n := len(b.chunks)
	if !all {
		n--
	}
	if n <= 0 {
		return nil, 0
	}
	cs = make([]*Chunk, n)
	copy(cs, b.chunks[:n])
	rest := copy(b.chunks, b.chunks[n:])
	clear(b.chunks[rest:])
	b.chunks = b.chunks[:rest]
	for _, c := range cs {
		packets += c.n
		b.bytes -= len(c.b)
	}
	b.packets -= packets
	return cs, packets
}
