package capture

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestWithTag: a frame whose VLAN tag the kernel took out gets it back
// after the MAC addresses, with the TPID the kernel reports (802.1Q when it
// reports none).
func TestWithTag(t *testing.T) {
	r := &nativeReader{vlan: make([]byte, 64)}
	frame := []byte{1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00, 0x45, 0}
	want := []byte{1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x81, 0x00, 0x20, 0x64, 0x08, 0x00, 0x45, 0}
	if got := r.withTag(frame, 0x8100, 0x2064); !bytes.Equal(got, want) {
		t.Errorf("802.1Q: %x, want %x", got, want)
	}
	want[12], want[13] = 0x88, 0xa8
	if got := r.withTag(frame, 0x88a8, 0x2064); !bytes.Equal(got, want) {
		t.Errorf("802.1ad: %x, want %x", got, want)
	}
}

// readAll reads frames until none came for a while.
func readAll(t *testing.T, h *Handle) (frames [][]byte, stamps []time.Time) {
	t.Helper()
	for {
		data, ts, _, err := h.Read()
		if err == ErrTimeout {
			return frames, stamps
		}
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, bytes.Clone(data))
		stamps = append(stamps, ts)
	}
}

// rootListener skips the test unless it runs as root (live capture), and
// listens on a loopback port for the test's connections.
func rootListener(t *testing.T) (net.Listener, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("live capture needs root")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, ln.Addr().(*net.TCPAddr).Port
}

// TestNativeMatchesLibpcap captures one loopback connection with the native
// reader and with libpcap at once, with a batch delay (TPACKET_V3) and
// without (TPACKET_V2): both see the same frames, byte for byte (each
// loopback frame once, not its outgoing copy too), with timestamps a few
// microseconds apart at most (each socket reads the clock itself).
func TestNativeMatchesLibpcap(t *testing.T) {
	for _, delay := range []time.Duration{DefaultBatchDelay, 0} {
		t.Run(fmt.Sprintf("batchdelay=%v", delay), func(t *testing.T) { testMatchesLibpcap(t, delay) })
	}
}

func testMatchesLibpcap(t *testing.T, delay time.Duration) {
	ln, port := rootListener(t)
	o := &Options{Filter: fmt.Sprintf("tcp port %d", port), ReadTimeout: 300 * time.Millisecond, BatchDelay: delay}
	native, err := Open("lo", o)
	if err != nil {
		t.Fatal(err)
	}
	defer native.Close()
	o.libpcap = true
	lib, err := Open("lo", o)
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	if native.reader() != "native" || native.r.v2 != (delay == 0) || lib.reader() != "libpcap" {
		t.Fatalf("readers %s (V2 %v) and %s, want native and libpcap", native.reader(), native.r.v2, lib.reader())
	}
	c := sinkConn(t, ln)
	for i := 0; i < 50; i++ {
		c.Write(bytes.Repeat([]byte{byte(i)}, 100+i*40)) // past the snaplen from the fourth on
		time.Sleep(time.Millisecond)
	}
	c.Close()
	time.Sleep(100 * time.Millisecond)
	got, gotTS := readAll(t, native)
	want, wantTS := readAll(t, lib)
	if len(want) < 100 {
		t.Fatalf("libpcap saw %d frames, want at least the 50 writes and their ACKs", len(want))
	}
	if len(got) != len(want) {
		t.Fatalf("native read %d frames, libpcap %d", len(got), len(want))
	}
	for i := range want {
		if d := gotTS[i].Sub(wantTS[i]); !bytes.Equal(got[i], want[i]) || d > time.Millisecond || d < -time.Millisecond {
			t.Fatalf("frame %d: native %x at %v, libpcap %x at %v", i, got[i], gotTS[i], want[i], wantTS[i])
		}
	}
}

