package anonymize

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/m-lab/packet-headers/packet"
)

// referenceKey is the key of the sample in the Crypto-PAn reference
// distribution (sample_trace_raw.dat, sample_trace_sanitized.dat).
var referenceKey = []byte{21, 34, 23, 141, 51, 164, 207, 128, 19, 10, 91, 22, 73, 144, 125, 16,
	216, 152, 143, 131, 121, 121, 101, 39, 98, 87, 76, 45, 42, 132, 34, 2}

// referenceSample is every address pair of the reference distribution's
// sample trace: raw, and as its implementation anonymized it.
var referenceSample = [][2]string{
	{"128.11.68.132", "135.242.180.132"}, {"129.118.74.4", "134.136.186.123"}, {"130.132.252.244", "133.68.164.234"},
	{"141.223.7.43", "141.167.8.160"}, {"141.233.145.108", "141.129.237.235"}, {"152.163.225.39", "151.140.114.167"},
	{"156.29.3.236", "147.225.12.42"}, {"165.247.96.84", "162.9.99.234"}, {"166.107.77.190", "160.132.178.185"},
	{"192.102.249.13", "252.138.62.131"}, {"192.215.32.125", "252.43.47.189"}, {"192.233.80.103", "252.25.108.8"},
	{"192.41.57.43", "252.222.221.184"}, {"193.150.244.223", "253.169.52.216"}, {"195.205.63.100", "255.186.223.5"},
	{"198.200.171.101", "249.199.68.213"}, {"198.26.132.101", "249.36.123.202"}, {"198.36.213.5", "249.7.21.132"},
	{"198.51.77.238", "249.18.186.254"}, {"199.217.79.101", "248.38.184.213"}, {"202.49.198.20", "245.206.7.234"},
	{"203.12.160.252", "244.248.163.4"}, {"204.184.162.189", "243.192.77.90"}, {"204.202.136.230", "243.178.4.198"},
	{"204.29.20.4", "243.33.20.123"}, {"205.178.38.67", "242.108.198.51"}, {"205.188.147.153", "242.96.16.101"},
	{"205.188.248.25", "242.96.88.27"}, {"205.245.121.43", "242.21.121.163"}, {"207.105.49.5", "241.118.205.138"},
	{"207.135.65.238", "241.202.129.222"}, {"207.155.9.214", "241.220.250.22"}, {"207.188.7.45", "241.255.249.220"},
	{"207.25.71.27", "241.33.119.156"}, {"207.33.151.131", "241.1.233.131"}, {"208.147.89.59", "227.237.98.191"},
	{"208.234.120.210", "227.154.67.17"}, {"208.28.185.184", "227.39.94.90"}, {"208.52.56.122", "227.8.63.165"},
	{"209.12.231.7", "226.243.167.8"}, {"209.238.72.3", "226.6.119.243"}, {"209.246.74.109", "226.22.124.76"},
	{"209.68.60.238", "226.184.220.233"}, {"209.85.249.6", "226.170.70.6"}, {"212.120.124.31", "228.135.163.231"},
	{"212.146.8.236", "228.19.4.234"}, {"212.186.227.154", "228.59.98.98"}, {"212.204.172.118", "228.71.195.169"},
	{"212.206.130.201", "228.69.242.193"}, {"216.148.237.145", "235.84.194.111"}, {"216.157.30.252", "235.89.31.26"},
	{"216.184.159.48", "235.96.225.78"}, {"216.227.10.221", "235.28.253.36"}, {"216.254.18.172", "235.7.16.162"},
	{"216.32.132.250", "235.192.139.38"}, {"216.35.217.178", "235.195.157.81"}, {"24.0.250.221", "100.15.198.226"},
	{"24.13.62.231", "100.2.192.247"}, {"24.14.213.138", "100.1.42.141"}, {"24.5.0.80", "100.9.15.210"},
	{"24.7.198.88", "100.10.6.25"}, {"24.94.26.44", "100.88.228.35"}, {"38.15.67.68", "64.3.66.187"},
	{"4.3.88.225", "124.60.155.63"}, {"63.14.55.111", "95.9.215.7"}, {"63.195.241.44", "95.179.238.44"},
	{"63.97.7.140", "95.97.9.123"}, {"64.14.118.196", "0.255.183.58"}, {"64.34.154.117", "0.221.154.117"},
	{"64.39.15.238", "0.219.7.41"},
}

