package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dockerDefaultCaps is the capability set Docker gives a container by
// default (moby's oci/caps/defaults.go).
var dockerDefaultCaps = []string{"cap_chown", "cap_dac_override", "cap_fsetid", "cap_fowner", "cap_mknod", "cap_net_raw",
	"cap_setgid", "cap_setuid", "cap_setfcap", "cap_setpcap", "cap_net_bind_service", "cap_sys_chroot", "cap_kill", "cap_audit_write"}

// TestImageCapabilities gives a copy of the daemon's binary the file
// capabilities the Dockerfile gives the image's, and execs it as user
// 65534 under the capability sets that runtimes give a container, with
// capsh, so that the kernel applies them at exec as it would there:
// Docker's default set, NET_RAW alone (M-Lab's DaemonSet: drop ALL, add
// NET_RAW) and NET_RAW with NET_ADMIN. The daemon must start under each,
// hold exactly the granted capabilities among the two it uses, and save
// the lab's connections.
func TestImageCapabilities(t *testing.T) {
	for _, tool := range []string{"capsh", "setcap"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (scripts/test.sh installs libcap2-bin)", tool)
		}
	}
	b, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`setcap (\S+) /packet-headers`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Dockerfile gives the binary no file capabilities")
	}
	l := newLab(t, 16)
	dir, err := os.MkdirTemp("", "phe2e-caps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "packet-headers")
	run(t, "cp", filepath.Join(l.bin, "packet-headers"), bin)
	os.Chmod(bin, 0o755)
	run(t, "setcap", string(m[1]), bin)
	var all []string
	for _, line := range strings.Split(run(t, "capsh", "--print"), "\n") {
		if v, ok := strings.CutPrefix(line, "Bounding set ="); ok {
			all = strings.Split(strings.TrimSpace(v), ",")
		}
	}
	if len(all) < 30 {
		t.Fatalf("capsh --print shows %d bounding capabilities", len(all))
	}
	l.server(8096)
	for i, set := range []struct {
		name string
		keep []string
		want uint64 // the effective set
	}{
		{"docker-default", dockerDefaultCaps, 1 << unix.CAP_NET_RAW},
		{"net-raw", []string{"cap_net_raw"}, 1 << unix.CAP_NET_RAW},
		{"net-raw-admin", []string{"cap_net_raw", "cap_net_admin"}, 1<<unix.CAP_NET_RAW | 1<<unix.CAP_NET_ADMIN},
	} {
		t.Run(set.name, func(t *testing.T) {
			var drop []string
			for _, c := range all {
				if !slices.Contains(set.keep, c) {
					drop = append(drop, c)
				}
			}
			data := filepath.Join(dir, set.name, "pcap")
			os.MkdirAll(data, 0o755)
			os.Chown(filepath.Dir(data), 65534, 65534)
			os.Chown(data, 65534, 65534)
			// capsh drops the bounding set and becomes 65534 (which
			// clears its own capabilities); the shell it runs then execs
			// the binary, whose file capabilities the kernel applies.
			d := &daemon{name: set.name, capDur: 30 * time.Second, wrap: []string{"capsh", "--drop=" + strings.Join(drop, ","),
				"--gid=65534", "--groups=65534", "--uid=65534", "--", "-c", "exec " + bin + ` "$@"`}}
			l.startDaemon(d, 9990+i, "-datadir="+data, "-interface", l.nsIf, "-flowtimeout=1s", "-sigtermwait=0s")
			d.dataDir = data
			status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
			eff := regexp.MustCompile(`CapEff:\s*([0-9a-f]+)`).FindSubmatch(status)
			uid := regexp.MustCompile(`Uid:\s*(\d+)`).FindSubmatch(status)
			if eff == nil || uid == nil {
				t.Fatalf("no capabilities in the daemon's status:\n%s", status)
			}
			if got, _ := strconv.ParseUint(string(eff[1]), 16, 64); got != set.want || string(uid[1]) != "65534" {
				t.Errorf("user %s with effective capabilities %x, want 65534 with %x", uid[1], got, set.want)
			}
			made := flows(t, l.srv4, 8096, 5)
			time.Sleep(2500 * time.Millisecond) // the flows' timeouts
			if _, err := stop(t, d.cmd, syscall.SIGTERM, 10*time.Second); err != nil {
				t.Fatalf("%v\n%s", err, l.log("daemon-"+d.name+".log"))
			}
			if got := len(daemonFiles(t, d)); got != len(made) {
				t.Errorf("%d files for %d connections\n%s", got, len(made), l.log("daemon-"+d.name+".log"))
			}
		})
	}
}
