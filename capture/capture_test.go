package capture

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcap"
)

// TestFilter: libpcap compiles the filter, to the same program whatever
// the host's addresses (it names none), within the kernel's limit.
func TestFilter(t *testing.T) {
	insns, err := pcap.CompileBPFFilter(layers.LinkTypeEthernet, 256, Filter)
	if err != nil {
		t.Fatalf("libpcap rejects %q: %v", Filter, err)
	}
	if len(insns)+len(hostOnly) > 4096 {
		t.Errorf("%d instructions", len(insns))
	}
}

func TestInterfaces(t *testing.T) {
	if _, err := Interfaces([]string{"no-such-interface0"}); err == nil || !strings.Contains(err.Error(), "unknown interface") {
		t.Errorf("unknown interface: %v", err)
	}
	all, err := Interfaces(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ifc := range all {
		if ifc.Name == "lo" || len(ifc.Addrs) == 0 {
			t.Errorf("picked %+v: loopback or without address", ifc)
		}
		for _, a := range ifc.Addrs {
			if a.IsLoopback() || a.Zone() != "" {
				t.Errorf("address %v", a)
			}
		}
	}
	lo, err := Interfaces([]string{"lo"})
	if err != nil || len(lo) != 1 {
		t.Errorf("a named loopback interface must be accepted: %v %v", lo, err)
	}
}

// TestOpenLoopback captures on the loopback interface for real (root only).
func TestOpenLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("live capture needs root")
	}
	h, err := Open("lo", &Options{Filter: "tcp port 9"})
	if err != nil {
		t.Fatal(err)
	}
	if h.LinkType() != 1 {
		t.Errorf("loopback link type %d, want Ethernet (1)", h.LinkType())
	}
	if _, _, _, err := h.Read(); err != ErrTimeout {
		t.Errorf("Read with no traffic: %v, want ErrTimeout", err)
	}
	if _, err := h.Stats(); err != nil {
		t.Error(err)
	}
	h.Close()
	if _, _, _, err := h.Read(); err != ErrClosed {
		t.Errorf("Read after Close: %v", err)
	}
	if _, err := h.Stats(); err != ErrClosed {
		t.Errorf("Stats after Close: %v", err)
	}
	if _, err := Open("no-such-interface0", nil); err == nil {
		t.Error("Open of a missing interface succeeded")
	}
}

// sinkConn connects to ln, whose one connection is read to the end.
func sinkConn(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestReadLoopback reads real frames of a loopback TCP connection through
// each reader: native, with a batch delay (TPACKET_V3) and without
// (TPACKET_V2), and libpcap's, the fallback; and checks that Close wakes a
// waiting Read.
func TestReadLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("live capture needs root")
	}
	for _, delay := range []time.Duration{DefaultBatchDelay, 20 * time.Millisecond, 0} {
		t.Run(fmt.Sprintf("native/batchdelay=%v", delay), func(t *testing.T) {
			testRead(t, &Options{BatchDelay: delay}, "native")
		})
		t.Run(fmt.Sprintf("libpcap/batchdelay=%v", delay), func(t *testing.T) {
			testRead(t, &Options{BatchDelay: delay, libpcap: true}, "libpcap")
		})
	}
}

func (c *Handle) reader() string {
	if c.r != nil {
		return "native"
	}
	return "libpcap"
}

func testRead(t *testing.T, o *Options, reader string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	o.Filter, o.ReadTimeout = fmt.Sprintf("tcp port %d", port), 50*time.Millisecond
	h, err := Open("lo", o)
	if err != nil {
		t.Fatal(err)
	}
	if h.reader() != reader {
		t.Fatalf("reading through %s, want %s", h.reader(), reader)
	}
	start := time.Now()
	c := sinkConn(t, ln)
	payload := make([]byte, 300) // longer than the snaplen's share for it
	for i := 0; i < 20; i++ {
		c.Write(payload)
	}
	c.Close()
	frames, withPayload := 0, 0
	for deadline := time.Now().Add(5 * time.Second); frames < 25 && time.Now().Before(deadline); {
		data, ts, origLen, err := h.Read()
		if err == ErrTimeout {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		frames++
		if len(data) > 256 || origLen < len(data) || len(data) < 54 {
			t.Errorf("frame of %d bytes, %d on the wire", len(data), origLen)
		}
		if origLen > 300 {
			withPayload++
		}
		if ts.Before(start.Add(-time.Second)) || ts.After(time.Now().Add(time.Second)) {
			t.Errorf("timestamp %v, test started at %v", ts, start)
		}
	}
	if frames < 25 || withPayload == 0 {
		t.Errorf("read %d frames (%d with the payload), want the handshake, 20 writes and the close", frames, withPayload)
	}
	s, err := h.Stats()
	if err != nil || s.Received < uint64(frames) {
		t.Errorf("stats %+v, %v after %d frames", s, err, frames)
	}
	// Drain what is left, then Close from another goroutine while Read waits.
	for {
		if _, _, _, err := h.Read(); err != nil {
			break
		}
	}
	done := make(chan error)
	go func() {
		for {
			_, _, _, err := h.Read()
			if err != nil && err != ErrTimeout { // (a late frame of the connection may still come)
				done <- err
				return
			}
		}
	}()
	time.Sleep(20 * time.Millisecond)
	h.Close()
	select {
	case err := <-done:
		if err != ErrClosed {
			t.Errorf("Read after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read did not return after Close")
	}
}

// deadlineRecorder records the deadlines set on it.
type deadlineRecorder struct{ set []time.Time }

func (r *deadlineRecorder) SetReadDeadline(t time.Time) error {
	r.set = append(r.set, t)
	return nil
}

func TestDeadline(t *testing.T) {
	const idle = 100 * time.Millisecond
	d := deadline{idle: idle}
	var r deadlineRecorder
	// set calls d.set and checks that the n-th deadline was then set,
	// want ahead (0: none set).
	set := func(n int, want time.Duration) {
		t.Helper()
		before := time.Now()
		d.set(&r)
		after := time.Now()
		if len(r.set) != n {
			t.Fatalf("%d deadlines set, want %d", len(r.set), n)
		}
		if got := r.set[n-1]; want > 0 && (got.Before(before.Add(want)) || got.After(after.Add(want))) {
			t.Errorf("deadline %d is %v ahead, want %v", n, got.Sub(before), want)
		}
	}
	set(1, idle) // idle: ReadTimeout ahead, every wait
	d.woke(false)
	set(2, idle)
	d.woke(true) // frames: BusyTimeout ahead, moved only when half is gone
	set(3, BusyTimeout)
	d.woke(true)
	set(3, 0)
	d.at = time.Now().Add(BusyTimeout/2 - time.Millisecond)
	set(4, BusyTimeout)
	d.woke(false) // timed out: idle again
	set(5, idle)

	long := deadline{idle: 3 * BusyTimeout} // a read timeout longer than BusyTimeout stays
	long.woke(true)
	r.set = nil
	before := time.Now()
	long.set(&r)
	if len(r.set) != 1 || r.set[0].Before(before.Add(3*BusyTimeout)) {
		t.Errorf("busy deadline %v with a read timeout of %v", r.set, long.idle)
	}
}
