// Package sockdiag names TCP connections the way tcp-info does, from the
// kernel's socket cookies, without tcp-info: it asks the kernel through
// sock_diag netlink (inet_diag) for the cookie of each captured connection,
// and listens to the kernel's destroy broadcasts, which carry the cookie and
// 4-tuple of every TCP socket that goes away. The UUID is
// uuid.FromCookie(cookie), so with the same -uuid-prefix-file it is exactly
// tcp-info's UUID for the same socket (Options.UUID names the cookie; the
// daemon may take tcp-info's prefix from its events).
//
// Costs: the demuxer asks for a connection once (Request never blocks); the
// Source sends look-ups in batches (one sendmsg for up to 64 connections)
// and reads one reply per connection. A connection closed before it could be
// looked up is named from its destroy broadcast. Nothing here runs per
// packet.
//
// Only sockets in the daemon's network namespace can be found: a flow whose
// socket is elsewhere, or that has no local socket, stays unnamed.
//
// One case cannot be named: a socket that its own application closes with
// SO_LINGER 0 (a reset) before the look-up runs. The kernel disconnects such
// a socket before destroying it, so its destroy broadcast no longer carries
// the remote port, and the 4-tuple cannot be known. A look-up is requested
// when the demuxer sees a flow's first packet with an ACK and no SYN (the
// handshake's last ACK) and retried every 0.5 ms while the kernel still
// holds a request socket, so only connections reset by the server within a
// few milliseconds of their handshake (and under load) are lost this way.
//
// Without CAP_NET_ADMIN the kernel refuses the destroy broadcasts
// (ErrNeedNetAdmin): the look-ups still work, and connections that close
// before theirs stay unnamed (Options.NoDestroy counts them).
package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/m-lab/tcp-info/tcp"
	"golang.org/x/sys/unix"
)

// Netlink and inet_diag constants (linux/netlink.h, linux/sock_diag.h,
// linux/inet_diag.h).
const (
	sockDiagByFamily = 20
	nlmsgHdrLen      = 16
	reqV2Len         = 56
	diagMsgLen       = 72
	noCookie         = ^uint32(0)
	inetDiagInfo     = 2  // INET_DIAG_INFO: struct tcp_info
	inetDiagCgroupID = 21 // INET_DIAG_CGROUP_ID

	// Multicast groups of the destroy broadcasts.
	GroupTCPDestroy  = 1 // SKNLGRP_INET_TCP_DESTROY
	GroupTCP6Destroy = 3 // SKNLGRP_INET6_TCP_DESTROY
)

// TCP states (include/net/tcp_states.h) that matter here.
const (
	StateEstablished = 1
	// StateSynRecv is how inet_diag reports a request socket (the kernel's
	// tcp_req_diag_fill), whose cookie is not the connection's, and a
	// child socket not yet established.
	StateSynRecv    = 3
	StateTimeWait   = 6 // a closed connection's timewait socket, with its cookie
	StateClose      = 7
	StateListen     = 10
	StateNewSynRecv = 12 // a request socket's own state, should a kernel report it
)

// ErrNotFound is the kernel's answer for a 4-tuple with no socket.
var ErrNotFound = errors.New("no such socket")

// Socket is one TCP socket as inet_diag describes it.
type Socket struct {
	Local, Remote netip.AddrPort
	Cookie        uint64
	State         uint8
	// Cgroup is the cgroup v2 id (its directory's inode number) of the
	// process that made the socket, as the kernel reports it
	// (INET_DIAG_CGROUP_ID, Linux 5.7 and later); 0 when it does not.
	Cgroup uint64
	// Info is the socket's tcp_info (INET_DIAG_INFO), which the destroy
	// broadcasts carry: its final counters. nil when absent. A shorter
	// tcp_info (an older kernel) leaves the later fields zero.
	Info *tcp.LinuxTCPInfo
}

// AppendRequest appends to b a netlink request for the socket whose local
// end is local and remote end remote, with sequence number seq. IPv4
// endpoints are asked as AF_INET; the kernel also finds dual-stack sockets
// that way.
func AppendRequest(b []byte, seq uint32, local, remote netip.AddrPort) []byte {
	start := len(b)
	b = append(b, make([]byte, nlmsgHdrLen+reqV2Len)...)
	m := b[start:]
	binary.NativeEndian.PutUint32(m[0:], nlmsgHdrLen+reqV2Len)
	binary.NativeEndian.PutUint16(m[4:], sockDiagByFamily)
	binary.NativeEndian.PutUint16(m[6:], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(m[8:], seq)
	r := m[nlmsgHdrLen:]
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	if la.Is4() && ra.Is4() {
		r[0] = unix.AF_INET
	} else {
		r[0] = unix.AF_INET6
		la, ra = netip.AddrFrom16(la.As16()), netip.AddrFrom16(ra.As16())
	}
	r[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], ^uint32(0)) // every state
	putSockID(r[8:], la, local.Port(), ra, remote.Port())
	binary.NativeEndian.PutUint32(r[8+40:], noCookie)
	binary.NativeEndian.PutUint32(r[8+44:], noCookie)
	return b
}

