package e2e

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/anonymize"
)

// record is one packet as read back from a pcap file.
type record struct {
	ts      time.Time
	data    []byte
	origLen int
}

// flowKey is a direction-independent 4-tuple.
type flowKey struct{ a, b netip.AddrPort }

func (k flowKey) String() string { return k.a.String() + "-" + k.b.String() }

func keyOf(x, y netip.AddrPort) flowKey {
	if x.Addr().Less(y.Addr()) || x.Addr() == y.Addr() && x.Port() < y.Port() {
		return flowKey{x, y}
	}
	return flowKey{y, x}
}

// refPacket is a packet of the reference capture, decoded by gopacket.
type refPacket struct {
	record
	key       flowKey
	src       netip.AddrPort
	seq       uint32
	flags     uint8
	hdrEnd    int // end of the TCP header
	syn       bool
	payload   int
	ip4       bool
	addrOff   [2]int // offsets of the source and destination addresses
	ipCsumOff int
	tcpOff    int
	tsOff     int    // offset of the timestamps option's TSval, 0 without
	tsval     uint32 // and its values, by gopacket
	tsecr     uint32
}

func decode(t testing.TB, r record) (refPacket, bool) {
	p := gopacket.NewPacket(r.data, layers.LayerTypeEthernet, gopacket.DecodeOptions{Lazy: false, NoCopy: true})
	tl, ok := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if !ok {
		return refPacket{}, false
	}
	rp := refPacket{record: r, syn: tl.SYN && !tl.ACK}
	var src, dst netip.Addr
	ipOff := 14
	switch ip := p.NetworkLayer().(type) {
	case *layers.IPv4:
		src, _ = netip.AddrFromSlice(ip.SrcIP.To4())
		dst, _ = netip.AddrFromSlice(ip.DstIP.To4())
		rp.ip4 = true
		rp.addrOff = [2]int{ipOff + 12, ipOff + 16}
		rp.ipCsumOff = ipOff + 10
		rp.tcpOff = ipOff + len(ip.Contents)
		rp.payload = int(ip.Length) - len(ip.Contents) - int(tl.DataOffset)*4
	case *layers.IPv6:
		src, _ = netip.AddrFromSlice(ip.SrcIP)
		dst, _ = netip.AddrFromSlice(ip.DstIP)
		rp.addrOff = [2]int{ipOff + 8, ipOff + 24}
		rp.tcpOff = ipOff + len(ip.Contents)
		rp.payload = int(ip.Length) - int(tl.DataOffset)*4
	default:
		return refPacket{}, false
	}
	rp.hdrEnd = rp.tcpOff + int(tl.DataOffset)*4
	rp.src = netip.AddrPortFrom(src, uint16(tl.SrcPort))
	rp.key = keyOf(rp.src, netip.AddrPortFrom(dst, uint16(tl.DstPort)))
	rp.seq = tl.Seq
	rp.flags = tl.Contents[13]
	for _, o := range tl.Options {
		if o.OptionType == layers.TCPOptionKindTimestamps && len(o.OptionData) == 8 {
			rp.tsval, rp.tsecr = binary.BigEndian.Uint32(o.OptionData), binary.BigEndian.Uint32(o.OptionData[4:])
			// Its place, for matchKey: the option's 8 data bytes.
			if i := bytes.Index(r.data[rp.tcpOff+20:rp.hdrEnd], append([]byte{8, 10}, o.OptionData...)); i >= 0 {
				rp.tsOff = rp.tcpOff + 20 + i + 2
			}
		}
	}
	return rp, true
}

func readPcap(t testing.TB, path string) ([]record, *pcapgo.Reader) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var in io.Reader = f
	if strings.HasSuffix(path, ".gz") { // as M-Lab's ETL reads them: every gzip member
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		in = zr
	}
	r, err := pcapgo.NewReader(in)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []record
	for {
		data, ci, err := r.ReadPacketData()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, record{ts: ci.Timestamp, data: data, origLen: ci.Length})
	}
	return out, r
}

// refConn is one connection of the reference capture.
type refConn struct {
	key       flowKey
	pkts      []refPacket
	synSeq    uint32
	syn       bool // began with a pure SYN
	handshake bool // SYN, SYN-ACK and the final ACK were all seen
	// serverReset: the server's application reset it (the server sent an
	// RST); the kernel's destroy broadcast cannot name such a connection.
	serverReset bool
}

