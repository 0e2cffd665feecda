package e2e

import (
	"fmt"
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

// TestMetricsPortFlood holds 2,000 idle connections to the daemon's
// metrics port, its descriptors limited to 1,024, while connections are
// made in the lab: /healthz must keep answering and every connection be
// saved (without the server's bounds, the idle connections took every
// descriptor: no file could be created, /healthz stopped answering).
func TestMetricsPortFlood(t *testing.T) {
	l := newLab(t, 18)
	d := &daemon{name: "flood", capDur: 30 * time.Second, wrap: []string{"prlimit", "--nofile=1024:1024", "--"}}
	l.startDaemon(d, 9990, "-interface", l.nsIf, "-flowtimeout=1s", "-sigtermwait=0s")
	l.server(8098)
	var idle []net.Conn
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	healthz := func() error {
		if code := probe(d.metrics, "/healthz"); code != 200 {
			return fmt.Errorf("status %d", code)
		}
		return nil
	}
	made := 0
	for i := 0; i < 2000; i++ {
		c, err := net.DialTimeout("tcp", d.metrics, 3*time.Second)
		if err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
		idle = append(idle, c)
		if i%400 == 399 {
			made += len(flows(t, l.srv4, 8098, 10))
			if err := healthz(); err != nil {
				t.Errorf("/healthz with %d idle connections open: %v", i+1, err)
			}
		}
	}
	made += len(flows(t, l.srv6, 8098, 10))
	if err := healthz(); err != nil {
		t.Errorf("/healthz with 2000 idle connections open: %v", err)
	}
	time.Sleep(2500 * time.Millisecond) // the flows' timeouts
	if _, err := stop(t, d.cmd, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, l.log("daemon-flood.log"))
	}
	log := l.log("daemon-flood.log")
	if strings.Contains(log, "too many open files") {
		t.Errorf("the daemon ran out of descriptors:\n%s", log)
	}
	daemonFiles(t, d) // no hidden or partial file left
	if got := len(filePorts(t, d.dataDir, 8098)); got != made {
		t.Errorf("%d files for %d connections made during the flood", got, made)
	}
	t.Logf("%d connections saved with 2000 idle connections to the metrics port and 1024 descriptors", made)
}

// TestPlantedPartialDir: an unprivileged user (65534) who can write the
// data directory's parent (a shared, sticky directory, as /tmp is) plants
// the partial directory before a root daemon starts, as a link to a
// directory of root's, or as a directory of theirs holding a link to a
// file of root's and a forged index file; or the data directory itself,
// as a link or a directory of theirs. The daemon must refuse to start
// (exit 2, saying why) and leave root's files as they were.
func TestPlantedPartialDir(t *testing.T) {
	requireRoot(t)
	wd, _ := os.Getwd()
	bin := filepath.Join(buildBinaries(t, filepath.Dir(wd)), "packet-headers")
	for _, c := range []struct {
		name  string
		plant string // a shell script run as 65534 in the shared directory; $V is root's directory
		says  string
	}{
		{"link", `ln -s "$V" .data.partial`, "partial directory"},
		{"directory", `mkdir .data.partial && ln -s "$V/secret" .data.partial/flows.2026-11-25.1764068400.1.jsonl && printf '{"uuid":"forged"}\n' > .data.partial/flows.2026-11-25.1764068400.2.jsonl && chmod 755 .data.partial`, "partial directory"},
		{"datadir link", `ln -s "$V" data`, "datadir"},
		{"datadir of theirs", `mkdir data && chmod 755 data`, "datadir"},
	} {
		t.Run(c.name, func(t *testing.T) {
			shared, err := os.MkdirTemp("", "phe2e-shared")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(shared) })
			os.Chmod(shared, 0o1777)
			victim := t.TempDir()
			os.WriteFile(filepath.Join(victim, "secret"), []byte("line one\nline two, cut"), 0o600)
			os.WriteFile(filepath.Join(victim, "7.pcap"), []byte("root's"), 0o600)
			os.Chmod(victim, 0o755) // searchable, not writable, by the other user
			plant := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", c.plant)
			plant.Dir, plant.Env = shared, []string{"V=" + victim, "PATH=/usr/bin:/bin"}
			if out, err := plant.CombinedOutput(); err != nil {
				t.Fatalf("planting as 65534: %v\n%s", err, out)
			}
			cmd := exec.Command(bin, "-read", filepath.Join(wd, "../offline/testdata/lab.pcap"), "-datadir", filepath.Join(shared, "data"), "-quiet")
			out, _ := cmd.CombinedOutput()
			if code := cmd.ProcessState.ExitCode(); code != 2 || !strings.Contains(string(out), c.says) {
				t.Errorf("exit %d: %s; want 2 and the reason", code, out)
			}
			if b, _ := os.ReadFile(filepath.Join(victim, "secret")); string(b) != "line one\nline two, cut" {
				t.Errorf("root's file was changed: %q", b)
			}
			if _, err := os.Stat(filepath.Join(victim, "7.pcap")); err != nil {
				t.Errorf("root's file was removed: %v", err)
			}
			if names, _ := os.ReadDir(victim); len(names) != 2 {
				t.Errorf("root's directory holds %d names, want its 2", len(names))
			}
			if found, _ := filepath.Glob(filepath.Join(shared, "data", "*", "*", "*", "flows-*")); len(found) != 0 {
				t.Errorf("index files were published: %v", found)
			}
		})
	}
}

