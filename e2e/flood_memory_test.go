package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestFloodInMemoryLimit runs the daemon with its default flags in a
// cgroup limited to 3G, as M-Lab's virtual sites limit the pod, and floods
// it with 100,000 spoofed SYNs a second for 5 s, then as many bare ACKs:
// -maxheap's default follows the cgroup's limit (2/3 of it), the runtime's
// memory limit with it, and unnamed flows whose handshake the capture did
// not see are forgotten at their UUID deadline, so the daemon stays inside
// the limit (an OOM kill fails the test) and saves the connections made
// meanwhile; an ACK flood holds no more flows, and takes no more memory,
// than a SYN flood of the same rate.
func TestFloodInMemoryLimit(t *testing.T) {
	var synPeak, synFlows int64
	for _, kind := range []string{"SYN", "ACK"} {
		t.Run(kind, func(t *testing.T) {
			peak, held := floodInMemoryLimit(t, kind == "ACK")
			if kind == "SYN" {
				synPeak, synFlows = peak, held
				return
			}
			t.Logf("ACK flood: %d MB and %d flows at most; SYN flood: %d MB and %d flows", peak>>20, held, synPeak>>20, synFlows)
			// Per flow, and in flows held, with margins for a run slowed
			// by busy cores.
			perFlow, synPerFlow := float64(peak)/float64(max(held, 1)), float64(synPeak)/float64(max(synFlows, 1))
			if synPeak > 0 && (held > 2*synFlows || perFlow > 1.3*synPerFlow) {
				t.Errorf("an ACK flood held %d flows in %d MB, a SYN flood of the same rate %d in %d MB", held, peak>>20, synFlows, synPeak>>20)
			}
		})
	}
}

// floodInMemoryLimit floods a daemon in a 3G cgroup with 100,000 spoofed
// SYNs (or bare ACKs) a second for 5 s, checks it, and returns its peak RSS
// and the most flows it held.
func floodInMemoryLimit(t *testing.T, ack bool) (peak, held int64) {
	l := newLab(t, 24)
	cg := "/sys/fs/cgroup/memory/phe2e-" + strconv.Itoa(os.Getpid())
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Skipf("no cgroup v1 memory controller to limit the daemon: %v", err)
	}
	t.Cleanup(func() { os.Remove(cg) }) // after the daemon's end, below
	os.WriteFile(filepath.Join(cg, "memory.limit_in_bytes"), []byte("3000000000"), 0o644)
	// The daemon joins the cgroup before it execs, and enters the lab's
	// network namespace with nsenter (ip netns exec mounts a sysfs of its
	// own, without the cgroup's files).
	d := &daemon{name: "flood", dataDir: filepath.Join(l.dir, "data-flood"), metrics: l.srv4.String() + ":9990"}
	logFile, err := os.Create(filepath.Join(l.dir, "daemon-flood.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command("sh", "-c", `echo $$ > `+cg+`/cgroup.procs && exec "$0" "$@"`, "nsenter", "--net=/var/run/netns/"+l.ns, "--",
		filepath.Join(l.bin, "packet-headers"), "-datadir", d.dataDir, "-prometheusx.listen-address", ":9990", "-interface", l.nsIf)
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // before the cgroup's removal
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill()
			d.cmd.Wait()
		}
	})
	waitFor(t, 10*time.Second, "the daemon to capture", func() bool { return strings.Contains(l.log("daemon-flood.log"), "capturing on") })
	const port = 8100
	l.server(port)
	text := scrape(d.metrics)
	// (The kernel rounds the limit down to whole pages.)
	if v, _ := metricValue(text, "go_gc_gomemlimit_bytes"); v < 1.99e9 || v > 2e9 {
		t.Errorf("the runtime's memory limit is %v, want 2e9 (2/3 of the cgroup's 3G)", v)
	}
	syns := l.synSender(t, port)
	syns.ack = ack
	made := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for round := 0; round < 25; round++ {
			for p := range flows(t, l.srv4, port, 2) {
				made[p.String()] = true
			}
			time.Sleep(200 * time.Millisecond)
			if v, ok := metricValue(scrape(d.metrics), "pcap_flows_active"); ok {
				held = max(held, int64(v))
			}
		}
	}()
	const rate = 100000
	start, sent := time.Now(), 0
	for sent < 5*rate {
		for due := int(time.Since(start) * rate / time.Second); sent < due && sent < 5*rate; sent++ {
			syns.send(sent)
		}
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	syns.close()
	<-done
	time.Sleep(6 * time.Second) // the flood's UUID deadline
	peak = statusBytes(d.cmd.Process.Pid, "VmHWM:")
	if _, err := stop(t, d.cmd, syscall.SIGTERM, 20*time.Second); err != nil {
		t.Fatalf("%v (an OOM kill?)\n%s", err, l.log("daemon-flood.log"))
	}
	files := filePorts(t, d.dataDir, port)
	saved := 0
	for p := range files {
		if made[p.String()] {
			saved++
		}
	}
	t.Logf("%d packets in %v; peak RSS %d MB, %d flows at most; %d of %d connections saved", sent, elapsed, peak>>20, held, saved, len(made))
	if saved != len(made) {
		t.Errorf("%d of %d connections saved during the flood", saved, len(made))
	}
	if peak > 3000000000 {
		t.Errorf("peak RSS %d above the 3G limit", peak)
	}
	return peak, held
}