// readReference returns the reference capture's connections by 4-tuple; a
// 4-tuple's packets are split into connections at each pure SYN with a new
// sequence number.
func readReference(t *testing.T, path string) map[flowKey][]*refConn {
	recs, _ := readPcap(t, path)
	if !nanosecondMagic(path) {
		t.Fatalf("reference capture is not in nanoseconds")
	}
	out := map[flowKey][]*refConn{}
	for _, rec := range recs {
		p, ok := decode(t, rec)
		if !ok {
			continue
		}
		conns := out[p.key]
		var c *refConn
		if len(conns) > 0 {
			c = conns[len(conns)-1]
		}
		if c == nil || p.syn && (!c.syn || c.synSeq != p.seq) {
			c = &refConn{key: p.key, syn: p.syn, synSeq: p.seq}
			out[p.key] = append(conns, c)
		}
		c.pkts = append(c.pkts, p)
	}
	for _, conns := range out {
		for _, c := range conns {
			c.handshake = c.syn && handshakeDone(c)
			for _, p := range c.pkts {
				if p.src != c.pkts[0].src && p.flags&0x04 != 0 {
					c.serverReset = true
				}
			}
		}
	}
	return out
}

func handshakeDone(c *refConn) bool {
	client := c.pkts[0].src
	synack, ack := false, false
	for _, p := range c.pkts[1:] {
		switch {
		case p.src != client && p.flags&0x12 == 0x12:
			synack = true
		case synack && p.src == client && p.flags&0x12 == 0x10:
			ack = true
		}
	}
	return synack && ack
}

// connAt returns the connection of a 4-tuple going on at ts.
func connAt(conns []*refConn, ts time.Time) *refConn {
	var best *refConn
	for _, c := range conns {
		if !c.pkts[0].ts.After(ts.Add(timestampTolerance)) {
			best = c
		}
	}
	return best
}

// timing collects, over many flows, how far each saved packet's timestamp
// is from its reference packet's.
type timing struct {
	deltas []time.Duration
}

// check reports whether the timestamps agree: nearly all within
// timestampTolerance and a median under 100 µs (a clock or resolution bug
// would move them all).
func (tm *timing) check(t *testing.T, what string) {
	t.Helper()
	if len(tm.deltas) == 0 {
		return
	}
	s := sortedDurations(tm.deltas)
	late := len(s) - sort.Search(len(s), func(i int) bool { return s[i] > timestampTolerance })
	median, max := s[len(s)/2], s[len(s)-1]
	t.Logf("%s: timestamps of %d packets: median %v from the reference, max %v, %d beyond %v", what, len(s), median, max, late, timestampTolerance)
	if late > len(s)/maxOutlierShare || median > 100*time.Microsecond {
		t.Errorf("%s: timestamps disagree with the reference: %d of %d packets beyond %v (at most 1 in %d allowed), median %v",
			what, late, len(s), timestampTolerance, maxOutlierShare, median)
	}
}

