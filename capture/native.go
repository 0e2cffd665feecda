package capture

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcap"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/packet"
)

// nativeBlockSize is the size of a block of the kernel's ring: as libpcap
// makes them, a few hundred small frames.
const nativeBlockSize = 256 << 10

// Where a frame's sockaddr_ll begins, after its header
// (TPACKET_ALIGN(sizeof(struct tpacket3_hdr)) or that of tpacket2_hdr); its
// packet type is 10 bytes in.
const (
	sllOffsetV3 = 48
	sllOffsetV2 = 32
)

// nativeReader reads a capture straight from the ring of an AF_PACKET
// socket of its own, which the kernel fills in memory it shares with the
// process. There is no copy, no thread and no cgo or system call while
// frames flow: the reader walks the frames in place, gives them back, and
// waits in Go's network poller on the socket itself, which the kernel makes
// readable when it hands frames over. With a batch delay the ring is
// TPACKET_V3: the kernel hands a block of frames over when it is full or
// BatchDelay old, one wake-up for many frames. Without (immediate
// delivery) it is TPACKET_V2, frames of fixed size handed over one by one,
// as libpcap does in immediate mode.
//
// libpcap still compiles the filter (pcap_compile, through gopacket);
// Open falls back to libpcap's own capture when the interface is not an
// Ethernet or loopback one. Like libpcap, the reader puts back VLAN tags
// the kernel took out, and drops the outgoing copy of each loopback frame
// (the incoming one follows). TestNativeMatchesLibpcap holds it to
// libpcap's frames, byte for byte, in both modes.
type nativeReader struct {
	fd       int
	file     *os.File // the socket, in Go's poller
	rc       syscall.RawConn
	m        *mapping
	ring     []byte
	v2       bool // a ring of frames (immediate delivery), not of blocks
	slots    int  // blocks (V3) or frames (V2) in the ring
	slotSize int
	cur      int  // the slot being read, or waited for
	owned    bool // the kernel handed cur over: its frames are being read
	left     int  // frames of cur not read yet
	off      int  // offset in cur of the next frame (V3)
	loopback bool
	ifindex  int
	ifname   string
	deadline deadline
	vlan     []byte        // a frame with its VLAN tag put back
	down     bool          // the socket said the interface went down: is it gone?
	retire   time.Duration // how soon the kernel hands over a block that holds frames (V3)
	failure  error         // the capture failed: the frames left in the ring are read, then it is returned
	closed   atomic.Bool
	totals   Stats // accumulated (the kernel's counters reset when read); guarded by Handle.mu
}

// mapping is the ring's memory, unmapped once, by the reader once it knows
// of Close, or by a cleanup once the reader is unreachable (a handle
// closed by the goroutine that read it is not read again).
type mapping struct {
	once sync.Once
	mem  []byte
}

func (m *mapping) release() { m.once.Do(func() { unix.Munmap(m.mem) }) }

// frameSizeV2 is the size of a TPACKET_V2 frame for snaplen bytes: the
// header, the sockaddr_ll and the kernel's alignment of the network header
// take 80 bytes before an Ethernet frame's IP header; a power of two, so
// that frames tile the blocks.
func frameSizeV2(snaplen int) int {
	size := 128
	for size < snaplen+128 {
		size <<= 1
	}
	return size
}

// hostOnly is the classic BPF prologue of Options.HostOnly: it loads the
// frame's packet type (the kernel's ancillary data, SKF_AD_OFF +
// SKF_AD_PKTTYPE) and drops PACKET_OTHERHOST frames; the program that
// follows starts afresh, its jumps relative to itself (TestHostOnly).
var hostOnly = [3]unix.SockFilter{
	{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0xfffff000 + 4},
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.PACKET_OTHERHOST},
	{Code: unix.BPF_RET | unix.BPF_K, K: 0},
}

