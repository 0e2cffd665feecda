package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/binary"
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

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
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

// record is one packet as read back from a pcap file.
type record struct {
	ts      time.Time
	data    []byte
	origLen int
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
		{name: "netblock", args: []string{"-anonymize.ip=netblock", "-captureduration=2s", "-uuidwaitduration=1s"}, capDur: 2 * time.Second, netblock: true},
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

// flowKey is a direction-independent 4-tuple.
type flowKey struct{ a, b netip.AddrPort }

func (k flowKey) String() string { return k.a.String() + "-" + k.b.String() }

func keyOf(x, y netip.AddrPort) flowKey {
	if x.Addr().Less(y.Addr()) || x.Addr() == y.Addr() && x.Port() < y.Port() {
		return flowKey{x, y}
	}
	return flowKey{y, x}
}

// refPacket is a packet of the reference capture, decoded by gopacket.
type refPacket struct {
	record
	key       flowKey
	src       netip.AddrPort
	seq       uint32
	flags     uint8
	hdrEnd    int // end of the TCP header
	syn       bool
	payload   int
	ip4       bool
	addrOff   [2]int // offsets of the source and destination addresses
	ipCsumOff int
	tcpOff    int
	tsOff     int    // offset of the timestamps option's TSval, 0 without
	tsval     uint32 // and its values, by gopacket
	tsecr     uint32
}

func decode(t testing.TB, r record) (refPacket, bool) {
	p := gopacket.NewPacket(r.data, layers.LayerTypeEthernet, gopacket.DecodeOptions{Lazy: false, NoCopy: true})
	tl, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if !ok {
		return refPacket{}, false
	}
	rp := refPacket{record: r, syn: tl.SYN && !tl.ACK}
	var src, dst netip.Addr
	ipOff := 14
	switch ip := p.NetworkLayer().(type) {
	case *layers.IPv4:
		src, _ = netip.AddrFromSlice(ip.SrcIP.To4())
		dst, _ = netip.AddrFromSlice(ip.DstIP.To4())
		rp.ip4 = true
		rp.addrOff = [2]int{ipOff + 12, ipOff + 16}
		rp.ipCsumOff = ipOff + 10
		rp.tcpOff = ipOff + len(ip.Contents)
		rp.payload = int(ip.Length) - len(ip.Contents) - int(tl.DataOffset)*4
	case *layers.IPv6:
		src, _ = netip.AddrFromSlice(ip.SrcIP)
		dst, _ = netip.AddrFromSlice(ip.DstIP)
		rp.addrOff = [2]int{ipOff + 8, ipOff + 24}
		rp.tcpOff = ipOff + len(ip.Contents)
		rp.payload = int(ip.Length) - int(tl.DataOffset)*4
	default:
		return refPacket{}, false
	}
	rp.hdrEnd = rp.tcpOff + int(tl.DataOffset)*4
	rp.src = netip.AddrPortFrom(src, uint16(tl.SrcPort))
	rp.key = keyOf(rp.src, netip.AddrPortFrom(dst, uint16(tl.DstPort)))
	rp.seq = tl.Seq
	rp.flags = tl.Contents[13]
	for _, o := range tl.Options {
		if o.OptionType == layers.TCPOptionKindTimestamps && len(o.OptionData) == 8 {
			rp.tsval, rp.tsecr = binary.BigEndian.Uint32(o.OptionData), binary.BigEndian.Uint32(o.OptionData[4:])
			// Its place, for matchKey: the option's 8 data bytes.
			if i := bytes.Index(r.data[rp.tcpOff+20:rp.hdrEnd], append([]byte{8, 10}, o.OptionData...)); i >= 0 {
				rp.tsOff = rp.tcpOff + 20 + i + 2
			}
		}
	}
	return rp, true
}

func readPcap(t testing.TB, path string) ([]record, *pcapgo.Reader) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var in io.Reader = f
	if strings.HasSuffix(path, ".gz") { // as M-Lab's ETL reads them: every gzip member
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		in = zr
	}
	r, err := pcapgo.NewReader(in)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []record
	for {
		data, ci, err := r.ReadPacketData()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, record{ts: ci.Timestamp, data: data, origLen: ci.Length})
	}
	return out, r
}

