// Package selection decides, at a flow's first packet, whether the daemon
// saves the connection: the connections the study asked for, and nothing
// else. By default that is every connection this host accepted (its SYN
// arrived for a local listener), on any local port, that tcp-info's
// exclusion rules (package exclude) do not leave out; -outgoing adds the
// connections this host opened, -localport keeps only some local ports.
//
// A connection is incoming when its SYN came from the remote end, or its
// SYN-ACK from the local one. When the capture saw neither (the daemon
// started mid-connection, or the capture dropped them), it is incoming
// when a socket listens on its local address and port, or on the port's
// wildcard (live: the kernel's listeners, SetListening); offline, without that knowledge, it is taken
// as incoming, so that nothing is lost by a guess.
//
// The local end is the one with one of this host's addresses (SetLocal,
// followed as addresses come and go). Live (Strict), a connection with no
// local end is another host's (forwarded, or captured in promiscuous mode)
// and is not saved; offline, where the addresses may be unknown, the
// server end is inferred: the SYN's receiver, the SYN-ACK's sender, the
// listening port, or else the lower port.
//
// A decision costs two map look-ups and is made once per flow, or once per
// packet of a connection that is not saved (the demuxer caches them).
package selection

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/internal/keyfile"
	"github.com/m-lab/packet-headers/packet"
)

// Verdict is the decision for one connection.
type Verdict uint8

// The verdicts.
const (
	Save        Verdict = iota
	Excluded            // tcp-info's exclusion rules (package exclude)
	NotLocal            // neither end is this host's (Strict only)
	Outgoing            // this host opened it, and Policy.Outgoing is false
	OtherPort           // its local port is not one of Policy.Ports
	OtherCgroup         // its listener is not one of the selected cgroups'
	NumVerdicts         // the number of verdicts, for arrays indexed by Verdict
)

var verdictNames = [NumVerdicts]string{"save", "excluded", "not_local", "outgoing", "other_port", "other_cgroup"}

// String returns the verdict's name, as the packet outcomes name it.
func (v Verdict) String() string {
	if v < NumVerdicts {
		return verdictNames[v]
	}
	return "invalid"
}

// Policy is what the study asked for. Its exported fields are set before
// use; SetLocal and SetListening may be called at any time, concurrently
// with Decide.
type Policy struct {
	Exclude  *exclude.Rules // nil: the always-on local rule only
	Ports    *Ports         // nil: every local port
	Outgoing bool           // save the connections this host opened too
	Strict   bool           // a connection without a local end is not saved (live)
	// KeepLocal keeps the connections of loopback, link-local, multicast
	// or unspecified addresses, which tcp-info always excludes (and so
	// live mode): offline, a capture taken on loopback is split whole
	// unless -exclude-local asks otherwise.
	KeepLocal bool
	// Ephemeral is the range of local ports the kernel gives connections
	// this host opens (net.ipv4.ip_local_port_range; default 32768-60999).
	// A connection whose SYN was not seen, on a port that no listener had
	// at the last reading, is taken as opened here only from one of them:
	// any other is a listener's made since (the listeners are read once a
	// second; a service starting must not lose its first connections).
	Ephemeral [2]uint16

	local     atomic.Pointer[map[netip.Addr]bool]
	captured  atomic.Pointer[map[netip.Addr]bool]
	listening atomic.Pointer[Listeners]
	cgroups   atomic.Pointer[map[uint64]bool]
}

// Listeners are the listening TCP sockets of this host, by local address
// (unspecified for a wildcard, IPv4-mapped ones unmapped) and port, each
// with the cgroup v2 ids of the sockets bound there (several with
// SO_REUSEPORT; 0 where the kernel does not say).
type Listeners map[netip.AddrPort][]uint64

// find returns the cgroups of the listener that accepts a connection to
// local, as the kernel's lookup chooses it: one bound to local's address
// before its family's wildcard, an IPv4 wildcard before IPv6's (which takes
// IPv4 too, unless IPV6_V6ONLY). A socket listening on another address of
// the same port (another user's, on [::1]) is not the service's
// (TestListenerShadow).
func (l Listeners) find(local netip.AddrPort) ([]uint64, bool) {
	if l == nil {
		return nil, false
	}
	a, port := local.Addr().Unmap(), local.Port()
	if ids, ok := l[netip.AddrPortFrom(a, port)]; ok {
		return ids, true
	}
	if a.Is4() {
		if ids, ok := l[netip.AddrPortFrom(netip.IPv4Unspecified(), port)]; ok {
			return ids, true
		}
	}
	ids, ok := l[netip.AddrPortFrom(netip.IPv6Unspecified(), port)]
	return ids, ok
}

