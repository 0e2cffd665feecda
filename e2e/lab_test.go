package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/tcp-info/eventsocket"
	"golang.org/x/sys/unix"
)

// lab is a server network namespace joined to the test's namespace by a
// veth pair with wire-sized packets (no TSO/GSO/GRO, no checksum offload).
type lab struct {
	t            testing.TB
	ns           string
	hostIf, nsIf string
	cli4, srv4   netip.Addr
	cli6, srv6   netip.Addr
	cli4b, cli6b netip.Addr // a second client address in each family, for prefix relations
	dir, bin     string
	procs        []*exec.Cmd
	procsMu      sync.Mutex
	modRoot      string
	tcpinfoSock  string
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("end-to-end tests need root (network namespaces, libpcap); run them as root")
	}
	for _, tool := range []string{"ip", "tcpdump", "ethtool"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("end-to-end tests need %s: apt-get install -y iproute2 tcpdump ethtool", tool)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newLab creates the namespace and the veth pair; t.Cleanup removes them
// and stops every process started in them, even when the test fails.
func newLab(t testing.TB, subnet int) *lab {
	requireRoot(t)
	id := os.Getpid()%10000*10 + subnet
	l := &lab{
		t: t, ns: fmt.Sprintf("phe2e%d", id),
		hostIf: fmt.Sprintf("phc%d", id), nsIf: fmt.Sprintf("phs%d", id),
		cli4:  netip.MustParseAddr(fmt.Sprintf("10.199.%d.1", subnet)),
		srv4:  netip.MustParseAddr(fmt.Sprintf("10.199.%d.2", subnet)),
		cli6:  netip.MustParseAddr(fmt.Sprintf("fd99:%d::1", subnet)),
		srv6:  netip.MustParseAddr(fmt.Sprintf("fd99:%d::2", subnet)),
		cli4b: netip.MustParseAddr(fmt.Sprintf("10.199.%d.77", subnet)),
		cli6b: netip.MustParseAddr(fmt.Sprintf("fd99:%d::77", subnet)),
	}
	dir, err := os.MkdirTemp("", "phe2e-lab")
	if err != nil {
		t.Fatal(err)
	}
	l.dir = dir
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("lab files kept for inspection in %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	wd, _ := os.Getwd()
	l.modRoot = filepath.Dir(wd)
	l.bin = buildBinaries(t, l.modRoot)
	exec.Command("ip", "netns", "del", l.ns).Run()
	exec.Command("ip", "link", "del", l.hostIf).Run()
	t.Cleanup(func() {
		l.procsMu.Lock()
		for _, p := range l.procs {
			if p.ProcessState == nil {
				p.Process.Kill()
				p.Wait()
			}
		}
		l.procsMu.Unlock()
		exec.Command("ip", "link", "del", l.hostIf).Run()
		exec.Command("ip", "netns", "del", l.ns).Run()
	})
	run(t, "ip", "netns", "add", l.ns)
	run(t, "ip", "link", "add", l.hostIf, "type", "veth", "peer", "name", l.nsIf, "netns", l.ns)
	run(t, "ip", "addr", "add", l.cli4.String()+"/24", "dev", l.hostIf)
	run(t, "ip", "-6", "addr", "add", l.cli6.String()+"/64", "dev", l.hostIf, "nodad")
	run(t, "ip", "addr", "add", l.cli4b.String()+"/24", "dev", l.hostIf)
	// Deprecated at once: bound to explicitly, never picked as a source.
	run(t, "ip", "-6", "addr", "add", l.cli6b.String()+"/64", "dev", l.hostIf, "nodad", "preferred_lft", "0")
	run(t, "ip", "link", "set", l.hostIf, "up")
	l.exec("ip", "addr", "add", l.srv4.String()+"/24", "dev", l.nsIf)
	l.exec("ip", "-6", "addr", "add", l.srv6.String()+"/64", "dev", l.nsIf, "nodad")
	l.exec("ip", "link", "set", l.nsIf, "up")
	l.exec("ip", "link", "set", "lo", "up")
	run(t, "ethtool", "-K", l.hostIf, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off")
	l.exec("ethtool", "-K", l.nsIf, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off")
	return l
}

// The version and commit the lab's daemon is built with.
const testVersion, testCommit = "v0.0.0-e2e", "abc1234"

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// buildBinaries builds the daemon and tcp-info (from the pinned module) once
// per test binary.
func buildBinaries(t testing.TB, modRoot string) string {
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "phe2e-bin")
		if buildErr != nil {
			return
		}
		for _, b := range [][2]string{{"packet-headers", "github.com/m-lab/packet-headers"}, {"tcp-info", "github.com/m-lab/tcp-info"}} {
			// The daemon's version variables as the Dockerfile sets them
			// (TestKubernetesDropIn finds them in its metrics).
			cmd := exec.Command("go", "build", "-ldflags", "-X main.version="+testVersion+" -X main.commit="+testCommit, "-o", filepath.Join(binDir, b[0]), b[1])
			cmd.Dir = modRoot
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", b[1], err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// exec runs a command in the namespace and fails the test if it fails.
func (l *lab) exec(name string, args ...string) string {
	l.t.Helper()
	return run(l.t, "ip", append([]string{"netns", "exec", l.ns, name}, args...)...)
}

// start starts a long-running command in the namespace, its output going
// to a log file in the lab directory.
func (l *lab) start(logName, name string, args ...string) *exec.Cmd {
	l.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.ns, name}, args...)...)
	f, err := os.Create(filepath.Join(l.dir, logName))
	if err != nil {
		l.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		l.t.Fatalf("start %s: %v", name, err)
	}
	l.procsMu.Lock()
	l.procs = append(l.procs, cmd)
	l.procsMu.Unlock()
	return cmd
}

func (l *lab) log(name string) string {
	b, _ := os.ReadFile(filepath.Join(l.dir, name))
	return string(b)
}

// inNamespace runs f on an OS thread that has joined the lab's network
// namespace; sockets created by f stay in it. The thread is discarded
// afterwards.
func (l *lab) inNamespace(f func()) {
	l.t.Helper()
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		fd, err := unix.Open("/var/run/netns/"+l.ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		f()
		done <- nil
	}()
	if err := <-done; err != nil {
		l.t.Fatalf("enter namespace: %v", err)
	}
}

// scrapeIn reads /metrics at addr from inside the namespace (a daemon
// bound to the namespace's loopback, as M-Lab binds it).
func (l *lab) scrapeIn(addr string) string {
	var out []byte
	l.inNamespace(func() {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
		out, _ = io.ReadAll(c)
	})
	if _, body, ok := strings.Cut(string(out), "\r\n\r\n"); ok {
		return body
	}
	return ""
}

// server listens in the namespace on both address families. The first byte
// a client sends chooses how the connection goes:
//
//	e: echo everything until the client closes
//	s: answer one line, then close (the server closes first)
//	r: answer one line, then reset (SO_LINGER 0)
func (l *lab) server(port int) {
	var lns []net.Listener
	l.inNamespace(func() {
		ln, err := net.Listen("tcp", fmt.Sprintf("[::]:%d", port)) // every address, both families
		if err != nil {
			l.t.Errorf("listen: %v", err)
			return
		}
		lns = append(lns, ln)
	})
	for _, ln := range lns {
		ln := ln
		l.t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go serve(c.(*net.TCPConn))
			}
		}()
	}
}

