// Package packet decodes the link, IP and TCP headers of one captured frame
// into a caller-owned Parsed value, without allocating.
//
// The decoder only finds what the rest of the daemon needs: the addresses
// and ports (the flow key), the TCP flags and sequence number (the flow
// lifecycle), where the TCP header ends (nothing past it is ever kept), and
// the offsets of the fields the anonymizer rewrites. It never reads payload
// bytes. Bad input is not an error: it is a Kind of packet, which the caller
// counts.
//
// Decode is safe for concurrent use on different Parsed values; a Parsed
// value belongs to one goroutine.
package packet

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// LinkType is a libpcap LINKTYPE_ value, as written in a pcap file header.
type LinkType uint32

// The link types the decoder understands.
const (
	LinkTypeNull      LinkType = 0 // BSD loopback: a 4-byte address family in the capturing host's byte order
	LinkTypeEthernet  LinkType = 1
	LinkTypeRaw       LinkType = 101
	LinkTypeLinuxSLL  LinkType = 113
	LinkTypeIPv4      LinkType = 228
	LinkTypeIPv6      LinkType = 229
	LinkTypeLinuxSLL2 LinkType = 276
	LinkTypeLoop      LinkType = 108 // OpenBSD loopback: the family in network byte order
)

var linkTypeNames = map[LinkType]string{
	LinkTypeNull: "NULL (BSD loopback)", LinkTypeEthernet: "EN10MB (Ethernet)", 9: "PPP", 50: "PPP_HDLC",
	LinkTypeRaw: "RAW (raw IP)", 105: "IEEE802_11 (Wi-Fi)", LinkTypeLoop: "LOOP (OpenBSD loopback)",
	LinkTypeLinuxSLL: "LINUX_SLL (Linux cooked v1)", 127: "IEEE802_11_RADIOTAP", 141: "MTP3",
	LinkTypeIPv4: "IPV4", LinkTypeIPv6: "IPV6", 239: "NFLOG", 220: "USB_LINUX_MMAPPED", 247: "IPOIB",
	LinkTypeLinuxSLL2: "LINUX_SLL2 (Linux cooked v2)",
}

// String returns the link type's libpcap name and number.
func (lt LinkType) String() string {
	if n, ok := linkTypeNames[lt]; ok {
		return fmt.Sprintf("%d, %s", uint32(lt), n)
	}
	return fmt.Sprintf("%d", uint32(lt))
}

// Supported reports whether Decode understands the link type.
func (lt LinkType) Supported() bool {
	switch lt {
	case LinkTypeNull, LinkTypeEthernet, LinkTypeRaw, LinkTypeLoop, LinkTypeLinuxSLL, LinkTypeIPv4, LinkTypeIPv6, LinkTypeLinuxSLL2:
		return true
	}
	return false
}

// SupportedLinkTypes names the link types Decode understands.
const SupportedLinkTypes = "Ethernet, Linux cooked v1 and v2, raw IP, BSD and OpenBSD loopback"

// Kind says what a frame turned out to be. Only TCP is kept; every other
// kind is counted under its name.
type Kind uint8

// The kinds of frame.
const (
	TCP            Kind = iota // an IPv4 or IPv6 TCP segment with a complete fixed TCP header
	Truncated                  // the frame ends before the headers it announces
	UnknownLink                // a link type or ethertype that carries no IP
	BadIP                      // an IP header that is inconsistent (version, IHL, lengths)
	NotTCP                     // a valid IP packet of another protocol
	Fragment                   // a non-first IP fragment: no TCP header in it
	BadTCP                     // a TCP data offset below 5 or past the end of the IP packet
	TooManyHeaders             // VLAN tags or IPv6 extension headers beyond the decoder's limit
	NumKinds                   // the number of kinds, for arrays indexed by Kind
)

var kindNames = [NumKinds]string{"tcp", "truncated", "unknown_link", "bad_ip", "not_tcp", "fragment", "bad_tcp", "too_many_headers"}

// String returns the kind's name as used in metric labels.
func (k Kind) String() string {
	if k < NumKinds {
		return kindNames[k]
	}
	return "invalid"
}

