package e2e

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// M-Lab's DaemonSet as m-lab/k8s-support runs it, frozen from commit
// c4337790a79718244f302b02a7f7c67c60a595b4 (2025-12-15) of
// k8s/daemonsets/templates.jsonnet, host-network form: Pcap() runs the
// predecessor (v0.7.6) with k8sPcapArgs, and no prefix file; Tcpinfo() runs
// tcp-info v1.9.0 with k8sTcpinfoArgs. A replacement must work with these
// arguments unchanged.
var (
	k8sPcapArgs = []string{
		"-prometheusx.listen-address=127.0.0.1:9993",
		"-datadir=/var/spool/ndt/pcap",
		"-tcpinfo.eventsocket=/var/local/tcpinfoeventsocket/tcpevents.sock",
		"-stream=false",
		"-anonymize.ip=none",
		"-maxidleram=1500MB",
		"-maxheap=2GB",
		"-flowtimeout=5s",
		"-maxflows=150",
	}
	k8sTcpinfoArgs = []string{
		"-prometheusx.listen-address=127.0.0.1:9991",
		"-output=/var/spool/ndt/tcpinfo",
		"-uuid-prefix-file=/var/local/uuid/prefix",
		"-tcpinfo.eventsocket=/var/local/tcpinfoeventsocket/tcpevents.sock",
		"-exclude-srcport=9100,9090,9091,9989,9990,9991,9992,9993,9994,9995,9996,9997,9998",
		"-exclude-dstip=172.25.0.1,35.202.153.90,35.188.150.110,35.185.54.7,35.243.193.167",
		"-anonymize.ip=none",
	}
)

// etlName is what m-lab/etl's pcap parser takes (parser/pcap.go's
// IsParsable and GetUUID): <uuid>.pcap.gz, the UUID being the base name.
var etlName = regexp.MustCompile(`^(.*)\.pcap\.gz$`)