// refConn is one connection of the reference capture.
type refConn struct {
	key       flowKey
	pkts      []refPacket
	synSeq    uint32
	syn       bool // began with a pure SYN
	handshake bool // SYN, SYN-ACK and the final ACK were all seen
	// serverReset: the server's application reset it (the server sent an
	// RST); the kernel's destroy broadcast cannot name such a connection.
	serverReset bool
}

// readReference returns the reference capture's connections by 4-tuple; a
// 4-tuple's packets are split into connections at each pure SYN with a new
// sequence number.
func readReference(t *testing.T, path string) map[flowKey][]*refConn {
	recs, _ := readPcap(t, path)
	if !nanosecondMagic(path) {
		t.Fatalf("reference capture is not in nanoseconds")
	}
	out := map[flowKey][]*refConn{}
	for _, rec := range recs {
		p, ok := decode(t, rec)
		if !ok {
			continue
		}
		conns := out[p.key]
		var c *refConn
		if len(conns) > 0 {
			c = conns[len(conns)-1]
		}
		if c == nil || p.syn && (!c.syn || c.synSeq != p.seq) {
			c = &refConn{key: p.key, syn: p.syn, synSeq: p.seq}
			out[p.key] = append(conns, c)
		}
		c.pkts = append(c.pkts, p)
	}
	for _, conns := range out {
		for _, c := range conns {
			c.handshake = c.syn && handshakeDone(c)
			for _, p := range c.pkts {
				if p.src != c.pkts[0].src && p.flags&0x04 != 0 {
					c.serverReset = true
				}
			}
		}
	}
	return out
}

func handshakeDone(c *refConn) bool {
	client := c.pkts[0].src
	synack, ack := false, false
	for _, p := range c.pkts[1:] {
		switch {
		case p.src != client && p.flags&0x12 == 0x12:
			synack = true
		case synack && p.src == client && p.flags&0x12 == 0x10:
			ack = true
		}
	}
	return synack && ack
}

// connAt returns the connection of a 4-tuple going on at ts.
func connAt(conns []*refConn, ts time.Time) *refConn {
	var best *refConn
	for _, c := range conns {
		if !c.pkts[0].ts.After(ts.Add(timestampTolerance)) {
			best = c
		}
	}
	return best
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
	checked, packets, eligible := 0, 0, 0
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
			t.Errorf("%s: no file for announced flow %s (%v -> %v, %d reference packets)", d.name, u, local, remote, len(c.pkts))
			continue
		}
		got, msg := checkFile(t, l, d, path, c, &tm)
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

// Two captures of one packet read the clock separately (see compareFlow),
// normally microseconds apart. timestampTolerance is what nearly every
// packet must meet; a virtual CPU descheduled between the two capture
// sockets' turns can stretch a few packets' gap to milliseconds, so a packet
// is still matched up to timestampOutlier, and the timing check allows
// outliers in at most 1 packet in maxOutlierShare.
const (
	timestampTolerance = 2 * time.Millisecond
	timestampOutlier   = 100 * time.Millisecond
	maxOutlierShare    = 200
)

// timing collects, over many flows, how far each saved packet's timestamp
// is from its reference packet's.
type timing struct {
	deltas []time.Duration
}

