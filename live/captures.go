package live

import (
	"context"
	"errors"
	"log"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/health"
	"github.com/m-lab/packet-headers/pipeline"
)

// RetireAfter is how long a capture of an interface that is gone is kept,
// reopening it every second, before it is closed for good: an interface
// deleted and made again within it (a link flap, a container restarting)
// keeps its capture and its flows.
const RetireAfter = 2 * time.Minute

// captureSet owns the daemon's captures, one per interface, each read by a
// demuxer on a goroutine that wg owns. With -interface the set is what the
// operator named, and an interface that is gone fails the health checks.
// Without it (follow), the set follows the interfaces that are up with an
// address: one that appears (a container's veth) is captured, within a
// second of the kernel's notification; one that is gone is not a failure,
// and its capture is retired after RetireAfter, its counts kept in retired
// so that the metrics' sums never go back (TestInterfacesFollowed).
type captureSet struct {
	c       *Config
	p       *pipeline.Pipeline
	k       *kernelNames
	checker *health.Checker
	follow  bool
	wg      sync.WaitGroup

	mu      sync.Mutex
	active  map[string]*liveCapture
	retired *demuxer.Stats // the counts of retired captures
	closed  bool
}

// liveCapture is a capture, its demuxer, and the read errors main counted.
type liveCapture struct {
	h        *capture.Live
	d        *demuxer.Demuxer
	errors   atomic.Uint64
	done     chan struct{} // closed when its demuxer has ended
	goneFrom time.Time     // when its interface was first seen gone (follow), else zero
}

func newCaptureSet(c *Config, p *pipeline.Pipeline, k *kernelNames, checker *health.Checker) *captureSet {
	return &captureSet{c: c, p: p, k: k, checker: checker, follow: len(c.Interfaces) == 0,
		active: map[string]*liveCapture{}, retired: demuxer.NewStats()}
}

// open starts a capture on every interface, or on none.
func (s *captureSet) open(ifaces []capture.Interface) error {
	for _, ifc := range ifaces {
		if err := s.add(ifc.Name); err != nil {
			s.closeAll()
			return err
		}
	}
	s.updateAddrs()
	return nil
}

// add starts a capture of the interface name and its demuxer.
func (s *captureSet) add(name string) error {
	o := &capture.Options{Snaplen: s.c.Pipeline.MaxHeaderSize, BufferSize: int(s.c.BufferSize), BatchDelay: s.c.BatchDelay, HostOnly: true}
	h, err := capture.OpenLive(name, o, func() string { return capture.Filter })
	if err != nil {
		return err
	}
	lc := &liveCapture{h: h, d: s.p.Demuxer(h.LinkType(), func(o *demuxer.Options) {
		if s.k.src != nil {
			o.Lookup = s.k.src.Request
			o.KernelCounters = s.k.destroy != nil
		}
		o.Interface, o.Capture = h.Name(), h.Totals
	}), done: make(chan struct{})}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		h.Close()
		return net.ErrClosed
	}
	s.active[name] = lc
	s.mu.Unlock()
	up := h.Up
	if s.follow {
		// An interface that is gone is no failure of the daemon's.
		up = func() bool { return h.Up() || !interfaceExists(name) }
	}
	s.checker.Add("capture "+name, up)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(lc.done)
		lc.d.Run(h, time.Now, func(err error) { lc.errors.Add(1); log.Printf("capture: %v", err) })
	}()
	return nil
}

func interfaceExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// list returns the active captures, by name.
func (s *captureSet) list() []*liveCapture {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*liveCapture, 0, len(s.active))
	for _, lc := range s.active {
		out = append(out, lc)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].h.Name() < out[j].h.Name() })
	return out
}

// stats returns the counts of every capture, the retired ones' summed.
func (s *captureSet) stats() []*demuxer.Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []*demuxer.Stats{s.retired}
	for _, lc := range s.active {
		out = append(out, lc.d.Stats())
	}
	return out
}

// closeAll closes every capture: their demuxers hand their flows to the
// saver and end (wg). No capture is added after it.
func (s *captureSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	all := make([]*liveCapture, 0, len(s.active))
	for _, lc := range s.active {
		all = append(all, lc)
	}
	s.mu.Unlock()
	for _, lc := range all {
		lc.h.Close()
	}
}

