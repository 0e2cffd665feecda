package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
	"github.com/m-lab/tcp-info/eventsocket"

	"github.com/m-lab/packet-headers/anonymize"
)

// daemon is one packet-headers run in the lab.
type daemon struct {
	name      string
	dataDir   string
	metrics   string
	args      []string
	stoppedAt time.Time // when SIGTERM was sent
	capDur    time.Duration
	netblock  bool
	anon      *anonymize.Anonymizer // the cryptopan twin's mapping, computed by the test from the key
	tsShift   bool                  // the daemon zeroes MACs and shifts TCP timestamps
	hostname  string                // when set, the daemon runs with this host name
	wrap      []string              // when set, the command that runs the daemon's command line
	cmd       *exec.Cmd             // set by lab.startDaemon
	// drops are the frames its capture's kernel ring dropped, as its
	// metrics said when it was stopped: with both cores busy a daemon may
	// be starved long enough to overflow its ring. No more flows than
	// frames dropped may have lost packets, and no index record may report
	// more drops than that.
	drops uint64
}

// stopAll scrapes every daemon's metrics, stops each with SIGTERM (failing
// the test unless it exits 0 within sigtermwait plus a few seconds), then
// the reference tcpdump. It returns the metrics by daemon.
func stopAll(t *testing.T, l *lab, daemons []*daemon, tcpdump *exec.Cmd) map[string]string {
	metricsText := map[string]string{}
	for _, d := range daemons {
		metricsText[d.name] = scrape(d.metrics)
	}
	for _, d := range daemons {
		d.stoppedAt = time.Now()
		took, err := stop(t, d.cmd, syscall.SIGTERM, 6*time.Second)
		if err != nil {
			t.Errorf("%s daemon: %v after SIGTERM (took %v)\n%s", d.name, err, took, l.log("daemon-"+d.name+".log"))
			continue
		}
		t.Logf("%s daemon exited 0 after SIGTERM in %v (sigtermwait 1s)", d.name, took.Round(time.Millisecond))
	}
	time.Sleep(200 * time.Millisecond)
	stop(t, tcpdump, syscall.SIGINT, 5*time.Second)
	return metricsText
}

// TestEndToEnd runs tcp-info, a reference tcpdump and three packet-headers
// (buffer mode; stream mode; netblock anonymization with a short
// -captureduration) side by side in a server namespace, drives real IPv4
// and IPv6 traffic into it, stops the daemons with SIGTERM and checks their
// files against the reference capture: once with a UUID prefix file shared
// by tcp-info and the daemons, once with none (then tcp-info's made-up
// prefix, which may differ from the daemons' by a second, is learnt from its
// events, so that every file has tcp-info's name whichever source named it
// first).
func TestEndToEnd(t *testing.T) {
	for _, tt := range []struct {
		name   string
		subnet int
		prefix bool
	}{{"no prefix file", 1, false}, {"shared prefix file", 10, true}} {
		t.Run(tt.name, func(t *testing.T) { endToEnd(t, tt.subnet, tt.prefix) })
	}
}