// has reports whether a socket listens where a connection to local is
// accepted.
func (l Listeners) has(local netip.AddrPort) bool { _, ok := l.find(local); return ok }

// SetCgroups selects the services whose listening sockets belong to these
// cgroup v2 ids (their directories' inode numbers: a systemd unit's or a
// container's cgroup and those below it); nil: every service. Only
// connections to a port on which such a socket listens are saved.
func (p *Policy) SetCgroups(ids map[uint64]bool) { p.cgroups.Store(&ids) }

// inCgroups reports whether the listener that accepts connections to
// local belongs to the selected cgroups, or no cgroup is selected. An
// incoming connection to an address and port that no listener of the last
// reading has (read once a second) is taken as the service's: a listener
// made since (a service restarted) must not lose its first connections; an
// outgoing one (with Outgoing) cannot be told a service's by its port, and
// is not (TestCgroups).
func (p *Policy) inCgroups(local netip.AddrPort, listening Listeners, incoming bool) bool {
	c := p.cgroups.Load()
	if c == nil || *c == nil {
		return true
	}
	ids, ok := listening.find(local)
	if !ok {
		return incoming
	}
	for _, id := range ids {
		if (*c)[id] {
			return true
		}
	}
	return false
}

// SetCaptured sets the addresses of the interfaces captured (live: those of
// the captured interfaces, a subset of SetLocal's with -interface); none:
// unknown, every local address counts (an interface without address, such
// as a bridge port, carries its master's).
func (p *Policy) SetCaptured(addrs []netip.Addr) {
	if len(addrs) == 0 {
		p.captured.Store(nil)
		return
	}
	m := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		m[a.Unmap()] = true
	}
	p.captured.Store(&m)
}

// Nameable reports whether a socket of this host between local and remote
// may be a connection the daemon saves: its local address is one of the
// captured interfaces' (when SetCaptured was called), tcp-info's rules,
// Ports and the cgroups keep it. The kernel source asks it before naming a
// destroyed socket, so that the names table holds only the connections a
// flow may claim, however many others the host has (loopback ones,
// another interface's). Which end opened the socket is not asked: the
// listeners are read once a second, and a connection to a listener made
// since (a service started) must be named (TestKernelUUIDs starts its
// server after the daemons).
func (p *Policy) Nameable(local, remote netip.AddrPort) bool {
	local, remote = netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if c := p.captured.Load(); c != nil && !(*c)[local.Addr()] {
		return false
	}
	if p.Exclude.Excluded(local, remote) || p.Ports != nil && !p.Ports.Has(local.Port()) {
		return false
	}
	var listening Listeners
	if l := p.listening.Load(); l != nil {
		listening = *l
	}
	return p.inCgroups(local, listening, true)
}

// SetLocal sets this host's addresses.
func (p *Policy) SetLocal(addrs []netip.Addr) {
	m := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		m[a.Unmap()] = true
	}
	p.local.Store(&m)
}

// IsLocal reports whether a is one of this host's addresses.
func (p *Policy) IsLocal(a netip.Addr) bool {
	m := p.local.Load()
	return m != nil && (*m)[a.Unmap()]
}

// SetListening sets the sockets that listen (nil: unknown).
func (p *Policy) SetListening(l Listeners) { p.listening.Store(&l) }

