package capture

/*
#cgo LDFLAGS: -lpcap -lpthread
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <pcap/pcap.h>

// ph_rec heads each frame in the ring; the frame's bytes follow, padded to
// 8 bytes. A record with wrap set only says "go on at the ring's start".
struct ph_rec {
	int64_t  sec;
	int32_t  frac;   // nanoseconds, or microseconds without nanosecond precision
	uint32_t caplen;
	uint32_t len;
	uint32_t wrap;
};

enum { PH_RUNNING = 0, PH_FAILED = 1, PH_STOPPED = 2 };

// ph_ring is the control block at the start of the ring's memory (Go
// memory, pinned); the data area follows it. The producer is ph_run, a
// thread of its own; the consumer is the Go reader. head and tail count
// bytes from the start, never wrapping.
struct ph_ring {
	uint64_t head;      // consumed up to here (written by Go)
	char     pad[56];   // head alone on its cache line, apart from what C writes
	uint64_t tail;      // published up to here (written by C)
	uint64_t wpos;      // written up to here (C's own, published as tail)
	int32_t  waiting;   // the consumer sleeps: the producer must wake it
	int32_t  state;     // PH_*
	uint64_t size;      // of the data area, a power of two
	uint64_t maxrec;    // the largest record
	pcap_t  *p;
	int      efd;       // eventfd: data, failure or stop, to the consumer
	int      stopfd;    // eventfd: stop, to the producer
	int      selfd;     // the capture's descriptor
	int      timeout_ms; // the longest wait before libpcap is called again
	pthread_mutex_t mu; // held by libpcap calls: dispatch, stats
	pthread_t th;
	char     err[PCAP_ERRBUF_SIZE];
};

#define PH_CTRL 4096

static unsigned char *ph_data(struct ph_ring *r) { return (unsigned char *)r + PH_CTRL; }

static void ph_wake(struct ph_ring *r) {
	uint64_t one = 1;
	while (write(r->efd, &one, sizeof one) < 0 && errno == EINTR) {
	}
}

// ph_copy appends one frame at wpos; ph_run asked for no more frames than
// fit, and publishes them all at once.
static void ph_copy(u_char *user, const struct pcap_pkthdr *h, const u_char *bytes) {
	struct ph_ring *r = (struct ph_ring *)user;
	uint64_t need = sizeof(struct ph_rec) + ((h->caplen + 7) & ~(uint64_t)7);
	uint64_t tail = r->wpos;
	uint64_t pos = tail & (r->size - 1);
	if (r->size - pos < need) { // no room before the end: wrap
		if (r->size - pos >= sizeof(struct ph_rec)) { // (less: the reader wraps by itself)
			struct ph_rec *w = (struct ph_rec *)(ph_data(r) + pos);
			memset(w, 0, sizeof *w);
			w->wrap = 1;
		}
		tail += r->size - pos;
		pos = 0;
	}
	struct ph_rec *rec = (struct ph_rec *)(ph_data(r) + pos);
	rec->sec = h->ts.tv_sec;
	rec->frac = (int32_t)h->ts.tv_usec;
	rec->caplen = h->caplen;
	rec->len = h->len;
	rec->wrap = 0;
	memcpy(ph_data(r) + pos + sizeof(struct ph_rec), bytes, h->caplen);
	r->wpos = tail + need;
}

// ph_run copies frames from libpcap into the ring until stopped or failed.
static void *ph_run(void *arg) {
	struct ph_ring *r = arg;
	sigset_t all; // signals are for the Go runtime's threads
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	struct pollfd fds[2] = {{.fd = r->selfd, .events = POLLIN}, {.fd = r->stopfd, .events = POLLIN}};
	uint64_t pub = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
	int hup = 0; // poll said the descriptor has an error
	for (;;) {
		uint64_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
		uint64_t free = r->size - (pub - head);
		// Room for n records, and for the waste of one wrap.
		int64_t n = (int64_t)(free / r->maxrec) - 1;
		if (n <= 0) { // the reader is behind: frames wait in the kernel
			if (poll(&fds[1], 1, 1) > 0) {
				break;
			}
			continue;
		}
		if (n > 1024) {
			n = 1024;
		}
		r->wpos = pub;
		pthread_mutex_lock(&r->mu);
		int got = pcap_dispatch(r->p, (int)n, ph_copy, (u_char *)r);
		if (got < 0) {
			strncpy(r->err, pcap_geterr(r->p), sizeof r->err - 1);
		}
		pthread_mutex_unlock(&r->mu);
		if (got < 0) {
			__atomic_store_n(&r->state, PH_FAILED, __ATOMIC_SEQ_CST);
			ph_wake(r);
			return NULL;
		}
		if (got > 0) {
			hup = 0;
			pub = r->wpos;
			__atomic_store_n(&r->tail, pub, __ATOMIC_SEQ_CST);
			if (__atomic_exchange_n(&r->waiting, 0, __ATOMIC_SEQ_CST)) {
				ph_wake(r);
			}
			if (got == n) {
				continue; // there may be more at once
			}
			// libpcap took every ready frame: wait for more without asking
			// it again (poll is level-triggered: a block retired meanwhile
			// returns at once).
		}
		if (got == 0 && hup) {
			// poll said the descriptor has an error, and libpcap did not
			// fail: an interface that went down, which libpcap waits out.
			// Pause rather than spin on it.
			if (poll(&fds[1], 1, 10) > 0) {
				break;
			}
		}
		// A timeout, as gopacket's reads have: libpcap notices an
		// interface back up when it is called.
		if (poll(fds, 2, r->timeout_ms) < 0 && errno != EINTR) {
			strncpy(r->err, strerror(errno), sizeof r->err - 1);
			__atomic_store_n(&r->state, PH_FAILED, __ATOMIC_SEQ_CST);
			ph_wake(r);
			return NULL;
		}
		if (fds[1].revents) {
			break;
		}
		hup = (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
	}
	__atomic_store_n(&r->state, PH_STOPPED, __ATOMIC_SEQ_CST);
	ph_wake(r);
	return NULL;
}

static int ph_start(struct ph_ring *r) {
	pthread_mutex_init(&r->mu, NULL);
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setstacksize(&a, 256 << 10); // it needs little
	int e = pthread_create(&r->th, &a, ph_run, r);
	pthread_attr_destroy(&a);
	return e;
}

static void ph_join(struct ph_ring *r) {
	uint64_t one = 1;
	while (write(r->stopfd, &one, sizeof one) < 0 && errno == EINTR) {
	}
	pthread_join(r->th, NULL);
	pthread_mutex_destroy(&r->mu);
}

static int ph_stats(struct ph_ring *r, struct pcap_stat *s) {
	pthread_mutex_lock(&r->mu);
	int e = pcap_stats(r->p, s);
	pthread_mutex_unlock(&r->mu);
	return e;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/google/gopacket/pcap"
	"golang.org/x/sys/unix"
)

// ringSize is the size of a reader's ring, a power of two: a few
// milliseconds of frames at a million frames per second (the kernel's
// buffer holds the rest). A variable for tests only.
var ringSize = 1 << 20

// recHeader is the Go view of struct ph_rec.
type recHeader struct {
	sec    int64
	frac   int32
	caplen uint32
	len    uint32
	wrap   uint32
}

// ringReader reads a live handle without any cgo call per frame or per
// batch. A thread of its own, in C, waits for the kernel's blocks of
// frames (poll(2) on the handle's descriptor) and copies them with
// pcap_dispatch into a single-producer single-consumer ring; the Go reader
// takes frames from the ring and, when it is empty, waits in Go's network
// poller on an eventfd the thread signals. The Go side thus makes no
// system call or cgo call while frames flow: each such call would wake the
// Go runtime's monitor thread, and gopacket's per-frame read (a cgo call
// per frame, a blocking poll per wake-up) made the scheduler hand its
// thread off and back for every frame.
//
// gopacket/pcap still opens, configures, filters and closes the handle;
// ringReader needs its pcap_t, which gopacket keeps unexported (see
// pcapOf). The ring's memory is Go memory, pinned while the thread runs.
type ringReader struct {
	mem      []byte // control block, then data
	r        *C.struct_ph_ring
	data     []byte
	mask     uint64
	pin      runtime.Pinner
	efd      *os.File // the eventfd, in Go's poller
	rc       syscall.RawConn
	deadline deadline
	nano     bool

	pos      uint64 // the next record; what is before it is consumed once read is called again
	released uint64 // the head last given back to the thread
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

// newRingReader starts the copying thread for h, which must be activated
// in non-blocking mode (gopacket does that for a positive timeout).
func newRingReader(h *pcap.Handle, snaplen int, timeout time.Duration) (*ringReader, error) {
	if unsafe.Sizeof(C.struct_ph_ring{}) > C.PH_CTRL {
		return nil, errors.New("control block too large")
	}
	p := pcapOf(h)
	if p == nil {
		return nil, errors.New("gopacket's pcap handle is not as expected")
	}
	selfd := int(C.pcap_get_selectable_fd(p))
	if selfd < 0 {
		return nil, errors.New("no selectable descriptor")
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	stopfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(efd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	file, rc, err := pollable(efd, "pcap-ring")
	if err != nil {
		unix.Close(stopfd)
		return nil, err
	}
	rr := &ringReader{mem: make([]byte, C.PH_CTRL+ringSize), mask: uint64(ringSize - 1), efd: file, rc: rc, deadline: deadline{idle: timeout},
		nano: C.pcap_get_tstamp_precision(p) == C.PCAP_TSTAMP_PRECISION_NANO}
	rr.pin.Pin(&rr.mem[0])
	rr.r = (*C.struct_ph_ring)(unsafe.Pointer(&rr.mem[0]))
	rr.data = rr.mem[C.PH_CTRL:]
	rr.r.size = C.uint64_t(ringSize)
	rr.r.maxrec = C.uint64_t(unsafe.Sizeof(recHeader{})) + C.uint64_t((snaplen+7)&^7)
	rr.r.p = p
	rr.r.efd, rr.r.stopfd, rr.r.selfd = C.int(efd), C.int(stopfd), C.int(selfd)
	rr.r.timeout_ms = C.int(max(timeout.Milliseconds(), 1))
	if e := C.ph_start(rr.r); e != 0 {
		file.Close()
		unix.Close(stopfd)
		rr.pin.Unpin()
		return nil, fmt.Errorf("pthread_create: %w", unix.Errno(e))
	}
	return rr, nil
}

func (rr *ringReader) head() *uint64   { return (*uint64)(unsafe.Pointer(&rr.r.head)) }
func (rr *ringReader) tail() *uint64   { return (*uint64)(unsafe.Pointer(&rr.r.tail)) }
func (rr *ringReader) waiting() *int32 { return (*int32)(unsafe.Pointer(&rr.r.waiting)) }
func (rr *ringReader) state() *int32   { return (*int32)(unsafe.Pointer(&rr.r.state)) }
func (rr *ringReader) errText() string { return C.GoString(&rr.r.err[0]) }
func (rr *ringReader) record() *recHeader {
	return (*recHeader)(unsafe.Pointer(&rr.data[rr.pos&rr.mask]))
}

// read returns the next frame; see Handle.Read. The frame's bytes stay in
// the ring until the next read.
func (rr *ringReader) read() ([]byte, time.Time, int, error) {
	// Room is given back an eighth of the ring at a time, not per frame:
	// the head's cache line then moves between the CPUs rarely.
	if rr.pos-rr.released >= uint64(len(rr.data))/8 {
		rr.release()
	}
	for {
		if rr.ready(atomic.LoadUint64(rr.tail())) {
			data, ts, n := rr.take()
			return data, ts, n, nil
		}
		if err := rr.wait(); err != nil {
			return nil, time.Time{}, 0, err
		}
	}
}

// release gives the thread back the room of every frame read before pos.
func (rr *ringReader) release() {
	atomic.StoreUint64(rr.head(), rr.pos)
	rr.released = rr.pos
}

// ready reports whether a frame is at pos, before the published tail,
// skipping the unused end of the ring.
func (rr *ringReader) ready(tail uint64) bool {
	for rr.pos != tail {
		left := uint64(len(rr.data)) - rr.pos&rr.mask
		if left >= uint64(unsafe.Sizeof(recHeader{})) && rr.record().wrap == 0 {
			return true
		}
		rr.pos += left // go on at the ring's start
	}
	return false
}

// take returns the record at pos, which is a frame, and moves past it.
func (rr *ringReader) take() ([]byte, time.Time, int) {
	h := rr.record()
	start := rr.pos&rr.mask + uint64(unsafe.Sizeof(recHeader{}))
	data := rr.data[start : start+uint64(h.caplen) : start+uint64(h.caplen)]
	rr.pos += uint64(unsafe.Sizeof(recHeader{})) + uint64(h.caplen+7)&^7
	frac := int64(h.frac)
	if !rr.nano {
		frac *= 1000
	}
	return data, time.Unix(h.sec, frac), int(h.len)
}

// wait sleeps in Go's poller until the thread published frames (or failed
// or stopped), or the read deadline (see deadline) passed.
func (rr *ringReader) wait() error {
	switch atomic.LoadInt32(rr.state()) {
	case C.PH_FAILED:
		return fmt.Errorf("%w: %s", ErrFailed, rr.errText())
	case C.PH_STOPPED:
		return ErrClosed
	}
	rr.release() // all read: the thread may fill the whole ring while we sleep
	atomic.StoreInt32(rr.waiting(), 1)
	if rr.pos != atomic.LoadUint64(rr.tail()) {
		atomic.StoreInt32(rr.waiting(), 0)
		return nil
	}
	if err := rr.deadline.set(rr.efd); err != nil {
		return ErrClosed
	}
	var buf [8]byte
	err := rr.rc.Read(func(fd uintptr) bool {
		// A raw read: no system-call bookkeeping that would wake the
		// runtime's monitor thread.
		_, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), 8)
		return e != unix.EAGAIN
	})
	rr.deadline.woke(err == nil)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ErrTimeout
	case err != nil:
		return ErrClosed
	}
	return nil
}

// stats reads libpcap's counters, between two dispatches of the thread.
func (rr *ringReader) stats() (Stats, error) {
	var s C.struct_pcap_stat
	if C.ph_stats(rr.r, &s) != 0 {
		return Stats{}, errors.New(C.GoString(C.pcap_geterr(rr.r.p)))
	}
	return Stats{Received: uint64(s.ps_recv), Dropped: uint64(s.ps_drop), IfaceDropped: uint64(s.ps_ifdrop)}, nil
}

// close stops and joins the thread, so that the pcap_t may be closed then;
// a waiting read returns ErrClosed. The ring stays readable memory for as
// long as the reader holds it. Handle.Close calls it once.
func (rr *ringReader) close() {
	C.ph_join(rr.r)
	unix.Close(int(rr.r.stopfd))
	rr.efd.Close()
	rr.pin.Unpin()
}