// compareFlow checks a flow's saved records against its reference
// packets. Every reference packet up to -captureduration after the first
// (and before the daemon was stopped) must be in the file, and nothing else:
// same headers byte for byte (but for masked addresses and their checksums
// in netblock runs), same original length, and not one byte past the TCP
// header. Each match's timestamp difference goes to tm.
//
// Packets are matched, not compared in file order: the two capture sockets
// are fed by both CPUs, so packets of the two directions that cross in
// flight may be queued to them in different orders.
func compareFlow(t *testing.T, got []record, want []refPacket, d *daemon, l *lab, tm *timing) string {
	if len(got) == 0 {
		return "no packets"
	}
	first := want[0].ts
	type cand struct {
		p         refPacket
		mandatory bool
		used      bool
	}
	byKey := map[string][]*cand{}
	for _, p := range want {
		age := p.ts.Sub(first)
		if age > d.capDur+timestampOutlier {
			continue
		}
		c := &cand{p: p, mandatory: age <= d.capDur-timestampOutlier && p.ts.Before(d.stoppedAt)}
		k := matchKey(p.data[:p.hdrEnd], p, d.netblock || d.anon != nil, p.origLen)
		if d.tsShift {
			k = shiftedKey(p.data[:p.hdrEnd], p, p.origLen)
		}
		byKey[k] = append(byKey[k], c)
	}
	type saved struct {
		i int
		r record
	}
	gotByKey := map[string][]saved{}
	for i, g := range got {
		gp, ok := decode(t, g)
		if !ok {
			return fmt.Sprintf("packet %d is not TCP/IP", i)
		}
		if len(g.data) != gp.hdrEnd {
			return fmt.Sprintf("packet %d: %d bytes saved, its headers end at %d: bytes past the TCP header", i, len(g.data), gp.hdrEnd)
		}
		if d.netblock {
			if msg := checkMasked(gp, l); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
		}
		if d.anon != nil {
			if msg := checkMapped(gp, l, d.anon); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
		}
		k := matchKey(g.data, gp, d.netblock || d.anon != nil, g.origLen)
		if d.tsShift {
			if msg := checkZeroMAC(g.data); msg != "" {
				return fmt.Sprintf("packet %d: %s", i, msg)
			}
			k = shiftedKey(g.data, gp, g.origLen)
		}
		gotByKey[k] = append(gotByKey[k], saved{i, g})
	}
	// Packets with equal headers (rare: a retransmission within the same
	// TCP timestamp tick) are paired in time order, each with the nearest
	// reference packet not yet used.
	var deltas []time.Duration
	var shifts []tsShift
	for k, gs := range gotByKey {
		cs := byKey[k]
		sort.Slice(gs, func(a, b int) bool { return gs[a].r.ts.Before(gs[b].r.ts) })
		for _, g := range gs {
			var best *cand
			for _, c := range cs {
				if !c.used && absDur(c.p.ts.Sub(g.r.ts)) <= timestampOutlier && (best == nil || absDur(c.p.ts.Sub(g.r.ts)) < absDur(best.p.ts.Sub(g.r.ts))) {
					best = c
				}
			}
			if best == nil {
				// Each capture socket reads the clock itself for packets that
				// carry no receive timestamp (TCP's departure times on a veth
				// are not one), so two captures of one packet differ by the
				// microseconds between the two sockets' turns. More than
				// timestampOutlier is a wrong timestamp, or a packet the
				// reference does not have.
				return fmt.Sprintf("packet %d (%x, length %d, at %s) is not in the reference capture within %v (%d with these headers)",
					g.i, g.r.data, g.r.origLen, g.r.ts.Format(time.RFC3339Nano), timestampOutlier, len(cs))
			}
			best.used = true
			deltas = append(deltas, absDur(best.p.ts.Sub(g.r.ts)))
			if d.tsShift {
				gp, _ := decode(t, g.r)
				shifts = append(shifts, tsShift{from: best.p.src, val: gp.tsval - best.p.tsval, ecr: gp.tsecr - best.p.tsecr,
					hasTS: best.p.tsOff != 0, echoes: best.p.flags&0x10 != 0})
			}
		}
	}
	missing := 0
	for _, cs := range byKey {
		for _, c := range cs {
			if c.mandatory && !c.used {
				missing++
			}
		}
	}
	if missing > 0 {
		return fmt.Sprintf("%d reference packets missing from the file (%d saved, %d in the reference)", missing, len(got), len(want))
	}
	tm.deltas = append(tm.deltas, deltas...)
	if d.tsShift {
		return checkShifts(shifts)
	}
	return ""
}

// tsShift is what the daemon added to a saved packet's timestamps.
type tsShift struct {
	from          netip.AddrPort // the sender
	val, ecr      uint32
	hasTS, echoes bool
}

// checkShifts checks that each end's TSval was shifted by one nonzero
// constant over the flow, and each TSecr by the other end's.
func checkShifts(shifts []tsShift) string {
	by := map[netip.AddrPort]uint32{}
	for _, s := range shifts {
		if !s.hasTS {
			continue
		}
		if v, ok := by[s.from]; ok && v != s.val {
			return fmt.Sprintf("%v's TSval shifted by %d and by %d in one flow", s.from, v, s.val)
		}
		by[s.from] = s.val
	}
	for _, s := range shifts {
		if !s.hasTS || !s.echoes {
			continue
		}
		for end, v := range by {
			if end != s.from && v != s.ecr {
				return fmt.Sprintf("%v's TSecr shifted by %d, the other end's TSval by %d", s.from, s.ecr, v)
			}
		}
	}
	for end, v := range by {
		if v == 0 {
			return fmt.Sprintf("%v's timestamps were not shifted", end)
		}
	}
	return ""
}

// shiftedKey is matchKey for a daemon that also zeroes MAC addresses and
// shifts timestamps: those fields are left out too (checkShifts and
// checkZeroMAC check them).
func shiftedKey(b []byte, p refPacket, origLen int) string {
	b = bytes.Clone(b[:min(len(b), p.hdrEnd)])
	clear(b[:12])
	if p.tsOff != 0 {
		clear(b[p.tsOff : p.tsOff+8])
	}
	return matchKey(b, p, true, origLen)
}

func checkZeroMAC(b []byte) string {
	if !bytes.Equal(b[:12], make([]byte, 12)) {
		return fmt.Sprintf("MAC addresses %x not zeroed", b[:12])
	}
	return ""
}

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// matchKey is what must be equal between a saved packet and its reference:
// the headers and the original length; in netblock runs, with the address
// and checksum fields left out (checkMasked checks those).
func matchKey(b []byte, p refPacket, netblock bool, origLen int) string {
	b = bytes.Clone(b[:min(len(b), p.hdrEnd)])
	if netblock {
		alen := 16
		if p.ip4 {
			alen = 4
			clear(b[p.ipCsumOff : p.ipCsumOff+2])
		}
		clear(b[p.addrOff[0] : p.addrOff[0]+alen])
		clear(b[p.addrOff[1] : p.addrOff[1]+alen])
		clear(b[p.tcpOff+16 : p.tcpOff+18])
	}
	return fmt.Sprintf("%x/%d", b, origLen)
}

