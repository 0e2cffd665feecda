// Package capture opens live captures on network interfaces with a tight
// BPF filter and reads their frames with no cgo or system call per frame,
// in place from the kernel's ring of an AF_PACKET socket of its own (see
// nativeReader). libpcap (gopacket/pcap) compiles the filter, and reads
// the interfaces the native reader does not: those that are neither
// Ethernet nor loopback. It also finds the interfaces and local addresses
// to capture on. Everything cgo is here; callers see plain Go types.
//
// A Handle's Read must be called from one goroutine; Stats and Close may be
// called from any goroutine, at any time.
package capture

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/google/gopacket/pcap"

	"github.com/m-lab/packet-headers/packet"
)

// ErrTimeout is returned by Read when no packet arrived within the read
// timeout; the caller may do housekeeping and read again. It wraps
// os.ErrDeadlineExceeded, so that a consumer need not import this package.
var ErrTimeout = fmt.Errorf("capture: read timeout: %w", os.ErrDeadlineExceeded)

// ErrClosed is returned by Read once the handle is closed. It wraps
// net.ErrClosed.
var ErrClosed = fmt.Errorf("capture: handle closed: %w", net.ErrClosed)

// ErrFailed is wrapped by Read's errors when the capture cannot go on (the
// interface went away): the handle must be closed and opened again.
var ErrFailed = errors.New("capture failed")

// DefaultBatchDelay is the BatchDelay that makes a batch of some hundred
// frames at tens of thousands of frames per second, and delays a frame by
// at most 5 ms.
const DefaultBatchDelay = 5 * time.Millisecond

// Options configures a live capture. The zero value asks for the defaults
// (and immediate delivery).
type Options struct {
	Snaplen     int           // bytes captured per frame; default 256
	BufferSize  int           // kernel ring size in bytes; default 8 MiB
	ReadTimeout time.Duration // longest a Read blocks without a packet on an idle capture (else BusyTimeout); default 100ms
	// BatchDelay is the longest a frame waits in the kernel's buffer so
	// that frames are read in batches: the kernel fills blocks of frames
	// and wakes the reader when one is full or this old, one wake-up for
	// many frames (rounded up to a millisecond; DefaultBatchDelay is a good
	// value). Zero delivers every frame as it comes, one wake-up each.
	BatchDelay time.Duration
	Filter     string // BPF filter expression; empty captures everything
	// HostOnly drops, in the kernel, the frames addressed to other hosts
	// that an interface in promiscuous mode (another capture's) shows: the
	// native reader runs a check of the frame's packet type before Filter.
	HostOnly bool

	libpcap bool // read through libpcap even where the native reader works (tests of the fallback)
}

func (o *Options) withDefaults() Options {
	r := Options{Snaplen: 256, BufferSize: 8 << 20, ReadTimeout: 100 * time.Millisecond}
	if o == nil {
		return r
	}
	if o.Snaplen > 0 {
		r.Snaplen = o.Snaplen
	}
	if o.BufferSize > 0 {
		r.BufferSize = o.BufferSize
	}
	if o.ReadTimeout > 0 {
		r.ReadTimeout = o.ReadTimeout
	}
	if o.BatchDelay > 0 {
		r.BatchDelay = max(o.BatchDelay.Round(time.Millisecond), time.Millisecond)
	}
	r.Filter, r.HostOnly, r.libpcap = o.Filter, o.HostOnly, o.libpcap
	return r
}

// Stats are the kernel's (or libpcap's) counters for one handle.
type Stats struct {
	Received     uint64 // frames that passed the filter
	Dropped      uint64 // frames dropped by the kernel because the buffer was full
	IfaceDropped uint64 // frames dropped by the interface or its driver
}

func (s *Stats) add(o Stats) {
	s.Received += o.Received
	s.Dropped += o.Dropped
	s.IfaceDropped += o.IfaceDropped
}

// Handle is a live capture on one interface.
type Handle struct {
	name     string
	linkType packet.LinkType
	h        *pcap.Handle  // the fallback: frames read one by one through gopacket
	r        *nativeReader // nil with the fallback

	mu     sync.Mutex // guards closed, h and r against use after Close by Stats
	closed bool
}

