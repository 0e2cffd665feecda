package e2e

import (
	"errors"
	"io"
	"io/fs"
	"net"
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
	"unsafe"

	"golang.org/x/sys/unix"
)

// watcher hears what M-Lab's pusher hears: it watches a directory and every
// directory below it (as rjeczalik/notify's "dir/..." does: a directory
// created later is watched, with the directories already in it, but files
// already in it are not reported) for IN_CLOSE_WRITE and IN_MOVED_TO, and
// opens and reads every file it hears of at once, as pusher's listener and
// tarcache do.
type watcher struct {
	t    testing.TB
	root string
	f    *os.File
	done chan struct{}

	mu    sync.Mutex
	dirs  map[int32]string
	heard map[string]int // by path below root
	bad   []string       // files that were not whole, or gone, when heard
}

// pusherMask is what pusher's listener asks notify for.
const pusherMask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO

func watch(t testing.TB, root string) *watcher {
	t.Helper()
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	w := &watcher{t: t, root: root, f: os.NewFile(uintptr(fd), "inotify"), done: make(chan struct{}),
		dirs: map[int32]string{}, heard: map[string]int{}}
	w.add(root)
	go w.run()
	t.Cleanup(w.stop)
	return w
}

// add watches dir and the directories below it.
func (w *watcher) add(dir string) {
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		wd, err := unix.InotifyAddWatch(int(w.f.Fd()), p, pusherMask|unix.IN_CREATE|unix.IN_ONLYDIR)
		if err == nil {
			w.mu.Lock()
			w.dirs[int32(wd)] = p
			w.mu.Unlock()
		}
		return nil
	})
}

func (w *watcher) run() {
	defer close(w.done)
	buf := make([]byte, 1<<16)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return // closed
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			w.mu.Lock()
			dir := w.dirs[ev.Wd]
			w.mu.Unlock()
			path := filepath.Join(dir, name)
			switch {
			case ev.Mask&unix.IN_ISDIR != 0:
				if ev.Mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0 {
					w.add(path)
				}
			case ev.Mask&pusherMask != 0:
				rel, _ := filepath.Rel(w.root, path)
				msg := readWhole(path) // pusher opens it now and tars it
				w.mu.Lock()
				w.heard[rel]++
				if msg != "" {
					w.bad = append(w.bad, rel+": "+msg)
				}
				w.mu.Unlock()
			}
		}
	}
}

func (w *watcher) stop() {
	select {
	case <-w.done:
		return
	default:
	}
	time.Sleep(100 * time.Millisecond) // the last events
	w.f.Close()
	<-w.done
}

// finalName is what a finished file is named below the data directory.
// (or a flow index file's, index.Name).
var finalName = regexp.MustCompile(`^20[0-9]{2}/[0-9]{2}/[0-9]{2}/([^./][^/]*\.pcap(\.gz)?|flows-[0-9]{8}T[0-9]{2}Z(-[0-9]+)?\.jsonl)$`)

// check stops the watcher and checks what it heard against the files in
// the data directory: each exactly once, under its final name, whole when
// heard, and nothing else (no partial file, no probe, no duplicate).
func (w *watcher) check(t *testing.T, what string) int {
	t.Helper()
	w.stop()
	var files []string
	filepath.WalkDir(w.root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(w.root, p)
			files = append(files, rel)
		}
		return nil
	})
	sort.Strings(files)
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, b := range w.bad {
		t.Errorf("%s: a file was not whole when the uploader heard of it: %s", what, b)
	}
	for p, n := range w.heard {
		switch {
		case !finalName.MatchString(p):
			t.Errorf("%s: the uploader heard of %s (%d times), which is not a finished file's name", what, p, n)
		case n != 1:
			t.Errorf("%s: the uploader heard of %s %d times", what, p, n)
		}
	}
	for _, f := range files {
		if w.heard[f] == 0 {
			t.Errorf("%s: the uploader never heard of %s", what, f)
		}
	}
	t.Logf("%s: %d files, each heard once under its final name", what, len(files))
	if len(files) == 0 {
		t.Errorf("%s: no file written", what)
	}
	return len(files)
}