func endToEnd(t *testing.T, subnet int, sharedPrefix bool) {
	l := newLab(t, subnet)
	var prefixArgs []string
	prefix := ""
	if sharedPrefix {
		prefix = filepath.Join(l.dir, "uuid-prefix")
		os.WriteFile(prefix, []byte("e2ehost_1764000000"), 0o644)
		prefixArgs = []string{"-uuid-prefix-file", prefix}
	}
	l.startTCPInfo("tcp-info.log", prefix)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)

	refFile, tcpdump := l.startReference()

	daemons := []*daemon{
		{name: "buffer", args: nil, capDur: 30 * time.Second},
		{name: "stream", args: []string{"-stream", "-capture.batchdelay=0"}, capDur: 30 * time.Second},
		{name: "netblock", args: []string{"-anonymize.ip=netblock", "-captureduration=2s", "-uuidwaitduration=2s"}, capDur: 2 * time.Second, netblock: true},
		cryptopanTwin(t, l),
	}
	for i, d := range daemons {
		if !sharedPrefix {
			d.hostname = "e2e-other-host"
		}
		l.startDaemon(d, 9990+i, append(append([]string{"-tcpinfo.eventsocket", l.tcpinfoSock, "-interface", l.nsIf}, prefixArgs...), d.args...)...)
	}
	for _, d := range daemons {
		waitFor(t, 10*time.Second, d.name+" daemon's eventsocket connection", func() bool {
			return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 1")
		})
	}
	captureStart := time.Now() // flows that began earlier (readiness checks) are not expected in full

	l.server(8081)
	held, talk, closeHeld := holdConns(t, l, 8081, 2)
	defer closeHeld()
	traffic(t, l, 8081)
	kinds := &labKinds{held: held, reset: resetConns(t, l, 8081, 3)}
	time.Sleep(2500 * time.Millisecond) // FIN linger (1 s) and a tick, so most files are written before SIGTERM
	talk()                              // the held connections, past the netblock daemon's -captureduration

	metricsText := stopAll(t, l, daemons, tcpdump)
	for _, d := range daemons {
		v, _ := metricValue(metricsText[d.name], fmt.Sprintf(`pcap_kernel_dropped_total{interface=%q}`, l.nsIf))
		d.drops = uint64(v)
	}
	closeHeld()
	cancel()

	ref := readReference(t, refFile)
	events.mu.Lock()
	opens := events.opens
	events.mu.Unlock()
	announced := 0
	for _, e := range opens {
		if e.ID.DstIP != "" && !netip.MustParseAddr(e.ID.DstIP).IsUnspecified() {
			announced++
		}
	}
	if announced == 0 {
		t.Fatal("tcp-info announced no flow; the lab did not work")
	}
	for _, d := range daemons {
		checkDaemon(t, l, d, opens, ref, captureStart, kinds)
		checkMetrics(t, d, metricsText[d.name])
	}
	checkDashboard(t, metricsText["buffer"])
	checkDocumentedMetrics(t, metricsText["buffer"])
	checkPrefixes(t, l, daemons[3])
	checkReadmeQuery(t, daemons[2])
	<-events.done
	checkOffline(t, l, daemons[0], daemons[0], refFile, opens, ref, captureStart, kinds, nil)
	// The cryptopan twin, split offline with the key, byte for byte:
	// addresses mapped alike, checksums alike (compared as a plain run).
	twin := *daemons[3]
	twin.anon, twin.tsShift = nil, false
	checkOffline(t, l, &twin, daemons[3], refFile, opens, ref, captureStart, kinds, append([]string{"-localaddr", l.srv4.String(), "-localaddr", l.srv6.String()}, twin.args...))
}

