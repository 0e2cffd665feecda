package demuxer

import (
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
)

// end is what a flow knows of one end's sequence space.
type end struct {
	// nxt is the next sequence number the receiver expects, as far as
	// the capture shows: segments without a gap before them move it, and
	// so do the receiver's acknowledgments (which also cover the capture's
	// own drops). hi is the end of the highest in-window segment sent.
	nxt, hi uint32
	wnd     uint32 // the window it advertised last, scaled
	finPos  uint32 // the sequence number of its last in-window FIN
	seen    bool   // nxt and hi are set
	acked   bool   // it sent an ACK without SYN
	fin     bool   // its FIN was in sequence, or acknowledged
	finSeen bool   // finPos is set
	wsOK    bool   // its SYN had a window scale option
	wscale  uint8
	tally   // what the capture saw it send (verify.go)
}

// maxWindow is the window assumed when an end's is not known (a flow seen
// from its middle): the largest that RFC 7323 allows.
const maxWindow = 1 << 30

// minWindow is the least window the sequence check allows: a receiver
// that advertised a zero window still takes retransmissions and probes.
const minWindow = 1 << 16

// track follows the sequence space of the segment's sender (src is A when
// srcIsA) and returns how the segment ends the connection, if it does: an
// RST the receiver accepts, or the second FIN in sequence. Segments the receiver
// would drop or answer with a challenge ACK change nothing
// (TestInjectedSegments).
func (f *flow) track(p *packet.Parsed, data []byte, srcIsA bool) index.End {
	src, dst := &f.ends[0], &f.ends[1]
	if !srcIsA {
		src, dst = dst, src
	}
	flags := p.Flags
	f.hs.step(flags, p.Seq, p.Ack, srcIsA)
	syn := flags&packet.FlagSYN != 0
	if syn {
		src.wscale, src.wsOK = p.WindowScale(data)
		if flags&packet.FlagACK != 0 {
			f.synced, f.sawSYNACK = true, true
		} else {
			f.sawSYN = true
		}
	} else if flags&packet.FlagACK != 0 {
		src.acked = true
		f.synced = f.synced || dst.acked
	}
	if flags&packet.FlagRST != 0 {
		// RFC 5961 3.2: only an RST at exactly the next sequence number
		// resets a synchronized connection (Linux also takes the FIN's own
		// number); one answering a SYN must acknowledge it.
		var ok bool
		switch {
		case src.seen:
			ok = p.Seq == src.nxt || p.Seq == src.hi || src.fin && p.Seq == src.nxt-1
		case dst.seen:
			ok = flags&packet.FlagACK != 0 && p.Ack == dst.nxt
		default:
			ok = true // a lone RST: nothing to check it against
		}
		f.ended = f.ended || ok
		if ok {
			return index.EndRST
		}
		return index.EndNone
	}
	seqEnd := p.Seq + uint32(p.PayloadLen)
	if syn {
		seqEnd++
	}
	fin := flags&packet.FlagFIN != 0
	if !src.seen {
		if fin {
			src.finPos, src.finSeen, src.fin = seqEnd, true, true
			seqEnd++
		}
		src.nxt, src.hi, src.seen = seqEnd, seqEnd, true
	} else if w, dStart, dEnd := int32(dst.window()), int32(p.Seq-src.nxt), int32(seqEnd-src.nxt); dEnd >= -w && dStart <= w {
		// In the receiver's window; nothing is missing before it when it
		// reaches the next number expected.
		if fin {
			src.finPos, src.finSeen = seqEnd, true
			if dStart <= 0 && dEnd >= 0 {
				src.fin = true
				seqEnd++
			}
		}
		if dStart <= 0 && int32(seqEnd-src.nxt) > 0 {
			src.nxt = seqEnd
		}
		if int32(seqEnd-src.hi) > 0 {
			src.hi = seqEnd
		}
	}
	if flags&packet.FlagACK != 0 && dst.seen {
		// What src acknowledges of dst's data is what it received.
		switch a := p.Ack; {
		case dst.finSeen && a == dst.finPos+1:
			dst.fin = true
			dst.nxt, dst.hi = a, a
		case int32(a-dst.nxt) > 0 && int32(a-dst.hi) <= 0:
			dst.nxt = a
		}
	}
	if !syn {
		src.wnd = uint32(p.Window)
		if src.wsOK && dst.wsOK {
			src.wnd <<= src.wscale
		}
	}
	if src.fin && dst.fin && !f.ended {
		f.ended = true
		return index.EndFIN
	}
	return index.EndNone
}

// window returns the receive window an end allows (see minWindow and
// maxWindow).
func (e *end) window() uint32 {
	switch {
	case !e.seen && e.wnd == 0:
		return maxWindow
	case e.wnd < minWindow:
		return minWindow
	}
	return min(e.wnd, maxWindow)
}