// TestPublication runs daemons in every mode (buffer, stream, -compress in
// both, a shutdown while long flows stream, a SIGKILL and a restart on the
// same data directory) with a recursive inotify watcher that hears what
// M-Lab's pusher hears on each data directory: every finished file exactly
// once, as one event under its final YYYY/MM/DD/<uuid>.pcap[.gz] name,
// whole, and nothing else.
func TestPublication(t *testing.T) {
	l := newLab(t, 11)
	l.server(8091)
	daemons := []*daemon{
		{name: "buffer"},
		{name: "stream", args: []string{"-stream"}},
		{name: "compress", args: []string{"-compress"}},
		{name: "stream-compress", args: []string{"-stream", "-compress"}},
		{name: "crash", args: []string{"-stream"}},
	}
	watchers := map[string]*watcher{}
	for i, d := range daemons {
		watchers[d.name] = watch(t, filepath.Join(l.dir, "data-"+d.name)) // before the daemon makes anything
		l.startDaemon(d, 9990+i, d.args...)
	}
	var long sync.WaitGroup
	for _, a := range []netip.Addr{l.srv4, l.srv6} { // streamed while they last, cut by the shutdown
		long.Add(1)
		go func() {
			defer long.Done()
			longFlow(a, 8091, 16<<10, 40)
		}()
	}
	for i := 0; i < 3; i++ {
		flows(t, l.srv4, 8091, 20)
		flows(t, l.srv6, 8091, 20)
	}
	// The short flows are written (after their linger), and the crash
	// daemon writes their index records (each second); the long ones
	// stream for 4 s.
	crash := daemons[len(daemons)-1]
	waitFor(t, 3*time.Second, "the crash daemon's index records", func() bool {
		partials, _ := filepath.Glob(filepath.Join(crash.partialDir(), "flows.*"))
		for _, p := range partials {
			if st, err := os.Stat(p); err == nil && st.Size() > 0 {
				return true
			}
		}
		return false
	})
	killedAt := time.Now()
	crash.cmd.Process.Kill()
	crash.cmd.Wait()
	leftovers, _ := os.ReadDir(crash.partialDir())
	t.Logf("crash daemon killed with %d files being written", len(leftovers))
	restarted := l.startDaemon(crash, 9999, crash.args...)
	flows(t, l.srv4, 8091, 20)
	time.Sleep(1500 * time.Millisecond)
	for _, d := range daemons {
		cmd := d.cmd
		if d == crash {
			cmd = restarted
		}
		if _, err := stop(t, cmd, syscall.SIGTERM, 6*time.Second); err != nil {
			t.Errorf("%s: %v", d.name, err)
		}
	}
	long.Wait()
	for _, d := range daemons {
		watchers[d.name].check(t, d.name)
		files := daemonFiles(t, d) // nothing left in the partial directory
		checkIndexOfFiles(t, d, files, d == crash, killedAt)
	}
}

// checkIndexOfFiles checks that a daemon's flow index has a record for
// every file and for nothing else. After a SIGKILL, a file published in the
// second before it may have no record (records are written each second),
// but the records written before it are published by the restart.
func checkIndexOfFiles(t *testing.T, d *daemon, files map[string]string, killed bool, killedAt time.Time) {
	recs := readIndex(t, d.name, d.dataDir)
	before, missing := 0, 0
	for u, r := range recs {
		if _, ok := files[u]; !ok {
			t.Errorf("%s: an index record for %s, which has no file", d.name, u)
		}
		if r.Ended.Before(killedAt) {
			before++
		}
	}
	for u := range files {
		if _, ok := recs[u]; !ok {
			missing++
			if !killed {
				t.Errorf("%s: no index record for %s", d.name, u)
			}
		}
	}
	t.Logf("%s: %d index records for %d files (%d files without)", d.name, len(recs), len(files), missing)
	if killed && before == 0 {
		t.Errorf("%s: no index record of a flow ended before the kill: the restart did not publish them", d.name)
	}
}

// streamFlow keeps a connection to an echo server busy, size bytes every
// interval, until the function it returns is called.
func streamFlow(to netip.AddrPort, every time.Duration, size int) (stop func()) {
	done := make(chan struct{})
	go func() {
		c, err := net.Dial("tcp", to.String())
		if err != nil {
			return
		}
		defer c.Close()
		go io.Copy(io.Discard, c)
		c.Write([]byte("e"))
		for {
			select {
			case <-done:
				return
			case <-time.After(every):
				c.Write(make([]byte, size))
			}
		}
	}()
	return func() { close(done) }
}