// TCP flag bits.
const (
	FlagFIN = 0x01
	FlagSYN = 0x02
	FlagRST = 0x04
	FlagACK = 0x10
)

const (
	maxLen            = 1 << 30
	maxVLANTags       = 4
	maxIPv6ExtHeaders = 8
)

// Parsed is the decoded view of one frame. Its fields are valid only when
// Decode returned TCP. Offsets are from the start of the frame.
type Parsed struct {
	IPv4     bool     // IPv4 (else IPv6)
	Src, Dst [16]byte // addresses; IPv4 as IPv4-mapped IPv6
	SrcPort  uint16
	DstPort  uint16
	Flags    uint8  // TCP flags byte
	Seq      uint32 // TCP sequence number
	Ack      uint32 // TCP acknowledgment number
	Window   uint16 // TCP window field, unscaled
	// PayloadLen is the TCP payload's length by the IP header's length
	// fields (never read: the payload is not captured), 0 when the IP
	// length is unknown (a GSO super-packet).
	PayloadLen int

	IPOffset  int // start of the IP header
	SrcOffset int // start of the source address (4 or 16 bytes)
	DstOffset int // start of the destination address
	TCPOffset int // start of the TCP header
	// HeaderEnd is where the TCP header (options included) ends. It may be
	// past the end of the captured bytes when the capture was truncated
	// inside the TCP options.
	HeaderEnd int

	// Addresses in IPv6 extension headers (IPv6 only; 0 when absent):
	// RouteOffset is where the Routing header's RouteAddrs 16-byte
	// addresses start (types 0, 2 and 4), RouteFinal the offset of the one
	// that is the final destination while segments are left (the TCP
	// pseudo-header's destination, RFC 8200 8.1), and HomeOffset that of
	// the Home Address destination option (RFC 6275), the pseudo-header's
	// source. RouteOpaque, RouteOpaqueEnd bound the data of a Routing
	// header of another type, whose addresses are not located.
	RouteOffset, RouteAddrs, RouteFinal, HomeOffset int
	RouteOpaque, RouteOpaqueEnd                     int
}

// SrcAddr returns the source address, unmapped for IPv4.
func (p *Parsed) SrcAddr() netip.Addr { return addr(p.IPv4, &p.Src) }

// DstAddr returns the destination address, unmapped for IPv4.
func (p *Parsed) DstAddr() netip.Addr { return addr(p.IPv4, &p.Dst) }

func addr(v4 bool, a *[16]byte) netip.Addr {
	if v4 {
		return netip.AddrFrom4([4]byte(a[12:16]))
	}
	return netip.AddrFrom16(*a)
}

// Decode decodes frame b of the given link type into p and says what kind of
// frame it is. It reads only headers and never allocates.
func (p *Parsed) Decode(lt LinkType, b []byte) Kind {
	off := 0
	var etype uint16
	switch lt {
	case LinkTypeEthernet:
		if len(b) < 14 {
			return Truncated
		}
		etype = binary.BigEndian.Uint16(b[12:14])
		off = 14
		for tags := 0; etype == 0x8100 || etype == 0x88a8 || etype == 0x9100; tags++ {
			if tags == maxVLANTags {
				return TooManyHeaders
			}
			if len(b) < off+4 {
				return Truncated
			}
			etype = binary.BigEndian.Uint16(b[off+2 : off+4])
			off += 4
		}
	case LinkTypeLinuxSLL:
		if len(b) < 16 {
			return Truncated
		}
		etype = binary.BigEndian.Uint16(b[14:16])
		off = 16
	case LinkTypeLinuxSLL2:
		if len(b) < 20 {
			return Truncated
		}
		etype = binary.BigEndian.Uint16(b[0:2])
		off = 20
	case LinkTypeNull, LinkTypeLoop:
		if len(b) < 4 {
			return Truncated
		}
		// The family of the capturing host, in its byte order for NULL:
		// a value that does not fit 16 bits was written the other way.
		family := binary.LittleEndian.Uint32(b)
		if lt == LinkTypeLoop || family > 0xffff {
			family = binary.BigEndian.Uint32(b)
		}
		switch family {
		case 2: // AF_INET everywhere
			etype = 0x0800
		case 10, 24, 28, 30: // AF_INET6 of Linux, NetBSD and OpenBSD, FreeBSD, macOS
			etype = 0x86dd
		default:
			return UnknownLink
		}
		off = 4
	case LinkTypeRaw, LinkTypeIPv4, LinkTypeIPv6:
		if len(b) < 1 {
			return Truncated
		}
		switch b[0] >> 4 {
		case 4:
			etype = 0x0800
		case 6:
			etype = 0x86dd
		default:
			return BadIP
		}
	default:
		return UnknownLink
	}
	p.IPOffset = off
	switch etype {
	case 0x0800:
		return p.decodeIPv4(b, off)
	case 0x86dd:
		return p.decodeIPv6(b, off)
	}
	return UnknownLink
}

