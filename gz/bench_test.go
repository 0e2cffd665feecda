//go:build cgo

package gz

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"testing"

	kgzip "github.com/klauspost/compress/gzip"

	"github.com/m-lab/packet-headers/gz/internal/libdeflate"
)

// BenchmarkCompress compresses a real capture's header records, batch by
// batch as the saver does, with each candidate compressor and level, and
// reports the speed (MB/s of records), the ratio (records / compressed)
// and the compressed bytes per packet. "gz" is what the saver uses;
// stdlib-6 is compress/gzip's default level, what gzip -6 makes.
func BenchmarkCompress(b *testing.B) {
	batches, packets := headerBatches(b)
	raw := 0
	for _, bt := range batches {
		raw += total(bt)
	}
	run := func(name string, compress func(bufs [][]byte) int) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(raw))
			b.ReportAllocs()
			out := 0
			for b.Loop() {
				out = 0
				for _, bt := range batches {
					out += compress(bt)
				}
			}
			b.ReportMetric(float64(raw)/float64(out), "ratio")
			b.ReportMetric(float64(out)/float64(packets), "bytes/packet")
		})
	}
	c := New()
	run("gz", func(bufs [][]byte) int { z, _ := c.Compress(bufs); return len(z) })
	for _, level := range []int{0, 2, 3} {
		c := newLevel(level)
		run(fmt.Sprintf("isal-%d", level), func(bufs [][]byte) int { z, _ := c.Compress(bufs); return len(z) })
	}
	// compress/gzip and klauspost's writers share a shape.
	var buf bytes.Buffer
	writer := func(zw interface {
		Reset(io.Writer)
		Write([]byte) (int, error)
		Close() error
	}) func(bufs [][]byte) int {
		return func(bufs [][]byte) int {
			buf.Reset()
			zw.Reset(&buf)
			for _, b := range bufs {
				zw.Write(b)
			}
			zw.Close()
			return buf.Len()
		}
	}
	for _, level := range []int{1, 6} {
		zw, _ := gzip.NewWriterLevel(nil, level)
		run(fmt.Sprintf("stdlib-%d", level), writer(zw))
	}
	for _, level := range []int{1, 4, 6} {
		zw, _ := kgzip.NewWriterLevel(nil, level)
		run(fmt.Sprintf("klauspost-%d", level), writer(zw))
	}
	// libdeflate compresses one contiguous buffer: the copy into it is
	// part of its cost.
	in, out := make([]byte, 0, 512<<10), make([]byte, 512<<10)
	for _, level := range []int{1, 6} {
		z := libdeflate.New(level)
		run(fmt.Sprintf("libdeflate-%d", level), func(bufs [][]byte) int {
			in = in[:0]
			for _, b := range bufs {
				in = append(in, b...)
			}
			return z.Compress(in, out)
		})
	}
}
