package live

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/m-lab/packet-headers/capture"
)

// TestUsableInterfaces: looking for interfaces (no -interface), one with
// only loopback or link-local addresses is skipped, not an error (a veth
// just made has an IPv6 link-local address); named, it is an error, and
// one without address is taken (a bridge port).
func TestUsableInterfaces(t *testing.T) {
	eth := capture.Interface{Name: "eth0", Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("fe80::1")}}
	veth := capture.Interface{Name: "veth0", Addrs: []netip.Addr{netip.MustParseAddr("fe80::2")}}
	port := capture.Interface{Name: "port0"}
	lo := capture.Interface{Name: "lo", Loopback: true, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}
	got, err := usable([]capture.Interface{eth, veth, lo}, false)
	if err != nil || len(got) != 1 || got[0].Name != "eth0" {
		t.Errorf("looking: %v %v, want eth0 alone", got, err)
	}
	if _, err := usable([]capture.Interface{veth}, false); err == nil {
		t.Error("looking, with no usable interface: no error")
	}
	if _, err := usable([]capture.Interface{eth, veth}, true); err == nil || !strings.Contains(err.Error(), "veth0") {
		t.Errorf("named veth0 with only a link-local address: %v", err)
	}
	if got, err := usable([]capture.Interface{port}, true); err != nil || len(got) != 1 {
		t.Errorf("a named interface without address: %v %v", got, err)
	}
}

// TestUnder: a -cgroup path is refused only when it climbs out of the
// cgroup v2 mount; a cgroup whose name begins with two dots is one like
// any other.
func TestUnder(t *testing.T) {
	for d, want := range map[string]bool{
		"/sys/fs/cgroup":                    true,
		"/sys/fs/cgroup/..svc":              true,
		"/sys/fs/cgroup/system.slice/..a.b": true,
		"/sys/fs/cgroup/..":                 false,
		"/sys/fs":                           false,
		"/sys/fs/cgroupx":                   false,
		"/etc":                              false,
	} {
		if got := under("/sys/fs/cgroup", d); got != want {
			t.Errorf("under(%q) = %v, want %v", d, got, want)
		}
	}
}
