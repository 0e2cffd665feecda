package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	apps "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"golang.org/x/sys/unix"
)

// refuseNetlinkGroupsArg makes the test binary run the rest of its command
// line under a seccomp filter that refuses to join netlink multicast groups
// with EPERM, as a kernel does to a process without CAP_NET_ADMIN that
// joins the socket destroy broadcasts (this machine's kernel may allow it).
const refuseNetlinkGroupsArg = "exec-refusing-netlink-groups"

// execRefusingNetlinkGroups installs that filter on this thread and execs
// argv; it returns only on failure.
func execRefusingNetlinkGroups(argv []string) error {
	if runtime.GOARCH != "amd64" {
		return fmt.Errorf("the seccomp filter is written for amd64, not %s", runtime.GOARCH)
	}
	const (
		ld, jeq = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		ret     = unix.BPF_RET | unix.BPF_K
		allow   = unix.SECCOMP_RET_ALLOW
		eperm   = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
	)
	// struct seccomp_data: nr at 0, arch at 4, args[i] at 16+8i (low
	// half first on amd64).
	filter := []unix.SockFilter{
		{Code: ld, K: 4},
		{Code: jeq, Jf: 6, K: unix.AUDIT_ARCH_X86_64},
		{Code: ld, K: 0},
		{Code: jeq, Jf: 4, K: unix.SYS_SETSOCKOPT},
		{Code: ld, K: 24},
		{Code: jeq, Jf: 2, K: unix.SOL_NETLINK},
		{Code: ld, K: 32},
		{Code: jeq, Jt: 1, K: unix.NETLINK_ADD_MEMBERSHIP},
		{Code: ret, K: allow},
		{Code: ret, K: eperm},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	runtime.LockOSThread() // the filter is this thread's, and exec keeps it
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0); err != nil {
		return err
	}
	return syscall.Exec(argv[0], argv, os.Environ())
}

// predecessorFlags is the predecessor's production command line
// (../shared/CONTEXT.md), run with only CAP_NET_RAW.
const predecessorFlags = "-datadir=/var/spool/ndt/pcap -tcpinfo.eventsocket=/var/local/tcpinfoeventsocket/tcpevents.sock -stream=false -anonymize.ip=none -maxidleram=1500MB -maxheap=2GB -flowtimeout=5s -maxflows=150"