// TestNativeDrops: with the smallest ring (two blocks) and a reader that
// does not read, the kernel drops frames and Stats says so; reading then
// goes on with the frames that fitted, and later ones. In both ring
// versions.
func TestNativeDrops(t *testing.T) {
	for _, delay := range []time.Duration{time.Millisecond, 0} {
		t.Run(fmt.Sprintf("batchdelay=%v", delay), func(t *testing.T) { testDrops(t, delay) })
	}
}

func testDrops(t *testing.T, delay time.Duration) {
	ln, port := rootListener(t)
	h, err := Open("lo", &Options{Filter: fmt.Sprintf("tcp port %d", port),
		ReadTimeout: 300 * time.Millisecond, BatchDelay: delay, BufferSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.reader() != "native" || h.r.slots*h.r.slotSize != 2*nativeBlockSize {
		t.Fatalf("reader %s, want native with two blocks", h.reader())
	}
	// Thousands of frames, more than two 256 KiB blocks hold in frames of
	// either kind: connections, each at least a handshake and two FINs
	// (small writes on one connection may be coalesced into a few frames).
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for i := 0; i < 1500; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	c := sinkConn(t, ln)
	time.Sleep(100 * time.Millisecond)
	s, err := h.Stats()
	if err != nil || s.Dropped == 0 || s.Received <= s.Dropped {
		t.Fatalf("stats %+v, %v: want drops, counted among the frames received", s, err)
	}
	frames, _ := readAll(t, h)
	if len(frames) == 0 || uint64(len(frames)) > s.Received-s.Dropped {
		t.Errorf("read %d frames after %d received and %d dropped", len(frames), s.Received, s.Dropped)
	}
	c.Write([]byte{2}) // capture goes on
	time.Sleep(50 * time.Millisecond)
	if more, _ := readAll(t, h); len(more) == 0 {
		t.Error("no frame read after the drops")
	}
	if s2, err := h.Stats(); err != nil || s2.Dropped < s.Dropped || s2.Received < s.Received {
		t.Errorf("stats went from %+v to %+v (%v): they must add up", s, s2, err)
	}
}

// fakeNative returns a native reader over two blocks laid out as the kernel
// writes them, each holding n copies of frame.
func fakeNative(frame []byte, n int) *nativeReader {
	r := &nativeReader{ring: make([]byte, 2*nativeBlockSize), slots: 2, slotSize: nativeBlockSize, m: &mapping{}, vlan: make([]byte, 300)}
	const first = 48 // after the block descriptor
	step := (sllOffsetV3 + 20 + len(frame) + 15) &^ 15
	for b := 0; b < 2; b++ {
		base := b * nativeBlockSize
		d := r.desc(b)
		d.Num_pkts, d.Offset_to_first_pkt, d.Block_status = uint32(n), first, unix.TP_STATUS_USER
		for i := 0; i < n; i++ {
			off := first + i*step
			h := (*unix.Tpacket3Hdr)(unsafe.Pointer(&r.ring[base+off]))
			h.Next_offset, h.Sec, h.Nsec = uint32(step), uint32(1700000000+i), uint32(i)
			h.Snaplen, h.Len, h.Mac = uint32(len(frame)), uint32(len(frame)+1000), uint16(sllOffsetV3+20)
			copy(r.ring[base+off+int(h.Mac):], frame)
		}
	}
	return r
}

// TestNativeLayout reads frames from blocks laid out as the kernel does,
// and gives each block back once its frames are read.
func TestNativeLayout(t *testing.T) {
	frame := bytes.Repeat([]byte{7}, 66)
	r := fakeNative(frame, 3)
	for i := 0; i < 6; i++ {
		data, ts, origLen, err := r.read()
		if err != nil || !bytes.Equal(data, frame) || origLen != 1066 || ts.Nanosecond() != i%3 {
			t.Fatalf("frame %d: %x, %v, %d, %v", i, data, ts, origLen, err)
		}
		if got := r.desc(0).Block_status; (i < 3) != (got == unix.TP_STATUS_USER) {
			t.Errorf("after frame %d, block 0's status is %d", i, got)
		}
	}
}

// fakeNativeV2 returns a native reader over a ring of n frames laid out as
// the kernel writes them (TPACKET_V2), each holding frame.
func fakeNativeV2(frame []byte, n int) *nativeReader {
	size := frameSizeV2(256)
	r := &nativeReader{ring: make([]byte, n*size), v2: true, slots: n, slotSize: size, m: &mapping{}, vlan: make([]byte, 300)}
	for i := 0; i < n; i++ {
		h := r.frameV2(i)
		h.Status, h.Sec, h.Nsec = unix.TP_STATUS_USER, uint32(1700000000+i), uint32(i)
		h.Snaplen, h.Len, h.Mac = uint32(len(frame)), uint32(len(frame)+1000), 66
		copy(r.ring[i*size+66:], frame)
	}
	return r
}

// TestNativeLayoutV2 reads frames from a TPACKET_V2 ring laid out as the
// kernel does, gives each frame back once the next is read, and puts back
// a VLAN tag the kernel took out.
func TestNativeLayoutV2(t *testing.T) {
	frame := bytes.Repeat([]byte{7}, 66)
	r := fakeNativeV2(frame, 4)
	r.frameV2(3).Status |= unix.TP_STATUS_VLAN_VALID
	r.frameV2(3).Vlan_tci = 0x2064
	for i := 0; i < 4; i++ {
		data, ts, origLen, err := r.read()
		want, wantLen := frame, 1066
		if i == 3 {
			want, wantLen = append(append(bytes.Clone(frame[:12]), 0x81, 0, 0x20, 0x64), frame[12:]...), 1070
		}
		if err != nil || !bytes.Equal(data, want) || origLen != wantLen || ts.Nanosecond() != i {
			t.Fatalf("frame %d: %x, %v, %d, %v", i, data, ts, origLen, err)
		}
		for j := 0; j < 4; j++ {
			if got := r.frameV2(j).Status & unix.TP_STATUS_USER; (j >= i) != (got != 0) {
				t.Errorf("reading frame %d, frame %d's status is %d", i, j, r.frameV2(j).Status)
			}
		}
	}
}

// BenchmarkNativeRead measures taking a frame from the kernel's ring, in
// blocks (V3) and in frames (V2).
func BenchmarkNativeRead(b *testing.B) {
	frame := make([]byte, 66)
	b.Run("v3", func(b *testing.B) {
		r := fakeNative(frame, 1000)
		b.ReportAllocs()
		for b.Loop() {
			if _, _, _, err := r.read(); err != nil {
				b.Fatal(err)
			}
			if r.left == 0 { // play the kernel: hand the other block over again
				r.desc(1 - r.cur).Block_status = unix.TP_STATUS_USER
			}
		}
	})
	b.Run("v2", func(b *testing.B) {
		r := fakeNativeV2(frame, 1000)
		b.ReportAllocs()
		for b.Loop() {
			if _, _, _, err := r.read(); err != nil {
				b.Fatal(err)
			}
			// play the kernel: hand the frame given back over again
			r.frameV2((r.cur + r.slots - 1) % r.slots).Status = unix.TP_STATUS_USER
		}
	})
}

// TestNativeInterfaceGone: a capture whose interface is deleted fails (to be
// opened again), whether the interface was deleted at once or went down
// first (the socket then hears only of the down); one that is only down
// times out until it is up again.
func TestNativeInterfaceGone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, downFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("down first: %v", downFirst), func(t *testing.T) {
			name := fmt.Sprintf("phgone%d", os.Getpid()%10000)
			ip := func(args ...string) {
				if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
					t.Fatalf("ip %v: %v\n%s", args, err, out)
				}
			}
			ip("link", "add", name, "type", "veth", "peer", "name", name+"p") // (no dummy module in some kernels)
			t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() })
			ip("link", "set", name, "up")
			ip("link", "set", name+"p", "up")
			h, err := Open(name, &Options{Filter: "tcp", ReadTimeout: 50 * time.Millisecond, BatchDelay: DefaultBatchDelay})
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			if h.reader() != "native" {
				t.Fatalf("reader %s", h.reader())
			}
			if downFirst {
				ip("link", "set", name, "down")
				for i := 0; i < 3; i++ { // down only: read timeouts
					if _, _, _, err := h.Read(); err != ErrTimeout {
						t.Fatalf("read while down: %v, want ErrTimeout", err)
					}
				}
				if !h.r.down {
					t.Error("the reader did not hear that the interface went down")
				}
			}
			ip("link", "del", name)
			deadline := time.Now().Add(2 * time.Second)
			for {
				_, _, _, err := h.Read()
				if errors.Is(err, ErrFailed) {
					break
				}
				if err != ErrTimeout || time.Now().After(deadline) {
					t.Fatalf("read after the interface was deleted: %v, want ErrFailed", err)
				}
			}
		})
	}
}

