// Package exclude decides which connections are never saved, with
// tcp-info's rules, so that one set of settings configures both programs
// and the traces hold exactly the connections tcp-info records.
//
// tcp-info (netlink.MakeArchivalRecord with ExcludeConfig{Local: true})
// neither records nor announces a socket whose local port is one of its
// -exclude-srcport ports, whose remote address is one of its -exclude-dstip
// addresses, or either of whose addresses is loopback, link-local unicast,
// multicast or unspecified (net.IP's IsLoopback, IsLinkLocalUnicast,
// IsMulticast, IsUnspecified). Rules does the same, with the same flag
// syntax: comma-separated values, the flag repeatable. One difference:
// tcp-info parses ports as signed 16-bit numbers and skips ports above
// 32767 with a log line; Rules takes every port from 1 to 65535 and refuses
// anything else, so a typo is an error at start, not a silent gap.
//
// Decisions are made once per flow (at its first packet) and per kernel
// name, never per saved packet; a zero Rules excludes the local addresses
// only. A Rules is read-only once built and safe for concurrent use.
package exclude

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/m-lab/packet-headers/packet"
)

// Rules are the exclusions beyond the always-on local one.
type Rules struct {
	srcPorts map[uint16]bool     // local ports (-exclude-srcport)
	dstIPs   map[netip.Addr]bool // remote addresses, unmapped (-exclude-dstip)
	local    map[netip.Addr]bool // this host's addresses, to tell the local end
}

// AddSrcPorts adds local ports to exclude: a comma-separated list, as
// tcp-info's -exclude-srcport takes it.
func (r *Rules) AddSrcPorts(list string) error {
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue // an empty list (an empty environment variable) excludes nothing
		}
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return fmt.Errorf("-exclude-srcport: %q is not a port from 1 to 65535", s)
		}
		if r.srcPorts == nil {
			r.srcPorts = map[uint16]bool{}
		}
		r.srcPorts[uint16(p)] = true
	}
	return nil
}

// AddDstIPs adds remote addresses to exclude: a comma-separated list, as
// tcp-info's -exclude-dstip takes it.
func (r *Rules) AddDstIPs(list string) error {
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return fmt.Errorf("-exclude-dstip: %q is not an IP address", s)
		}
		if r.dstIPs == nil {
			r.dstIPs = map[netip.Addr]bool{}
		}
		r.dstIPs[a.Unmap()] = true
	}
	return nil
}

// SetLocal gives the host's own addresses, which tell a connection's local
// end from its remote one when the rules are applied to a flow key.
func (r *Rules) SetLocal(addrs []netip.Addr) {
	r.local = make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		r.local[a.Unmap()] = true
	}
}

// Empty reports whether no port or address is excluded (the local rule
// always applies).
func (r *Rules) Empty() bool { return r == nil || len(r.srcPorts) == 0 && len(r.dstIPs) == 0 }

// Local reports whether a is an address tcp-info always excludes: loopback,
// link-local unicast, multicast or unspecified (IPv4-mapped IPv6 addresses
// as their IPv4 address).
func Local(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsUnspecified()
}

// Excluded reports whether tcp-info excludes the connection between local
// and remote. A nil Rules applies the local rule only.
func (r *Rules) Excluded(local, remote netip.AddrPort) bool {
	return Local(local.Addr()) || Local(remote.Addr()) || r.Listed(local, remote)
}

// Listed reports whether the ports and addresses of the rules exclude the
// connection between local and remote, without the local rule (offline
// mode keeps a loopback capture's connections unless asked). A nil Rules
// lists nothing.
func (r *Rules) Listed(local, remote netip.AddrPort) bool {
	if r == nil {
		return false
	}
	return r.srcPorts[local.Port()] || r.dstIPs[remote.Addr().Unmap()]
}

// ExcludedKey reports whether tcp-info excludes the connection of flow key
// k. The local end is the one with an address given to SetLocal; where
// neither or both are, the rules are applied both ways (a connection is
// excluded if either reading excludes it), so that offline mode without
// -localaddr misses no exclusion.
func (r *Rules) ExcludedKey(k *packet.Key) bool {
	a := netip.AddrPortFrom(netip.AddrFrom16(k.A).Unmap(), k.APort)
	b := netip.AddrPortFrom(netip.AddrFrom16(k.B).Unmap(), k.BPort)
	if Local(a.Addr()) || Local(b.Addr()) {
		return true
	}
	if r.Empty() {
		return false
	}
	aLocal, bLocal := r.local[a.Addr()], r.local[b.Addr()]
	switch {
	case aLocal && !bLocal:
		return r.Excluded(a, b)
	case bLocal && !aLocal:
		return r.Excluded(b, a)
	}
	return r.Excluded(a, b) || r.Excluded(b, a)
}

// String describes the rules for the daemon's start-up line.
func (r *Rules) String() string {
	if r.Empty() {
		return "local addresses"
	}
	return fmt.Sprintf("local addresses, %d local ports, %d remote addresses", len(r.srcPorts), len(r.dstIPs))
}
