package capture

import (
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcap"
)

func TestFilter(t *testing.T) {
	tests := []struct {
		local []netip.Addr
		want  string
	}{
		{nil, "less 0"},
		{[]netip.Addr{netip.MustParseAddr("192.0.2.1")}, "(ip and tcp and (host 192.0.2.1))"},
		{[]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")},
			"(ip and tcp and (host 192.0.2.1)) or (ip6 and (ip6 proto 6 or ip6 proto 0 or ip6 proto 43 or ip6 proto 44 or ip6 proto 60 or ip6 proto 51) and (host 2001:db8::1))"},
	}
	for _, tt := range tests {
		got := Filter(tt.local)
		if got != tt.want {
			t.Errorf("Filter(%v) = %q, want %q", tt.local, got, tt.want)
		}
		// libpcap must compile it.
		if _, err := pcap.CompileBPFFilter(layers.LinkTypeEthernet, 256, got); err != nil {
			t.Errorf("libpcap rejects %q: %v", got, err)
		}
	}
}

func TestInterfaces(t *testing.T) {
	if _, err := Interfaces([]string{"no-such-interface0"}); err == nil || !strings.Contains(err.Error(), "unknown interface") {
		t.Errorf("unknown interface: %v", err)
	}
	all, err := Interfaces(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ifc := range all {
		if ifc.Name == "lo" || len(ifc.Addrs) == 0 {
			t.Errorf("picked %+v: loopback or without address", ifc)
		}
		for _, a := range ifc.Addrs {
			if a.IsLoopback() || a.Zone() != "" {
				t.Errorf("address %v", a)
			}
		}
	}
	lo, err := Interfaces([]string{"lo"})
	if err != nil || len(lo) != 1 {
		t.Errorf("a named loopback interface must be accepted: %v %v", lo, err)
	}
}

// TestOpenLoopback captures on the loopback interface for real (root only).
func TestOpenLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("live capture needs root")
	}
	h, err := Open("lo", &Options{Filter: "tcp port 9"})
	if err != nil {
		t.Fatal(err)
	}
	if h.LinkType() != 1 {
		t.Errorf("loopback link type %d, want Ethernet (1)", h.LinkType())
	}
	if _, _, _, err := h.Read(); err != ErrTimeout {
		t.Errorf("Read with no traffic: %v, want ErrTimeout", err)
	}
	if _, err := h.Stats(); err != nil {
		t.Error(err)
	}
	h.Close()
	if _, _, _, err := h.Read(); err != ErrClosed {
		t.Errorf("Read after Close: %v", err)
	}
	if _, err := h.Stats(); err != ErrClosed {
		t.Errorf("Stats after Close: %v", err)
	}
	if _, err := Open("no-such-interface0", nil); err == nil {
		t.Error("Open of a missing interface succeeded")
	}
}