// TestCryptoPAnReference: the reference sample, bit for bit, as IPv4 and
// as IPv4-mapped IPv6 (mapped over its 32 bits, staying mapped).
func TestCryptoPAnReference(t *testing.T) {
	cp, err := NewCryptoPAn(referenceKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range referenceSample {
		in, want := netip.MustParseAddr(v[0]), netip.MustParseAddr(v[1])
		if got := cp.Map(in); got != want {
			t.Errorf("%v -> %v, want %v", in, got, want)
		}
		if got := cp.Map(netip.AddrFrom16(in.As16())); got != netip.AddrFrom16(want.As16()) {
			t.Errorf("::ffff:%v -> %v, want ::ffff:%v", in, got, want)
		}
	}
}

// TestCryptoPAnIPv6: the 128-bit construction gives the values other
// implementations of it give for the reference key (Yawning Angel's Go
// package and yacryptopan; the reference has no IPv6 sample).
func TestCryptoPAnIPv6(t *testing.T) {
	cp, _ := NewCryptoPAn(referenceKey)
	for in, want := range map[string]string{
		"::1":         "78ff:f001:9fc0:20df:8380:b1f1:704:ed",
		"::2":         "78ff:f001:9fc0:20df:8380:b1f1:704:ef",
		"::ffff":      "78ff:f001:9fc0:20df:8380:b1f1:704:f838",
		"2001:db8::1": "4401:2bc:603f:d91d:27f:ff8e:e6f1:dc1e",
		"2001:db8::2": "4401:2bc:603f:d91d:27f:ff8e:e6f1:dc1c",
	} {
		if got := cp.Map(netip.MustParseAddr(in)); got != netip.MustParseAddr(want) {
			t.Errorf("%s -> %v, want %s", in, got, want)
		}
	}
}

func commonPrefix(a, b []byte) int {
	for i := range a {
		if x := a[i] ^ b[i]; x != 0 {
			return 8*i + bits.LeadingZeros8(x)
		}
	}
	return 8 * len(a)
}

// TestCryptoPAnProperties: for random pairs sharing a prefix of every
// length, the mapped pair shares exactly as long a prefix (IPv4 and IPv6),
// and a whole /16 maps one to one.
func TestCryptoPAnProperties(t *testing.T) {
	key := make([]byte, KeySize)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	cp, _ := NewCryptoPAn(key)
	for n := 0; n < 2000; n++ {
		var a, b [16]byte
		for i := range a {
			a[i] = byte(r.Uint32())
		}
		b = a
		k := r.IntN(129) // flip bit k (none when 128): the pair shares exactly k bits
		if k < 128 {
			b[k/8] ^= 0x80 >> (k % 8)
			for i := k + 1; i < 128; i++ { // and randomize what follows
				if r.IntN(2) == 1 {
					b[i/8] ^= 0x80 >> (i % 8)
				}
			}
		}
		ma, mb := cp.Map16(a), cp.Map16(b)
		if got, want := commonPrefix(ma[:], mb[:]), commonPrefix(a[:], b[:]); got != want {
			t.Fatalf("IPv6 %x and %x share %d bits, their mappings %d", a, b, want, got)
		}
		a4, b4 := [4]byte(a[:4]), [4]byte(b[:4])
		m4a, m4b := cp.Map4(a4), cp.Map4(b4)
		if got, want := commonPrefix(m4a[:], m4b[:]), commonPrefix(a4[:], b4[:]); got != want {
			t.Fatalf("IPv4 %v and %v share %d bits, their mappings %d", a4, b4, want, got)
		}
	}
	seen := make(map[[4]byte]bool, 1<<16)
	for i := 0; i < 1<<16; i++ {
		m := cp.Map4([4]byte{198, 51, byte(i >> 8), byte(i)})
		if seen[m] {
			t.Fatalf("two addresses of 198.51/16 map to %v", m)
		}
		seen[m] = true
	}
}

// TestReadKey: 32 raw bytes or 64 hex digits are a key; anything else,
// or a missing file, is an error that does not quote the file.
func TestReadKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o600)
		return p
	}
	if k, err := ReadKey(write("raw", referenceKey)); err != nil || !bytes.Equal(k, referenceKey) {
		t.Errorf("raw key: %x, %v", k, err)
	}
	if k, err := ReadKey(write("hex", []byte(hex.EncodeToString(referenceKey)+"\n"))); err != nil || !bytes.Equal(k, referenceKey) {
		t.Errorf("hex key: %x, %v", k, err)
	}
	secret := "0123456789abcdef" // 16 bytes
	for name, b := range map[string][]byte{"short": []byte(secret), "long": append(bytes.Clone(referenceKey), 'x'), "badhex": bytes.Repeat([]byte("zz"), KeySize)} {
		_, err := ReadKey(write(name, b))
		if !errors.Is(err, ErrKeySize) || bytes.Contains([]byte(err.Error()), b[:8]) {
			t.Errorf("%s: %v, want ErrKeySize without the contents", name, err)
		}
	}
	if _, err := ReadKey(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	exposed := write("exposed", referenceKey)
	os.Chmod(exposed, 0o644)
	if _, err := ReadKey(exposed); !errors.Is(err, ErrKeyExposed) {
		t.Errorf("a key file others can read: %v, want ErrKeyExposed", err)
	}
}