// check reports whether the timestamps agree: nearly all within
// timestampTolerance and a median under 100 µs (a clock or resolution bug
// would move them all).
func (tm *timing) check(t *testing.T, what string) {
	t.Helper()
	if len(tm.deltas) == 0 {
		return
	}
	s := sortedDurations(tm.deltas)
	late := len(s) - sort.Search(len(s), func(i int) bool { return s[i] > timestampTolerance })
	median, max := s[len(s)/2], s[len(s)-1]
	t.Logf("%s: timestamps of %d packets: median %v from the reference, max %v, %d beyond %v", what, len(s), median, max, late, timestampTolerance)
	if late > len(s)/maxOutlierShare || median > 100*time.Microsecond {
		t.Errorf("%s: timestamps disagree with the reference: %d of %d packets beyond %v (at most 1 in %d allowed), median %v",
			what, late, len(s), timestampTolerance, maxOutlierShare, median)
	}
}

// compareFlow checks a flow's saved records against its reference
// packets. Every reference packet up to -captureduration after the first
// (and before the daemon was stopped) must be in the file, and nothing else:
// same headers byte for byte (but for masked addresses and their checksums
// in netblock runs), same original length, and not one byte past the TCP
// header. Each match's timestamp difference goes to tm.
//
// Packets are matched, not compared in file order: the two capture sockets
// are fed by both CPUs, so packets of the two directions that cross in
// flight may be queued to them in different orders.
func compareFlow(t *testing.T, got []record, want []refPacket, d *daemon, l *lab, tm *timing) string {
	if len(got) == 0 {
		return "no packets"
	}
	first := want[0].ts
	type cand struct {
		p         refPacket
		mandatory bool
		used      bool
	}
	byKey := map[string][]*cand{}
	for _, p := range want {
		age := p.ts.Sub(first)
		if age > d.capDur+timestampOutlier {
			continue
		}
		c := &cand{p: p, mandatory: age <= d.capDur-timestampOutlier && p.ts.Before(d.stoppedAt)}
		k := matchKey(p.data[:p.hdrEnd], p, d.netblock || d.anon != nil, p.origLen)
		if d.tsShift {
			k = shiftedKey(p.data[:p.hdrEnd], p, p.origLen)
		}
		byKey[k] = append(byKey[k], c)
	}
	type saved struct {
		i int
		r record
	}
	gotByKey := map[string][]saved{}
	for i, g := range got {
		gp, ok := decode(t, g)
		if !ok {
			return fmt.Sprintf("packet %d is not TCP/IP", i)
		}
		if len(g.data) != gp.hdrEnd {
			return fmt.Sprintf("packet %d: %d bytes saved, its headers end at %d: bytes past the TCP header", i, len(g.data), gp.hdrEnd)
		}
		if d.netblock {
			if msg := checkMasked(gp, l); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
		}
		if d.anon != nil {
			if msg := checkMapped(gp, l, d.anon); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
		}
		k := matchKey(g.data, gp, d.netblock || d.anon != nil, g.origLen)
		if d.tsShift {
			if msg := checkZeroMAC(g.data); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
			k = shiftedKey(g.data, gp, g.origLen)
		}
		gotByKey[k] = append(gotByKey[k], saved{i, g})
	}
	// Packets with equal headers (rare: a retransmission within the same
	// TCP timestamp tick) are paired in time order, each with the nearest
	// reference packet not yet used.
	var deltas []time.Duration
	var shifts []tsShift
	for k, gs := range gotByKey {
		cs := byKey[k]
		sort.Slice(gs, func(a, b int) bool { return gs[a].r.ts.Before(gs[b].r.ts) })
		for _, g := range gs {
			var best *cand
			for _, c := range cs {
				if !c.used && absDur(c.p.ts.Sub(g.r.ts)) <= timestampOutlier && (best == nil || absDur(c.p.ts.Sub(g.r.ts)) < absDur(best.p.ts.Sub(g.r.ts))) {
					best = c
				}
			}
			if best == nil {
				// Each capture socket reads the clock itself for packets that
				// carry no receive timestamp (TCP's departure times on a veth
				// are not one), so two captures of one packet differ by the
				// microseconds between the two sockets' turns. More than
				// timestampOutlier is a wrong timestamp, or a packet the
				// reference does not have.
				return fmt.Sprintf("packet %d (%x, length %d, at %s) is not in the reference capture within %v (%d with these headers)",
					g.i, g.r.data, g.r.origLen, g.r.ts.Format(time.RFC3339Nano), timestampOutlier, len(cs))
			}
			best.used = true
			deltas = append(deltas, absDur(best.p.ts.Sub(g.r.ts)))
			if d.tsShift {
				gp, _ := decode(t, g.r)
				shifts = append(shifts, tsShift{from: best.p.src, val: gp.tsval - best.p.tsval, ecr: gp.tsecr - best.p.tsecr,
					hasTS: best.p.tsOff != 0, echoes: best.p.flags&0x10 != 0})
			}
		}
	}
	missing := 0
	for _, cs := range byKey {
		for _, c := range cs {
			if c.mandatory && !c.used {
				missing++
			}
		}
	}
	if missing > 0 {
		return fmt.Sprintf("%d reference packets missing from the file (%d saved, %d in the reference)", missing, len(got), len(want))
	}
	tm.deltas = append(tm.deltas, deltas...)
	if d.tsShift {
		return checkShifts(shifts)
	}
	return ""
}

