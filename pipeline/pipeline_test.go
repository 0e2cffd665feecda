package pipeline

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
)

// TestAnnouncements: an announcement whose UUID cannot name a file is
// refused and changes nothing; a good one names the flow of its 4-tuple,
// whose file the demuxer built by the pipeline writes under that name.
func TestAnnouncements(t *testing.T) {
	dir := t.TempDir()
	p, err := New(Config{Saver: saver.Options{Dir: filepath.Join(dir, "data")}, MaxHeaderSize: 128,
		CaptureDuration: time.Minute, FlowTimeout: time.Minute, UUIDWait: time.Second, Anonymize: anonymize.None})
	if err != nil {
		t.Fatal(err)
	}
	ts := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	local, remote := netip.MustParseAddrPort("192.0.2.1:443"), netip.MustParseAddrPort("198.51.100.7:50000")
	for _, bad := range []string{"", "../../etc/x", "a/b", ".hidden", "nl\n"} {
		if err := p.Open(ts, bad, local, remote, 1); !errors.Is(err, saver.ErrBadUUID) {
			t.Errorf("Open(%q) = %v, want ErrBadUUID", bad, err)
		}
		if err := p.Close(ts, bad); !errors.Is(err, saver.ErrBadUUID) {
			t.Errorf("Close(%q) = %v, want ErrBadUUID", bad, err)
		}
	}
	if n := p.Names.Len(); n != 0 {
		t.Fatalf("%d entries after bad announcements, want 0", n)
	}
	if err := p.Open(ts, "host_1_0000000000000001", local, remote, 1); err != nil {
		t.Fatal(err)
	}
	d := p.Demuxer(packet.LinkTypeEthernet, nil)
	k := packet.KeyFromAddrPorts(local, remote)
	for i, syn := range []bool{true, false, false} {
		frame := segment(t, remote, local, syn)
		d.Packet(frame, ts.Add(time.Duration(i)*time.Millisecond), len(frame))
	}
	d.Tick(ts.Add(time.Second))
	d.Close()
	p.Wait()
	file := filepath.Join(dir, "data", "2026", "12", "01", "host_1_0000000000000001.pcap")
	if _, err := os.Stat(file); err != nil {
		t.Errorf("flow %v not saved under its announced name: %v", k, err)
	}
}

// segment is an Ethernet frame of a TCP segment from src to dst.
func segment(t *testing.T, src, dst netip.AddrPort, syn bool) []byte {
	t.Helper()
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP,
		SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), SYN: syn, ACK: !syn, Seq: 1000, Window: 500}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestGate: the kernel's names and offline fallback names pass the same
// check as tcp-info's; one that cannot name a file changes nothing.
func TestGate(t *testing.T) {
	p, err := New(Config{Saver: saver.Options{Dir: filepath.Join(t.TempDir(), "data")}, MaxHeaderSize: 128,
		CaptureDuration: time.Minute, FlowTimeout: time.Minute, UUIDWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	g := p.Gate()
	ts := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	k := packet.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:443"), netip.MustParseAddrPort("198.51.100.7:50000"))
	for _, bad := range []string{"", "../x", "a/b", "\u202ename", "nl\n"} {
		if g.Open(ts, bad, k, names.Kernel, 7) || g.Close(ts, bad) {
			t.Errorf("the gate took %q", bad)
		}
		if e := g.Fallback(bad, k, ts); e != nil {
			t.Errorf("Fallback(%q) = %v, want nil", bad, e)
		}
	}
	if n := p.Names.Len(); n != 0 || g.NamedSince(k, ts) {
		t.Fatalf("%d entries after bad names, want 0", n)
	}
	if !g.Open(ts, "host_1_0000000000000007", k, names.Kernel, 7) || !g.NamedSince(k, ts) {
		t.Fatal("a good kernel name was refused")
	}
	if e := p.Names.Claim(k, ts); e == nil || e.Source != names.Kernel {
		t.Fatalf("claimed %v, want the kernel's name", e)
	}
	if e := g.Fallback("192.0.2.1_443_x", k, ts); e == nil || e.Source != names.Fallback || e.UUID != "192.0.2.1_443_x" {
		t.Errorf("Fallback = %+v", e)
	}
}