// TestApplyMapped: a frame rewritten with a flow's mappings is exactly the
// frame gopacket encodes with the mapped addresses, checksums included, in
// IPv4, IPv6 and IPv4-mapped IPv6; the server's address is kept.
func TestApplyMapped(t *testing.T) {
	server4, server6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8:aaaa::1")
	a, err := NewKeyed(referenceKey, []netip.Addr{server4, server6})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range [][2]netip.Addr{
		{netip.MustParseAddr("128.11.68.132"), server4},
		{server4, netip.MustParseAddr("24.5.0.80")},
		{netip.MustParseAddr("2001:db8::1"), server6},
		{netip.MustParseAddr("::ffff:128.11.68.132"), server6},
	} {
		b := frame(t, c[0], c[1], 40)
		want := frame(t, a.Anonymized(c[0]), a.Anonymized(c[1]), 40)
		var p packet.Parsed
		if p.Decode(packet.LinkTypeEthernet, b) != packet.TCP {
			t.Fatal("decode")
		}
		var src, dst *[16]byte
		if a.ShouldMask(&p.Src) {
			m := a.Map(p.Src)
			src = &m
		}
		if a.ShouldMask(&p.Dst) {
			m := a.Map(p.Dst)
			dst = &m
		}
		a.ApplyMapped(b, &p, src, dst)
		if !bytes.Equal(b, want) {
			t.Errorf("%v -> %v:\n got %x\nwant %x", c[0], c[1], b, want)
		}
		if a.Anonymized(c[1]) != c[1] && a.Anonymized(c[0]) != c[0] {
			t.Errorf("%v -> %v: the server's address was mapped", c[0], c[1])
		}
	}
	if got := a.Anonymized(netip.MustParseAddr("128.11.68.132")); got != netip.MustParseAddr("135.242.180.132") {
		t.Errorf("Anonymized gives %v, not the reference's mapping", got)
	}
}

// BenchmarkMap measures the per-flow mapping (some dozens of AES blocks).
func BenchmarkMap(b *testing.B) {
	cp, _ := NewCryptoPAn(referenceKey)
	b.Run("ipv4", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			cp.Map4([4]byte{203, 0, 113, 77})
		}
	})
	b.Run("ipv6", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			cp.Map16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1})
		}
	})
}

