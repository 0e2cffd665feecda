package e2e

import (
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket/pcapgo"
)

// flows makes n short connections to addr:port (each lives 30 ms) and
// returns their client ends.
func flows(t testing.TB, addr netip.Addr, port, n int) map[netip.AddrPort]bool {
	ports := map[netip.AddrPort]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, uint16(port)).String(), 2*time.Second)
			if err != nil {
				t.Errorf("dial %v: %v", addr, err)
				return
			}
			defer c.Close()
			mu.Lock()
			ports[clientEnd(c)] = true
			mu.Unlock()
			time.Sleep(30 * time.Millisecond)
			c.Write([]byte("e hello\n"))
			io.ReadFull(c, make([]byte, 7))
		}()
	}
	wg.Wait()
	return ports
}

func clientEnd(c net.Conn) netip.AddrPort {
	a := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// filePorts counts the files of connections to serverPort in dir by the
// client end of their first packet.
func filePorts(t testing.TB, dir string, serverPort uint16) map[netip.AddrPort]int {
	out := map[netip.AddrPort]int{}
	for k, paths := range filesByKey(t, dir) {
		switch serverPort {
		case k.a.Port():
			out[k.b] += len(paths)
		case k.b.Port():
			out[k.a] += len(paths)
		} // else a flow to another port (a metrics scrape)
	}
	return out
}

func expectFiles(t *testing.T, what string, ports map[netip.AddrPort]bool, files map[netip.AddrPort]int) {
	t.Helper()
	missing := 0
	var examples []string
	for p := range ports {
		if files[p] != 1 {
			if missing++; missing <= 3 {
				examples = append(examples, fmt.Sprintf("%v: %d files", p, files[p]))
			}
		}
	}
	if missing > 0 {
		t.Errorf("%s: %d of %d flows without exactly one file (%s)", what, missing, len(ports), strings.Join(examples, ", "))
	} else {
		t.Logf("%s: all %d flows saved", what, len(ports))
	}
}

// addLink joins the namespace by a second veth pair, 10.198.N.0/24.
func (l *lab) addLink(name string, subnet int) (cli, srv netip.Addr, nsIf string) {
	hostIf, nsIf := "pa"+name, "pb"+name
	cli = netip.MustParseAddr(fmt.Sprintf("10.198.%d.1", subnet))
	srv = netip.MustParseAddr(fmt.Sprintf("10.198.%d.2", subnet))
	exec.Command("ip", "link", "del", hostIf).Run()
	run(l.t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", l.ns)
	run(l.t, "ip", "addr", "add", cli.String()+"/24", "dev", hostIf)
	run(l.t, "ip", "link", "set", hostIf, "up")
	l.exec("ip", "addr", "add", srv.String()+"/24", "dev", nsIf)
	l.exec("ip", "link", "set", nsIf, "up")
	l.t.Cleanup(func() { exec.Command("ip", "link", "del", hostIf).Run() })
	return cli, srv, nsIf
}

// TestInterfaceFaults deletes and re-creates one of two captured
// interfaces, and takes the other down and up: capture goes on where it
// can, and resumes on the interface that comes back; the health checks pass
// meanwhile. A connection idle
// across the deletion, and used again after it, is one flow, from its SYN
// (the frames captured just before the deletion are read from the ring),
// whose index record says the capture was down meanwhile; flows before it
// say not.
func TestInterfaceFaults(t *testing.T) {
	l := newLab(t, 3)
	name := strconv.Itoa(os.Getpid() % 100000)
	_, srvB, nsB := l.addLink(name, 3)
	l.server(8083)
	d := &daemon{name: "faults"}
	cmd := l.startDaemon(d, 9990, "-health.grace", "1s")
	upMetric := func(ifc string) string {
		v, _ := metricValue(scrape(d.metrics), fmt.Sprintf(`pcap_capture_up{interface="%s"}`, ifc))
		return fmt.Sprint(v)
	}
	// Interface b may have got its address just after the daemon looked:
	// it is then captured when the daemon sees it appear.
	waitFor(t, 5*time.Second, "capture on both interfaces", func() bool { return upMetric(nsB) == "1" && upMetric(l.nsIf) == "1" })

	phase1a, phase1b := flows(t, l.srv4, 8083, 10), flows(t, srvB, 8083, 10)
	time.Sleep(time.Second) // their records' readings come before the deletion
	across, err := net.Dial("tcp", netip.AddrPortFrom(srvB, 8083).String())
	if err != nil {
		t.Fatal(err)
	}
	defer across.Close()
	echo := func(msg string) {
		across.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := across.Write([]byte(msg + "\n")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(across, make([]byte, len(msg)+1)); err != nil {
			t.Fatalf("the connection across the deletion: %v", err)
		}
	}
	across.Write([]byte("e"))
	echo("before")
	// Interface b is deleted, the exchange's frames likely still in the
	// ring's open block: they are read before the failure.
	deletedAt := time.Now()
	run(t, "ip", "link", "del", "pa"+name)
	waitFor(t, 5*time.Second, "capture on the deleted interface to be reported down", func() bool { return upMetric(nsB) == "0" })
	// Captures of interfaces the daemon chose (no -interface) follow the
	// interfaces: one that is gone is no failure (TestInterfacesFollowed
	// has the named case).
	time.Sleep(1500 * time.Millisecond) // past -health.grace
	if code := probe(d.metrics, "/healthz"); code != 200 {
		t.Errorf("/healthz %d while an interface the daemon chose is gone, want 200", code)
	}
	phase2 := flows(t, l.srv4, 8083, 10)

	_, srvB, _ = l.addLink(name, 3) // and comes back
	waitFor(t, 10*time.Second, "capture to resume on the re-created interface", func() bool { return upMetric(nsB) == "1" })
	waitFor(t, 2*time.Second, "/healthz and /readyz to pass again", func() bool {
		return probe(d.metrics, "/healthz") == 200 && probe(d.metrics, "/readyz") == 200
	})
	phase3 := flows(t, srvB, 8083, 10)
	echo("after")
	across.Close()

	l.exec("ip", "link", "set", l.nsIf, "down") // interface a goes down and up
	time.Sleep(300 * time.Millisecond)
	l.exec("ip", "link", "set", l.nsIf, "up")
	waitFor(t, 5*time.Second, "the lab link to be up", func() bool {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(l.srv4, 8083).String(), 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	phase4 := flows(t, l.srv4, 8083, 10)

	time.Sleep(2 * time.Second)
	if _, err := stop(t, cmd, syscall.SIGTERM, 6*time.Second); err != nil {
		t.Errorf("daemon: %v\n%s", err, l.log("daemon-faults.log"))
	}
	files := filePorts(t, d.dataDir, 8083)
	expectFiles(t, "both interfaces up, interface a", phase1a, files)
	expectFiles(t, "both interfaces up, interface b", phase1b, files)
	expectFiles(t, "interface b deleted, interface a", phase2, files)
	expectFiles(t, "interface b re-created", phase3, files)
	expectFiles(t, "interface a after down and up", phase4, files)
	if !strings.Contains(l.log("daemon-faults.log"), "is back") {
		t.Errorf("the log does not say that capture resumed:\n%s", l.log("daemon-faults.log"))
	}
	recs := readIndex(t, d.name, d.dataDir)
	acrossEnd, seen := clientEnd(across), map[string]int{}
	for _, r := range recs {
		client := netip.AddrPortFrom(netip.MustParseAddr(r.Src.IP), r.Src.Port)
		switch {
		case r.Capture == nil:
			t.Errorf("%s: a live record without its capture", r.UUID)
		case client == acrossEnd:
			seen["across"]++
			if !r.Capture.Down || r.Capture.Interface != nsB || !r.SYN || r.FlowEnd != "fin" {
				t.Errorf("the connection across the deletion: %+v, capture %+v; want one flow on %s, down meanwhile", r, r.Capture, nsB)
			}
		case (phase1b[client] || phase1a[client]) && r.First.Before(deletedAt): // (a later flow may reuse a client port)
			seen["before"]++
			if r.Capture.Down {
				t.Errorf("%v, before the deletion: capture %+v, want never down", client, r.Capture)
			}
		}
	}
	if seen["across"] != 1 || seen["before"] != len(phase1a)+len(phase1b) {
		t.Errorf("records checked: %v", seen)
	}
}

// TestSIGKILL kills daemons in stream and buffer mode while they write:
// no <uuid>.pcap is ever partial, and a restart cleans the leftovers.
func TestSIGKILL(t *testing.T) {
	l := newLab(t, 4)
	l.server(8084)
	stream, buffer := &daemon{name: "stream"}, &daemon{name: "buffer"}
	sCmd := l.startDaemon(stream, 9990, "-stream")
	bCmd := l.startDaemon(buffer, 9991)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ { // long flows, streamed while they last
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", netip.AddrPortFrom(l.srv4, 8084).String())
			if err != nil {
				return
			}
			defer c.Close()
			go io.Copy(io.Discard, c)
			c.Write([]byte("e"))
			for j := 0; j < 40; j++ {
				if _, err := c.Write(make([]byte, 64<<10)); err != nil {
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
	}
	for i := 0; i < 3; i++ { // short flows, written whole as they end
		flows(t, l.srv4, 8084, 30)
	}
	time.Sleep(1300 * time.Millisecond) // the short flows' files are written; the long ones still stream
	sCmd.Process.Kill()
	bCmd.Process.Kill()
	sCmd.Wait()
	bCmd.Wait()
	wg.Wait()
	for _, d := range []*daemon{stream, buffer} {
		complete, leftovers := 0, 0
		if entries, err := os.ReadDir(d.partialDir()); err == nil {
			leftovers = len(entries)
		}
		filepath.Walk(d.dataDir, func(p string, info os.FileInfo, err error) error {
			if err != nil || info.IsDir() {
				return nil
			}
			if msg := readWhole(p); msg != "" {
				t.Errorf("%s: %s is partial: %s", d.name, p, msg)
			}
			complete++
			return nil
		})
		t.Logf("%s daemon killed: %d complete files, %d partial files left in %s", d.name, complete, leftovers, d.partialDir())
		if d.name == "stream" && leftovers == 0 || complete == 0 {
			t.Errorf("%s: %d complete and %d partial files: the kill did not come while files were written and done", d.name, complete, leftovers)
		}
		cmd := l.startDaemon(d, 9992) // restart on the same datadir
		if entries, _ := os.ReadDir(d.partialDir()); len(entries) != 0 {
			t.Errorf("%s: %d leftovers not cleaned at restart", d.name, len(entries))
		}
		stop(t, cmd, syscall.SIGTERM, 6*time.Second)
	}
}

// readWhole reads a pcap to its end; it returns what is wrong, if anything.
func readWhole(path string) string {
	if isIndex(path) {
		return readWholeIndex(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var in io.Reader = f
	if strings.HasSuffix(path, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return err.Error()
		}
		in = zr
	}
	r, err := pcapgo.NewReader(in)
	if err != nil {
		return err.Error()
	}
	for {
		_, _, err := r.ReadPacketData()
		if err == io.EOF {
			return ""
		}
		if err != nil {
			return err.Error()
		}
	}
}

// TestShutdownUnderLoad holds 2000 connections open, each with a few
// packets buffered in the daemon, and sends SIGTERM: the daemon writes
// every flow and exits 0, which it does only within -sigtermwait plus
// -shutdown.timeout (past it, it exits 1 naming the files not written).
// How long it took is logged, not asserted: on a machine whose cores are
// busy it varies from 1.6 to 6.4 s.
func TestShutdownUnderLoad(t *testing.T) {
	l := newLab(t, 5)
	l.server(8085)
	d := &daemon{name: "load"}
	cmd := l.startDaemon(d, 9990, "-maxidleram", "100MB")
	const n = 2000
	var conns []net.Conn
	ports := map[netip.AddrPort]bool{}
	for i := 0; i < n; i++ {
		a := l.srv4
		if i%2 == 1 {
			a = l.srv6
		}
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(a, 8085).String(), 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
		ports[clientEnd(c)] = true
		c.Write([]byte("e hello\n"))
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, c := range conns {
		io.ReadFull(c, make([]byte, 7))
	}
	time.Sleep(500 * time.Millisecond) // the last look-ups
	active, _ := metricValue(scrape(d.metrics), "pcap_flows_active")
	// -sigtermwait (1 s) and -shutdown.timeout (20 s), and a margin.
	took, err := stop(t, cmd, syscall.SIGTERM, 25*time.Second)
	if err != nil {
		t.Fatalf("daemon: %v after SIGTERM\n%s", err, l.log("daemon-load.log"))
	}
	t.Logf("%v flows active; exited 0 in %v after SIGTERM (sigtermwait 1s)", active, took.Round(time.Millisecond))
	expectFiles(t, fmt.Sprintf("%d open connections at SIGTERM", n), ports, filePorts(t, d.dataDir, 8085))
}

// TestTCPInfoRestart kills tcp-info and starts it again while connections
// are open, with tcp-info as the only UUID source: the daemon reconnects,
// flows announced before and after the restart are saved, each once.
func TestTCPInfoRestart(t *testing.T) {
	l := newLab(t, 6)
	l.server(8086)
	prefix := filepath.Join(l.dir, "uuid-prefix")
	os.WriteFile(prefix, []byte("restarthost_1764000000"), 0o644)
	startTI := func(logName string) *exec.Cmd { return l.startTCPInfo(logName, prefix) }
	ti := startTI("tcp-info-1.log")
	d := &daemon{name: "restart"}
	cmd := l.startDaemon(d, 9990, "-tcpinfo.eventsocket", l.tcpinfoSock, "-uuid.kernel=false", "-uuid-prefix-file", prefix)
	waitFor(t, 10*time.Second, "the daemon's eventsocket connection", func() bool {
		return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 1")
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx) // the first tcp-info's, until it is killed
	before := flows(t, l.srv4, 8086, 20)
	var held []net.Conn // open across the restart: announced twice
	heldPorts := map[netip.AddrPort]bool{}
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", netip.AddrPortFrom(l.srv4, 8086).String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("e hi\n"))
		held = append(held, c)
		heldPorts[clientEnd(c)] = true
	}
	// tcp-info announces them within its polls, which a loaded machine
	// stretches (and may miss a 30 ms connection altogether): it is killed
	// once it has announced the held ones and a second has passed, and the
	// files expected are those of the connections it announced. (The
	// daemon's count of opens is no measure: the test's scrapes of its
	// metrics are connections tcp-info announces too.)
	announced := func(events *eventLog, of map[netip.AddrPort]bool) map[netip.AddrPort]bool {
		events.mu.Lock()
		defer events.mu.Unlock()
		out := map[netip.AddrPort]bool{}
		for _, e := range events.opens {
			if e.ID != nil && e.ID.DstIP != "" {
				if c := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort); of[c] {
					out[c] = true
				}
			}
		}
		return out
	}
	waitFor(t, 10*time.Second, "tcp-info to announce the held connections", func() bool { return len(announced(events, heldPorts)) == len(heldPorts) })
	time.Sleep(time.Second)
	ti.Process.Kill()
	ti.Wait()
	waitFor(t, 10*time.Second, "the daemon to see tcp-info gone", func() bool {
		return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 0")
	})
	waitFor(t, 2*time.Second, "/readyz to fail while tcp-info is down", func() bool { return probe(d.metrics, "/readyz") == 503 })
	if code := probe(d.metrics, "/healthz"); code != 200 {
		t.Errorf("/healthz is %d within the grace period", code)
	}
	startTI("tcp-info-2.log")
	waitFor(t, 15*time.Second, "the daemon to reconnect", func() bool {
		return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 1")
	})
	waitFor(t, 2*time.Second, "/readyz to pass again", func() bool { return probe(d.metrics, "/readyz") == 200 })
	events2 := l.recordEvents(ctx) // the second tcp-info's
	time.Sleep(200 * time.Millisecond)
	after := flows(t, l.srv4, 8086, 20)
	for _, c := range held {
		c.Write([]byte("more\n"))
		time.Sleep(10 * time.Millisecond)
		c.Close()
	}
	time.Sleep(2 * time.Second)
	if _, err := stop(t, cmd, syscall.SIGTERM, 6*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	files := filePorts(t, d.dataDir, 8086)
	<-events.done
	announcedBefore := announced(events, before)
	t.Logf("tcp-info announced %d of the %d connections made before its restart", len(announcedBefore), len(before))
	if len(announcedBefore) == 0 {
		t.Error("tcp-info announced none of the connections made before its restart")
	}
	expectFiles(t, "announced before the restart", announcedBefore, files)
	cancel()
	<-events2.done
	expectFiles(t, "announced after the restart", announced(events2, after), files)
	expectFiles(t, "open across the restart (announced twice)", heldPorts, files)
}

// TestEventFlood feeds the daemon junk from a fake eventsocket: 100k Opens
// of flows that never appear, duplicates, Closes without Open, non-JSON
// lines, a 10 MB line. It stays up with bounded memory and still names a
// real flow announced after the flood.
func TestEventFlood(t *testing.T) {
	l := newLab(t, 7)
	l.server(8087)
	sock := filepath.Join(l.dir, "fake.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			conns <- c
		}
	}()
	d := &daemon{name: "flood"}
	cmd := l.startDaemon(d, 9990, "-tcpinfo.eventsocket", sock, "-uuid.kernel=false")
	c := <-conns
	defer c.Close()
	rssBefore := rss(cmd.Process.Pid)
	ts := time.Now().UTC().Format(time.RFC3339Nano)
	w := func(format string, a ...any) { fmt.Fprintf(c, format+"\n", a...) }
	for i := 0; i < 100000; i++ {
		w(`{"Event":0,"Timestamp":%q,"UUID":"flood_%d","ID":{"SPort":%d,"DPort":%d,"SrcIP":"10.199.7.2","DstIP":"203.0.113.%d","Cookie":%d}}`, ts, i, 1+i%60000, 1+i/60000, i%250, i+1)
		if i%10 == 0 {
			w(`{"Event":0,"Timestamp":%q,"UUID":"flood_%d","ID":{"SPort":1,"DPort":1,"SrcIP":"10.199.7.2","DstIP":"203.0.113.1"}}`, ts, i) // duplicate
			w(`{"Event":1,"Timestamp":%q,"UUID":"never_opened_%d","ID":null}`, ts, i)
			w(`this is not json %d`, i)
		}
	}
	c.Write([]byte(strings.Repeat("x", 10<<20) + "\n"))
	// A real connection, announced after the flood.
	real, err := net.Dial("tcp", netip.AddrPortFrom(l.srv4, 8087).String())
	if err != nil {
		t.Fatal(err)
	}
	realEnd := clientEnd(real)
	port := realEnd.Port()
	w(`{"Event":0,"Timestamp":%q,"UUID":"real_flow","ID":{"SPort":8087,"DPort":%d,"SrcIP":"%s","DstIP":"%s","Cookie":1}}`,
		time.Now().UTC().Format(time.RFC3339Nano), port, l.srv4, l.cli4)
	real.Write([]byte("e hello\n"))
	io.ReadFull(real, make([]byte, 7))
	real.Close()
	waitFor(t, 10*time.Second, "the events to be read", func() bool {
		v, _ := metricValue(scrape(d.metrics), "pcap_eventsocket_malformed_lines_total")
		return v >= 10001
	})
	rssAfter := rss(cmd.Process.Pid)
	time.Sleep(1500 * time.Millisecond)
	if _, err := stop(t, cmd, syscall.SIGTERM, 6*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	t.Logf("RSS %d MB before the flood, %d MB after 100k bogus Opens and a 10 MB line", rssBefore>>20, rssAfter>>20)
	if rssAfter > 200<<20 {
		t.Errorf("RSS %d MB after the flood", rssAfter>>20)
	}
	if files := filePorts(t, d.dataDir, 8087); files[realEnd] != 1 {
		t.Errorf("the real flow announced after the flood was not saved (%v)", files)
	}
}

// probe returns the HTTP status of a health endpoint, 0 if unreachable.
func probe(addr, path string) int {
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// rss returns a process's resident set size in bytes.
func rss(pid int) int64 { return statusBytes(pid, "VmRSS:") }

// statusBytes returns a size field of /proc/PID/status (VmRSS:, VmHWM:...)
// in bytes, or 0.
func statusBytes(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// TestMaxHeap runs a daemon whose -maxheap is below any heap: every new
// flow is refused and counted, none is written, and the daemon goes on
// serving; and one with -maxflows 5, which tracks five flows of ten.
func TestMaxHeap(t *testing.T) {
	l := newLab(t, 9)
	l.server(8090)
	d := &daemon{name: "maxheap"}
	cmd := l.startDaemon(d, 9990, "-maxheap", "1KB")
	d2 := &daemon{name: "maxflows"}
	cmd2 := l.startDaemon(d2, 9991, "-maxflows", "5", "-flowtimeout", "1m")
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < 10; i++ { // held open: the flows stay tracked
		c, err := net.Dial("tcp", netip.AddrPortFrom(l.srv4, 8090).String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("e hi\n"))
		held = append(held, c)
	}
	waitFor(t, 5*time.Second, "the flows to be refused", func() bool {
		v, _ := metricValue(scrape(d.metrics), `pcap_flows_refused_total{limit="memory_limit"}`)
		return v >= 10
	})
	waitFor(t, 5*time.Second, "-maxflows 5 to refuse the others", func() bool {
		v, _ := metricValue(scrape(d2.metrics), `pcap_flows_refused_total{limit="flow_limit"}`)
		return v >= 5
	})
	if active, _ := metricValue(scrape(d2.metrics), "pcap_flows_active"); active != 5 {
		t.Errorf("-maxflows 5: %v flows active", active)
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	time.Sleep(500 * time.Millisecond)
	for _, x := range []struct {
		d   *daemon
		cmd *exec.Cmd
	}{{d, cmd}, {d2, cmd2}} {
		if _, err := stop(t, x.cmd, syscall.SIGTERM, 6*time.Second); err != nil {
			t.Errorf("%s: %v", x.d.name, err)
		}
	}
	if files := filePorts(t, d.dataDir, 8090); len(files) != 0 {
		t.Errorf("-maxheap 1KB: %d flows written, want none", len(files))
	}
	if files := filePorts(t, d2.dataDir, 8090); len(files) != 5 {
		t.Errorf("-maxflows 5: %d flows written, want 5", len(files))
	}
}

// TestInterfacesFollowed: without -interface, an interface that appears
// under a running daemon (a container's veth) is captured, its connections
// saved, and one that is deleted fails no health check; with -interface,
// the named interface's deletion fails /healthz after -health.grace, so
// that an orchestrator restarts a daemon that cannot do what it was told.
func TestInterfacesFollowed(t *testing.T) {
	l := newLab(t, 23)
	l.server(8084)
	auto := &daemon{name: "auto"}
	l.startDaemon(auto, 9990, "-health.grace", "1s", "-flowtimeout=1s")
	name := strconv.Itoa(os.Getpid()%100000 + 1)
	_, srvB, nsB := l.addLink(name, 23)
	up := func(d *daemon) string {
		v, _ := metricValue(scrape(d.metrics), fmt.Sprintf(`pcap_capture_up{interface="%s"}`, nsB))
		return fmt.Sprint(v)
	}
	waitFor(t, 5*time.Second, "the new interface to be captured", func() bool { return up(auto) == "1" })
	named := &daemon{name: "named"}
	l.startDaemon(named, 9991, "-health.grace", "1s", "-interface", nsB)
	made := flows(t, srvB, 8084, 10)
	time.Sleep(1500 * time.Millisecond) // the flows' timeouts
	run(t, "ip", "link", "del", "pa"+name)
	waitFor(t, 5*time.Second, "the capture of the deleted interface to be reported down", func() bool { return up(auto) == "0" })
	waitFor(t, 5*time.Second, "/healthz of the daemon told to capture it to fail", func() bool { return probe(named.metrics, "/healthz") == 503 })
	if code := probe(auto.metrics, "/healthz"); code != 200 {
		t.Errorf("/healthz %d for the daemon that chose its interfaces, want 200", code)
	}
	for _, d := range []*daemon{auto, named} {
		if _, err := stop(t, d.cmd, syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatalf("%s: %v\n%s", d.name, err, l.log("daemon-"+d.name+".log"))
		}
	}
	expectFiles(t, "on the interface that appeared", made, filePorts(t, auto.dataDir, 8084))
	if !strings.Contains(l.log("daemon-auto.log"), "interface "+nsB+" appeared") {
		t.Errorf("the log does not say the interface appeared:\n%s", l.log("daemon-auto.log"))
	}
}