// mapped is the second half of an IPv4-mapped IPv6 address before the
// IPv4 address: ::ffff:0:0.
const mapped = 0xffff << 32

func (p *Parsed) decodeIPv4(b []byte, off int) Kind {
	if len(b) < off+20 {
		return Truncated
	}
	ip := b[off:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || ihl < 20 {
		return BadIP
	}
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if total == 0 {
		total = maxLen // a GSO/BIG TCP super-packet: the length is unknown
	} else if total < ihl {
		return BadIP
	}
	if binary.BigEndian.Uint16(ip[6:8])&0x1fff != 0 {
		return Fragment
	}
	if ip[9] != 6 {
		return NotTCP
	}
	p.IPv4 = true
	// IPv4-mapped, written in two 8-byte stores each: built in memory and
	// copied, the addresses were read back before the CPU could forward
	// the narrower stores that made them, a stall that was 40% of this
	// function's time.
	binary.LittleEndian.PutUint64(p.Src[0:8], 0)
	binary.BigEndian.PutUint64(p.Src[8:16], mapped|uint64(binary.BigEndian.Uint32(ip[12:16])))
	binary.LittleEndian.PutUint64(p.Dst[0:8], 0)
	binary.BigEndian.PutUint64(p.Dst[8:16], mapped|uint64(binary.BigEndian.Uint32(ip[16:20])))
	p.SrcOffset = off + 12
	p.DstOffset = off + 16
	return p.decodeTCP(b, off+ihl, off+total)
}

func (p *Parsed) decodeIPv6(b []byte, off int) Kind {
	if len(b) < off+40 {
		return Truncated
	}
	ip := b[off:]
	if ip[0]>>4 != 6 {
		return BadIP
	}
	end := off + 40 + int(binary.BigEndian.Uint16(ip[4:6]))
	if end == off+40 {
		end = maxLen // a jumbogram or GSO super-packet: the length is unknown
	}
	next := ip[6]
	p.IPv4 = false
	p.Src = [16]byte(ip[8:24])
	p.Dst = [16]byte(ip[24:40])
	p.SrcOffset = off + 8
	p.DstOffset = off + 24
	p.RouteOffset, p.RouteAddrs, p.RouteFinal, p.HomeOffset, p.RouteOpaque, p.RouteOpaqueEnd = 0, 0, 0, 0, 0, 0
	off += 40
	for n := 0; ; n++ {
		switch next {
		case 6:
			return p.decodeTCP(b, off, end)
		case 0, 43, 60, 44, 51: // hop-by-hop, routing, destination options, fragment, AH
		default:
			return NotTCP
		}
		if n == maxIPv6ExtHeaders {
			return TooManyHeaders
		}
		if len(b) < off+8 {
			return Truncated
		}
		var hlen int
		switch next {
		case 44:
			if binary.BigEndian.Uint16(b[off+2:off+4])&0xfff8 != 0 {
				return Fragment
			}
			hlen = 8
		case 51:
			hlen = (int(b[off+1]) + 2) * 4
		default:
			hlen = (int(b[off+1]) + 1) * 8
		}
		if off+hlen > end {
			return BadIP
		}
		if next == 43 || next == 60 {
			if off+hlen > len(b) {
				return Truncated // the addresses it may carry must be saved whole
			}
			p.extAddrs(b[off:off+hlen], off, next)
		}
		next = b[off]
		off += hlen
	}
}

// extAddrs locates the addresses of a Routing (43) or Destination Options
// (60) header h that starts at off in the frame.
func (p *Parsed) extAddrs(h []byte, off int, kind byte) {
	if kind == 60 {
		for i := 2; i+1 < len(h); {
			switch {
			case h[i] == 0: // Pad1
				i++
				continue
			case h[i] == 0xc9 && h[i+1] == 16 && i+18 <= len(h): // Home Address
				p.HomeOffset = off + i + 2
			}
			i += 2 + int(h[i+1])
		}
		return
	}
	segLeft := int(h[3])
	n := 0
	switch h[2] {
	case 0, 2: // source route (deprecated), Mobile IPv6's type 2: the last address is the final one
		n = (len(h) - 8) / 16
		if segLeft > 0 && n > 0 {
			p.RouteFinal = off + 8 + (n-1)*16
		}
	case 4: // segment routing: Segment List[0] is the final segment
		n = min(int(h[4])+1, (len(h)-8)/16)
		if segLeft > 0 && n > 0 {
			p.RouteFinal = off + 8
		}
	default:
		p.RouteOpaque, p.RouteOpaqueEnd = off+8, off+len(h)
		return
	}
	p.RouteOffset, p.RouteAddrs = off+8, n
}

// decodeTCP decodes the TCP header at off; ipEnd is where the IP packet ends
// according to its length field.
func (p *Parsed) decodeTCP(b []byte, off, ipEnd int) Kind {
	if len(b) < off+20 {
		if ipEnd < off+20 {
			return BadTCP
		}
		return Truncated
	}
	t := b[off : off+20]
	doff := int(t[12]>>4) * 4
	if doff < 20 || off+doff > ipEnd {
		return BadTCP
	}
	p.SrcPort = binary.BigEndian.Uint16(t[0:2])
	p.DstPort = binary.BigEndian.Uint16(t[2:4])
	p.Seq = binary.BigEndian.Uint32(t[4:8])
	p.Ack = binary.BigEndian.Uint32(t[8:12])
	p.Flags = t[13]
	p.Window = binary.BigEndian.Uint16(t[14:16])
	p.TCPOffset = off
	p.HeaderEnd = off + doff
	p.PayloadLen = 0
	if ipEnd != maxLen {
		p.PayloadLen = ipEnd - p.HeaderEnd
	}
	return TCP
}

// WindowScale returns the shift of the window scale option (RFC 7323) of
// the TCP header decoded from frame b, if it has one within the captured
// bytes. It is meant for SYN segments, the only ones that carry it.
func (p *Parsed) WindowScale(b []byte) (uint8, bool) {
	off, ok := p.option(b, 3, 3)
	if !ok {
		return 0, false
	}
	return min(b[off+2], 14), true
}

// MSS returns the value of the maximum segment size option (RFC 9293
// 3.7.1) of the TCP header decoded from frame b, if it has one within the
// captured bytes. It is meant for SYN segments, the only ones that carry it.
func (p *Parsed) MSS(b []byte) (uint16, bool) {
	off, ok := p.option(b, 2, 4)
	if !ok {
		return 0, false
	}
	return binary.BigEndian.Uint16(b[off+2:]), true
}

// Timestamps returns the offset in b of the TCP timestamps option (kind 8,
// length 10: TSval at off+2, TSecr at off+6), when the segment has one and
// all of it is in b.
func (p *Parsed) Timestamps(b []byte) (off int, ok bool) { return p.option(b, 8, 10) }

// option finds the TCP option of the given kind and length within b.
func (p *Parsed) option(b []byte, kind, length byte) (int, bool) {
	end := min(p.HeaderEnd, len(b))
	for i := p.TCPOffset + 20; i < end; {
		switch b[i] {
		case 0: // end of options
			return 0, false
		case 1: // no-operation
			i++
			continue
		case kind:
			if i+int(length) <= end && b[i+1] == length {
				return i, true
			}
			return 0, false
		}
		if i+1 >= end || b[i+1] < 2 {
			return 0, false
		}
		i += int(b[i+1])
	}
	return 0, false
}
