//go:build cgo

package gz

/*
#cgo LDFLAGS: -lisal
#include <stdlib.h>
#include <string.h>
#include <isa-l/igzip_lib.h>

// gz_state is a Compressor's C side: the stream and its level's hash
// tables, in C memory, so that igzip keeps no Go pointer after a call
// returns. The SMALL sizes compress header records as fast and as well as
// the default ones, in a third of the memory.
typedef struct {
	struct isal_zstream s;
	int level, done;
	uint32_t in_left, out_left, level_buf_size;
	uint8_t level_buf[];
} gz_state;

static gz_state *gz_new(int level) {
	uint32_t n = 0;
	switch (level) {
	case 1: n = ISAL_DEF_LVL1_SMALL; break;
	case 2: n = ISAL_DEF_LVL2_SMALL; break;
	case 3: n = ISAL_DEF_LVL3_SMALL; break;
	}
	gz_state *g = malloc(sizeof(gz_state) + n);
	if (g) {
		g->level = level;
		g->level_buf_size = n;
	}
	return g;
}

static void gz_start(gz_state *g) {
	isal_deflate_init(&g->s);
	g->s.level = g->level;
	g->s.level_buf = g->level_buf_size ? g->level_buf : NULL;
	g->s.level_buf_size = g->level_buf_size;
	g->s.gzip_flag = IGZIP_GZIP;
	g->s.flush = NO_FLUSH;
}

// gz_feed compresses in[0:inlen] into out[0:outlen], the last input of the
// member when last is set. It returns igzip's status and leaves in the state
// what it did not consume (in_left) and fill (out_left), and whether the
// member is complete (done). The Go buffers' addresses are cleared before
// it returns. A NULL in is empty input.
static int gz_feed(gz_state *g, uint8_t *in, uint32_t inlen, uint8_t *out, uint32_t outlen, int last) {
	static uint8_t empty;
	g->s.next_in = in ? in : &empty;
	g->s.avail_in = in ? inlen : 0;
	g->s.next_out = out;
	g->s.avail_out = outlen;
	g->s.end_of_stream = last;
	int r = isal_deflate(&g->s);
	g->in_left = g->s.avail_in;
	g->out_left = g->s.avail_out;
	g->done = g->s.internal_state.state == ZSTATE_END;
	g->s.next_in = NULL;
	g->s.next_out = NULL;
	return r;
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Compressor makes gzip members with ISA-L's igzip at level 1.
type Compressor struct {
	g   *C.gz_state
	out []byte
}

// New returns a Compressor.
func New() *Compressor { return newLevel(1) }

// newLevel returns a Compressor at igzip's level 0 to 3, for
// BenchmarkCompress.
func newLevel(level int) *Compressor {
	g := C.gz_new(C.int(level))
	if g == nil {
		panic("gz: out of C memory") // as Go's own allocator would
	}
	c := &Compressor{g: g}
	runtime.AddCleanup(c, func(g *C.gz_state) { C.free(unsafe.Pointer(g)) }, g)
	return c
}

// Compress returns bufs, in order, as one gzip member, in a buffer of the
// Compressor's that is valid until its next Compress. It allocates only
// when its buffer must grow.
func (c *Compressor) Compress(bufs [][]byte) ([]byte, error) {
	if need := initialOut(total(bufs)); cap(c.out) < need {
		c.out = make([]byte, 0, need)
	}
	out := c.out[:cap(c.out)]
	n := 0
	C.gz_start(c.g)
	for i := 0; i < len(bufs) || i == 0; i++ {
		var in []byte
		if i < len(bufs) {
			in = bufs[i]
		}
		last := i >= len(bufs)-1
		if len(in) == 0 && !last {
			continue
		}
		for {
			if n == len(out) { // full: grow, and go on where it stopped
				grown := make([]byte, 2*len(out))
				copy(grown, out)
				out = grown
			}
			var inp *C.uint8_t
			if len(in) > 0 {
				inp = (*C.uint8_t)(unsafe.Pointer(&in[0]))
			}
			room := len(out) - n
			r := C.gz_feed(c.g, inp, C.uint32_t(len(in)), (*C.uint8_t)(unsafe.Pointer(&out[n])), C.uint32_t(room), C.int(b2i(last)))
			left, done := int(c.g.in_left), c.g.done != 0
			stuck := left == len(in) && int(c.g.out_left) == room && !done
			if r != C.COMP_OK || stuck {
				c.out = out[:0]
				return nil, fmt.Errorf("%w: igzip status %d", ErrCompress, int(r))
			}
			in = in[len(in)-left:]
			n = len(out) - int(c.g.out_left)
			if len(in) == 0 && (!last || done) {
				break
			}
		}
	}
	c.out = out[:0]
	return out[:n], nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