// TestSYNScanAtFlowLimit runs a spoofed-SYN scan (1,000 and 3,000 SYNs a
// second from 131,072 addresses), then a spoofed-ACK one (100 and 1,000
// bare ACKs a second to the service port, which a blind attacker sends as
// cheaply), through a daemon with k8s-support's limits (-maxflows=150
// -flowtimeout=5s) while clients connect: every connection must be saved
// (a SYN scan used to hide 56% of them at 1,000 a second, and 84% at
// 3,000: its half-open flows held the table; an ACK scan 71% at 100 a
// second and 97% at 1,000, its flows taken for established ones).
func TestSYNScanAtFlowLimit(t *testing.T) {
	for _, tc := range []struct {
		kind         string
		rate, subnet int
	}{{"SYN", 1000, 20}, {"SYN", 3000, 21}, {"ACK", 100, 34}, {"ACK", 1000, 35}} {
		rate := tc.rate
		t.Run(fmt.Sprintf("%s-%d-per-second", tc.kind, rate), func(t *testing.T) {
			l := newLab(t, tc.subnet)
			d := &daemon{name: "scan", capDur: 30 * time.Second}
			l.startDaemon(d, 9990, "-interface", l.nsIf, "-maxflows=150", "-flowtimeout=5s")
			const port = 8099
			l.server(port)
			syns := l.synSender(t, port)
			syns.ack = tc.kind == "ACK"
			scanDone := make(chan int)
			go func() {
				defer syns.close()
				sent := 0
				start := time.Now()
				for sent < rate*5 { // 5 s
					for due := int(time.Since(start) * time.Duration(rate) / time.Second); sent < due; sent++ {
						syns.send(sent)
					}
					time.Sleep(2 * time.Millisecond)
				}
				scanDone <- sent
			}()
			made := map[netip.AddrPort]bool{}
			for round := 0; round < 40; round++ { // 4 s of connections, 3 every 100 ms
				for p := range flows(t, l.srv4, port, 3) {
					made[p] = true
				}
				time.Sleep(100 * time.Millisecond)
			}
			sent := <-scanDone
			time.Sleep(6500 * time.Millisecond) // -flowtimeout and the UUID deadline
			text := scrape(d.metrics)
			if _, err := stop(t, d.cmd, syscall.SIGTERM, 10*time.Second); err != nil {
				t.Fatalf("%v\n%s", err, l.log("daemon-scan.log"))
			}
			files := filePorts(t, d.dataDir, port)
			missing := 0
			for p := range made {
				if files[p] != 1 {
					missing++
				}
			}
			evicted, _ := metricValue(text, `pcap_flows_ended_total{outcome="evicted"}`)
			refused, _ := metricValue(text, `pcap_flows_refused_total{limit="flow_limit"}`)
			t.Logf("%d %ss at %d a second: %d of %d connections saved; %v flows not established evicted, %v refused",
				sent, tc.kind, rate, len(made)-missing, len(made), evicted, refused)
			if missing > 0 {
				t.Errorf("%d of %d connections hidden by the scan", missing, len(made))
			}
		})
	}
}
