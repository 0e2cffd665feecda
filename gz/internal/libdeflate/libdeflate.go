//go:build cgo

package libdeflate

/*
#cgo LDFLAGS: -ldeflate
#include <stdlib.h>
#include <libdeflate.h>
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// Compressor is a libdeflate compressor at one level.
type Compressor struct {
	c *C.struct_libdeflate_compressor
}

// New returns a Compressor at level 1 to 12, or nil for another level.
func New(level int) *Compressor {
	c := C.libdeflate_alloc_compressor(C.int(level))
	if c == nil {
		return nil
	}
	z := &Compressor{c}
	runtime.AddCleanup(z, func(c *C.struct_libdeflate_compressor) { C.libdeflate_free_compressor(c) }, c)
	return z
}

// Compress writes in as one gzip member into out and returns its length,
// or 0 when out is too small.
func (z *Compressor) Compress(in, out []byte) int {
	if len(in) == 0 || len(out) == 0 {
		return 0
	}
	return int(C.libdeflate_gzip_compress(z.c, unsafe.Pointer(&in[0]), C.size_t(len(in)), unsafe.Pointer(&out[0]), C.size_t(len(out))))
}
