package e2e

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSelection runs three daemons on one interface that carries 1,500
// server addresses: the default (incoming connections only), -outgoing,
// and -localport for one of two services. Five connections come in to
// one service, three to the other, five go out from the server, and one
// comes in to an address added after the daemons started, and one that
// lives past -uuidwaitduration (named by its look-up, not its end). Each daemon
// must save exactly the connections it selects, and a UDP flood must not
// reach any of them (the kernel's filter no longer lists the addresses).
// Offline, the reference capture split with -localaddr gives the live
// default's connections, and with -outgoing all of them.
func TestSelection(t *testing.T) {
	l := newLab(t, 30)
	// 1,500 addresses more on the server's interface: a filter listing
	// them would pass the kernel's 4096 instructions.
	var batch strings.Builder
	for i := 0; i < 1500; i++ {
		fmt.Fprintf(&batch, "address add 10.197.%d.%d/32 dev %s\n", i/250, i%250+1, l.nsIf)
	}
	batchFile := filepath.Join(l.dir, "addresses")
	os.WriteFile(batchFile, []byte(batch.String()), 0o644)
	l.exec("ip", "-batch", batchFile)

	l.server(8081)
	l.server(8082)
	// Outgoing connections: the server dials a listener on the client's side.
	out, err := net.Listen("tcp", netip.AddrPortFrom(l.cli4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	go func() {
		for {
			c, err := out.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	outPort := uint16(out.Addr().(*net.TCPAddr).Port)

	refFile, tcpdump := l.startReference()
	prefix := filepath.Join(l.dir, "prefix")
	os.WriteFile(prefix, []byte("selection_1764000000"), 0o644)
	common := []string{"-interface", l.nsIf, "-uuid-prefix-file", prefix, "-flowtimeout", "5s", "-uuidwaitduration", "2s"}
	def, both, port := &daemon{name: "default"}, &daemon{name: "outgoing"}, &daemon{name: "localport"}
	cmds := []*exec.Cmd{
		l.startDaemon(def, 9990, common...),
		l.startDaemon(both, 9991, append([]string{"-outgoing"}, common...)...),
		l.startDaemon(port, 9992, append([]string{"-localport", "8082"}, common...)...),
	}

	in1 := flows(t, l.srv4, 8081, 5)
	in2 := flows(t, l.srv4, 8082, 3)
	outgoing := map[netip.AddrPort]bool{}
	l.inNamespace(func() {
		for i := 0; i < 5; i++ {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(l.cli4, outPort).String(), 2*time.Second)
			if err != nil {
				t.Errorf("outgoing dial: %v", err)
				return
			}
			outgoing[clientEnd(c)] = true
			c.Write([]byte("hello\n"))
			time.Sleep(30 * time.Millisecond)
			c.Close()
		}
	})
	// An address added now: its connections are saved from their SYN
	// once the daemons have heard of it (the kernel's notification).
	added := netip.MustParseAddr(fmt.Sprintf("10.199.%d.50", 30))
	l.exec("ip", "addr", "add", added.String()+"/24", "dev", l.nsIf)
	time.Sleep(time.Second)
	for c := range flows(t, added, 8081, 1) {
		in1[c] = true
	}
	long, err := net.DialTimeout("tcp", netip.AddrPortFrom(added, 8081).String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	longStart := time.Now()
	long.Write([]byte("e hello\n"))
	io.ReadFull(long, make([]byte, 7))
	in1[clientEnd(long)] = true
	// UDP, which the kernel's filter keeps out of every capture. (A few
	// IPv6 frames that are not TCP do pass it: those with extension
	// headers, such as multicast listener reports, which the decoder
	// sorts out.)
	notTCP := func(d *daemon) float64 {
		v, _ := metricValue(scrape(d.metrics), `pcap_undecodable_packets_total{kind="not_tcp"}`)
		return v
	}
	before := map[*daemon]float64{def: notTCP(def), both: notTCP(both), port: notTCP(port)}
	const datagrams = 500
	udp, err := net.Dial("udp", netip.AddrPortFrom(l.srv4, 9).String())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < datagrams; i++ {
		udp.Write([]byte("not tcp"))
	}
	udp.Close()
	time.Sleep(time.Until(longStart.Add(3 * time.Second))) // past -uuidwaitduration
	long.Write([]byte("e bye\n"))
	io.ReadFull(long, make([]byte, 5))
	long.Close()
	time.Sleep(1500 * time.Millisecond) // FIN linger and a tick
	for i, d := range []*daemon{def, both, port} {
		m := scrape(d.metrics)
		if v := notTCP(d) - before[d]; v >= datagrams/10 {
			t.Errorf("%s: %v frames that are not TCP reached the daemon during a flood of %d UDP datagrams: the kernel did not filter them", d.name, v, datagrams)
		}
		if d == def {
			if v, _ := metricValue(m, `pcap_packets_total{outcome="outgoing"}`); v == 0 {
				t.Errorf("%s: no packet counted as outgoing", d.name)
			}
		}
		if _, err := stop(t, cmds[i], syscall.SIGTERM, 10*time.Second); err != nil {
			t.Errorf("%s: %v", d.name, err)
		}
	}
	stop(t, tcpdump, syscall.SIGTERM, 5*time.Second)

	check := func(what string, dir string, want map[uint16]map[netip.AddrPort]bool, none map[uint16]map[netip.AddrPort]bool) {
		t.Helper()
		for p, conns := range want {
			expectFiles(t, fmt.Sprintf("%s, port %d", what, p), conns, filePorts(t, dir, p))
		}
		for p, conns := range none {
			files := filePorts(t, dir, p)
			for c := range conns {
				if files[c] != 0 {
					t.Errorf("%s: the connection of %v on port %d was saved, and should not be", what, c, p)
				}
			}
		}
	}
	// Outgoing connections are counted by the remote listener's port.
	check("default", def.dataDir, map[uint16]map[netip.AddrPort]bool{8081: in1, 8082: in2}, map[uint16]map[netip.AddrPort]bool{outPort: outgoing})
	check("-outgoing", both.dataDir, map[uint16]map[netip.AddrPort]bool{8081: in1, 8082: in2, outPort: outgoing}, nil)
	for _, r := range readIndex(t, def.name, def.dataDir) {
		if netip.AddrPortFrom(netip.MustParseAddr(r.Src.IP), r.Src.Port) == clientEnd(long) && !r.SYN {
			t.Errorf("the long connection to the added address was saved from %v, without its SYN: it was not named by its look-up", r.First)
		}
	}
	check("-localport 8082", port.dataDir, map[uint16]map[netip.AddrPort]bool{8082: in2}, map[uint16]map[netip.AddrPort]bool{8081: in1, outPort: outgoing})

	// Offline, the same selection from the reference capture.
	for _, o := range []struct {
		name string
		args []string
		want map[uint16]map[netip.AddrPort]bool
		none map[uint16]map[netip.AddrPort]bool
	}{
		{"offline", nil, map[uint16]map[netip.AddrPort]bool{8081: in1, 8082: in2}, map[uint16]map[netip.AddrPort]bool{outPort: outgoing}},
		{"offline -outgoing", []string{"-outgoing"}, map[uint16]map[netip.AddrPort]bool{8081: in1, 8082: in2, outPort: outgoing}, nil},
	} {
		dir := filepath.Join(l.dir, "split-"+strings.ReplaceAll(o.name, " ", ""))
		args := append([]string{"-read", refFile, "-datadir", dir, "-quiet", "-localaddr", l.srv4.String(), "-localaddr", added.String()}, o.args...)
		if b, err := exec.Command(filepath.Join(l.bin, "packet-headers"), args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", o.name, err, b)
		}
		check(o.name, dir, o.want, o.none)
	}
}

// TestSample runs a daemon beside tcp-info with -sample 3 and a key, then
// splits the reference capture offline with tcp-info's recorded events and
// the same flags. Every file's UUID must be one the documented hash
// chooses (computed here, as another tool would), every connection tcp-info
// announced and the hash chooses must have its file, and live and offline
// must have chosen the same UUIDs.
func TestSample(t *testing.T) {
	l := newLab(t, 31)
	l.server(8083)
	prefix := filepath.Join(l.dir, "prefix")
	os.WriteFile(prefix, []byte("sample_1764000000"), 0o644)
	key := filepath.Join(l.dir, "sample.key")
	os.WriteFile(key, []byte("the study's key"), 0o600)
	chosen := func(uuid string) bool {
		m := hmac.New(sha256.New, []byte("the study's key"))
		m.Write([]byte(uuid))
		return binary.BigEndian.Uint64(m.Sum(nil))%3 == 0
	}
	ti := l.startTCPInfo("tcp-info.log", prefix)
	defer ti.Process.Kill()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "sample"}
	cmd := l.startDaemon(d, 9990, "-interface", l.nsIf, "-tcpinfo.eventsocket", l.tcpinfoSock, "-uuid-prefix-file", prefix,
		"-sample", "3", "-sample.keyfile", key)
	clients := flows(t, l.srv4, 8083, 60)
	time.Sleep(1500 * time.Millisecond) // FIN linger and a tick
	if v, _ := metricValue(scrape(d.metrics), "pcap_sample_rate"); v != 3 {
		t.Errorf("pcap_sample_rate %v, want 3", v)
	}
	if _, err := stop(t, cmd, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	stop(t, tcpdump, syscall.SIGTERM, 5*time.Second)
	cancel()
	<-events.done

	// The UUIDs tcp-info gave the lab's connections.
	announced := map[string]bool{}
	events.mu.Lock()
	for u, e := range events.opens {
		if e.ID != nil && e.ID.DstIP != "" && clients[netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort)] {
			announced[u] = true
		}
	}
	events.mu.Unlock()
	uuids := func(dir string) map[string]bool {
		out := map[string]bool{}
		for k, paths := range filesByKey(t, dir) {
			if k.a.Port() != 8083 && k.b.Port() != 8083 {
				continue // a scrape of the metrics
			}
			for _, p := range paths {
				out[strings.TrimSuffix(filepath.Base(p), ".pcap.gz")] = true
			}
		}
		return out
	}
	live := uuids(d.dataDir)
	split := filepath.Join(l.dir, "split")
	if b, err := exec.Command(filepath.Join(l.bin, "packet-headers"), "-read", refFile, "-events", filepath.Join(l.dir, "events.jsonl"),
		"-datadir", split, "-quiet", "-localaddr", l.srv4.String(), "-sample", "3", "-sample.keyfile", key).CombinedOutput(); err != nil {
		t.Fatalf("offline: %v\n%s", err, b)
	}
	offline := uuids(split)
	for name, set := range map[string]map[string]bool{"live": live, "offline": offline} {
		for u := range set {
			if !chosen(u) {
				t.Errorf("%s: %s has a file, and the hash does not choose it", name, u)
			}
		}
	}
	want := 0
	for u := range announced {
		if !chosen(u) {
			continue
		}
		want++
		if !live[u] || !offline[u] {
			t.Errorf("%s, announced and chosen: live file %v, offline file %v", u, live[u], offline[u])
		}
	}
	t.Logf("%d connections, %d announced by tcp-info, %d of them chosen; %d live files, %d offline", len(clients), len(announced), want, len(live), len(offline))
	if want == 0 {
		t.Error("the hash chose none of the announced connections: the test says nothing")
	}
}

// TestUnseenFlood: the kernel source names only the sockets of connections
// the daemon may save. Beside tcp-info, while 50 connections come in on the
// captured interface, 1,000 come in on another interface of the server and
// 1,000 run over its loopback: none of those is named (their destroy
// broadcasts are counted as not_selected or excluded), and every
// connection tcp-info announced on the captured interface is saved.
func TestUnseenFlood(t *testing.T) {
	l := newLab(t, 32)
	_, srv2, _ := l.addLink("uf32", 32)
	l.server(8084)
	prefix := filepath.Join(l.dir, "prefix")
	os.WriteFile(prefix, []byte("unseen_1764000000"), 0o644)
	ti := l.startTCPInfo("tcp-info.log", prefix)
	defer ti.Process.Kill()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	d := &daemon{name: "unseen"}
	cmd := l.startDaemon(d, 9990, "-interface", l.nsIf, "-tcpinfo.eventsocket", l.tcpinfoSock, "-uuid-prefix-file", prefix)
	const flood = 1000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < flood/100; i++ {
			flows(t, srv2, 8084, 100)
		}
		l.inNamespace(func() { // on this thread alone: new goroutines would leave the namespace
			for i := 0; i < flood; i++ {
				c, err := net.DialTimeout("tcp", "127.0.0.1:8084", 2*time.Second)
				if err != nil {
					t.Errorf("loopback dial: %v", err)
					return
				}
				c.Write([]byte("e hi\n"))
				c.Close()
			}
		})
	}()
	seen := flows(t, l.srv4, 8084, 50)
	<-done
	time.Sleep(1500 * time.Millisecond)
	m := scrape(d.metrics)
	named, _ := metricValue(m, `pcap_kernel_destroy_events_total{result="named"}`)
	notSelected, _ := metricValue(m, `pcap_kernel_destroy_events_total{result="not_selected"}`)
	excluded, _ := metricValue(m, `pcap_kernel_destroy_events_total{result="excluded"}`)
	t.Logf("destroy broadcasts: %v named, %v not_selected, %v excluded", named, notSelected, excluded)
	if named >= flood/2 {
		t.Errorf("%v destroyed sockets named: the flood's sockets, which no capture sees, were named", named)
	}
	if notSelected == 0 {
		t.Error("no destroyed socket counted as not_selected")
	}
	if _, err := stop(t, cmd, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	cancel()
	<-events.done
	announced := map[netip.AddrPort]bool{}
	events.mu.Lock()
	for _, e := range events.opens {
		if e.ID != nil && e.ID.DstIP != "" {
			if c := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort); seen[c] {
				announced[c] = true
			}
		}
	}
	events.mu.Unlock()
	files := filePorts(t, d.dataDir, 8084)
	expectFiles(t, "announced on the captured interface", announced, files)
	for c, n := range files {
		if !seen[c] && n > 0 {
			t.Errorf("a file for %v, a connection the capture does not see", c)
		}
	}
}

// cgroup2Mount mounts the cgroup v2 hierarchy in the lab's directory: the
// processes the lab starts run under ip netns exec, which mounts a sysfs
// of the namespace over /sys and so hides /sys/fs/cgroup's mounts; the
// same hierarchy mounted elsewhere is theirs too (a host with cgroup v1
// controllers still has it, and the kernel records sockets in it).
func cgroup2Mount(t *testing.T, l *lab) string {
	dir := filepath.Join(l.dir, "cgroup2")
	os.Mkdir(dir, 0o755)
	if out, err := exec.Command("mount", "-t", "cgroup2", "none", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount cgroup v2: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	return dir
}

// TestCgroupSelection runs two services in the server's namespace, each in
// a cgroup v2 of its own, as two systemd units or containers would be, and
// a daemon told -cgroup with the first one's: it must save exactly the
// first service's connections. The first listens on 0.0.0.0 only, and the
// second also listens on [::1] at the first one's port, as any local user
// may: a listener on another address (dumped after the service's) must
// not make the service's connections another cgroup's.
func TestCgroupSelection(t *testing.T) {
	l := newLab(t, 33)
	mnt := cgroup2Mount(t, l)
	var cgroups []string
	var servers []*exec.Cmd
	t.Cleanup(func() { // before the lab's own cleanup: the cgroups must be empty to go
		for _, s := range servers {
			s.Process.Kill()
			s.Wait()
		}
		for _, c := range cgroups {
			os.Remove(c)
		}
	})
	for i, listen := range [][]string{{"AF_INET", "0.0.0.0", "8095"}, {"AF_INET6", "::", "8096"}, {"AF_INET6", "::1", "8095"}} {
		name := fmt.Sprintf("phe2e%d-svc%d", os.Getpid(), min(i, 1))
		dir := filepath.Join(mnt, name)
		if i < 2 {
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			cgroups = append(cgroups, dir)
		}
		server := fmt.Sprintf(`import socket
s = socket.socket(socket.%s)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if s.family == socket.AF_INET6 and "%s" != "::":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("%s", %s))
s.listen(128)
while True:
    c, _ = s.accept()
    c.recv(100)
    c.sendall(b"ok\n")
    c.close()
`, listen[0], listen[1], listen[1], listen[2])
		servers = append(servers, l.start(fmt.Sprintf("%s-%d.log", name, i), "sh", "-c", `echo $$ > "$0/cgroup.procs" && exec python3 -c "$1"`, dir, server))
		waitFor(t, 10*time.Second, name+" to listen on "+listen[1], func() bool {
			var c net.Conn
			var err error
			if listen[1] == "::1" { // the namespace's own loopback
				l.inNamespace(func() { c, err = net.Dial("tcp", "[::1]:"+listen[2]) })
			} else {
				c, err = net.Dial("tcp", net.JoinHostPort(l.srv4.String(), listen[2]))
			}
			if err == nil {
				c.Close()
			}
			return err == nil
		})
	}
	prefix := filepath.Join(l.dir, "prefix")
	os.WriteFile(prefix, []byte("cgroup_1764000000"), 0o644)
	d := &daemon{name: "cgroup"}
	cmd := l.startDaemon(d, 9990, "-interface", l.nsIf, "-uuid-prefix-file", prefix, "-cgroup", filepath.Base(cgroups[0]))
	time.Sleep(1500 * time.Millisecond) // a reading of the listeners and their cgroups
	selected := flows(t, l.srv4, 8095, 5)
	other := flows(t, l.srv4, 8096, 5)
	time.Sleep(1500 * time.Millisecond)
	if v, _ := metricValue(scrape(d.metrics), `pcap_packets_total{outcome="other_cgroup"}`); v == 0 {
		t.Error("no packet counted as other_cgroup")
	}
	if _, err := stop(t, cmd, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	expectFiles(t, "the selected cgroup's service", selected, filePorts(t, d.dataDir, 8095))
	files := filePorts(t, d.dataDir, 8096)
	for c := range other {
		if files[c] != 0 {
			t.Errorf("the other cgroup's connection %v was saved", c)
		}
	}
}