// checkMasked checks a saved netblock packet on its own: the server's
// addresses kept, the client's masked to /24 or /48, and valid checksums
// (the lab has no checksum offload, so every original checksum was valid).
// The TCP checksum can be checked only for segments without payload, whose
// checksummed bytes are all in the file.
func checkMasked(p refPacket, l *lab) string {
	alen := 16
	if p.ip4 {
		alen = 4
	}
	for side, off := range p.addrOff {
		a, _ := netip.AddrFromSlice(p.data[off : off+alen])
		switch {
		case a == l.srv4 || a == l.srv6:
		case a == l.cli4 || a == l.cli6:
			return fmt.Sprintf("address %d is the client's, unmasked: %v", side, a)
		case p.ip4 && a.As4()[3] == 0 && netip.PrefixFrom(l.cli4, 24).Contains(a):
		case !p.ip4 && a == netip.PrefixFrom(l.cli6, 48).Masked().Addr():
		default:
			return fmt.Sprintf("address %d is %v: neither the server's nor a masked client's", side, a)
		}
	}
	return checkChecksums(p, "masking")
}

// checkChecksums checks the IPv4 header checksum and, for segments without
// payload (whose checksummed bytes are all saved), the TCP checksum.
func checkChecksums(p refPacket, after string) string {
	if p.ip4 && checksum(p.data[14:p.tcpOff], 0) != 0xffff {
		return "IPv4 header checksum is not valid after " + after
	}
	if p.payload == 0 && !tcpChecksumValid(p.data, p) {
		return "TCP checksum is not valid after " + after
	}
	return ""
}

// checkMapped checks a saved cryptopan packet on its own: the server's
// addresses kept, each client address replaced by its Crypto-PAn mapping
// under the daemon's key, and valid checksums (see checkMasked).
func checkMapped(p refPacket, l *lab, anon *anonymize.Anonymizer) string {
	alen := 16
	if p.ip4 {
		alen = 4
	}
	for side, off := range p.addrOff {
		a, _ := netip.AddrFromSlice(p.data[off : off+alen])
		switch a {
		case l.srv4, l.srv6:
		case l.cli4, l.cli6, l.cli4b, l.cli6b:
			return fmt.Sprintf("address %d is a client's, unmapped: %v", side, a)
		case anon.Anonymized(l.cli4), anon.Anonymized(l.cli6), anon.Anonymized(l.cli4b), anon.Anonymized(l.cli6b):
		default:
			return fmt.Sprintf("address %d is %v: neither the server's nor a mapped client's", side, a)
		}
	}
	return checkChecksums(p, "mapping")
}

// nanosecondMagic reports whether a pcap file declares nanosecond
// timestamps. (gopacket v1.1.19's Reader.Resolution has it backwards.)
func nanosecondMagic(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var in io.Reader = f
	if strings.HasSuffix(path, ".gz") {
		if in, err = gzip.NewReader(f); err != nil {
			return false
		}
	}
	var m [4]byte
	io.ReadFull(in, m[:])
	return binary.LittleEndian.Uint32(m[:]) == 0xa1b23c4d || binary.BigEndian.Uint32(m[:]) == 0xa1b23c4d
}

func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func tcpChecksumValid(b []byte, ref refPacket) bool {
	seg := b[ref.tcpOff:ref.hdrEnd]
	var pseudo []byte
	if ref.ip4 {
		pseudo = append(pseudo, b[ref.addrOff[0]:ref.addrOff[0]+4]...)
		pseudo = append(pseudo, b[ref.addrOff[1]:ref.addrOff[1]+4]...)
		pseudo = append(pseudo, 0, 6, byte(len(seg)>>8), byte(len(seg)))
	} else {
		pseudo = append(pseudo, b[ref.addrOff[0]:ref.addrOff[0]+16]...)
		pseudo = append(pseudo, b[ref.addrOff[1]:ref.addrOff[1]+16]...)
		pseudo = append(pseudo, 0, 0, byte(len(seg)>>8), byte(len(seg)), 0, 0, 0, 6)
	}
	return checksum(append(pseudo, seg...), 0) == 0xffff
}

// Two captures of one packet read the clock separately (see compareFlow),
// normally microseconds apart. timestampTolerance is what nearly every
// packet must meet; a virtual CPU descheduled between the two capture
// sockets' turns can stretch a few packets' gap to milliseconds, so a packet
// is still matched up to timestampOutlier, and the timing check allows
// outliers in at most 1 packet in maxOutlierShare.
const (
	timestampTolerance = 2 * time.Millisecond
	timestampOutlier   = 100 * time.Millisecond
	maxOutlierShare    = 200
)
