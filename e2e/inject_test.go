package e2e

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// injectScript learns a live connection's sequence numbers from one of the
// client's data segments on the client's interface, then sends, as either
// end (as an off-path attacker, a censor's RST injector or a middlebox
// would), segments that the receiving TCP ignores or answers with a
// challenge ACK (RFC 5961), on the wire to the server: each arrives at the
// server's interface, where the daemon and the reference tcpdump capture.
const injectScript = `
import random, sys, time
from scapy.all import Ether, IP, IPv6, TCP, Raw, conf, get_if_hwaddr, sendp, sniff
conf.verb = 0
iface, srvmac, cli, srv, cport, sport = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
L3 = IPv6 if ":" in cli else IP
got = sniff(iface=iface, count=1, timeout=10, filter="tcp and src port %d and dst port %d" % (cport, sport),
            lfilter=lambda p: TCP in p and len(p[TCP].payload) > 0)
if not got:
    sys.exit("no data segment seen")
p = got[0][TCP]
cseq, sseq = (p.seq + len(p.payload)) % 2**32, p.ack
eth = Ether(src=get_if_hwaddr(iface), dst=srvmac)
def client(**kw):
    return eth / L3(src=cli, dst=srv) / TCP(sport=cport, dport=sport, **kw)
def server(**kw):
    return eth / L3(src=srv, dst=cli) / TCP(sport=sport, dport=cport, **kw)
far = 2**31
kinds = []
for end, seq, ack in ((client, cseq, sseq), (server, sseq, cseq)):
    kinds += [
        end(flags="R", seq=(seq + 5000) % 2**32),                     # in window, not exact
        end(flags="R", seq=(seq + far) % 2**32),                      # far out of window
        end(flags="RA", seq=(seq - 3000) % 2**32, ack=ack),           # behind
        end(flags="S", seq=random.randrange(2**32)),                  # a SYN on a synchronized connection
        end(flags="FA", seq=(seq + 2**30) % 2**32, ack=ack),          # a FIN far ahead
        end(flags="PA", seq=(seq + far) % 2**32, ack=ack) / Raw(b"x" * 20),  # data far out of window
    ]
for k in kinds:
    sendp(k, iface=iface)
    time.sleep(0.1)
print(len(kinds))
`

// filesByKey returns the paths of a daemon's files by the 4-tuple of their
// first packet, in the order of their first packets.
func filesByKey(t testing.TB, dir string) map[flowKey][]string {
	type file struct {
		path  string
		first time.Time
	}
	byKey := map[flowKey][]file{}
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() || isIndex(p) {
			return nil
		}
		recs, _ := readPcap(t, p)
		if len(recs) == 0 {
			return nil
		}
		if rp, ok := decode(t, recs[0]); ok {
			byKey[rp.key] = append(byKey[rp.key], file{p, recs[0].ts})
		}
		return nil
	})
	out := map[flowKey][]string{}
	for k, fs := range byKey {
		sort.Slice(fs, func(i, j int) bool { return fs[i].first.Before(fs[j].first) })
		for _, f := range fs {
			out[k] = append(out[k], f.path)
		}
	}
	return out
}

// dialFrom connects from a fixed local port (SO_REUSEADDR, so that a port
// whose last connection ended may be bound again at once).
func dialFrom(local, remote netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local), Timeout: 2 * time.Second,
		Control: func(network, address string, c syscall.RawConn) error {
			var err error
			c.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
			return err
		}}
	return d.Dial("tcp", remote.String())
}