// Open starts a live capture on the named interface. Frames are captured
// with nanosecond timestamps, truncated to opts.Snaplen bytes, and filtered
// in the kernel by opts.Filter.
func Open(iface string, opts *Options) (*Handle, error) {
	o := opts.withDefaults()
	if !o.libpcap {
		r, err := openNative(iface, o)
		if err == nil {
			return &Handle{name: iface, linkType: linkTypeNative, r: r}, nil
		}
		nativeOnce.Do(func() { log.Printf("capture on %s: through libpcap: %v", iface, err) })
	}
	in, err := pcap.NewInactiveHandle(iface)
	if err != nil {
		return nil, fmt.Errorf("capture on %s: %w", iface, err)
	}
	defer in.CleanUp()
	for _, set := range []func() error{
		func() error { return in.SetSnapLen(o.Snaplen) },
		func() error { return in.SetPromisc(false) },
		// libpcap's timeout is how long the kernel holds frames in a
		// block (TPACKET_V3) before it wakes the reader; without a batch
		// delay, immediate mode delivers each frame at once (TPACKET_V2),
		// and the timeout only bounds gopacket's own reads.
		func() error {
			if o.BatchDelay > 0 {
				return in.SetTimeout(o.BatchDelay)
			}
			return in.SetTimeout(o.ReadTimeout)
		},
		func() error { return in.SetBufferSize(o.BufferSize) },
		func() error { return in.SetImmediateMode(o.BatchDelay == 0) },
	} {
		if err := set(); err != nil {
			return nil, fmt.Errorf("capture on %s: %w", iface, err)
		}
	}
	h, err := in.Activate()
	if err != nil {
		return nil, fmt.Errorf("capture on %s: %w", iface, err)
	}
	if o.Filter != "" {
		if err := h.SetBPFFilter(o.Filter); err != nil {
			h.Close()
			return nil, fmt.Errorf("capture on %s: filter %q: %w", iface, o.Filter, err)
		}
	}
	return &Handle{name: iface, linkType: packet.LinkType(h.LinkType()), h: h}, nil
}

var nativeOnce sync.Once

// Name returns the interface's name.
func (c *Handle) Name() string { return c.name }

// LinkType returns the link type of the frames Read returns.
func (c *Handle) LinkType() packet.LinkType { return c.linkType }

// Read returns the next frame. The returned bytes are owned by the handle and
// are valid only until the next call to Read: copy what must outlive it.
// origLen is the frame's length on the wire. Read returns ErrTimeout when no
// frame came within the read timeout (BusyTimeout right after frames came,
// see deadline), and ErrClosed after Close.
func (c *Handle) Read() (data []byte, ts time.Time, origLen int, err error) {
	if c.r != nil {
		data, ts, origLen, err = c.r.read()
		if err != nil && errors.Is(err, ErrFailed) {
			err = fmt.Errorf("read from %s: %w", c.name, err)
		}
		return data, ts, origLen, err
	}
	data, ci, err := c.h.ZeroCopyReadPacketData()
	switch {
	case err == nil:
		return data, ci.Timestamp, ci.Length, nil
	case errors.Is(err, pcap.NextErrorTimeoutExpired):
		return nil, time.Time{}, 0, ErrTimeout
	case errors.Is(err, io.EOF):
		return nil, time.Time{}, 0, ErrClosed
	}
	if errors.Is(err, pcap.NextErrorReadError) {
		return nil, time.Time{}, 0, fmt.Errorf("read from %s: %w: %v", c.name, ErrFailed, c.h.Error())
	}
	return nil, time.Time{}, 0, fmt.Errorf("read from %s: %w: %v", c.name, ErrFailed, err)
}

// Stats returns the handle's counters since it was opened, or an error
// once the handle is closed.
func (c *Handle) Stats() (Stats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return Stats{}, ErrClosed
	}
	if c.r != nil {
		s, err := c.r.stats()
		if err != nil {
			return Stats{}, fmt.Errorf("stats of %s: %w", c.name, err)
		}
		return s, nil
	}
	s, err := c.h.Stats()
	if err != nil {
		return Stats{}, fmt.Errorf("stats of %s: %w", c.name, err)
	}
	return Stats{Received: uint64(s.PacketsReceived), Dropped: uint64(s.PacketsDropped), IfaceDropped: uint64(s.PacketsIfDropped)}, nil
}

// Close stops the capture. A Read in progress returns ErrClosed within the
// read timeout. Close may be called more than once.
func (c *Handle) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		if c.r != nil {
			c.r.close()
		}
		if c.h != nil {
			c.h.Close()
		}
	}
}