// openNative opens a native capture on iface, or says why it cannot.
func openNative(iface string, o Options) (*nativeReader, error) {
	ifc, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, err
	}
	insns, err := pcap.CompileBPFFilter(layers.LinkTypeEthernet, o.Snaplen, o.Filter)
	if err != nil {
		return nil, fmt.Errorf("filter %q: %w", o.Filter, err)
	}
	// No protocol yet: the socket takes frames only once bound, filtered.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	var ring []byte
	fail := func(what string, err error) (*nativeReader, error) {
		if ring != nil {
			unix.Munmap(ring)
		}
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	var prog []unix.SockFilter
	if o.HostOnly {
		prog = append(prog, hostOnly[:]...)
	}
	for _, in := range insns {
		prog = append(prog, unix.SockFilter{Code: in.Code, Jt: in.Jt, Jf: in.Jf, K: in.K})
	}
	if len(prog) == 0 {
		return fail("filter", errors.New("empty program"))
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}); err != nil {
		return fail("attach filter", err)
	}
	r := &nativeReader{fd: fd, v2: o.BatchDelay == 0, ifindex: ifc.Index, ifname: iface, retire: max(o.BatchDelay.Truncate(time.Millisecond), time.Millisecond),
		deadline: deadline{idle: o.ReadTimeout}, vlan: make([]byte, o.Snaplen+4)}
	blockSize := nativeBlockSize
	if r.v2 {
		r.slotSize = frameSizeV2(o.Snaplen)
		blockSize = max(blockSize, r.slotSize)
		blocks := max(o.BufferSize/blockSize, 2)
		r.slots = blocks * blockSize / r.slotSize
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VERSION, unix.TPACKET_V2); err != nil {
			return fail("TPACKET_V2", err)
		}
		req := unix.TpacketReq{Block_size: uint32(blockSize), Block_nr: uint32(blocks), Frame_size: uint32(r.slotSize), Frame_nr: uint32(r.slots)}
		if err := unix.SetsockoptTpacketReq(fd, unix.SOL_PACKET, unix.PACKET_RX_RING, &req); err != nil {
			return fail("ring", err)
		}
	} else {
		r.slotSize, r.slots = blockSize, max(o.BufferSize/blockSize, 2)
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VERSION, unix.TPACKET_V3); err != nil {
			return fail("TPACKET_V3", err)
		}
		req := unix.TpacketReq3{Block_size: uint32(blockSize), Block_nr: uint32(r.slots), Frame_size: uint32(blockSize), Frame_nr: uint32(r.slots),
			Retire_blk_tov: uint32(max(o.BatchDelay.Milliseconds(), 1))}
		if err := unix.SetsockoptTpacketReq3(fd, unix.SOL_PACKET, unix.PACKET_RX_RING, &req); err != nil {
			return fail("ring", err)
		}
	}
	if ring, err = unix.Mmap(fd, 0, r.slots*r.slotSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return fail("mmap", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
		return fail("bind", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fail("getsockname", err)
	}
	ll, ok := sa.(*unix.SockaddrLinklayer)
	if !ok || ll.Hatype != unix.ARPHRD_ETHER && ll.Hatype != unix.ARPHRD_LOOPBACK {
		return fail("link", fmt.Errorf("%s is not an Ethernet or loopback interface", iface))
	}
	file, rc, err := pollable(fd, "packet-"+iface)
	if err != nil {
		unix.Munmap(ring)
		return nil, err
	}
	r.file, r.rc, r.m, r.ring, r.loopback = file, rc, &mapping{mem: ring}, ring, ll.Hatype == unix.ARPHRD_LOOPBACK
	runtime.AddCleanup(r, (*mapping).release, r.m)
	return r, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// pollable puts the non-blocking descriptor fd into Go's network poller,
// or closes it.
func pollable(fd int, name string) (*os.File, syscall.RawConn, error) {
	file := os.NewFile(uintptr(fd), name)
	if err := file.SetReadDeadline(time.Time{}); err != nil { // the poller did not take it
		file.Close()
		return nil, nil, fmt.Errorf("%s not pollable: %w", name, err)
	}
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, nil, err
	}
	return file, rc, nil
}

// desc returns the header of block i (V3).
func (r *nativeReader) desc(i int) *unix.TpacketHdrV1 {
	// struct tpacket_block_desc: version, offset_to_priv, then the header.
	return (*unix.TpacketHdrV1)(unsafe.Pointer(&r.ring[i*r.slotSize+8]))
}

// frameV2 returns the header of frame i (V2).
func (r *nativeReader) frameV2(i int) *unix.Tpacket2Hdr {
	return (*unix.Tpacket2Hdr)(unsafe.Pointer(&r.ring[i*r.slotSize]))
}

// status returns the status word of slot i, which the kernel and the
// reader hand each other.
func (r *nativeReader) status(i int) *uint32 {
	if r.v2 {
		return &r.frameV2(i).Status
	}
	return &r.desc(i).Block_status
}

// ready reports whether the kernel handed the current slot over.
func (r *nativeReader) ready() bool {
	return atomic.LoadUint32(r.status(r.cur))&unix.TP_STATUS_USER != 0
}

// read returns the next frame; see Handle.Read. The frame's bytes stay in
// the ring until the next read, which gives its slot back when it is done.
// (BenchmarkNativeRead: no allocation.)
func (r *nativeReader) read() ([]byte, time.Time, int, error) {
	for {
		if r.closed.Load() {
			r.m.release()
			return nil, time.Time{}, 0, ErrClosed
		}
		if r.left > 0 {
			data, ts, origLen, ok := r.next()
			if ok {
				return data, ts, origLen, nil
			}
			continue
		}
		if r.owned { // every frame of the slot was read: give it back
			atomic.StoreUint32(r.status(r.cur), unix.TP_STATUS_KERNEL)
			r.cur = (r.cur + 1) % r.slots
			r.owned = false
		}
		if r.ready() {
			r.owned, r.left = true, 1
			if !r.v2 {
				d := r.desc(r.cur)
				r.left, r.off = int(d.Num_pkts), int(d.Offset_to_first_pkt)
			}
			continue
		}
		if r.failure != nil {
			return nil, time.Time{}, 0, r.failure
		}
		if err := r.wait(); err != nil {
			if errors.Is(err, ErrClosed) {
				r.m.release()
			}
			if errors.Is(err, ErrFailed) && !r.v2 {
				// The interface is gone, but the frames it captured last
				// are in the ring's open block, which the kernel's timer
				// still hands over (within two of its periods): they are
				// read before the failure is returned (TestInterfaceFaults
				// in e2e).
				r.failure = err
				time.Sleep(2*r.retire + time.Millisecond)
				continue
			}
			return nil, time.Time{}, 0, err
		}
	}
}

// next takes the next frame of the current slot; ok is false for a frame
// to skip.
func (r *nativeReader) next() (data []byte, ts time.Time, origLen int, ok bool) {
	base := r.cur * r.slotSize
	var start, end, sll int
	var status uint32
	var tpid, tci uint16
	r.left--
	if r.v2 {
		h := r.frameV2(r.cur)
		start, end, sll = int(h.Mac), int(h.Mac)+int(h.Snaplen), sllOffsetV2
		ts, origLen, status, tpid, tci = time.Unix(int64(h.Sec), int64(h.Nsec)), int(h.Len), h.Status, h.Vlan_tpid, h.Vlan_tci
	} else {
		h := (*unix.Tpacket3Hdr)(unsafe.Pointer(&r.ring[base+r.off]))
		frame := r.off
		r.off += int(h.Next_offset)
		start, end, sll = frame+int(h.Mac), frame+int(h.Mac)+int(h.Snaplen), frame+sllOffsetV3
		ts, origLen, status, tpid, tci = time.Unix(int64(h.Sec), int64(h.Nsec)), int(h.Len), h.Status, h.Hv1.Vlan_tpid, uint16(h.Hv1.Vlan_tci)
	}
	if end > r.slotSize || sll+11 > r.slotSize {
		r.left = 0 // not a slot the kernel wrote: skip it
		return nil, ts, 0, false
	}
	if r.loopback && r.ring[base+sll+10] == unix.PACKET_OUTGOING {
		return nil, ts, 0, false // its incoming copy follows
	}
	data = r.ring[base+start : base+end : base+end]
	if status&unix.TP_STATUS_VLAN_VALID != 0 && len(data) >= 12 {
		if status&unix.TP_STATUS_VLAN_TPID_VALID == 0 {
			tpid = 0x8100
		}
		data, origLen = r.withTag(data, tpid, tci), origLen+4
	}
	return data, ts, origLen, true
}

// withTag returns the frame with the VLAN tag the kernel took out of it put
// back after the MAC addresses, as libpcap does.
func (r *nativeReader) withTag(data []byte, tpid, tci uint16) []byte {
	if len(data)+4 > len(r.vlan) { // (the filter truncates to the snaplen: never)
		r.vlan = make([]byte, len(data)+4)
	}
	out := r.vlan[:len(data)+4]
	copy(out, data[:12])
	out[12], out[13] = byte(tpid>>8), byte(tpid)
	out[14], out[15] = byte(tci>>8), byte(tci)
	copy(out[16:], data[12:])
	return out
}

// wait sleeps in Go's poller until the kernel hands a slot over, the
// socket reports an error, or the read deadline (see deadline) passes.
func (r *nativeReader) wait() error {
	if err := r.deadline.set(r.file); err != nil {
		return ErrClosed
	}
	woken := false
	var failed error
	err := r.rc.Read(func(fd uintptr) bool {
		if r.ready() {
			return true
		}
		if woken { // readable without a slot: the socket has an error
			if failed = r.sockErr(int(fd)); failed != nil {
				return true
			}
		}
		woken = true
		return false
	})
	r.deadline.woke(err == nil && failed == nil)
	switch {
	case failed != nil:
		return failed
	case errors.Is(err, os.ErrDeadlineExceeded):
		// Go's poller forgets readiness that came before this wait: an
		// error reported then is read now. And an interface deleted after
		// it went down leaves no word in the socket. (Control: the socket
		// may be closed meanwhile, and its number reused.)
		if err := r.rc.Control(func(fd uintptr) { failed = r.sockErr(int(fd)) }); err != nil {
			return ErrClosed
		}
		if failed != nil {
			return failed
		}
		if r.down {
			if err := r.gone(); err != nil {
				return err
			}
		}
		return ErrTimeout
	case err != nil:
		return ErrClosed
	}
	return nil
}

// gone fails the capture if its interface no longer exists, and stops
// asking once it is up again.
func (r *nativeReader) gone() error {
	ifc, err := net.InterfaceByIndex(r.ifindex)
	if err != nil || ifc.Name != r.ifname {
		return fmt.Errorf("%w: interface %s is gone", ErrFailed, r.ifname)
	}
	r.down = ifc.Flags&net.FlagUp == 0
	return nil
}

// sockErr reads (and clears) the socket's error. The kernel reports an
// interface that went down as ENETDOWN, and says nothing more if it is then
// deleted: one that is only down is waited out (capture resumes when it is
// up), one that is gone, now or at a later read timeout, fails the capture,
// to be opened again.
func (r *nativeReader) sockErr(fd int) error {
	e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	switch {
	case err != nil:
		return fmt.Errorf("%w: %v", ErrFailed, err)
	case e == 0:
		return nil
	case e == int(unix.ENETDOWN):
		r.down = true
		return r.gone()
	}
	return fmt.Errorf("%w: %v", ErrFailed, unix.Errno(e))
}

// stats adds the kernel's counters since the last call to the totals.
// Handle.mu serializes it with close.
func (r *nativeReader) stats() (Stats, error) {
	var packets, drops uint32
	if r.v2 {
		s, err := unix.GetsockoptTpacketStats(r.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
		if err != nil {
			return Stats{}, err
		}
		packets, drops = s.Packets, s.Drops
	} else {
		s, err := unix.GetsockoptTpacketStatsV3(r.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
		if err != nil {
			return Stats{}, err
		}
		packets, drops = s.Packets, s.Drops
	}
	r.totals.Received += uint64(packets)
	r.totals.Dropped += uint64(drops)
	return r.totals, nil
}

// close closes the socket; a waiting read returns ErrClosed, and the ring
// is unmapped by the reader's next read (or by the cleanup).
func (r *nativeReader) close() {
	r.closed.Store(true)
	r.file.Close()
}

// linkTypeNative is the link type of every native capture.
const linkTypeNative = packet.LinkTypeEthernet
