package capture

/*
#cgo LDFLAGS: -lpcap
#include <stdint.h>
#include <string.h>
#include <pcap/pcap.h>

// ph_rec heads each frame copied into a batch; the frame's bytes follow,
// padded to 8 bytes.
struct ph_rec {
	int64_t  sec;
	int32_t  frac;   // nanoseconds, or microseconds without nanosecond precision
	uint32_t caplen;
	uint32_t len;
	uint32_t pad;
};

struct ph_batch {
	unsigned char *buf;
	size_t size;
	size_t used;
};

static void ph_copy(u_char *user, const struct pcap_pkthdr *h, const u_char *bytes) {
	struct ph_batch *b = (struct ph_batch *)user;
	size_t need = sizeof(struct ph_rec) + ((h->caplen + 7) & ~(size_t)7);
	if (b->used + need > b->size) {
		return; // cannot happen: at most size / (record + snaplen) frames are asked for
	}
	struct ph_rec *r = (struct ph_rec *)(b->buf + b->used);
	r->sec = h->ts.tv_sec;
	r->frac = (int32_t)h->ts.tv_usec;
	r->caplen = h->caplen;
	r->len = h->len;
	r->pad = 0;
	memcpy(b->buf + b->used + sizeof(struct ph_rec), bytes, h->caplen);
	b->used += need;
}

// ph_dispatch copies up to max ready frames into buf without blocking (the
// handle is in non-blocking mode) and returns how many, or libpcap's
// negative error.
static int ph_dispatch(pcap_t *p, void *buf, size_t size, int max) {
	struct ph_batch b = {buf, size, 0};
	return pcap_dispatch(p, max, ph_copy, (u_char *)&b);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/google/gopacket/pcap"
)

// batchFrames is how many frames one batch holds.
const batchFrames = 512

// recHeader is the Go view of struct ph_rec.
type recHeader struct {
	sec    int64
	frac   int32
	caplen uint32
	len    uint32
	_      uint32
}

// batchReader reads a live handle in batches: one cgo call copies every
// frame ready in libpcap's ring (up to batchFrames) into a Go buffer, and the
// frames are then handed out one by one without crossing into C. When the
// ring is empty, the goroutine waits in Go's network poller on the handle's
// descriptor, not in a blocking C call: gopacket's per-frame read costs a
// cgo call per frame and a blocking poll(2) per wake-up, which makes the Go
// scheduler hand the thread's processor off and back for every frame.
//
// gopacket/pcap still opens, configures, filters and closes the handle, and
// reads its statistics; batchReader only needs its pcap_t, which gopacket
// keeps unexported (see pcapOf).
type batchReader struct {
	p       *C.pcap_t
	buf     []byte // the batch, filled by C during each dispatch
	file    *os.File
	rc      syscall.RawConn
	timeout time.Duration
	frames  C.int
	nano    bool

	pos, left int // the next frame's offset in buf, and frames left

	mu     sync.Mutex // held during each dispatch; guards closed
	closed bool
}

// pcapOf returns the pcap_t of a gopacket handle, or nil if this gopacket's
// Handle does not look as expected. The pointer is checked against the
// handle's link type and snapshot length, read through gopacket.
func pcapOf(h *pcap.Handle) *C.pcap_t {
	f, ok := reflect.TypeOf(pcap.Handle{}).FieldByName("cptr")
	if !ok || f.Type.Kind() != reflect.Pointer || f.Type.Size() != unsafe.Sizeof(uintptr(0)) {
		return nil
	}
	p := *(**C.pcap_t)(unsafe.Add(unsafe.Pointer(h), f.Offset))
	if p == nil || int(C.pcap_datalink(p)) != int(h.LinkType()) || int(C.pcap_snapshot(p)) != h.SnapLen() {
		return nil
	}
	return p
}

// newBatchReader prepares batched reads of h, which must be activated in
// non-blocking mode (gopacket does that for a positive timeout).
func newBatchReader(h *pcap.Handle, snaplen int, timeout time.Duration) (*batchReader, error) {
	p := pcapOf(h)
	if p == nil {
		return nil, errors.New("gopacket's pcap handle is not as expected")
	}
	fd := int(C.pcap_get_selectable_fd(p))
	if fd < 0 {
		return nil, errors.New("no selectable descriptor")
	}
	// A duplicate of the descriptor goes to the poller: closing it at Close
	// wakes a waiting reader, and libpcap's own stays libpcap's to close.
	dup, err := syscall.Dup(fd)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	syscall.CloseOnExec(dup)
	if err := syscall.SetNonblock(dup, true); err != nil {
		syscall.Close(dup)
		return nil, fmt.Errorf("non-blocking: %w", err)
	}
	file := os.NewFile(uintptr(dup), "pcap")
	if err := file.SetReadDeadline(time.Time{}); err != nil {
		file.Close()
		return nil, fmt.Errorf("descriptor not pollable: %w", err)
	}
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, err
	}
	recSize := int(unsafe.Sizeof(recHeader{})) + (snaplen+7)&^7
	size := batchFrames * recSize
	return &batchReader{
		p:       p,
		buf:     make([]byte, size),
		file:    file,
		rc:      rc,
		timeout: timeout,
		frames:  batchFrames,
		nano:    C.pcap_get_tstamp_precision(p) == C.PCAP_TSTAMP_PRECISION_NANO,
	}, nil
}

// dispatch copies the ready frames into the batch. It returns their number,
// or a negative libpcap error, or -2 once closed.
func (r *batchReader) dispatch() C.int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return -2
	}
	return C.ph_dispatch(r.p, unsafe.Pointer(&r.buf[0]), C.size_t(len(r.buf)), r.frames)
}

// read returns the next frame; see Handle.Read.
func (r *batchReader) read() ([]byte, time.Time, int, error) {
	if r.left == 0 {
		if err := r.fill(); err != nil {
			return nil, time.Time{}, 0, err
		}
	}
	h := (*recHeader)(unsafe.Pointer(&r.buf[r.pos]))
	start := r.pos + int(unsafe.Sizeof(recHeader{}))
	data := r.buf[start : start+int(h.caplen) : start+int(h.caplen)]
	r.pos = start + (int(h.caplen)+7)&^7
	r.left--
	frac := int64(h.frac)
	if !r.nano {
		frac *= 1000
	}
	return data, time.Unix(h.sec, frac), int(h.len), nil
}

// fill dispatches the ready frames, waiting for some in the poller up to the
// read timeout.
func (r *batchReader) fill() error {
	n := r.dispatch()
	if n == 0 {
		if err := r.file.SetReadDeadline(time.Now().Add(r.timeout)); err != nil {
			return ErrClosed
		}
		err := r.rc.Read(func(uintptr) bool {
			n = r.dispatch()
			return n != 0
		})
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return ErrTimeout
		case err != nil:
			return ErrClosed
		}
	}
	switch {
	case n == -2:
		return ErrClosed
	case n < 0:
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.closed {
			return ErrClosed
		}
		return fmt.Errorf("%w: %s", ErrFailed, C.GoString(C.pcap_geterr(r.p)))
	}
	r.pos, r.left = 0, int(n)
	return nil
}

// close stops reads: a waiting read returns ErrClosed, and no dispatch runs
// after close returns, so the pcap_t may be closed then.
func (r *batchReader) close() {
	r.file.Close()
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
}
