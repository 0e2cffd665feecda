package e2e

import (
	"crypto/rand"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRetentionEndToEnd runs the daemon with -retention.minfree=50% on a
// small filesystem (an 8 MiB tmpfs) that three old days of traces (2 MiB
// each) have all but filled: it must delete the oldest days whole until
// half is free, keep today's and the day made ahead, and save every
// connection made meanwhile.
func TestRetentionEndToEnd(t *testing.T) {
	l := newLab(t, 36)
	mnt := filepath.Join(l.dir, "small")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	data := filepath.Join(mnt, "data")
	old := []string{"2026/11/01", "2026/11/02", "2026/11/03"}
	for _, d := range old {
		os.MkdirAll(filepath.Join(data, d), 0o750)
		b := make([]byte, 2<<20)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(data, d, "old.bin"), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(data, 0o750)
	l.server(8097)
	d := &daemon{name: "retention"}
	cmd := l.startDaemon(d, 9990, "-interface", l.nsIf, "-datadir", data, "-retention.minfree=50%", "-minfreespace=10%")
	d.dataDir = data
	waitFor(t, 20*time.Second, "the retention to free half the filesystem", func() bool {
		v, _ := metricValue(scrape(d.metrics), "pcap_retention_deleted_dirs_total")
		var st syscall.Statfs_t
		return v >= 1 && syscall.Statfs(mnt, &st) == nil && st.Bavail*2 >= st.Blocks
	})
	made := flows(t, l.srv4, 8097, 10)
	time.Sleep(1500 * time.Millisecond)
	text := scrape(d.metrics)
	if _, err := stop(t, cmd, syscall.SIGTERM, 15*time.Second); err != nil {
		t.Errorf("daemon: %v", err)
	}
	if _, err := os.Stat(filepath.Join(data, old[0])); err == nil {
		t.Error("the oldest day was not deleted")
	}
	today := time.Now().UTC()
	files := map[netip.AddrPort]int{} // the new files: today's, or tomorrow's past midnight
	for _, day := range []time.Time{today, today.AddDate(0, 0, 1)} {
		dir := filepath.Join(data, day.Format("2006/01/02"))
		if _, err := os.Stat(dir); err != nil {
			t.Errorf("the directory of %s was deleted", day.Format("2006-01-02"))
		}
		for k, n := range filePorts(t, dir, 8097) {
			files[k] += n
		}
	}
	expectFiles(t, "connections made during the retention", made, files)
	kept := 0
	for _, d := range old {
		if _, err := os.Stat(filepath.Join(data, d, "old.bin")); err == nil {
			kept++
		} else if _, err := os.Stat(filepath.Join(data, d)); err == nil {
			t.Errorf("day %s was deleted in part", d)
		}
	}
	oldest, _ := metricValue(text, "pcap_retention_oldest_day_timestamp_seconds")
	if want := time.Date(2026, 11, 4-kept, 0, 0, 0, 0, time.UTC); kept > 0 && int64(oldest) != want.Unix() {
		t.Errorf("oldest day kept %v, want %v", time.Unix(int64(oldest), 0).UTC(), want)
	}
	if !strings.Contains(l.log("daemon-retention.log"), "retention: deleted "+filepath.Join(data, old[0])) {
		t.Error("the deletion is not logged")
	}
	t.Logf("%d of 3 old days kept, %d connections saved", kept, len(made))
}
