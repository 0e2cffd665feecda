package capture

import (
	"errors"
	"fmt"
	"log"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/packet"
)

// RetryInterval is how often a failed capture is opened again.
const RetryInterval = time.Second

// Live is a capture on one interface that survives the interface going away:
// when a read fails, it closes the handle, returns the failure once (for the
// reader to count), then reports timeouts to its reader (who goes on with
// its housekeeping), and opens the interface again every RetryInterval
// until it can, with a fresh filter. Read belongs to one
// goroutine; Stats, Up and Close may be called from any.
type Live struct {
	name   string
	opts   Options
	filter func() string // called at each open
	up     atomic.Bool

	mu       sync.Mutex // guards h, closed and base
	h        *Handle
	closed   bool
	base     Stats         // the counters of the handles that failed
	failures atomic.Uint64 // reads that failed and closed the handle
	linkType packet.LinkType
	retryAt  time.Time

	rh *Handle // the reader's copy of h, so that a frame costs no lock
}

// OpenLive opens a resilient capture. The first open must succeed.
func OpenLive(iface string, opts *Options, filter func() string) (*Live, error) {
	o := opts.withDefaults()
	o.Filter = filter()
	h, err := Open(iface, &o)
	if err != nil {
		return nil, err
	}
	l := &Live{name: iface, opts: o, filter: filter, h: h, linkType: h.LinkType()}
	l.up.Store(true)
	return l, nil
}

// Name returns the interface's name.
func (l *Live) Name() string { return l.name }

// LinkType returns the link type of the first open.
func (l *Live) LinkType() packet.LinkType { return l.linkType }

// Up reports whether the capture is running (not waiting to reopen).
func (l *Live) Up() bool { return l.up.Load() }

func (l *Live) current() (*Handle, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h, l.closed
}

// Read reads the next frame, like Handle.Read. When the capture fails it
// returns the error (wrapping ErrFailed) once; while the interface is gone
// it then returns ErrTimeout every read timeout and tries to reopen it
// every RetryInterval. It returns ErrClosed after Close.
func (l *Live) Read() ([]byte, time.Time, int, error) {
	h := l.rh
	if h == nil {
		var closed bool
		h, closed = l.current()
		if closed {
			return nil, time.Time{}, 0, ErrClosed
		}
		if h == nil {
			l.reopen()
			return nil, time.Time{}, 0, ErrTimeout
		}
		l.rh = h
	}
	data, ts, n, err := h.Read()
	if err == nil {
		return data, ts, n, nil
	}
	l.rh = nil // after a timeout or an error, look at the handle again
	if errors.Is(err, ErrFailed) {
		l.mu.Lock()
		if l.h == h {
			l.h = nil
			// The failed handle's last counters carry over, so that Stats
			// never goes back (a flow's drops are differences of them).
			if s, err := h.Stats(); err == nil {
				l.base.add(s)
			}
		}
		l.failures.Add(1)
		l.retryAt = time.Now().Add(RetryInterval)
		l.mu.Unlock()
		h.Close()
		l.up.Store(false)
		return nil, time.Time{}, 0, fmt.Errorf("%w; reopening every %v", err, RetryInterval)
	}
	if errors.Is(err, ErrClosed) {
		if _, closed := l.current(); !closed {
			return nil, time.Time{}, 0, ErrTimeout // a handle swapped out
		}
	}
	return data, ts, n, err
}

// reopen waits a read timeout, and tries to open the interface again when
// the retry time has come.
func (l *Live) reopen() {
	time.Sleep(l.opts.ReadTimeout)
	l.mu.Lock()
	due := !l.closed && time.Now().After(l.retryAt)
	if due {
		l.retryAt = time.Now().Add(RetryInterval)
	}
	l.mu.Unlock()
	if !due {
		return
	}
	o := l.opts
	o.Filter = l.filter()
	h, err := Open(l.name, &o)
	if err != nil {
		return
	}
	if h.LinkType() != l.linkType {
		log.Printf("capture: %s came back with link type %d, not %d; not capturing on it", l.name, h.LinkType(), l.linkType)
		h.Close()
		return
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		h.Close()
		return
	}
	l.h = h
	l.mu.Unlock()
	l.up.Store(true)
	log.Printf("capture: %s is back; capturing again", l.name)
}

// Stats returns the counters since OpenLive, over every reopen. It fails
// while the capture is down or closed.
func (l *Live) Stats() (Stats, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.h == nil {
		return Stats{}, ErrClosed
	}
	s, err := l.h.Stats()
	if err != nil {
		return Stats{}, err
	}
	s.add(l.base)
	return s, nil
}

// Totals returns the frames the kernel dropped since OpenLive (over every
// reopen, as far as the last Stats of each handle saw), and how many times
// the capture failed and closed its handle. It costs a system call.
func (l *Live) Totals() (dropped, failures uint64) {
	f := l.failures.Load() // first: a failure after it is seen at the next call
	s, err := l.Stats()
	if err != nil {
		l.mu.Lock()
		s = l.base
		l.mu.Unlock()
	}
	return s.Dropped + s.IfaceDropped, f
}

// Close stops the capture for good.
func (l *Live) Close() {
	l.mu.Lock()
	h := l.h
	l.closed = true
	l.h = nil
	l.mu.Unlock()
	if h != nil {
		h.Close()
	}
	l.up.Store(false)
}