// cryptopanTwin is the netblock daemon's twin with Crypto-PAn, its key a
// fresh random one, and the other remedies: MAC addresses zeroed, TCP
// timestamps shifted per flow.
func cryptopanTwin(t *testing.T, l *lab) *daemon {
	key := make([]byte, anonymize.KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(l.dir, "cryptopan.key")
	if err := os.WriteFile(file, []byte(hex.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	anon, err := anonymize.NewKeyed(key, []netip.Addr{l.srv4, l.srv6})
	if err != nil {
		t.Fatal(err)
	}
	// The default -captureduration: offline, a packet within microseconds
	// of a 2 s limit may fall on either side of it, the two captures'
	// clocks differing (the netblock daemon covers the short limit).
	return &daemon{name: "cryptopan", args: []string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", file, "-anonymize.tsoffset", "-anonymize.zeromac"},
		capDur: 30 * time.Second, anon: anon, tsShift: true}
}

// checkPrefixes checks, from the cryptopan twin's files, that each client
// address was saved as one mapped address, and that the two client
// addresses of each family share as long a prefix mapped as they do.
func checkPrefixes(t *testing.T, l *lab, d *daemon) {
	seen := map[netip.Addr]bool{}
	for _, path := range daemonFiles(t, d) {
		recs, _ := readPcap(t, path)
		for _, r := range recs {
			if p, ok := decode(t, r); ok {
				alen := 16
				if p.ip4 {
					alen = 4
				}
				for _, off := range p.addrOff {
					if a, _ := netip.AddrFromSlice(p.data[off : off+alen]); a != l.srv4 && a != l.srv6 {
						seen[a] = true
					}
				}
			}
		}
	}
	for _, pair := range [][2]netip.Addr{{l.cli4, l.cli4b}, {l.cli6, l.cli6b}} {
		ma, mb := d.anon.Anonymized(pair[0]), d.anon.Anonymized(pair[1])
		if !seen[ma] || !seen[mb] {
			t.Errorf("cryptopan: %v and %v were not saved as %v and %v (saved: %v)", pair[0], pair[1], ma, mb, seen)
			continue
		}
		if got, want := commonBits(ma.AsSlice(), mb.AsSlice()), commonBits(pair[0].AsSlice(), pair[1].AsSlice()); got != want {
			t.Errorf("cryptopan: %v and %v share %d bits, saved as %v and %v sharing %d", pair[0], pair[1], want, ma, mb, got)
		}
		delete(seen, ma)
		delete(seen, mb)
	}
	if len(seen) > 0 {
		t.Errorf("cryptopan: other client addresses saved: %v", seen)
	}
}

func commonBits(a, b []byte) int {
	for i := range a {
		if x := a[i] ^ b[i]; x != 0 {
			return 8*i + bits.LeadingZeros8(x)
		}
	}
	return 8 * len(a)
}

// checkOffline splits the reference capture offline, with the events
// recorded beside it, and checks that it gives the live daemon's files for
// every flow tcp-info announced: the same set of files, with the same
// packets (the two captures' timestamps differ by the usual microseconds,
// see compareFlow); and its flow index, as the live daemon's (savedAs has
// the anonymization of the files, for the records' endpoints).
func checkOffline(t *testing.T, l *lab, live, savedAs *daemon, refFile string, opens map[string]eventsocket.FlowEvent, ref map[flowKey][]*refConn, captureStart time.Time, kinds *labKinds, args []string) {
	dir := filepath.Join(l.dir, "offline-"+live.name)
	cmd := exec.Command(filepath.Join(l.bin, "packet-headers"), append([]string{"-read", refFile, "-events", filepath.Join(l.dir, "events.jsonl"), "-datadir", dir}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("offline run: %v\n%s", err, out)
	}
	t.Logf("offline run: %s", strings.TrimSpace(string(out)))
	offFiles, liveFiles := daemonFiles(t, &daemon{name: "offline", dataDir: dir}), daemonFiles(t, live)
	want := map[string]indexWant{}
	compared, eligible := 0, 0
	var tm timing
	for u, e := range opens {
		local := netip.AddrPortFrom(netip.MustParseAddr(e.ID.SrcIP).Unmap(), e.ID.SPort)
		remote := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort)
		c := connAt(ref[keyOf(local, remote)], e.Timestamp)
		if remote.Addr().IsUnspecified() || c == nil || c.pkts[0].ts.Before(captureStart) || !c.pkts[len(c.pkts)-1].ts.Before(live.stoppedAt) {
			continue // outside the live daemon's capture
		}
		eligible++
		lp, lok := liveFiles[u]
		op, ook := offFiles[u]
		if !lok || !ook {
			t.Errorf("%s: live file %v, offline file %v", u, lok, ook)
			continue
		}
		liveRecs, _ := readPcap(t, lp)
		offRecs, _ := readPcap(t, op)
		var offPkts []refPacket
		for _, r := range offRecs {
			p, ok := decode(t, r)
			if !ok {
				t.Fatalf("%s: offline record is not TCP", u)
			}
			p.hdrEnd = len(r.data)
			offPkts = append(offPkts, p)
		}
		if msg := compareFlow(t, liveRecs, offPkts, live, l, &tm); msg != "" || len(liveRecs) != len(offRecs) {
			t.Errorf("%s: live and offline files differ (%d and %d packets): %s", u, len(liveRecs), len(offRecs), msg)
			continue
		}
		compared++
		want[u] = indexWant{c: c, kind: kinds.of(c)}
	}
	od := *savedAs
	od.name, od.dataDir = "offline-"+live.name, dir
	checkIndex(t, l, &od, offFiles, want, true, kinds != nil)
	t.Logf("offline mode gave the live daemon's files for %d flows", compared)
	tm.check(t, "offline vs live")
	if eligible == 0 {
		t.Error("no flow tcp-info announced to compare between offline and live")
	}
}

// traffic drives many short flows and a few long ones over IPv4 and IPv6.
func traffic(t *testing.T, l *lab, port int) {
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	long := func(a netip.Addr) {
		defer wg.Done()
		if err := longFlow(a, port, 64<<10, 30); err != nil {
			errs <- err
		}
	}
	for _, a := range []netip.Addr{l.srv4, l.srv6, l.srv4} {
		wg.Add(1)
		go long(a)
	}
	short := func(a netip.Addr, i int) {
		defer wg.Done()
		var d net.Dialer
		if i%4 >= 2 { // from the second client address of the family
			from := l.cli4b
			if a.Is6() {
				from = l.cli6b
			}
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
		}
		c, err := d.Dial("tcp", netip.AddrPortFrom(a, uint16(port)).String())
		if err != nil {
			errs <- err
			return
		}
		defer c.Close()
		time.Sleep(40 * time.Millisecond) // long enough for tcp-info's 10 ms polls to see it
		msg := []byte(fmt.Sprintf("hello %d\n", i))
		if _, err := c.Write(append([]byte("e"), msg...)); err != nil {
			errs <- err
			return
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			errs <- err
		}
	}
	for batch := 0; batch < 10; batch++ {
		for i := 0; i < 20; i++ {
			a := l.srv4
			if i%2 == 1 {
				a = l.srv6
			}
			wg.Add(1)
			go short(a, batch*20+i)
		}
		time.Sleep(60 * time.Millisecond)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("traffic: %v", err)
	}
}

func scrape(addr string) string {
	// No keep-alive: a scrape's connection is a flow of the lab too, and it
	// should end long before the daemon does.
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// checkDashboard checks that every metric the Grafana dashboard queries is
// in a running daemon's /metrics output.
func checkDashboard(t *testing.T, metricsText string) {
	b, err := os.ReadFile("../deploy/grafana/packet-headers.json")
	if err != nil {
		t.Fatal(err)
	}
	names := regexp.MustCompile(`\b(pcap|process)_[a-z0-9_]+`).FindAllString(string(b), -1)
	if len(names) < 10 {
		t.Fatalf("the dashboard queries only %d metrics", len(names))
	}
	for _, m := range names {
		if !regexp.MustCompile(`(?m)^` + m + `[ {]`).MatchString(metricsText) {
			t.Errorf("the dashboard queries %s, which the daemon does not export", m)
		}
	}
}

// checkDocumentedMetrics checks that every metric the operations guide
// lists is in a running daemon's /metrics output, and that the daemon
// exports no pcap_* metric the guide does not list.
func checkDocumentedMetrics(t *testing.T, metricsText string) {
	b, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(pcap_[a-z0-9_]+)").FindAllStringSubmatch(string(b), -1) {
		documented[m[1]] = true
	}
	if len(documented) < 30 {
		t.Fatalf("the operations guide lists only %d metrics", len(documented))
	}
	for m := range documented {
		if !regexp.MustCompile(`(?m)^` + m + `(_count)?[ {]`).MatchString(metricsText) {
			t.Errorf("docs/operations.md lists %s, which the daemon does not export", m)
		}
	}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (pcap_[a-z0-9_]+)`).FindAllStringSubmatch(metricsText, -1) {
		if !documented[m[1]] {
			t.Errorf("the daemon exports %s, which docs/operations.md does not list", m[1])
		}
	}
}

func metricValue(text, name string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, name+" ") {
			var v float64
			fmt.Sscanf(strings.TrimPrefix(line, name+" "), "%g", &v)
			return v, true
		}
	}
	return 0, false
}

func checkMetrics(t *testing.T, d *daemon, text string) {
	for _, m := range []string{"pcap_packets_captured_total{interface=", "pcap_kernel_dropped_total{interface=", "pcap_eventsocket_connected 1", "pcap_uuid_wait_seconds_count"} {
		if !strings.Contains(text, m) {
			t.Errorf("%s daemon: metric %s not served", d.name, m)
		}
	}
	if v, _ := metricValue(text, "pcap_files_written_total"); v < 100 {
		t.Errorf("%s daemon: pcap_files_written_total = %v before SIGTERM, want >= 100", d.name, v)
	}
}

// daemonFiles returns the daemon's flow files by UUID (not its index
// files), and flags partial files left behind.
func daemonFiles(t *testing.T, d *daemon) map[string]string {
	files := map[string]string{}
	filepath.Walk(d.dataDir, func(path string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			if strings.Contains(path, "/.") {
				t.Errorf("%s: a hidden file in the data directory: %s", d.name, path)
			}
			if isIndex(path) {
				return nil
			}
			files[strings.TrimSuffix(strings.TrimSuffix(filepath.Base(path), ".gz"), ".pcap")] = path
		}
		return nil
	})
	if entries, _ := os.ReadDir(d.partialDir()); len(entries) != 0 {
		t.Errorf("%s: %d partial files left behind in %s", d.name, len(entries), d.partialDir())
	}
	return files
}

// partialDir is where the daemon writes files before it publishes them:
// beside the data directory (saver.PartialDir).
func (d *daemon) partialDir() string {
	return filepath.Join(filepath.Dir(d.dataDir), "."+filepath.Base(d.dataDir)+".partial")
}

// checkFile reads a file and checks it against its reference connection.
func checkFile(t *testing.T, l *lab, d *daemon, path string, c *refConn, tm *timing) ([]record, string) {
	if c.pkts[0].ts.UTC().Format("2006/01/02") != filepath.Dir(strings.TrimPrefix(path, d.dataDir+"/")) {
		return nil, "not in the directory of its first packet's date"
	}
	got, r := readPcap(t, path)
	if !nanosecondMagic(path) || r.LinkType() != layers.LinkTypeEthernet || r.Snaplen() != 256 {
		return nil, fmt.Sprintf("header: nanosecond magic %v, link type %v, snaplen %d", nanosecondMagic(path), r.LinkType(), r.Snaplen())
	}
	return got, compareFlow(t, got, c.pkts, d, l, tm)
}

// checkDaemon checks a daemon's files against the reference capture, for
// every flow tcp-info announced, and its flow index (every kind of end when
// kinds, the lab's held and reset connections, are given).
func checkDaemon(t *testing.T, l *lab, d *daemon, opens map[string]eventsocket.FlowEvent, ref map[flowKey][]*refConn, captureStart time.Time, kinds *labKinds) {
	files := daemonFiles(t, d)
	want := map[string]indexWant{}
	checked, packets, eligible, lost := 0, 0, 0, 0
	var tm timing
	var uuids []string
	for u := range opens {
		uuids = append(uuids, u)
	}
	sort.Strings(uuids)
	for _, u := range uuids {
		e := opens[u]
		local := netip.AddrPortFrom(netip.MustParseAddr(e.ID.SrcIP).Unmap(), e.ID.SPort)
		remote := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort)
		if remote.Addr().IsUnspecified() {
			continue // a listening socket
		}
		c := connAt(ref[keyOf(local, remote)], e.Timestamp)
		if c == nil || c.pkts[0].ts.Before(captureStart) {
			continue // not in the reference capture, or begun before the daemons captured
		}
		eligible++
		path, ok := files[u]
		if !ok {
			if lost++; lost > int(d.drops) {
				t.Errorf("%s: no file for announced flow %s (%v -> %v, %d reference packets)", d.name, u, local, remote, len(c.pkts))
			}
			continue
		}
		got, msg := checkFile(t, l, d, path, c, &tm)
		if msg != "" && strings.Contains(msg, "reference packets missing") && d.drops > 0 {
			lost++
			if lost <= int(d.drops) {
				t.Logf("%s: %s (%v -> %v): %s, with %d frames dropped by the kernel", d.name, u, local, remote, msg, d.drops)
				continue
			}
		}
		if msg != "" {
			t.Errorf("%s: %s (%v -> %v): %s", d.name, u, local, remote, msg)
			continue
		}
		checked++
		packets += len(got)
		want[u] = indexWant{c: c, kind: kinds.of(c)}
	}
	t.Logf("%s daemon: %d announced flows checked packet by packet (%d packets), %d files in all", d.name, checked, packets, len(files))
	checkIndex(t, l, d, files, want, false, kinds != nil)
	tm.check(t, d.name+" daemon")
	// Every flow tcp-info announced is checked (a missing or wrong file is
	// an error above); how many it announced depends on its 10 ms polls,
	// which a loaded machine stretches, so no count is required of it.
	if eligible == 0 {
		t.Errorf("%s: tcp-info announced no flow of the reference capture", d.name)
	}
}
