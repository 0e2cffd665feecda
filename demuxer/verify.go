package demuxer

import (
	"net/netip"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
)

// This file is how a flow's record says whether its trace is complete
// (index.Record's Verified, Missing and Kernel): each end's tally of what
// the capture saw it send, counted per packet, and at the flow's end its
// comparison with the local socket's own counters, which the kernel's
// destroy broadcast reports, or else what the trace alone shows.
//
// What the kernel counts (Linux's tcp_info, measured on the lab's kernel
// by TestVerifyKernel and the end-to-end TestCompleteness):
//   - segs_in and segs_out count every segment, a GRO or TSO super-packet
//     as the segments it stands for;
//   - a passive socket is made at the handshake's end: its segs_in counts
//     the SYN once, however often it came; its segs_out no SYN-ACK (a SYN
//     or SYN-ACK the capture lacks is counted missing all the same). An
//     active socket counts each SYN it sent and each SYN-ACK it received;
//   - bytes_received is the sequence space the socket took in order:
//     payload, and 1 for the peer's FIN; bytes_sent is every payload byte
//     sent, retransmissions included;
//   - packets after the socket is destroyed (its TIME_WAIT) are not
//     counted: the trace may hold more than the kernel counted, never less
//     when nothing was missed.

// tally is what the capture saw one end send.
type tally struct {
	segs     uint32 // segments without SYN, super-packets counted as their segments
	dataSegs uint32 // those of segs with payload
	syns     uint16 // frames with SYN (a pure SYN, or a SYN-ACK)
	mss      uint16 // the MSS option of its SYN, 0 if none was seen
	bytes    uint64 // payload bytes, retransmissions included
	cov      coverage
	pureSYNs uint16 // pure SYNs among syns: it opened the connection
}

// maxHoles is how many sequence holes of one end a flow keeps track of
// at once; past it the bytes covered are no longer known exactly
// (index.Direction.BytesUnknown), the segments still are.
const maxHoles = 3

// coverage is which of an end's sequence space the captured segments
// covered: [base, hi) less the holes.
type coverage struct {
	set, lost bool // base and hi are set; more holes than maxHoles came
	n         uint8
	ackSet    bool
	base, hi  uint32
	acked     uint32 // the highest acknowledgment from the peer
	bytes     uint64 // sequence space covered (payload, and 1 for a FIN)
	holes     [maxHoles][2]uint32
}

// start sets the sequence number after the SYN's: the first of the data.
func (c *coverage) start(next uint32) {
	if !c.set {
		c.base, c.hi, c.set = next, next, true
	}
}

// add covers [s, e).
func (c *coverage) add(s, e uint32) {
	switch {
	case !c.set:
		c.base, c.hi, c.set = s, e, true
		c.bytes += uint64(e - s)
		return
	case s == c.hi: // in order: nearly every segment
		c.hi = e
		c.bytes += uint64(e - s)
		return
	case int32(s-c.hi) > 0: // past a gap
		c.hole(c.hi, s)
		c.hi = e
		c.bytes += uint64(e - s)
		return
	}
	if int32(e-c.hi) > 0 {
		c.bytes += uint64(e - c.hi)
		c.hi, e = e, c.hi
	}
	if int32(s-c.base) < 0 { // before the first byte covered
		if int32(e-c.base) < 0 {
			c.hole(e, c.base)
			c.bytes += uint64(e - s)
			c.base = s
			return
		}
		c.bytes += uint64(c.base - s)
		c.base, s = s, c.base
	}
	for i := 0; i < int(c.n); i++ {
		h := &c.holes[i]
		lo, hi := h[0], h[1]
		if int32(s-lo) > 0 {
			lo = s
		}
		if int32(e-hi) < 0 {
			hi = e
		}
		if int32(hi-lo) <= 0 {
			continue
		}
		c.bytes += uint64(hi - lo)
		switch {
		case lo == h[0] && hi == h[1]: // filled
			c.n--
			c.holes[i] = c.holes[c.n]
			i--
		case lo == h[0]:
			h[0] = hi
		case hi == h[1]:
			h[1] = lo
		default: // split in two
			rest := [2]uint32{hi, h[1]}
			h[1] = lo
			c.hole(rest[0], rest[1])
		}
	}
}