func serve(c *net.TCPConn) {
	defer c.Close()
	r := bufio.NewReader(c)
	mode, err := r.ReadByte()
	if err != nil {
		return
	}
	if mode == 'e' {
		io.Copy(c, r)
		return
	}
	line, err := r.ReadBytes('\n')
	if err != nil {
		return
	}
	c.Write(line)
	if mode == 'r' {
		c.SetLinger(0)
	}
}

// startTCPInfo runs tcp-info in the namespace with its eventsocket (and the
// UUID prefix file, if any), logging to logName, and waits for the socket.
func (l *lab) startTCPInfo(logName, prefixFile string, extra ...string) *exec.Cmd {
	l.tcpinfoSock = filepath.Join(l.dir, "tcpevents.sock")
	args := []string{"-tcpinfo.eventsocket", l.tcpinfoSock, "-output", filepath.Join(l.dir, "tcpinfo"),
		"-prometheusx.listen-address", "127.0.0.1:0"}
	if prefixFile != "" {
		args = append(args, "-uuid-prefix-file", prefixFile)
	}
	cmd := l.start(logName, filepath.Join(l.bin, "tcp-info"), append(args, extra...)...)
	waitFor(l.t, 10*time.Second, "tcp-info's eventsocket", func() bool {
		c, err := net.Dial("unix", l.tcpinfoSock)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return cmd
}

// longFlow keeps a connection to a:port busy until it has sent n blocks of
// size bytes, 100 ms apart (the server discards them).
func longFlow(a netip.Addr, port, size, n int) error {
	c, err := net.Dial("tcp", netip.AddrPortFrom(a, uint16(port)).String())
	if err != nil {
		return err
	}
	defer c.Close()
	go io.Copy(io.Discard, c)
	c.Write([]byte("e"))
	buf := bytes.Repeat([]byte("x"), size)
	for i := 0; i < n; i++ {
		if _, err := c.Write(buf); err != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

// startReference runs the reference tcpdump on the namespace's interface
// into reference.pcap in the lab directory, and waits until it listens.
func (l *lab) startReference() (path string, cmd *exec.Cmd) {
	path = filepath.Join(l.dir, "reference.pcap")
	cmd = l.start("tcpdump.log", "tcpdump", "-i", l.nsIf, "-s", "256", "-B", "65536", "-U", "-n", "--immediate-mode",
		"--time-stamp-precision=nano", "-w", path, "tcp")
	waitFor(l.t, 10*time.Second, "tcpdump to start", func() bool { return strings.Contains(l.log("tcpdump.log"), "listening") })
	return path, cmd
}

// startDaemon starts a daemon in the lab, its metrics on port, and waits
// until it captures.
func (l *lab) startDaemon(d *daemon, port int, args ...string) *exec.Cmd {
	l.t.Helper()
	d.dataDir = filepath.Join(l.dir, "data-"+d.name)
	d.metrics = fmt.Sprintf("%s:%d", l.srv4, port)
	all := append([]string{"-datadir", d.dataDir, "-prometheusx.listen-address", fmt.Sprintf(":%d", port)}, args...)
	logName := "daemon-" + d.name + ".log"
	os.Remove(filepath.Join(l.dir, logName))
	if len(d.wrap) > 0 {
		d.cmd = l.start(logName, d.wrap[0], append(append(d.wrap[1:len(d.wrap):len(d.wrap)], filepath.Join(l.bin, "packet-headers")), all...)...)
	} else if d.hostname != "" {
		// A UTS namespace of its own: without a prefix file, its made-up
		// UUID prefix (<hostname>_<boot time>_unsafe) is not tcp-info's.
		all = append([]string{"--uts", "sh", "-c", "hostname " + d.hostname + ` && exec "$0" "$@"`, filepath.Join(l.bin, "packet-headers")}, all...)
		d.cmd = l.start(logName, "unshare", all...)
	} else {
		d.cmd = l.start(logName, filepath.Join(l.bin, "packet-headers"), all...)
	}
	waitFor(l.t, 10*time.Second, d.name+" daemon to capture", func() bool {
		return strings.Contains(l.log(logName), "capturing on")
	})
	return d.cmd
}

// eventLog records what tcp-info announces.
type eventLog struct {
	done   chan struct{} // closed when the recording ends
	mu     sync.Mutex
	opens  map[string]eventsocket.FlowEvent
	closes map[string]bool
}

// recordEvents reads tcp-info's eventsocket, as the daemon does, with
// tcp-info's own event type, until ctx is done.
func (l *lab) recordEvents(ctx context.Context) *eventLog {
	ev := &eventLog{opens: map[string]eventsocket.FlowEvent{}, closes: map[string]bool{}}
	c, err := net.Dial("unix", l.tcpinfoSock)
	if err != nil {
		l.t.Fatal(err)
	}
	context.AfterFunc(ctx, func() { c.Close() })
	raw, err := os.Create(filepath.Join(l.dir, "events.jsonl"))
	if err != nil {
		l.t.Fatal(err)
	}
	ev.done = make(chan struct{})
	go func() {
		defer close(ev.done)
		defer raw.Close()
		s := bufio.NewScanner(c)
		for s.Scan() {
			raw.Write(append(s.Bytes(), '\n'))
			var e eventsocket.FlowEvent
			if err := json.Unmarshal(s.Bytes(), &e); err != nil {
				continue
			}
			ev.mu.Lock()
			if e.Event == eventsocket.Open && e.ID != nil {
				ev.opens[e.UUID] = e
			} else if e.Event == eventsocket.Close {
				ev.closes[e.UUID] = true
			}
			ev.mu.Unlock()
		}
	}()
	return ev
}

func waitFor(t testing.TB, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends sig to cmd and waits up to limit for it to exit, returning how
// long it took.
func stop(t testing.TB, cmd *exec.Cmd, sig syscall.Signal, limit time.Duration) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	cmd.Process.Signal(sig)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return time.Since(start), err
	case <-time.After(limit):
		cmd.Process.Kill()
		<-done
		return time.Since(start), fmt.Errorf("did not exit within %v of %v", limit, sig)
	}
}