// sync takes this host's addresses as they are now (the connections to an
// address added are saved from its first packet), and, following the
// interfaces, captures those that appeared and retires the captures of
// interfaces gone for RetireAfter.
func (s *captureSet) sync(now time.Time) {
	defer s.updateAddrs()
	if !s.follow {
		return
	}
	ifaces, err := capture.Interfaces(nil)
	if err != nil {
		log.Printf("packet-headers: %v", err)
		return
	}
	if ifaces, err = usable(ifaces, false); err != nil {
		ifaces = nil // none left: those captured may be retiring
	}
	present := map[string]bool{}
	for _, ifc := range ifaces { // as at start: up, with an address neither loopback nor link-local
		present[ifc.Name] = true
		s.mu.Lock()
		lc, ok := s.active[ifc.Name]
		s.mu.Unlock()
		if ok {
			lc.goneFrom = time.Time{}
			continue
		}
		if err := s.add(ifc.Name); err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Printf("packet-headers: interface %s appeared, but cannot be captured: %v", ifc.Name, err)
			}
			continue
		}
		log.Printf("packet-headers: interface %s appeared: capturing on it", ifc.Name)
	}
	for _, lc := range s.list() {
		name := lc.h.Name()
		if present[name] || interfaceExists(name) {
			lc.goneFrom = time.Time{}
			continue
		}
		if lc.goneFrom.IsZero() {
			lc.goneFrom = now
			continue
		}
		if now.Sub(lc.goneFrom) >= RetireAfter {
			s.retire(lc)
		}
	}
}

// updateAddrs gives the selection this host's addresses, and those of the
// captured interfaces (the kernel source names only their sockets).
func (s *captureSet) updateAddrs() {
	if local, err := capture.LocalAddrs(); err == nil {
		s.p.Select.SetLocal(local)
	}
	var names []string
	for _, lc := range s.list() {
		names = append(names, lc.h.Name())
	}
	if ifaces, err := capture.Interfaces(names); err == nil && len(names) > 0 {
		var addrs []netip.Addr
		for _, ifc := range ifaces {
			addrs = append(addrs, ifc.Addrs...)
		}
		s.p.Select.SetCaptured(addrs)
	}
}

// retire closes a capture for good and keeps its counts.
func (s *captureSet) retire(lc *liveCapture) {
	name := lc.h.Name()
	lc.h.Close()
	s.checker.Remove("capture " + name)
	// Its demuxer hands its flows to the saver and publishes its last
	// counts as its Run ends on the closed capture; they are kept then,
	// and its place is free.
	<-lc.done
	s.mu.Lock()
	lc.d.Stats().AddTo(s.retired)
	delete(s.active, name)
	s.mu.Unlock()
	log.Printf("packet-headers: interface %s gone for %v: its capture is closed", name, RetireAfter)
}

// followInterfaces runs sync at each of the kernel's link and address
// notifications (within 200 ms of them), and every 10 seconds in any
// case, until ctx is done.
func (s *captureSet) followInterfaces(ctx context.Context) {
	events := make(chan struct{}, 1)
	if f, err := linkNotifications(); err != nil {
		log.Printf("packet-headers: no link notifications (%v): looking for new interfaces every 10 s", err)
	} else {
		var reader sync.WaitGroup // this function's own, waited for at its return
		defer reader.Wait()
		defer f.Close() // ends the Read
		reader.Add(1)
		go func() {
			defer reader.Done()
			buf := make([]byte, 64<<10)
			for {
				if _, err := f.Read(buf); errors.Is(err, os.ErrClosed) {
					return
				}
				select {
				case events <- struct{}{}:
				default:
				}
			}
		}()
	}
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-events:
			// Several notifications come together (a link, then its
			// addresses): wait for them to settle.
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
			select {
			case <-events:
			default:
			}
		case <-tick.C:
		}
		s.sync(time.Now())
	}
}

// linkNotifications subscribes to the kernel's link and address
// notifications (rtnetlink), on a file closing which ends a Read.
func linkNotifications() (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	sa := &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_LINK | unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "rtnetlink"), nil
}