func putSockID(id []byte, src netip.Addr, sport uint16, dst netip.Addr, dport uint16) {
	binary.BigEndian.PutUint16(id[0:], sport)
	binary.BigEndian.PutUint16(id[2:], dport)
	copy(id[4:20], src.AsSlice())
	copy(id[20:36], dst.AsSlice())
}

// Message is one parsed netlink message: a socket, or the error that
// answered request Seq.
type Message struct {
	Seq    uint32
	Socket Socket
	Err    error // ErrNotFound, another errno, or nil with Socket set
}

// ParseMessages parses the netlink messages of one datagram. It never
// panics on any input; a malformed datagram is an error.
func ParseMessages(b []byte) ([]Message, error) {
	var out []Message
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return out, fmt.Errorf("sockdiag: truncated netlink header (%d bytes)", len(b))
		}
		l := int(binary.NativeEndian.Uint32(b[0:]))
		if l < nlmsgHdrLen || l > len(b) {
			return out, fmt.Errorf("sockdiag: netlink message length %d of %d bytes", l, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		seq := binary.NativeEndian.Uint32(b[8:])
		body := b[nlmsgHdrLen:l]
		switch typ {
		case unix.NLMSG_ERROR:
			if len(body) < 4 {
				return out, errors.New("sockdiag: truncated netlink error")
			}
			errno := -int32(binary.NativeEndian.Uint32(body))
			var err error
			switch {
			case errno == 0:
				err = nil // an acknowledgment
			case unix.Errno(errno) == unix.ENOENT:
				err = ErrNotFound
			default:
				err = fmt.Errorf("sockdiag: %w", unix.Errno(errno))
			}
			if err != nil {
				out = append(out, Message{Seq: seq, Err: err})
			}
		case unix.NLMSG_DONE, unix.NLMSG_NOOP:
		case sockDiagByFamily:
			s, err := parseDiagMsg(body)
			if err != nil {
				return out, err
			}
			out = append(out, Message{Seq: seq, Socket: s})
		default:
			return out, fmt.Errorf("sockdiag: unexpected netlink message type %d", typ)
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	return out, nil
}

// parseDiagMsg parses an inet_diag_msg.
func parseDiagMsg(b []byte) (Socket, error) {
	if len(b) < diagMsgLen {
		return Socket{}, fmt.Errorf("sockdiag: inet_diag_msg of %d bytes", len(b))
	}
	family, state := b[0], b[1]
	id := b[4:52]
	var src, dst netip.Addr
	switch family {
	case unix.AF_INET:
		src = netip.AddrFrom4([4]byte(id[4:8]))
		dst = netip.AddrFrom4([4]byte(id[20:24]))
	case unix.AF_INET6:
		src = netip.AddrFrom16([16]byte(id[4:20])).Unmap()
		dst = netip.AddrFrom16([16]byte(id[20:36])).Unmap()
	default:
		return Socket{}, fmt.Errorf("sockdiag: address family %d", family)
	}
	cookie := uint64(binary.NativeEndian.Uint32(id[40:])) | uint64(binary.NativeEndian.Uint32(id[44:]))<<32
	s := Socket{
		Local:  netip.AddrPortFrom(src, binary.BigEndian.Uint16(id[0:])),
		Remote: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(id[2:])),
		Cookie: cookie,
		State:  state,
	}
	// The attributes (struct rtattr: length, type, value, each aligned to
	// 4 bytes); a malformed one ends the list.
	for a := b[diagMsgLen:]; len(a) >= 4; {
		l, typ := int(binary.NativeEndian.Uint16(a[0:])), binary.NativeEndian.Uint16(a[2:])
		if l < 4 || l > len(a) {
			break
		}
		switch {
		case typ == inetDiagCgroupID && l >= 4+8:
			s.Cgroup = binary.NativeEndian.Uint64(a[4:])
		case typ == inetDiagInfo && l > 4:
			// Copied, field for field in the kernel's layout, which is
			// tcp.LinuxTCPInfo's (as m-lab/tcp-info reads it).
			info := new(tcp.LinuxTCPInfo)
			copy(unsafe.Slice((*byte)(unsafe.Pointer(info)), unsafe.Sizeof(*info)), a[4:l])
			s.Info = info
		}
		a = a[min(len(a), (l+3)&^3):]
	}
	return s, nil
}