// Decide returns the verdict for the connection of flow key k, whose first
// packet seen is pp, sent by k's A end if srcIsA.
func (p *Policy) Decide(k packet.Key, pp *packet.Parsed, srcIsA bool) Verdict {
	a := netip.AddrPortFrom(netip.AddrFrom16(k.A).Unmap(), k.APort)
	b := netip.AddrPortFrom(netip.AddrFrom16(k.B).Unmap(), k.BPort)
	if !p.KeepLocal && (exclude.Local(a.Addr()) || exclude.Local(b.Addr())) {
		return Excluded
	}
	aLocal, bLocal := p.IsLocal(a.Addr()), p.IsLocal(b.Addr())
	if p.Strict && !aLocal && !bLocal {
		return NotLocal
	}
	syn := pp.Flags&(packet.FlagSYN|packet.FlagACK) == packet.FlagSYN
	synack := pp.Flags&(packet.FlagSYN|packet.FlagACK) == packet.FlagSYN|packet.FlagACK
	var listening Listeners
	if l := p.listening.Load(); l != nil {
		listening = *l
	}
	known := aLocal != bLocal
	localIsA := aLocal
	if !known {
		// The server's end: the SYN's receiver, the SYN-ACK's sender, a
		// listening port, else the lower port.
		switch {
		case syn:
			localIsA = !srcIsA
		case synack:
			localIsA = srcIsA
		case listening != nil && listening.has(a) != listening.has(b):
			localIsA = listening.has(a)
		default:
			localIsA = a.Port() < b.Port()
		}
	}
	local, remote := a, b
	if !localIsA {
		local, remote = b, a
	}
	if known && p.Exclude.Listed(local, remote) || !known && (p.Exclude.Listed(a, b) || p.Exclude.Listed(b, a)) {
		return Excluded
	}
	if p.Ports != nil && !p.Ports.Has(local.Port()) {
		return OtherPort
	}
	var incoming bool
	switch {
	case syn:
		incoming = srcIsA != localIsA // from the remote end
	case synack:
		incoming = srcIsA == localIsA // from the local end
	case listening != nil:
		lo, hi := p.Ephemeral[0], p.Ephemeral[1]
		if lo == 0 {
			lo, hi = 32768, 60999
		}
		incoming = listening.has(local) || local.Port() < lo || local.Port() > hi
	default:
		incoming = true // unknown: saved rather than lost
	}
	if !p.Outgoing && !incoming {
		return Outgoing
	}
	if !p.inCgroups(local, listening, incoming) {
		return OtherCgroup
	}
	return Save
}

// Ports is a set of TCP ports.
type Ports struct{ bits [1024]uint64 }

// Add adds a comma-separated list of ports and ranges (443,3001-3010).
func (s *Ports) Add(list string) error {
	for _, item := range strings.Split(list, ",") {
		if item = strings.TrimSpace(item); item == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(item, "-")
		first, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
		last, err2 := first, error(nil)
		if isRange {
			last, err2 = strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
		}
		if err1 != nil || err2 != nil || first == 0 || last < first {
			return fmt.Errorf("%q is not a port from 1 to 65535 or a range of them (such as 3001-3010)", item)
		}
		for p := first; p <= last; p++ {
			s.bits[p/64] |= 1 << (p % 64)
		}
	}
	return nil
}

// Has reports whether p is in the set.
func (s *Ports) Has(p uint16) bool { return s.bits[p/64]&(1<<(p%64)) != 0 }

// Sample chooses one connection in N by a keyed hash of its UUID: the
// first 8 bytes of HMAC-SHA256(key, UUID), big-endian, are a multiple of
// N. Every server and an offline re-split of the same capture with the
// same events choose the same connections, and a tool that knows the key
// (none by default: an empty key) can tell which UUIDs have traces
// (TestSampleChosen holds a vector to check one against). A nil Sample
// chooses every connection.
type Sample struct {
	n   uint64
	key []byte
}

// NewSample returns a sample of one connection in n, keyed by key; nil
// for n <= 1 (every connection).
func NewSample(n int, key []byte) *Sample {
	if n <= 1 {
		return nil
	}
	return &Sample{n: uint64(n), key: key}
}

// MaxSampleKey is the longest sample key file read (HMAC-SHA256 hashes a
// key longer than 64 bytes anyway).
const MaxSampleKey = 4096

// LoadSample returns the sample that -sample (n) and -sample.keyfile ask
// for, or a one-line reason naming them. The key file's bytes are the key
// as they are; an empty one, or one that is not a regular file, is
// refused, and so is a file others can read, since whoever reads it can
// tell which connections have traces (TestLoadSample).
func LoadSample(n int, keyFile string) (*Sample, error) {
	switch {
	case n < 1:
		return nil, fmt.Errorf("-sample must be at least 1, not %d", n)
	case keyFile != "" && n == 1:
		return nil, errors.New("-sample.keyfile goes with -sample above 1")
	}
	var key []byte
	if keyFile != "" {
		var err error
		if key, err = keyfile.Read(keyFile, MaxSampleKey); err == nil && len(key) == 0 {
			err = fmt.Errorf("%s is empty: a key that is no secret", keyFile)
		}
		if err != nil {
			return nil, fmt.Errorf("-sample.keyfile: %w", err)
		}
	}
	return NewSample(n, key), nil
}

// Rate returns N (1 for a nil Sample).
func (s *Sample) Rate() int {
	if s == nil {
		return 1
	}
	return int(s.n)
}

// Chosen reports whether the connection named uuid is in the sample. It
// is asked once per flow, when the flow is named.
func (s *Sample) Chosen(uuid string) bool {
	if s == nil {
		return true
	}
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(uuid))
	return binary.BigEndian.Uint64(m.Sum(nil))%s.n == 0
}