// tsShift is what the daemon added to a saved packet's timestamps.
type tsShift struct {
	from          netip.AddrPort // the sender
	val, ecr      uint32
	hasTS, echoes bool
}

// checkShifts checks that each end's TSval was shifted by one nonzero
// constant over the flow, and each TSecr by the other end's.
func checkShifts(shifts []tsShift) string {
	by := map[netip.AddrPort]uint32{}
	for _, s := range shifts {
		if !s.hasTS {
			continue
		}
		if v, ok := by[s.from]; ok && v != s.val {
			return fmt.Sprintf("%v's TSval shifted by %d and by %d in one flow", s.from, v, s.val)
		}
		by[s.from] = s.val
	}
	for _, s := range shifts {
		if !s.hasTS || !s.echoes {
			continue
		}
		for end, v := range by {
			if end != s.from && v != s.ecr {
				return fmt.Sprintf("%v's TSecr shifted by %d, the other end's TSval by %d", s.from, s.ecr, v)
			}
		}
	}
	for end, v := range by {
		if v == 0 {
			return fmt.Sprintf("%v's timestamps were not shifted", end)
		}
	}
	return ""
}

// shiftedKey is matchKey for a daemon that also zeroes MAC addresses and
// shifts timestamps: those fields are left out too (checkShifts and
// checkZeroMAC check them).
func shiftedKey(b []byte, p refPacket, origLen int) string {
	b = bytes.Clone(b[:min(len(b), p.hdrEnd)])
	clear(b[:12])
	if p.tsOff != 0 {
		clear(b[p.tsOff : p.tsOff+8])
	}
	return matchKey(b, p, true, origLen)
}

func checkZeroMAC(b []byte) string {
	if !bytes.Equal(b[:12], make([]byte, 12)) {
		return fmt.Sprintf("MAC addresses %x not zeroed", b[:12])
	}
	return ""
}

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// matchKey is what must be equal between a saved packet and its reference:
// the headers and the original length; in netblock runs, with the address
// and checksum fields left out (checkMasked checks those).
func matchKey(b []byte, p refPacket, netblock bool, origLen int) string {
	b = bytes.Clone(b[:min(len(b), p.hdrEnd)])
	if netblock {
		alen := 16
		if p.ip4 {
			alen = 4
			clear(b[p.ipCsumOff : p.ipCsumOff+2])
		}
		clear(b[p.addrOff[0] : p.addrOff[0]+alen])
		clear(b[p.addrOff[1] : p.addrOff[1]+alen])
		clear(b[p.tcpOff+16 : p.tcpOff+18])
	}
	return fmt.Sprintf("%x/%d", b, origLen)
}