// Interface is a network interface to capture on.
type Interface struct {
	Name     string
	Addrs    []netip.Addr // loopback addresses left out
	Loopback bool
}

// Interfaces returns the interfaces that are up and have at least one
// address, loopback excluded, or, when names is not empty, exactly the
// named interfaces (which must exist and be up). An interface without an
// address (a bridge port, a bond member) would only show again the traffic
// of the interface that holds the address, so it is not picked by default.
func Interfaces(names []string) ([]Interface, error) {
	all, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	byName := map[string]net.Interface{}
	for _, ifc := range all {
		byName[ifc.Name] = ifc
	}
	var out []Interface
	if len(names) > 0 {
		for _, n := range names {
			ifc, ok := byName[n]
			if !ok {
				return nil, fmt.Errorf("unknown interface %q", n)
			}
			if ifc.Flags&net.FlagUp == 0 {
				return nil, fmt.Errorf("interface %q is down", n)
			}
			addrs, err := addrsOf(ifc)
			if err != nil {
				return nil, err
			}
			out = append(out, Interface{Name: n, Addrs: addrs, Loopback: ifc.Flags&net.FlagLoopback != 0})
		}
		return out, nil
	}
	for _, ifc := range all {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := addrsOf(ifc)
		if err != nil {
			return nil, err
		}
		if len(addrs) > 0 {
			out = append(out, Interface{Name: ifc.Name, Addrs: addrs})
		}
	}
	return out, nil
}

func addrsOf(ifc net.Interface) ([]netip.Addr, error) {
	as, err := ifc.Addrs()
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
	}
	var out []netip.Addr
	for _, a := range as {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		addr, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		if addr.IsLoopback() {
			continue
		}
		out = append(out, addr.WithZone(""))
	}
	return out, nil
}

// LocalAddrs returns every non-loopback address of every interface, up or
// down: the addresses that may be at the local end of a connection.
func LocalAddrs() ([]netip.Addr, error) {
	all, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []netip.Addr
	for _, ifc := range all {
		addrs, err := addrsOf(ifc)
		if err != nil {
			return nil, err
		}
		out = append(out, addrs...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out, nil
}

// Filter keeps TCP segments. IPv6 packets whose TCP header follows
// extension headers are kept too (the classic BPF "tcp" primitive misses
// them); the decoder sorts them out. It names no address, so it is the
// same program however many addresses the host has, and an address added
// later is captured at once; with Options.HostOnly, frames of other hosts
// are dropped in the kernel too, and the daemon tells its connections from
// forwarded ones at their first packet (package selection).
const Filter = "(ip and tcp) or (ip6 and (ip6 proto 6 or ip6 proto 0 or ip6 proto 43 or ip6 proto 44 or ip6 proto 60 or ip6 proto 51))"

// BusyTimeout is how long a read may wait while frames are coming (or the
// read timeout, if longer), before a read times out and the capture is idle
// again; see deadline.
const BusyTimeout = time.Second

// deadline keeps a poller's read deadline. While frames come, the kernel's
// block timeout (or each frame, without a batch delay) wakes the reader anyway,
// and a deadline ReadTimeout ahead would never be reached: yet Go's monitor
// thread (sysmon) sleeps only until the earliest timer, however often that
// timer is pushed back, and each of its wake-ups is a context switch (the
// lab's CPU row, BenchmarkLab, measures what they cost). So once a wait
// ends with frames, the deadline is set BusyTimeout ahead, and moved only
// when less than half of that is left; once a wait times out, ReadTimeout
// applies again. A Read therefore returns ErrTimeout at most BusyTimeout
// after the last frame (TestDeadline).
type deadline struct {
	idle time.Duration // ReadTimeout
	busy bool          // the last wait ended with frames
	at   time.Time     // the deadline set, when busy
}

// set sets f's deadline for the next wait.
func (d *deadline) set(f interface{ SetReadDeadline(time.Time) error }) error {
	now := time.Now()
	if !d.busy {
		return f.SetReadDeadline(now.Add(d.idle))
	}
	busy := max(BusyTimeout, d.idle)
	if d.at.Sub(now) >= busy/2 {
		return nil
	}
	d.at = now.Add(busy)
	return f.SetReadDeadline(d.at)
}

// woke records how the wait ended: with frames, or timed out.
func (d *deadline) woke(frames bool) {
	d.busy = frames
	if !frames {
		d.at = time.Time{}
	}
}