// TestPredecessorDeployment runs the daemon as the predecessor ran in
// production: its command line, without a UUID prefix file, beside tcp-info,
// with CAP_NET_RAW alone (capabilities really dropped), and a kernel that
// refuses the destroy broadcasts to a process without CAP_NET_ADMIN (a
// seccomp filter stands in for that refusal where this kernel allows
// them). The daemon must capture, say once what it cannot name, show it in
// its metrics, and write every flow tcp-info announces.
func TestPredecessorDeployment(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the seccomp stand-in is written for amd64")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	l := newLab(t, 13)
	l.startTCPInfo("tcp-info.log", "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "predecessor", capDur: 30 * time.Second,
		wrap: []string{"setpriv", "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw", self, refuseNetlinkGroupsArg}}
	dataDir := filepath.Join(l.dir, "data-"+d.name)
	args := strings.Fields(strings.NewReplacer("/var/spool/ndt/pcap", dataDir, "/var/local/tcpinfoeventsocket/tcpevents.sock", l.tcpinfoSock).Replace(predecessorFlags))
	l.startDaemon(d, 9990, append(args, "-interface", l.nsIf)...)
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if m := regexp.MustCompile(`CapEff:\s*([0-9a-f]+)`).FindSubmatch(status); m == nil || string(m[1]) != fmt.Sprintf("%016x", 1<<unix.CAP_NET_RAW) {
		t.Fatalf("the daemon's effective capabilities are %q, want CAP_NET_RAW alone", m)
	}
	waitFor(t, 10*time.Second, "the eventsocket connection", func() bool {
		return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 1")
	})
	captureStart := time.Now()
	l.server(8093)
	// About the busiest production load (50-60 concurrent flows, each
	// tracked for its linger after the FINs): within -maxflows=150.
	for round := 0; round < 9; round++ {
		flows(t, l.srv4, 8093, 10)
		flows(t, l.srv6, 8093, 10)
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(2500 * time.Millisecond)
	metricsText := stopAll(t, l, []*daemon{d}, tcpdump)
	cancel()

	log := l.log("daemon-predecessor.log")
	if n := strings.Count(log, "destroy broadcasts needs CAP_NET_ADMIN"); n != 1 {
		t.Errorf("the daemon said %d times that it lacks CAP_NET_ADMIN, want once:\n%s", n, log)
	}
	if v, ok := metricValue(metricsText[d.name], "pcap_kernel_destroy_broadcasts"); !ok || v != 0 {
		t.Errorf("pcap_kernel_destroy_broadcasts %v (%v), want 0", v, ok)
	}
	if v, _ := metricValue(metricsText[d.name], `pcap_flows_refused_total{limit="flow_limit"}`); v != 0 {
		t.Errorf("%v flows refused by -maxflows: the lab's load should stay within it", v)
	}
	ref := readReference(t, refFile)
	events.mu.Lock()
	opens := events.opens
	events.mu.Unlock()
	checkDaemon(t, l, d, opens, ref, captureStart, nil)
}

// TestManifestOutput runs the daemon with the arguments of the shipped
// Kubernetes manifest (its paths mapped into the lab, the capture limited
// to the lab's interface) beside tcp-info with the manifest's prefix file,
// and checks the output against what the pipeline behind it expects: the
// manifest's pusher watches the daemon's data directory and hears each file
// once; every file is what M-Lab's ETL parses (parser/pcap.go): named
// <uuid>.pcap.gz with tcp-info's UUID as its base name, gzip around a
// classic pcap that pcapgo reads, every packet decoded as Ethernet with an
// IP layer, one 4-tuple per file.
func TestManifestOutput(t *testing.T) {
	b, err := os.ReadFile("../deploy/kubernetes/packet-headers.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds apps.DaemonSet
	var cm corev1.ConfigMap
	for _, doc := range strings.Split(string(b), "\n---\n") {
		if strings.Contains(doc, "\nkind: ConfigMap") {
			err = yaml.UnmarshalStrict([]byte(doc), &cm)
		} else {
			err = yaml.UnmarshalStrict([]byte(doc), &ds)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	var phArgs, pusherArgs []string
	for _, c := range ds.Spec.Template.Spec.Containers {
		switch c.Name {
		case "packet-headers":
			phArgs = c.Args
		case "pusher":
			pusherArgs = c.Args
		}
	}
	// The ConfigMap's exclusions, for tcp-info and the daemon alike.
	for k, v := range cm.Data {
		t.Setenv(k, v)
	}
	l := newLab(t, 15)
	root := filepath.Join(l.dir, "node") // the node's paths, under the lab's directory
	prefix := filepath.Join(root, "var/local/uuid/prefix")
	os.MkdirAll(filepath.Dir(prefix), 0o755)
	os.WriteFile(prefix, []byte("e2enode_1764000000"), 0o644)
	l.startTCPInfo("tcp-info.log", prefix)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := l.recordEvents(ctx)
	var args []string
	dataDir := ""
	for _, a := range phArgs {
		if strings.HasPrefix(a, "-prometheusx.listen-address=") {
			continue // the lab's, reachable from outside the namespace
		}
		if strings.HasPrefix(a, "-tcpinfo.eventsocket=") {
			a = "-tcpinfo.eventsocket=" + l.tcpinfoSock
		} else if k, v, ok := strings.Cut(a, "="); ok && strings.HasPrefix(v, "/") {
			a = k + "=" + filepath.Join(root, v)
			if k == "-datadir" {
				dataDir = filepath.Join(root, v)
			}
		}
		args = append(args, a)
	}
	// The pusher of the manifest watches <directory>/<datatype>.
	var dir string
	var watched []string
	for _, a := range pusherArgs {
		if v, ok := strings.CutPrefix(a, "-directory="); ok {
			dir = filepath.Join(root, v)
		}
		if v, ok := strings.CutPrefix(a, "-datatype="); ok {
			watched = append(watched, v)
		}
	}
	if dataDir == "" || filepath.Dir(dataDir) != dir || !slices.Contains(watched, filepath.Base(dataDir)) {
		t.Fatalf("the manifest's pusher watches %s for %v, the daemon writes to %s", dir, watched, dataDir)
	}
	w := watch(t, dataDir)
	d := &daemon{name: "manifest", capDur: 30 * time.Second}
	l.startDaemon(d, 9990, append(args, "-interface", l.nsIf)...)
	d.dataDir = dataDir
	waitFor(t, 10*time.Second, "the eventsocket connection", func() bool {
		return strings.Contains(scrape(d.metrics), "pcap_eventsocket_connected 1")
	})
	l.server(8095)
	traffic(t, l, 8095)
	time.Sleep(2500 * time.Millisecond)
	if _, err := stop(t, d.cmd, syscall.SIGTERM, 6*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, l.log("daemon-manifest.log"))
	}
	cancel()
	w.check(t, "the manifest's pusher")

	events.mu.Lock()
	opens := events.opens
	events.mu.Unlock()
	named := 0
	for _, path := range daemonFiles(t, d) {
		if u, _, ok := checkETL(t, path); ok {
			if _, ok := opens[u]; ok {
				named++
			}
		}
	}
	indexes := 0
	filepath.Walk(dataDir, func(p string, info os.FileInfo, err error) error {
		if err == nil && isIndex(p) {
			indexes++
			if etlName.MatchString(filepath.Base(p)) {
				t.Errorf("%s: ETL would parse the flow index as a trace", p)
			}
		}
		return nil
	})
	if indexes == 0 {
		t.Errorf("no flow index beside the files")
	}
	t.Logf("%d files under tcp-info's UUIDs, every file as ETL parses it; %d flow index files, which ETL skips (IsParsable)", named, indexes)
	// Every file is under a UUID tcp-info announced or one the kernel
	// gave a connection it did not (TestKernelUUIDs); how many tcp-info
	// announced depends on its polls.
	if named == 0 {
		t.Error("no file under tcp-info's UUIDs")
	}
}