// TestSecondSignal: during the orderly shutdown that a SIGTERM starts
// (here a long -sigtermwait while a flow streams), a second SIGTERM ends
// the daemon at once with status 1, saying which files were not written.
func TestSecondSignal(t *testing.T) {
	l := newLab(t, 14)
	l.server(8094)
	d := &daemon{name: "signals"}
	cmd := l.startDaemon(d, 9990, "-stream", "-sigtermwait=30s")
	defer streamFlow(netip.AddrPortFrom(l.srv4, 8094), 50*time.Millisecond, 1000)()
	waitFor(t, 10*time.Second, "the flow to be named and streamed", func() bool {
		v, _ := metricValue(scrape(d.metrics), "pcap_saver_active")
		return v > 0
	})
	cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the shutdown to start", func() bool { return strings.Contains(l.log("daemon-signals.log"), "signal received") })
	start := time.Now()
	_, err := stop(t, cmd, syscall.SIGTERM, 3*time.Second)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("after a second SIGTERM: %v, want exit status 1 at once", err)
	}
	log := l.log("daemon-signals.log")
	// The streamed flow, and the metric scrapes' flows still in their linger.
	if !regexp.MustCompile(`second signal \(terminated\): exiting now; [1-9][0-9]* files not written: [^ ]+_[0-9A-F]{16}`).MatchString(log) {
		t.Errorf("the daemon did not say what was not written:\n%s", log)
	}
	t.Logf("exited %v after the second signal", time.Since(start).Round(time.Millisecond))
}

// TestStuckDisk freezes the data directory's filesystem (fsfreeze on a
// loop-mounted ext4, as a snapshot does) while a flow streams, then sends
// SIGTERM: the shutdown is bounded by -shutdown.timeout, after which the
// daemon names the files it could not write and exits 1 (once the
// filesystem thaws: a process cannot finish exiting while a thread waits on
// a frozen filesystem).
func TestStuckDisk(t *testing.T) {
	for _, tool := range []string{"fsfreeze", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (util-linux, e2fsprogs)", tool)
		}
	}
	l := newLab(t, 16)
	img, mnt := filepath.Join(l.dir, "disk.img"), filepath.Join(l.dir, "disk")
	os.MkdirAll(mnt, 0o755)
	run(t, "truncate", "-s", "64M", img)
	run(t, "mkfs.ext4", "-q", img)
	run(t, "mount", "-o", "loop", img, mnt)
	t.Cleanup(func() {
		exec.Command("fsfreeze", "-u", mnt).Run() // even when the test failed while frozen
		exec.Command("umount", "-l", mnt).Run()
	})
	l.server(8096)
	d := &daemon{name: "stuck"}
	cmd := l.startDaemon(d, 9990, "-stream", "-sigtermwait=0s", "-shutdown.timeout=2s", "-datadir", filepath.Join(mnt, "data"))
	defer streamFlow(netip.AddrPortFrom(l.srv4, 8096), 20*time.Millisecond, 4000)()
	waitFor(t, 10*time.Second, "the flow to stream", func() bool {
		v, _ := metricValue(scrape(d.metrics), "pcap_saver_active")
		return v > 0
	})
	time.Sleep(500 * time.Millisecond)
	run(t, "fsfreeze", "-f", mnt)
	time.Sleep(500 * time.Millisecond) // writes are stuck now
	cmd.Process.Signal(syscall.SIGTERM)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(l.log("daemon-stuck.log"), "shutdown took longer than"); {
		if time.Now().After(deadline) {
			// Where it is stuck: Go's runtime prints every goroutine's
			// stack on SIGQUIT.
			cmd.Process.Signal(syscall.SIGQUIT)
			time.Sleep(time.Second)
			t.Fatalf("no word of the shutdown's bound 10 s after SIGTERM:\n%s", l.log("daemon-stuck.log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	run(t, "fsfreeze", "-u", mnt)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Errorf("exit: %v, want status 1", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon did not exit after the filesystem thawed")
	}
	if log := l.log("daemon-stuck.log"); !regexp.MustCompile(`[1-9][0-9]* files not written: [^ ]+_[0-9A-F]{16}`).MatchString(log) {
		t.Errorf("the daemon did not name the files not written:\n%s", log)
	}
}