// BenchmarkApplyMapped measures the per-packet rewrite with a flow's
// mapping, the cryptopan twin of BenchmarkApply.
func BenchmarkApplyMapped(b *testing.B) {
	src, dst := netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("192.0.2.1")
	f := frame(b, src, dst, 0)
	var p packet.Parsed
	p.Decode(packet.LinkTypeEthernet, f)
	a, _ := NewKeyed(referenceKey, []netip.Addr{dst})
	m := a.Map(p.Src)
	b.ReportAllocs()
	for b.Loop() {
		a.ApplyMapped(f, &p, &m, nil)
	}
}

// FuzzCryptoPAn checks, for any key and pair of addresses, that the
// mapping is one to one, maps an IPv4-mapped address as the IPv4 address
// it holds, preserves exactly their common prefix where both are
// IPv4-mapped or neither is, and that a frame rewritten with it is the
// frame gopacket encodes with the mapped address, truncated frames
// included (no write out of bounds).
func FuzzCryptoPAn(f *testing.F) {
	f.Add(referenceKey, []byte{128, 11, 68, 132}, []byte{128, 11, 68, 133}, uint8(0))
	f.Add(referenceKey, bytes.Repeat([]byte{0x20}, 16), bytes.Repeat([]byte{0x21}, 16), uint8(5))
	// An IPv6 address and an IPv4-mapped one: their 2-bit common prefix
	// is not kept, the mapped one being mapped as IPv4.
	f.Add(referenceKey, bytes.Repeat([]byte{0x30}, 16), []byte{10: 0xff, 0xff, 48, 48, 48, 48}, uint8(0))
	f.Fuzz(func(t *testing.T, key, x, y []byte, cut uint8) {
		if len(key) != KeySize {
			return
		}
		ax, ok1 := netip.AddrFromSlice(x)
		ay, ok2 := netip.AddrFromSlice(y)
		if !ok1 || !ok2 || ax.Is4() != ay.Is4() {
			return
		}
		cp, err := NewCryptoPAn(key)
		if err != nil {
			t.Fatal(err)
		}
		mx, my := cp.Map(ax), cp.Map(ay)
		if (ax == ay) != (mx == my) {
			t.Fatalf("%v, %v -> %v, %v: one-to-one broken", ax, ay, mx, my)
		}
		// An IPv4-mapped address is mapped as the IPv4 address it holds, so
		// a host has one name over both families; the prefix is preserved
		// within each of the two trees, IPv4(-mapped) and the rest of IPv6.
		for _, a := range []netip.Addr{ax, ay} {
			if m := cp.Map(a); m.Is4In6() != a.Is4In6() || a.Is4In6() && m.Unmap() != cp.Map(a.Unmap()) {
				t.Fatalf("%v -> %v: not the mapping of %v (%v)", a, m, a.Unmap(), cp.Map(a.Unmap()))
			}
		}
		if ax.Is4In6() == ay.Is4In6() && commonPrefix(mx.AsSlice(), my.AsSlice()) != commonPrefix(ax.AsSlice(), ay.AsSlice()) {
			t.Fatalf("%v, %v -> %v, %v: prefix broken", ax, ay, mx, my)
		}
		server := netip.MustParseAddr("192.0.2.1")
		if !ax.Is4() {
			server = netip.MustParseAddr("2001:db8:aaaa::1")
		}
		if ax == server {
			return
		}
		a, _ := NewKeyed(key, []netip.Addr{server})
		b := frame(t, ax, server, 10)
		want := frame(t, a.Anonymized(ax), server, 10)
		var p packet.Parsed
		if p.Decode(packet.LinkTypeEthernet, b) != packet.TCP {
			return // (an address gopacket's frame cannot carry)
		}
		m := a.Map(p.Src)
		trunc := bytes.Clone(b[:max(0, len(b)-int(cut))])
		a.ApplyMapped(b, &p, &m, nil)
		if !bytes.Equal(b, want) {
			t.Fatalf("%v:\n got %x\nwant %x", ax, b, want)
		}
		a.ApplyMapped(trunc, &p, &m, &m)
	})
}