// TestHostOnly sends two TCP frames into a veth in promiscuous mode, one
// to its own MAC address and one to another host's: with HostOnly the
// kernel drops the other host's, without it both are read.
func TestHostOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a veth and a raw socket")
	}
	name := fmt.Sprintf("phho%d", os.Getpid()%100000)
	ip := func(args ...string) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ip("link", "add", name, "type", "veth", "peer", "name", name+"p")
	t.Cleanup(func() { exec.Command("ip", "link", "del", name).Run() })
	ip("link", "set", name, "up", "promisc", "on")
	ip("link", "set", name+"p", "up")
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := net.InterfaceByName(name + "p")
	if err != nil {
		t.Fatal(err)
	}
	// A TCP SYN from 192.0.2.7:1234 to 192.0.2.1:80, to dst.
	frame := func(dst net.HardwareAddr) []byte {
		b := make([]byte, 14+20+20)
		copy(b[0:], dst)
		copy(b[6:], peer.HardwareAddr)
		b[12], b[13] = 0x08, 0x00
		ipv4 := b[14:]
		ipv4[0], ipv4[3], ipv4[8], ipv4[9] = 0x45, 40, 64, 6
		copy(ipv4[12:], []byte{192, 0, 2, 7})
		copy(ipv4[16:], []byte{192, 0, 2, 1})
		tcp := ipv4[20:]
		tcp[0], tcp[1], tcp[2], tcp[3], tcp[12], tcp[13] = 0x04, 0xd2, 0, 80, 0x50, 0x02
		return b
	}
	send, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(send)
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	for _, hostOnly := range []bool{true, false} {
		h, err := Open(name, &Options{Filter: Filter, HostOnly: hostOnly, ReadTimeout: 50 * time.Millisecond, BatchDelay: 0})
		if err != nil {
			t.Fatal(err)
		}
		for _, dst := range []net.HardwareAddr{other, ifc.HardwareAddr} {
			if err := unix.Sendto(send, frame(dst), 0, &unix.SockaddrLinklayer{Ifindex: peer.Index, Halen: 6}); err != nil {
				t.Fatal(err)
			}
		}
		var got []string
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) && len(got) < 2 {
			data, _, _, err := h.Read()
			if err == nil && len(data) >= 30 && data[12] == 0x08 && data[13] == 0 && data[29] == 7 { // ours (IPv6 multicast listener reports come too)
				got = append(got, net.HardwareAddr(data[:6]).String())
			}
		}
		h.Close()
		want := []string{other.String(), ifc.HardwareAddr.String()}
		if hostOnly {
			want = want[1:]
		}
		if !slices.Equal(got, want) {
			t.Errorf("HostOnly=%v: read frames to %v, want %v", hostOnly, got, want)
		}
	}
}
