//go:build !cgo

package gz

import (
	"bytes"
	"compress/gzip"
	"fmt"
)

// Compressor makes gzip members with compress/gzip at BestSpeed.
type Compressor struct {
	zw  *gzip.Writer
	out bytes.Buffer
}

// New returns a Compressor.
func New() *Compressor {
	zw, _ := gzip.NewWriterLevel(nil, gzip.BestSpeed)
	return &Compressor{zw: zw}
}

// Compress returns bufs, in order, as one gzip member, in a buffer of the
// Compressor's that is valid until its next Compress.
func (c *Compressor) Compress(bufs [][]byte) ([]byte, error) {
	c.out.Reset()
	c.out.Grow(initialOut(total(bufs)))
	c.zw.Reset(&c.out)
	for _, b := range bufs {
		if _, err := c.zw.Write(b); err != nil { // a bytes.Buffer does not fail
			return nil, fmt.Errorf("%w: %v", ErrCompress, err)
		}
	}
	if err := c.zw.Close(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCompress, err)
	}
	return c.out.Bytes(), nil
}