// checkETL reads a file as m-lab/etl's pcap parser does: named as etlName
// says, gzip around a classic pcap that pcapgo reads, every packet decoded
// as Ethernet with IP and TCP layers, one 4-tuple in the file. It returns
// the file's UUID and 4-tuple.
func checkETL(t *testing.T, path string) (string, flowKey, bool) {
	t.Helper()
	m := etlName.FindStringSubmatch(filepath.Base(path))
	if m == nil {
		t.Errorf("%s: ETL does not parse a file named so", path)
		return "", flowKey{}, false
	}
	recs, r := readPcap(t, path) // gzip.NewReader, then pcapgo, as ETL does
	if r.LinkType() != layers.LinkTypeEthernet {
		t.Errorf("%s: link type %v, ETL decodes Ethernet", path, r.LinkType())
		return "", flowKey{}, false
	}
	keys := map[flowKey]bool{}
	var key flowKey
	for i, rec := range recs {
		p := gopacket.NewPacket(rec.data, layers.LayerTypeEthernet, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		if p.Layer(layers.LayerTypeIPv4) == nil && p.Layer(layers.LayerTypeIPv6) == nil || p.Layer(layers.LayerTypeTCP) == nil {
			t.Errorf("%s: packet %d has no IP and TCP layer when decoded as Ethernet", path, i)
			return "", flowKey{}, false
		}
		if rp, ok := decode(t, rec); ok {
			keys[rp.key] = true
			key = rp.key
		}
	}
	if len(keys) != 1 {
		t.Errorf("%s: %d 4-tuples in one file", path, len(keys))
		return "", flowKey{}, false
	}
	return m[1], key, true
}

// TestKubernetesDropIn runs the daemon with k8sPcapArgs verbatim (paths
// mapped into the lab) beside tcp-info with k8sTcpinfoArgs, which has a
// prefix file the daemon is not given, and lab traffic both on an excluded
// port (9100, node-exporter's) and on the service's: every flow tcp-info
// announces is saved as a file ETL parses, checked packet by packet against
// the reference capture; no connection of the excluded port is saved; no
// file has a made-up (_unsafe) prefix. It also measures how late tcp-info
// announces connections, the margin of the silence rule
// (sockdiag.DefaultSilence).
func TestKubernetesDropIn(t *testing.T) {
	l := newLab(t, 17)
	root := filepath.Join(l.dir, "node") // the node's paths, under the lab's directory
	const podPrefix = "ndt-x7k2p_1764000000"
	prefix := filepath.Join(root, "var/local/uuid/prefix")
	os.MkdirAll(filepath.Dir(prefix), 0o755)
	os.WriteFile(prefix, []byte(podPrefix), 0o644) // as M-Lab's uuid init container writes it
	mapArgs := func(args []string) []string {
		var out []string
		for _, a := range args {
			k, v, _ := strings.Cut(a, "=")
			switch {
			case k == "-tcpinfo.eventsocket":
				a = k + "=" + l.tcpinfoSock
			case strings.HasPrefix(v, "/"):
				a = k + "=" + filepath.Join(root, v)
			}
			out = append(out, a)
		}
		return out
	}
	l.tcpinfoSock = filepath.Join(l.dir, "tcpevents.sock")
	l.startTCPInfo("tcp-info.log", "", mapArgs(k8sTcpinfoArgs)...)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "k8s", capDur: 30 * time.Second}
	l.startDaemon(d, 9990, mapArgs(k8sPcapArgs)...)
	d.dataDir = filepath.Join(root, "var/spool/ndt/pcap")
	metrics := func() string { return l.scrapeIn("127.0.0.1:9993") }
	waitFor(t, 10*time.Second, "the eventsocket connection", func() bool {
		return strings.Contains(metrics(), "pcap_eventsocket_connected 1")
	})
	captureStart := time.Now()
	l.server(8097)
	l.server(9100)
	// Connections of the excluded port that tcp-info would have seen
	// (longer than the silence rule's 200 ms) while the service is used
	// (tcp-info's announcements of its connections show that it looked at
	// the sockets of each family after the excluded ones were made), then
	// short ones.
	done := make(chan error, 4)
	for _, a := range []string{l.srv4.String(), l.srv6.String(), l.srv4.String(), l.srv6.String()} {
		go func() { done <- longFlow(netip.MustParseAddr(a), 9100, 1000, 8) }()
	}
	for range 4 {
		flows(t, l.srv4, 8097, 3)
		flows(t, l.srv6, 8097, 3)
		time.Sleep(200 * time.Millisecond)
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	excluded := 4
	// Within the DaemonSet's -maxflows=150, as the busiest servers run.
	for round := 0; round < 9; round++ {
		flows(t, l.srv4, 8097, 10)
		flows(t, l.srv6, 8097, 10)
		excluded += len(flows(t, l.srv4, 9100, 3)) + len(flows(t, l.srv6, 9100, 3))
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(6500 * time.Millisecond) // -flowtimeout=5s for the last ones
	metricsText := metrics()
	d.stoppedAt = time.Now()
	if _, err := stop(t, d.cmd, syscall.SIGTERM, 25*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, l.log("daemon-k8s.log"))
	}
	stop(t, tcpdump, syscall.SIGTERM, 5*time.Second)
	cancel()

	files := daemonFiles(t, d)
	byKey := map[flowKey]string{}
	for u, path := range files {
		if strings.Contains(u, "_unsafe") || !strings.HasPrefix(u, podPrefix+"_") {
			t.Errorf("%s: not named with tcp-info's prefix %s", path, podPrefix)
		}
		if name, key, ok := checkETL(t, path); ok {
			byKey[key] = name
		}
	}
	for k, u := range byKey {
		if k.a.Port() == 9100 || k.b.Port() == 9100 {
			t.Errorf("%s: a connection of a port tcp-info excludes was saved (%v)", u, k)
		}
	}
	ref := readReference(t, refFile)
	events.mu.Lock()
	opens := events.opens
	events.mu.Unlock()
	checkDaemon(t, l, d, opens, ref, captureStart, nil)

	// How late tcp-info announced connections: the margin of the rule
	// that its silence about a connection older than 200 ms is a decision.
	var delays []time.Duration
	for _, e := range opens {
		if e.ID == nil || e.ID.DPort == 0 {
			continue
		}
		local := netip.AddrPortFrom(netip.MustParseAddr(e.ID.SrcIP).Unmap(), e.ID.SPort)
		remote := netip.AddrPortFrom(netip.MustParseAddr(e.ID.DstIP).Unmap(), e.ID.DPort)
		if c := connAt(ref[keyOf(local, remote)], e.Timestamp); c != nil {
			delays = append(delays, e.Timestamp.Sub(c.pkts[0].ts))
		}
	}
	sort.Slice(delays, func(i, j int) bool { return delays[i] < delays[j] })
	if len(delays) > 0 {
		t.Logf("tcp-info announced %d connections, from their SYN: median %v, p99 %v, max %v", len(delays),
			delays[len(delays)/2], delays[len(delays)*99/100], delays[len(delays)-1])
	}
	silenced, _ := metricValue(metricsText, `pcap_kernel_uuid_lookups_total{result="silenced"}`)
	t.Logf("%d files; %d connections of the excluded port; look-ups silenced %v", len(files), excluded, silenced)
	if silenced < 4 {
		t.Errorf("%v connections silenced, want at least the 4 long ones of the excluded port", silenced)
	}
	checkPromtool(t, metricsText)
	// -maxheap=2GB is the runtime's soft memory limit too; the version is
	// where M-Lab's dashboards look for it (m-lab/go's prometheusx).
	for name, want := range map[string]float64{
		"go_gc_gomemlimit_bytes":                        2e9,
		`git_short_commit{commit="` + testCommit + `"}`: 0xabc1234,
		`pcap_build_info{commit="` + testCommit + `",goversion="` + runtime.Version() + `",version="` + testVersion + `"}`: 1,
	} {
		if v, ok := metricValue(metricsText, name); !ok || v != want {
			t.Errorf("%s = %v (%v), want %v", name, v, ok, want)
		}
	}
}

// checkPromtool lints a /metrics text with promtool, as Prometheus's own
// tooling (and a cluster's CI) would.
func checkPromtool(t *testing.T, metricsText string) {
	t.Helper()
	if metricsText == "" {
		t.Error("no metrics to check")
		return
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(metricsText)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
