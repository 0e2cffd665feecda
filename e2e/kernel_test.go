package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestKernelUUIDs runs two daemons side by side: one without tcp-info,
// naming every flow from the kernel's socket cookies, and one with tcp-info's
// eventsocket and the kernel source for what tcp-info misses. tcp-info and
// both daemons share one UUID prefix file. 520 short flows (closed by the
// client, closed by the server, reset by either side; half of them too short
// for tcp-info's 10 ms polls) and four long ones, over IPv4 and IPv6, must
// each get exactly one file in both runs, with the reference capture's
// packets, and every UUID tcp-info announced must name the same connection's
// file in both.
func TestKernelUUIDs(t *testing.T) {
	l := newLab(t, 2)
	prefix := filepath.Join(l.dir, "uuid-prefix")
	os.WriteFile(prefix, []byte("e2ehost_1764000000"), 0o644)
	l.startTCPInfo("tcp-info.log", prefix)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	refFile, tcpdump := l.startReference()

	daemons := []*daemon{
		{name: "kernel", args: nil, capDur: 30 * time.Second},
		{name: "both", args: []string{"-tcpinfo.eventsocket", l.tcpinfoSock}, capDur: 30 * time.Second},
	}
	for i, d := range daemons {
		l.startDaemon(d, 9990+i, append([]string{"-uuid-prefix-file", prefix, "-interface", l.nsIf}, d.args...)...)
	}
	captureStart := time.Now()

	l.server(8082)
	kindTraffic(t, l, 8082)
	time.Sleep(2500 * time.Millisecond)
	metricsText := stopAll(t, l, daemons, tcpdump)
	cancel()

	ref := readReference(t, refFile)
	expected := 0
	for _, conns := range ref {
		for _, c := range conns {
			if c.handshake && !c.pkts[0].ts.Before(captureStart) {
				expected++
			}
		}
	}
	if expected < 520 {
		t.Fatalf("only %d handshakes in the reference capture; the lab did not work", expected)
	}
	fileConn := map[string]map[string]*refConn{} // daemon -> uuid -> connection
	for _, d := range daemons {
		fileConn[d.name] = checkCoverage(t, l, d, ref, captureStart, expected)
	}
	for _, name := range []string{"kernel", "both"} {
		if v, _ := metricValue(metricsText[name], `pcap_uuids_total{source="kernel"}`); v == 0 {
			t.Errorf("%s daemon: no flow named from kernel cookies", name)
		}
	}
	for _, d := range daemons {
		var lines []string
		for _, line := range strings.Split(metricsText[d.name], "\n") {
			if strings.HasPrefix(line, "pcap_uuids_total") || strings.HasPrefix(line, "pcap_kernel_uuid") || strings.HasPrefix(line, "pcap_kernel_destroy") {
				lines = append(lines, line)
			}
		}
		t.Logf("%s daemon's naming metrics:\n%s", d.name, strings.Join(lines, "\n"))
	}

	events.mu.Lock()
	defer events.mu.Unlock()
	same := 0
	for u, e := range events.opens {
		local := netip.AddrPortFrom(netip.MustParseAddr(e.ID.SrcIP).Unmap(), e.ID.SPort)
		remote := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort)
		c := connAt(ref[keyOf(local, remote)], e.Timestamp)
		if remote.Addr().IsUnspecified() || c == nil || c.pkts[0].ts.Before(captureStart) {
			continue
		}
		k, b := fileConn["kernel"][u], fileConn["both"][u]
		if k == nil && b == c && c.serverReset {
			continue // reset by the server before the kernel run's look-up (see checkCoverage)
		}
		if k == nil || b == nil || k != c || b != c {
			t.Errorf("tcp-info's %s (%v -> %v): kernel run's file is of %v, both run's of %v", u, local, remote, connName(k), connName(b))
			continue
		}
		same++
	}
	t.Logf("%d UUIDs announced by tcp-info name the same connection's file in both runs", same)
	if same == 0 {
		t.Error("no UUID of tcp-info's compared")
	}
}

func connName(c *refConn) string {
	if c == nil {
		return "no file"
	}
	return fmt.Sprintf("%v-%v (SYN seq %d)", c.key.a, c.key.b, c.synSeq)
}