func (c *coverage) hole(lo, hi uint32) {
	if int(c.n) < maxHoles {
		c.holes[c.n] = [2]uint32{lo, hi}
		c.n++
		return
	}
	c.lost = true
}

// ack notes the peer's acknowledgment a, sent with its receive window
// wnd before this segment. The sender cannot have sent past the last
// acknowledgment (or its highest segment seen) plus that window: an
// acknowledgment beyond is one its TCP ignores (a spoofed segment), and
// changes nothing (TestVerifyInference's spoofed ACK).
func (c *coverage) ack(a, wnd uint32) {
	from := c.hi
	if c.ackSet && int32(c.acked-c.hi) > 0 {
		from = c.acked
	}
	if c.set && int32(a-from) > int32(wnd) {
		return
	}
	if !c.ackSet || int32(a-c.acked) > 0 {
		c.acked, c.ackSet = a, true
	}
}

// unseen returns the bytes the peer acknowledged that no captured segment
// carried, and how many segments of size seg (0: unknown, one a hole) at
// least carried them.
func (c *coverage) unseen(seg int) (bytes, segs uint64) {
	if !c.set || !c.ackSet {
		return 0, 0
	}
	count := func(n uint32) {
		bytes += uint64(n)
		if seg > 0 {
			segs += (uint64(n) + uint64(seg) - 1) / uint64(seg)
		} else {
			segs++
		}
	}
	for i := 0; i < int(c.n); i++ {
		lo, hi := c.holes[i][0], c.holes[i][1]
		if int32(c.acked-hi) < 0 {
			hi = c.acked
		}
		if int32(hi-lo) > 0 {
			count(hi - lo)
		}
	}
	if int32(c.acked-c.hi) > 0 {
		count(c.acked - c.hi)
	}
	return bytes, segs
}

// count adds a segment that src sent to its tally; payload is its payload
// length (a super-packet's whole), dst the other end.
func (src *end) count(p *packet.Parsed, data []byte, payload int, dst *end) {
	t := &src.tally
	if p.Flags&packet.FlagSYN != 0 {
		t.syns++
		if p.Flags&packet.FlagACK == 0 {
			t.pureSYNs++
		}
		if mss, ok := p.MSS(data); ok {
			t.mss = mss
		}
		t.cov.start(p.Seq + 1)
	} else {
		n := uint32(1)
		if payload > 0 {
			if size := segmentSize(t, &dst.tally, p); size > 0 && payload > size {
				n = uint32((payload + size - 1) / size)
			}
			t.bytes += uint64(payload)
			t.dataSegs += n
		}
		t.segs += n
		if e := p.Seq + uint32(payload); payload > 0 || p.Flags&packet.FlagFIN != 0 {
			if p.Flags&packet.FlagFIN != 0 {
				e++
			}
			t.cov.add(p.Seq, e)
		}
	}
	if p.Flags&packet.FlagACK != 0 {
		dst.tally.cov.ack(p.Ack, src.window())
	}
}

// segmentSize returns the payload of each segment a super-packet p from
// the end of tally t stands for: the smaller MSS of the two SYNs, less the
// options p carries (as the sender's TCP sizes them); 0 when no MSS is
// known (a flow seen from its middle).
func segmentSize(t, peer *tally, p *packet.Parsed) int {
	mss := minMSS(t.mss, peer.mss)
	if mss == 0 {
		return 0
	}
	return int(mss) - (p.HeaderEnd - p.TCPOffset - 20)
}

// minMSS returns the smaller of two MSS options, 0 when neither is known.
func minMSS(a, b uint16) uint16 {
	if a == 0 || b != 0 && b < a {
		return b
	}
	return a
}

// verdict is what a flow's record says of its completeness, decided at
// its end from its ends' tallies.
type verdict struct {
	ends      [2]tally
	srcIsA    bool // the record's Src is the key's A
	key       packet.Key
	handshake bool // a SYN and a SYN-ACK were captured
	ending    bool // both FINs, or an accepted RST
	mss       int  // the smaller MSS of the SYNs, 0 if unknown
}

