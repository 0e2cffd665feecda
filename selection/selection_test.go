package selection

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/packet"
)

var (
	server  = netip.MustParseAddrPort("192.0.2.1:443")
	server2 = netip.MustParseAddrPort("192.0.2.1:50123") // an outgoing connection's local end
	remote  = netip.MustParseAddrPort("198.51.100.7:40000")
	remoteS = netip.MustParseAddrPort("198.51.100.7:443") // a remote server
	other   = netip.MustParseAddrPort("203.0.113.9:40000")
)

const (
	syn    = packet.FlagSYN
	synack = packet.FlagSYN | packet.FlagACK
	ack    = packet.FlagACK
)

func decide(p *Policy, src, dst netip.AddrPort, flags uint8) Verdict {
	k := packet.KeyFromAddrPorts(src, dst)
	srcIsA := netip.AddrFrom16(k.A).Unmap() == src.Addr() && k.APort == src.Port()
	return p.Decide(k, &packet.Parsed{Flags: flags}, srcIsA)
}

// TestDecide: incoming by default, whichever packet comes first; outgoing
// with Outgoing; ports; tcp-info's rules; another host's connections.
func TestDecide(t *testing.T) {
	rules := &exclude.Rules{}
	if err := rules.AddSrcPorts("9100"); err != nil {
		t.Fatal(err)
	}
	var ports Ports
	if err := ports.Add("80, 440-450"); err != nil {
		t.Fatal(err)
	}
	live := &Policy{Strict: true, Exclude: rules}
	live.SetLocal([]netip.Addr{server.Addr()})
	live.SetListening(Listeners{netip.MustParseAddrPort("0.0.0.0:443"): {1}, netip.MustParseAddrPort("[::]:9100"): {1}})
	both := &Policy{Strict: true, Outgoing: true}
	both.SetLocal([]netip.Addr{server.Addr()})
	onPorts := &Policy{Strict: true, Ports: &ports}
	onPorts.SetLocal([]netip.Addr{server.Addr()})
	offline := &Policy{} // no addresses, no listeners
	for _, tt := range []struct {
		name     string
		p        *Policy
		src, dst netip.AddrPort
		flags    uint8
		want     Verdict
	}{
		{"incoming SYN", live, remote, server, syn, Save},
		{"incoming SYN-ACK", live, server, remote, synack, Save},
		{"incoming, mid-connection, to a listener", live, remote, server, ack, Save},
		{"incoming, mid-connection, from a listener", live, server, remote, ack, Save},
		{"outgoing SYN", live, server2, remoteS, syn, Outgoing},
		{"outgoing SYN-ACK", live, remoteS, server2, synack, Outgoing},
		{"outgoing, mid-connection", live, remoteS, server2, ack, Outgoing},
		{"incoming, mid-connection, to a listener made since", live, remote, netip.AddrPortFrom(server.Addr(), 8443), ack, Save},
		{"outgoing with -outgoing", both, server2, remoteS, syn, Save},
		{"incoming with -outgoing", both, remote, server, syn, Save},
		{"excluded port", live, remote, netip.AddrPortFrom(server.Addr(), 9100), syn, Excluded},
		{"loopback", live, netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"), syn, Excluded},
		{"another host's", live, remote, other, syn, NotLocal},
		{"selected port", onPorts, remote, server, syn, Save},
		{"selected port, mid-connection", onPorts, server, remote, ack, Save},
		{"another port", onPorts, remote, netip.AddrPortFrom(server.Addr(), 8080), syn, OtherPort},
		{"offline SYN", offline, remote, other, syn, Save},
		{"offline outgoing?", offline, other, remote, synack, Save}, // the SYN-ACK's sender is the server
		{"offline mid-connection", offline, remote, server, ack, Save},
		{"offline exclusion either way", &Policy{Exclude: rules}, netip.AddrPortFrom(other.Addr(), 9100), remote, ack, Excluded},
	} {
		if got := decide(tt.p, tt.src, tt.dst, tt.flags); got != tt.want {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
	// Addresses added later count at once.
	if v := decide(live, remote, netip.MustParseAddrPort("192.0.2.99:443"), syn); v != NotLocal {
		t.Fatalf("before SetLocal: %v", v)
	}
	live.SetLocal([]netip.Addr{server.Addr(), netip.MustParseAddr("192.0.2.99")})
	if v := decide(live, remote, netip.MustParseAddrPort("192.0.2.99:443"), syn); v != Save {
		t.Errorf("after SetLocal: %v", v)
	}
}

func TestPorts(t *testing.T) {
	var p Ports
	if err := p.Add("443,3001-3003, 65535"); err != nil {
		t.Fatal(err)
	}
	for port, want := range map[uint16]bool{443: true, 3001: true, 3002: true, 3003: true, 3004: false, 65535: true, 1: false} {
		if p.Has(port) != want {
			t.Errorf("Has(%d) = %v", port, !want)
		}
	}
	for _, bad := range []string{"0", "http", "10-5", "1-70000", "-3"} {
		if err := p.Add(bad); err == nil {
			t.Errorf("Add(%q) took it", bad)
		}
	}
}

// TestSampleChosen: the choice is HMAC-SHA256(key, UUID) as documented
// (a vector computed with Python's hmac module), stable, and about one in
// N over many UUIDs.
func TestSampleChosen(t *testing.T) {
	// Computed apart, with Python's hmac module:
	//   int.from_bytes(hmac.new(key, uuid, hashlib.sha256).digest()[:8], "big") % 3 == 0
	vectors := []struct {
		key  string
		uuid string
		want bool
	}{
		{"", "host_1764000000_0000000000000001", false},
		{"", "host_1764000000_0000000000000006", true},
		{"secret", "host_1764000000_0000000000000001", true},
		{"secret", "host_1764000000_0000000000000006", false},
	}
	for _, v := range vectors {
		if got := NewSample(3, []byte(v.key)).Chosen(v.uuid); got != v.want {
			t.Errorf("key %q, %s: chosen %v, want %v (the documented hash)", v.key, v.uuid, got, v.want)
		}
	}
	var nilSample *Sample
	if !nilSample.Chosen("x") || nilSample.Rate() != 1 || NewSample(1, nil) != nil {
		t.Error("no sample must choose every connection")
	}
	s := NewSample(3, nil)
	n := 0
	for i := 0; i < 30000; i++ {
		if s.Chosen(fmt.Sprintf("host_1764000000_%016X", i)) {
			n++
		}
	}
	if n < 9000 || n > 11000 {
		t.Errorf("%d of 30000 chosen for one in 3", n)
	}
	keyed := NewSample(3, []byte("secret"))
	same := 0
	for i := 0; i < 3000; i++ {
		u := fmt.Sprintf("host_1764000000_%016X", i)
		if keyed.Chosen(u) == s.Chosen(u) {
			same++
		}
	}
	if same == 3000 {
		t.Error("the key changes nothing")
	}
}

// TestNameable: the kernel source names only sockets the daemon may save.
func TestNameable(t *testing.T) {
	p := &Policy{Strict: true}
	p.SetLocal([]netip.Addr{server.Addr(), netip.MustParseAddr("10.0.0.1")})
	if !p.Nameable(server2, remoteS) {
		t.Error("without listeners or captured addresses known, a socket is nameable")
	}
	p.SetCaptured([]netip.Addr{server.Addr()})
	p.SetListening(Listeners{netip.MustParseAddrPort("[::]:443"): {1}})
	for _, tt := range []struct {
		local, remote netip.AddrPort
		want          bool
	}{
		{server, remote, true},
		{server2, remoteS, true},                                          // outgoing: named too (the listeners are read once a second)
		{netip.MustParseAddrPort("10.0.0.1:443"), remote, false},          // an interface not captured
		{netip.MustParseAddrPort("127.0.0.1:443"), remote, false},         // loopback
		{netip.MustParseAddrPort("[::ffff:192.0.2.1]:443"), remote, true}, // mapped
	} {
		if got := p.Nameable(tt.local, tt.remote); got != tt.want {
			t.Errorf("Nameable(%v, %v) = %v", tt.local, tt.remote, got)
		}
	}
	p.Outgoing = true
	if !p.Nameable(server2, remoteS) {
		t.Error("with Outgoing, an outgoing socket is nameable")
	}
	var ports Ports
	ports.Add("8080")
	p.Ports = &ports
	if p.Nameable(server, remote) {
		t.Error("a port outside -localport is nameable")
	}
}

// TestCgroups: with cgroups selected, only connections to a port on which
// a socket of those cgroups listens are saved, or named by the kernel.
func TestCgroups(t *testing.T) {
	p := &Policy{Strict: true, Outgoing: true}
	p.SetLocal([]netip.Addr{server.Addr()})
	p.SetListening(Listeners{netip.MustParseAddrPort("0.0.0.0:443"): {7}, netip.MustParseAddrPort("192.0.2.1:8080"): {9}})
	p.SetCgroups(map[uint64]bool{7: true})
	other := netip.AddrPortFrom(server.Addr(), 8080)
	for _, tt := range []struct {
		src, dst netip.AddrPort
		flags    uint8
		want     Verdict
	}{
		{remote, server, syn, Save},
		{server, remote, ack, Save},
		{remote, other, syn, OtherCgroup},
		{server2, remoteS, syn, OtherCgroup},                         // outgoing: no listener of the service
		{remote, netip.AddrPortFrom(server.Addr(), 9999), syn, Save}, // a listener made since the last reading
	} {
		if got := decide(p, tt.src, tt.dst, tt.flags); got != tt.want {
			t.Errorf("%v -> %v: %v, want %v", tt.src, tt.dst, got, tt.want)
		}
	}
	if !p.Nameable(server, remote) || p.Nameable(other, remote) {
		t.Error("Nameable does not follow the cgroups")
	}
	p.SetCgroups(nil)
	if decide(p, remote, other, syn) != Save {
		t.Error("without cgroups, every service is selected")
	}
}

// TestListenerShadow: a socket of another owner listening on the service's
// port at another address (a local user's on [::1], dumped after the
// service's on 0.0.0.0) changes nothing for the service's connections; one
// bound to the connection's own address is the one the kernel hands it to.
// The same for the listening rule of the incoming decision.
func TestListenerShadow(t *testing.T) {
	p := &Policy{Strict: true}
	v6 := netip.MustParseAddr("2001:db8::1")
	p.SetLocal([]netip.Addr{server.Addr(), v6})
	p.SetListening(Listeners{
		netip.MustParseAddrPort("0.0.0.0:3001"):      {7},
		netip.MustParseAddrPort("[::1]:3001"):        {9}, // another user's
		netip.MustParseAddrPort("[::]:3002"):         {7}, // dual-stack
		netip.MustParseAddrPort("127.0.0.1:3002"):    {9},
		netip.MustParseAddrPort("192.0.2.1:3003"):    {9}, // bound to the address itself: the kernel prefers it
		netip.MustParseAddrPort("0.0.0.0:3003"):      {7},
		netip.MustParseAddrPort("[::]:3004"):         {9, 7}, // SO_REUSEPORT, two owners
		netip.MustParseAddrPort("[::1]:40001"):       {9},    // in the ephemeral range
		netip.MustParseAddrPort("[2001:db8::1]:443"): {7},
	})
	p.SetCgroups(map[uint64]bool{7: true})
	at := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	for _, tt := range []struct {
		name     string
		src, dst netip.AddrPort
		flags    uint8
		want     Verdict
	}{
		{"service on 0.0.0.0, shadow on [::1]", remote, at(server.Addr(), 3001), syn, Save},
		{"the same, mid-connection", at(server.Addr(), 3001), remote, ack, Save},
		{"dual-stack service, shadow on 127.0.0.1", remote, at(server.Addr(), 3002), ack, Save},
		{"IPv6 to the dual-stack service", netip.MustParseAddrPort("[2001:db8::2]:40000"), at(v6, 3002), syn, Save},
		{"the other owner's socket on the address itself", remote, at(server.Addr(), 3003), syn, OtherCgroup},
		{"SO_REUSEPORT shared with the service", remote, at(server.Addr(), 3004), syn, Save},
		{"IPv4 to a port listened on by IPv6 address only", remote, at(server.Addr(), 443), syn, Save}, // a listener made since
		{"outgoing from a port listened on elsewhere", at(server.Addr(), 40001), remoteS, ack, Outgoing},
	} {
		if got := decide(p, tt.src, tt.dst, tt.flags); got != tt.want {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
	if !p.Nameable(at(server.Addr(), 3001), remote) || p.Nameable(at(server.Addr(), 3003), remote) {
		t.Error("Nameable does not follow the listener of the connection's own address")
	}
}

// TestLoadSample: a sample key file is read whole; an empty one, a FIFO
// (which would hold start-up), one others can read and one too long are
// refused, each with a one-line reason naming the flag.
func TestLoadSample(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), mode)
		os.Chmod(p, mode)
		return p
	}
	if s, err := LoadSample(10, write("key", "k", 0o600)); err != nil || s.Rate() != 10 || string(s.key) != "k" {
		t.Errorf("LoadSample = %v, %v", s, err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, path := range map[string]string{
		"empty":              write("empty", "", 0o600),
		"fifo":               fifo,
		"readable by others": write("open", "k", 0o644),
		"too long":           write("long", strings.Repeat("k", MaxSampleKey+1), 0o600),
	} {
		done := make(chan error, 1)
		go func() { _, err := LoadSample(10, path); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.HasPrefix(err.Error(), "-sample.keyfile: ") || strings.Contains(err.Error(), "\n") {
				t.Errorf("%s: %v, want a one-line reason", name, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: LoadSample is still waiting after 5 s", name)
		}
	}
}