// checkMasked checks a saved netblock packet on its own: the server's
// addresses kept, the client's masked to /24 or /48, and valid checksums
// (the lab has no checksum offload, so every original checksum was valid).
// The TCP checksum can be checked only for segments without payload, whose
// checksummed bytes are all in the file.
func checkMasked(p refPacket, l *lab) string {
	alen := 16
	if p.ip4 {
		alen = 4
	}
	for side, off := range p.addrOff {
		a, _ := netip.AddrFromSlice(p.data[off : off+alen])
		switch {
		case a == l.srv4 || a == l.srv6:
		case a == l.cli4 || a == l.cli6:
			return fmt.Sprintf("address %d is the client's, unmasked: %v", side, a)
		case p.ip4 && a.As4()[3] == 0 && netip.PrefixFrom(l.cli4, 24).Contains(a):
		case !p.ip4 && a == netip.PrefixFrom(l.cli6, 48).Masked().Addr():
		default:
			return fmt.Sprintf("address %d is %v: neither the server's nor a masked client's", side, a)
		}
	}
	return checkChecksums(p, "masking")
}

// checkChecksums checks the IPv4 header checksum and, for segments without
// payload (whose checksummed bytes are all saved), the TCP checksum.
func checkChecksums(p refPacket, after string) string {
	if p.ip4 && checksum(p.data[14:p.tcpOff], 0) != 0xffff {
		return "IPv4 header checksum is not valid after " + after
	}
	if p.payload == 0 && !tcpChecksumValid(p.data, p) {
		return "TCP checksum is not valid after " + after
	}
	return ""
}

// checkMapped checks a saved cryptopan packet on its own: the server's
// addresses kept, each client address replaced by its Crypto-PAn mapping
// under the daemon's key, and valid checksums (see checkMasked).
func checkMapped(p refPacket, l *lab, anon *anonymize.Anonymizer) string {
	alen := 16
	if p.ip4 {
		alen = 4
	}
	for side, off := range p.addrOff {
		a, _ := netip.AddrFromSlice(p.data[off : off+alen])
		switch a {
		case l.srv4, l.srv6:
		case l.cli4, l.cli6, l.cli4b, l.cli6b:
			return fmt.Sprintf("address %d is a client's, unmapped: %v", side, a)
		case anon.Anonymized(l.cli4), anon.Anonymized(l.cli6), anon.Anonymized(l.cli4b), anon.Anonymized(l.cli6b):
		default:
			return fmt.Sprintf("address %d is %v: neither the server's nor a mapped client's", side, a)
		}
	}
	return checkChecksums(p, "mapping")
}

// nanosecondMagic reports whether a pcap file declares nanosecond
// timestamps. (gopacket v1.1.19's Reader.Resolution has it backwards.)
func nanosecondMagic(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var in io.Reader = f
	if strings.HasSuffix(path, ".gz") {
		if in, err = gzip.NewReader(f); err != nil {
			return false
		}
	}
	var m [4]byte
	io.ReadFull(in, m[:])
	return binary.LittleEndian.Uint32(m[:]) == 0xa1b23c4d || binary.BigEndian.Uint32(m[:]) == 0xa1b23c4d
}

func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func tcpChecksumValid(b []byte, ref refPacket) bool {
	seg := b[ref.tcpOff:ref.hdrEnd]
	var pseudo []byte
	if ref.ip4 {
		pseudo = append(pseudo, b[ref.addrOff[0]:ref.addrOff[0]+4]...)
		pseudo = append(pseudo, b[ref.addrOff[1]:ref.addrOff[1]+4]...)
		pseudo = append(pseudo, 0, 6, byte(len(seg)>>8), byte(len(seg)))
	} else {
		pseudo = append(pseudo, b[ref.addrOff[0]:ref.addrOff[0]+16]...)
		pseudo = append(pseudo, b[ref.addrOff[1]:ref.addrOff[1]+16]...)
		pseudo = append(pseudo, 0, 0, byte(len(seg)>>8), byte(len(seg)), 0, 0, 0, 6)
	}
	return checksum(append(pseudo, seg...), 0) == 0xffff
}
