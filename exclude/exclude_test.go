package exclude

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/m-lab/packet-headers/packet"
)

// TestRules applies k8s-support's Tcpinfo() exclusions (its ports and one
// of its addresses) to connections as tcp-info would: by local port, by
// remote address, and always to local addresses.
func TestRules(t *testing.T) {
	var r Rules
	if err := r.AddSrcPorts("9100,9090,9091,9989,9990,9991,9992,9993,9994,9995,9996,9997,9998"); err != nil {
		t.Fatal(err)
	}
	if err := r.AddSrcPorts("40000"); err != nil { // above tcp-info's signed 16 bits
		t.Fatal(err)
	}
	if err := r.AddDstIPs("172.25.0.1,2001:db8::9"); err != nil {
		t.Fatal(err)
	}
	ap := netip.MustParseAddrPort
	for _, c := range []struct {
		local, remote string
		want          bool
	}{
		{"192.0.2.1:443", "198.51.100.7:50000", false},
		{"192.0.2.1:9100", "198.51.100.7:50000", true},  // a local excluded port
		{"192.0.2.1:50000", "198.51.100.7:9100", false}, // the remote's port does not count
		{"192.0.2.1:40000", "198.51.100.7:50000", true},
		{"192.0.2.1:443", "172.25.0.1:50000", true},
		{"[::ffff:192.0.2.1]:443", "[::ffff:172.25.0.1]:50000", true},
		{"[2001:db8::1]:443", "[2001:db8::9]:50000", true},
		{"127.0.0.1:443", "127.0.0.1:50000", true},
		{"[::1]:443", "[::1]:50000", true},
		{"[fe80::1]:443", "[2001:db8::7]:50000", true},
		{"169.254.1.1:443", "198.51.100.7:50000", true},
		{"192.0.2.1:443", "224.0.0.1:50000", true},
		{"0.0.0.0:443", "198.51.100.7:50000", true},
	} {
		if got := r.Excluded(ap(c.local), ap(c.remote)); got != c.want {
			t.Errorf("Excluded(%s, %s) = %v, want %v", c.local, c.remote, got, c.want)
		}
	}
	var none *Rules
	if none.Excluded(ap("192.0.2.1:9100"), ap("198.51.100.7:1")) || !none.Excluded(ap("127.0.0.1:1"), ap("127.0.0.1:2")) {
		t.Error("nil rules must exclude the local addresses only")
	}
}

// TestExcludedKey: the local end of a flow key is the one with a local
// address; without one, either reading excludes.
func TestExcludedKey(t *testing.T) {
	var r Rules
	r.AddSrcPorts("9100")
	key := func(a, b string) *packet.Key {
		k := packet.KeyFromAddrPorts(netip.MustParseAddrPort(a), netip.MustParseAddrPort(b))
		return &k
	}
	out := key("198.51.100.7:9100", "192.0.2.1:50000") // to a remote node exporter
	in := key("198.51.100.7:50000", "192.0.2.1:9100")  // to ours
	if r.ExcludedKey(out) != true || r.ExcludedKey(in) != true {
		t.Error("without local addresses, either end's port must exclude")
	}
	r.SetLocal([]netip.Addr{netip.MustParseAddr("192.0.2.1")})
	if r.ExcludedKey(out) || !r.ExcludedKey(in) {
		t.Error("with the local address known, only the local port must exclude")
	}
	if !r.ExcludedKey(key("127.0.0.1:1", "127.0.0.1:2")) {
		t.Error("loopback must be excluded")
	}
}

// TestBadLists: what tcp-info would skip with a log line is an error here.
func TestBadLists(t *testing.T) {
	var r Rules
	for _, bad := range []string{"0", "65536", "-1", "http", "9100,x"} {
		if err := r.AddSrcPorts(bad); err == nil || !strings.Contains(err.Error(), "-exclude-srcport") {
			t.Errorf("AddSrcPorts(%q) = %v, want an error", bad, err)
		}
	}
	for _, bad := range []string{"10.0.0", "fe80::1%eth0", "host"} {
		if err := r.AddDstIPs(bad); err == nil || !strings.Contains(err.Error(), "-exclude-dstip") {
			t.Errorf("AddDstIPs(%q) = %v, want an error", bad, err)
		}
	}
	// An empty list, as an empty environment variable gives, excludes nothing.
	var empty Rules
	if err := empty.AddSrcPorts(""); err != nil || !empty.Empty() {
		t.Errorf("AddSrcPorts(\"\") = %v, empty %v", err, empty.Empty())
	}
}