// verdictOf takes what f's verification needs, at its end.
func verdictOf(f *flow) verdict {
	v := verdict{ends: [2]tally{f.ends[0].tally, f.ends[1].tally}, srcIsA: f.firstFromA, key: f.key,
		handshake: f.sawSYN && f.sawSYNACK, ending: f.ended}
	// The MSS without options: inference needs only a lower bound of
	// the segments missing.
	v.mss = int(minMSS(v.ends[0].mss, v.ends[1].mss))
	return v
}

// apply sets r's Verified, VerifiedBy, Missing and Kernel: by comparison
// with the local socket's counters k when there are some, else by
// inference from the trace.
func (v *verdict) apply(r *index.Record, k *index.Kernel) {
	var dir [2]index.Direction // what is missing of what A sent, of what B sent
	r.Missing.Handshake = !v.handshake
	if k != nil {
		r.Kernel, r.VerifiedBy = k, index.ByKernel
		local := 0
		if b := netip.AddrPortFrom(netip.AddrFrom16(v.key.B).Unmap(), v.key.BPort); b == k.Local {
			local = 1
		}
		l, rm := &v.ends[local], &v.ends[1-local]
		in, out := k.SegsIn, k.SegsOut
		var synMissing, synackMissing uint64 // handshake segments the socket did not count
		// An active socket counted its SYNs and SYN-ACKs; a passive one the
		// SYN once, no SYN-ACK.
		if l.pureSYNs > 0 {
			out -= min(out, uint64(l.pureSYNs))
			in -= min(in, uint64(rm.syns))
		} else {
			in -= min(in, 1)
			synMissing, synackMissing = uint64(1-min(rm.pureSYNs, 1)), uint64(1-min(l.syns, 1))
		}
		dir[1-local] = compare(in, k.DataSegsIn, k.BytesReceived, rm, rm.cov.bytes, rm.cov.lost)
		dir[local] = compare(out, k.DataSegsOut, k.BytesSent, l, l.bytes, false)
		dir[1-local].Segments += synMissing
		dir[local].Segments += synackMissing
	} else {
		r.VerifiedBy = index.ByInference
		r.Missing.Ending = !v.ending
		for i := range dir {
			b, s := v.ends[i].cov.unseen(v.mss)
			dir[i] = index.Direction{Segments: s, Bytes: b, BytesUnknown: v.ends[i].cov.lost}
		}
	}
	r.Missing.SrcToDst, r.Missing.DstToSrc = dir[0], dir[1]
	if !v.srcIsA {
		r.Missing.SrcToDst, r.Missing.DstToSrc = dir[1], dir[0]
	}
	r.Missing.Segments = dir[0].Segments + dir[1].Segments
	switch {
	case r.Missing.Segments > 0 || !dir[0].BytesUnknown && dir[0].Bytes > 0 || !dir[1].BytesUnknown && dir[1].Bytes > 0:
		r.Verified = index.Incomplete
	case k != nil:
		r.Verified = index.Complete
	case r.Missing.Handshake:
		r.Verified = index.Incomplete
	case r.Missing.Ending:
		r.Verified = index.Unknown
	default:
		r.Verified = index.Complete
	}
}

// compare returns what the capture's tally t of one direction lacks of
// the kernel's counts: segs segments (less those the handshake accounts
// for), data of them with payload, and bytes, against t's bytes (its
// coverage, or its payload sent). Segments without payload (ACKs, FINs,
// RSTs) are never merged by GRO or TSO: those missing are exact. Data
// segments are counted from super-packets by the MSS, which a sender
// whose path MTU is smaller undercuts: they are taken as missing only
// when bytes are, or the bytes cannot be told (TestVerifyKernel).
func compare(segs, data, bytes uint64, t *tally, got uint64, unknown bool) index.Direction {
	d := index.Direction{Segments: sub(sub(segs, data), uint64(t.segs-t.dataSegs)), Bytes: sub(bytes, got), BytesUnknown: unknown}
	if d.Bytes > 0 || unknown {
		d.Segments += max(sub(data, uint64(t.dataSegs)), uint64(min(d.Bytes, 1)))
	}
	return d
}

func sub(a, b uint64) uint64 { return a - min(a, b) }