// TestInjection sends, under live IPv4 and IPv6 connections, real packets
// that the server's TCP ignores (RSTs in and out of window, SYNs, FINs and
// data far out of window, as either end), from the client's side with raw
// sockets, then reuses a 4-tuple twice the way Linux allows (a new
// connection while the server's socket of the old one is in TIME_WAIT). The
// daemon must write one file per connection, holding every packet the
// reference tcpdump saw on it, the injected ones included: none of them
// ends or splits a flow, and nothing of one connection lands in the
// other's file.
func TestInjection(t *testing.T) {
	python := "/usr/bin/python3"
	if exec.Command(python, "-c", "import scapy").Run() != nil {
		t.Skip("needs Debian's python3-scapy (scripts/test.sh installs it)")
	}
	l := newLab(t, 12)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "inject", capDur: 30 * time.Second}
	l.startDaemon(d, 9990, "-interface", l.nsIf) // named from the kernel's cookies
	l.server(8092)
	srvMAC := strings.TrimSpace(l.exec("cat", "/sys/class/net/"+l.nsIf+"/address"))
	script := filepath.Join(l.dir, "inject.py")
	os.WriteFile(script, []byte(injectScript), 0o644)

	var injected []flowKey
	var wg sync.WaitGroup
	for i, srv := range []netip.Addr{l.srv4, l.srv6} {
		cli := l.cli4
		if srv.Is6() {
			cli = l.cli6
		}
		local := netip.AddrPortFrom(cli, uint16(41000+i))
		remote := netip.AddrPortFrom(srv, 8092)
		injected = append(injected, keyOf(local, remote))
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialFrom(local, remote)
			if err != nil {
				t.Errorf("dial %v: %v", remote, err)
				return
			}
			defer c.Close()
			go io.Copy(io.Discard, c)
			c.Write([]byte("e"))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() {
				out, err := exec.CommandContext(ctx, python, script, l.hostIf, srvMAC, cli.String(), srv.String(), fmt.Sprint(local.Port()), "8092").CombinedOutput()
				if err != nil && ctx.Err() == nil {
					t.Errorf("inject on %v: %v\n%s", remote, err, out)
				}
			}()
			for j := 0; j < 50; j++ { // 5 s of data, 100 ms apart
				if _, err := c.Write(make([]byte, 1000)); err != nil {
					t.Errorf("%v: the connection broke: %v", remote, err)
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
	}
	wg.Wait()

	// A 4-tuple reused: the server closes first (its socket goes to
	// TIME_WAIT), and the client connects again from the same port.
	reused := netip.AddrPortFrom(l.cli4, 41100)
	for i := 0; i < 2; i++ {
		c, err := dialFrom(reused, netip.AddrPortFrom(l.srv4, 8092))
		if err != nil {
			t.Fatalf("connection %d from %v: %v", i, reused, err)
		}
		c.Write([]byte(fmt.Sprintf("s hello %d\n", i)))
		io.ReadAll(c)
		c.Close()
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(2500 * time.Millisecond) // the FINs' linger, a tick
	stopAll(t, l, []*daemon{d}, tcpdump)

	ref := readReference(t, refFile)
	files := filesByKey(t, d.dataDir)
	var tm timing
	for _, k := range injected {
		var all []refPacket
		for _, c := range ref[k] {
			all = append(all, c.pkts...)
		}
		if len(files[k]) != 1 {
			t.Errorf("%v: %d files, want one for the connection", k, len(files[k]))
			continue
		}
		got, _ := readPcap(t, files[k][0])
		if msg := compareFlow(t, got, all, d, l, &tm); msg != "" {
			t.Errorf("%v: %s", k, msg)
			continue
		}
		t.Logf("%v: one file with all %d packets of the reference, the 12 injected ones included", k, len(got))
		if len(got) < 50+12 {
			t.Errorf("%v: only %d packets", k, len(got))
		}
	}
	k := keyOf(reused, netip.AddrPortFrom(l.srv4, 8092))
	if len(ref[k]) != 2 || len(files[k]) != 2 {
		t.Fatalf("reused 4-tuple %v: %d connections in the reference, %d files; want 2 and 2", k, len(ref[k]), len(files[k]))
	}
	for i, c := range ref[k] {
		got, _ := readPcap(t, files[k][i])
		if msg := compareFlow(t, got, c.pkts, d, l, &tm); msg != "" {
			t.Errorf("reused 4-tuple, connection %d: %s", i, msg)
		}
	}
	tm.check(t, "injection")
}