// checkCoverage checks that every connection that completed a handshake
// after captureStart has exactly one file, that every file is the reference
// connection's packets, and returns each file's connection by UUID.
func checkCoverage(t *testing.T, l *lab, d *daemon, ref map[flowKey][]*refConn, captureStart time.Time, expected int) map[string]*refConn {
	byUUID := map[string]*refConn{}
	count := map[*refConn]int{}
	bad := 0
	var tm timing
	for u, path := range daemonFiles(t, d) {
		recs, _ := readPcap(t, path)
		if len(recs) == 0 {
			t.Errorf("%s: %s is empty", d.name, u)
			continue
		}
		p, ok := decode(t, recs[0])
		if !ok {
			t.Errorf("%s: %s: first packet is not TCP", d.name, u)
			continue
		}
		c := connAt(ref[p.key], recs[0].ts)
		if c == nil {
			t.Errorf("%s: %s is of no connection in the reference capture", d.name, u)
			continue
		}
		byUUID[u] = c
		count[c]++
		if c.pkts[0].ts.Before(captureStart) {
			continue
		}
		if _, msg := checkFile(t, l, d, path, c, &tm); msg != "" && bad < 10 {
			bad++
			t.Errorf("%s: %s (%s): %s", d.name, u, connName(c), msg)
		}
	}
	tm.check(t, d.name+" daemon")
	covered, missing, resets, resetsMissed := 0, 0, 0, 0
	for _, conns := range ref {
		for _, c := range conns {
			if !c.handshake || c.pkts[0].ts.Before(captureStart) {
				continue
			}
			if c.serverReset {
				resets++
			}
			switch n := count[c]; {
			case n == 1:
				covered++
			case n == 0 && c.serverReset:
				resetsMissed++ // see below
			case n == 0:
				if missing++; missing <= 10 {
					t.Errorf("%s: no file for %s (%d packets)", d.name, connName(c), len(c.pkts))
				}
			default:
				t.Errorf("%s: %d files for %s", d.name, n, connName(c))
			}
		}
	}
	t.Logf("%s daemon: %d of %d handshaken connections have exactly one file (%.1f%%); %d files in all; %d of %d connections reset by the server application missed",
		d.name, covered, expected, 100*float64(covered)/float64(expected), len(byUUID), resetsMissed, resets)
	// A connection that the server application resets (SO_LINGER 0) can
	// only be named by a look-up made before the reset: its destroy
	// broadcast has lost the remote port. In this lab half of them are
	// reset a millisecond or two after the handshake, on a machine loaded
	// by four captures, so some are missed (measured: 1 to 25 of 130); more
	// than half missed means look-ups are broken. Every other connection
	// must be named.
	if resetsMissed*2 > resets {
		t.Errorf("%s: %d of %d connections reset by the server missed (more than half)", d.name, resetsMissed, resets)
	}
	return byUUID
}

// kindTraffic makes 520 short connections of four kinds and four long ones.
func kindTraffic(t *testing.T, l *lab, port int) {
	var wg sync.WaitGroup
	errs := make(chan error, 2000)
	dial := func(a netip.Addr) (*net.TCPConn, error) {
		c, err := net.Dial("tcp", netip.AddrPortFrom(a, uint16(port)).String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	short := func(a netip.Addr, i int) {
		defer wg.Done()
		c, err := dial(a)
		if err != nil {
			errs <- err
			return
		}
		defer c.Close()
		if i%2 == 0 {
			time.Sleep(30 * time.Millisecond) // long enough for tcp-info to see it
		}
		msg := fmt.Sprintf("flow %d\n", i)
		switch i % 8 / 2 {
		case 0: // the client closes
			c.Write([]byte("e" + msg))
			io.ReadFull(c, make([]byte, len(msg)))
		case 1: // the server closes
			c.Write([]byte("s" + msg))
			io.ReadAll(c)
		case 2: // the server resets
			c.Write([]byte("r" + msg))
			io.ReadAll(c)
		case 3: // the client resets
			c.Write([]byte("e" + msg))
			io.ReadFull(c, make([]byte, len(msg)))
			c.SetLinger(0)
		}
	}
	long := func(a netip.Addr) {
		defer wg.Done()
		if err := longFlow(a, port, 32<<10, 20); err != nil {
			errs <- err
		}
	}
	for _, a := range []netip.Addr{l.srv4, l.srv6, l.srv4, l.srv6} {
		wg.Add(1)
		go long(a)
	}
	for i := 0; i < 520; i++ {
		a := l.srv4
		if i%16 >= 8 {
			a = l.srv6
		}
		wg.Add(1)
		go short(a, i)
		if i%40 == 39 {
			time.Sleep(40 * time.Millisecond)
		}
	}
	wg.Wait()
	close(errs)
	n := 0
	for err := range errs {
		if n++; n <= 5 {
			t.Errorf("traffic: %v", err)
		}
	}
}
