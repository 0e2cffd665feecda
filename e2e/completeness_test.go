package e2e

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// TestCompletenessOffloads turns GRO, GSO and TSO on on the lab's veths,
// so that the capture sees super-packets that stand for several segments,
// and checks that every connection's trace is proved complete by the
// kernel's counters (a super-packet counted as its segments). Then,
// offline, the reference capture says the same by inference, and the same
// capture with one data segment cut out (one whose bytes no other packet
// carries) says that connection, and only it, is incomplete, by at most
// that segment's bytes.
func TestCompletenessOffloads(t *testing.T) {
	l := newLab(t, 32)
	on := []string{"tso", "on", "gso", "on", "gro", "on", "tx", "on", "rx", "on"}
	run(t, "ethtool", append([]string{"-K", l.hostIf}, on...)...)
	l.exec("ethtool", append([]string{"-K", l.nsIf}, on...)...)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "offloads", capDur: 30 * time.Second}
	cmd := l.startDaemon(d, 9990, "-interface", l.nsIf)
	l.server(8098)

	var wg sync.WaitGroup
	for _, a := range []netip.Addr{l.srv4, l.srv6, l.srv4, l.srv6} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := longFlow(a, 8098, 128<<10, 8); err != nil { // echoed: bulk both ways
				t.Error(err)
			}
		}()
	}
	short := flows(t, l.srv4, 8098, 10)
	for c := range flows(t, l.srv6, 8098, 10) {
		short[c] = true
	}
	wg.Wait()
	time.Sleep(3 * time.Second) // the last FINs, their linger, the sockets' counters
	if _, err := stop(t, cmd, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, l.log("daemon-offloads.log"))
	}
	stop(t, tcpdump, syscall.SIGINT, 5*time.Second)

	// The offloads were at work: frames longer than the MTU.
	super := 0
	for _, path := range daemonFiles(t, d) {
		recs, _ := readPcap(t, path)
		for _, r := range recs {
			if r.origLen > 1514 {
				super++
			}
		}
	}
	if super == 0 {
		t.Fatal("no super-packet in the traces: the offloads did not work, the test proves nothing")
	}
	recs := readIndex(t, d.name, d.dataDir)
	n := 0
	for u, r := range recs {
		if r.Dst.Port != 8098 {
			continue // a metrics scrape
		}
		n++
		if r.Verified != "complete" || r.VerifiedBy != "kernel" || r.Missing.Segments != 0 || r.Kernel == nil {
			t.Errorf("%s (%s -> %s): verified %s by %s, missing %+v, kernel %v; want complete by the kernel", u, r.Src.IP, r.Dst.IP, r.Verified, r.VerifiedBy, r.Missing, r.Kernel)
		}
	}
	if n != 24 {
		t.Errorf("%d records of the 24 connections", n)
	}
	t.Logf("%d traces complete by the kernel's counters, with %d super-packets", n, super)

	// Offline: the whole reference, and the reference less one data
	// segment of the first bulk connection from the client.
	ref, _ := readPcap(t, refFile)
	cutFile := filepath.Join(l.dir, "cut.pcap")
	f, err := os.Create(cutFile)
	if err != nil {
		t.Fatal(err)
	}
	w := pcapgo.NewWriterNanos(f)
	if err := w.WriteFileHeader(256, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	// The segment cut must be the only one that carries its bytes: a
	// retransmission (a tail-loss probe the receiver D-SACKs, say) cut out
	// leaves the trace complete.
	type span struct {
		seq uint32
		n   int
	}
	fromClient := func(p refPacket) bool {
		return p.payload > 0 && p.src.Addr() != l.srv4 && p.src.Addr() != l.srv6
	}
	spans := map[flowKey][]span{}
	for _, r := range ref {
		if p, ok := decode(t, r); ok && fromClient(p) {
			spans[p.key] = append(spans[p.key], span{p.seq, p.payload})
		}
	}
	alone := func(k flowKey, s span) bool {
		carriers := 0
		for _, o := range spans[k] {
			if int32(o.seq-(s.seq+uint32(s.n))) < 0 && int32(s.seq-(o.seq+uint32(o.n))) < 0 {
				carriers++
			}
		}
		return carriers == 1
	}
	var cutConn flowKey
	cutBytes, dataSeen := 0, map[flowKey]int{}
	for _, r := range ref {
		p, ok := decode(t, r)
		if ok && fromClient(p) && cutBytes == 0 {
			// From the tenth data segment of a client, in a bulk connection.
			if dataSeen[p.key]++; dataSeen[p.key] >= 10 && alone(p.key, span{p.seq, p.payload}) {
				cutConn, cutBytes = p.key, p.payload
				continue
			}
		}
		w.WritePacket(captureInfo(r), r.data)
	}
	f.Close()
	if cutBytes == 0 {
		t.Fatal("no tenth data segment to cut")
	}
	split := func(name, file string) map[string]indexRecord {
		dir := filepath.Join(l.dir, name)
		out, err := exec.Command(filepath.Join(l.bin, "packet-headers"), "-read", file, "-datadir", dir, "-quiet",
			"-localaddr", l.srv4.String(), "-localaddr", l.srv6.String()).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
		return readIndex(t, name, dir)
	}
	for name, file := range map[string]string{"whole": refFile, "cut": cutFile} {
		n, incomplete := 0, 0
		for u, r := range split(name, file) {
			if r.Dst.Port != 8098 {
				continue
			}
			n++
			k := keyOf(netip.AddrPortFrom(netip.MustParseAddr(r.Src.IP), r.Src.Port), netip.AddrPortFrom(netip.MustParseAddr(r.Dst.IP), r.Dst.Port))
			switch {
			case r.VerifiedBy != "inference" || r.Kernel != nil:
				t.Errorf("%s: %s verified by %s offline", name, u, r.VerifiedBy)
			case name == "cut" && k == cutConn:
				incomplete++
				// Inference counts the bytes acknowledged past the hole as the
				// receiver's window allows: at least some, at most the cut.
				if b := r.Missing.S2D.Bytes; r.Verified != "incomplete" || b == nil || *b == 0 || *b > cutBytes || r.Missing.S2D.Segments < 1 || r.Missing.D2S.Segments != 0 {
					t.Errorf("cut: the connection with a segment of %d bytes cut out: verified %s, missing %+v (src_to_dst bytes %v)", cutBytes, r.Verified, r.Missing, deref(b))
				}
			case r.Verified != "complete":
				t.Errorf("%s: %s (%v): verified %s, missing %+v; want complete", name, u, k, r.Verified, r.Missing)
			}
		}
		if n != 24 || name == "cut" && incomplete != 1 {
			t.Errorf("%s: %d records, %d incomplete", name, n, incomplete)
		}
	}
	t.Logf("offline: the reference's 24 traces complete by inference; cut of %d bytes found in its connection alone", cutBytes)
}

func deref(p *int) string {
	if p == nil {
		return "null"
	}
	return strconv.Itoa(*p)
}

// referenceDrops returns how many packets the reference tcpdump said its
// kernel buffer dropped (its last lines, at exit).
func referenceDrops(t *testing.T, l *lab) int {
	m := regexp.MustCompile(`(\d+) packets dropped by kernel`).FindStringSubmatch(l.log("tcpdump.log"))
	if m == nil {
		t.Fatalf("tcpdump did not report its drops:\n%s", l.log("tcpdump.log"))
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

func captureInfo(r record) gopacket.CaptureInfo {
	return gopacket.CaptureInfo{Timestamp: r.ts, CaptureLength: len(r.data), Length: r.origLen}
}
