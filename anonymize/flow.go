package anonymize

import (
	"net/netip"

	"github.com/m-lab/packet-headers/packet"
)

// Flow is one connection's anonymization: which of its ends are masked,
// and, computed once at its first packet, their Crypto-PAn mappings and
// its timestamp offsets (a mapping costs dozens of AES blocks, the offsets
// three: BenchmarkMap, BenchmarkPacket/*/cryptopan in the demuxer). Apply
// rewrites each of its packets. The zero Flow changes nothing.
type Flow struct {
	a            *Anonymizer
	maskA, maskB bool
	x            *flowExtra // with PerFlow only, so that other flows stay small
}

type flowExtra struct {
	addr    [2][16]byte // A's and B's addresses as saved (Keyed mode)
	mapped  bool        // addr applies
	ts      [2]uint32   // A's and B's timestamp offsets
	shiftTS bool
}

// Flow returns the anonymization of the connection k.
func (a *Anonymizer) Flow(k *packet.Key) Flow {
	f := Flow{a: a, maskA: a.ShouldMask(&k.A), maskB: a.ShouldMask(&k.B)}
	if !a.PerFlow() {
		return f
	}
	x := &flowExtra{mapped: a.mode == Keyed && (f.maskA || f.maskB)}
	if x.mapped && f.maskA {
		x.addr[0] = a.Map(k.A)
	}
	if x.mapped && f.maskB {
		x.addr[1] = a.Map(k.B)
	}
	x.ts[0], x.ts[1] = a.TSOffsets(k)
	x.shiftTS = x.ts != [2]uint32{}
	f.x = x
	return f
}

// Apply anonymizes one of the flow's frames in place: b holds its saved
// headers as p decoded them, of link type lt, sent by the key's A end if
// srcIsA. It allocates nothing.
func (f *Flow) Apply(b []byte, p *packet.Parsed, srcIsA bool, lt packet.LinkType) {
	if f.a == nil {
		return
	}
	if x := f.x; x != nil && x.mapped {
		src, dst := f.side(0), f.side(1)
		if !srcIsA {
			src, dst = dst, src
		}
		f.a.ApplyMapped(b, p, src, dst)
	} else if f.maskA || f.maskB {
		maskSrc, maskDst := f.maskA, f.maskB
		if !srcIsA {
			maskSrc, maskDst = maskDst, maskSrc
		}
		f.a.Apply(b, p, maskSrc, maskDst)
	}
	if x := f.x; x != nil && x.shiftTS {
		valOff, ecrOff := x.ts[0], x.ts[1] // the sender's clock, the echoed one
		if !srcIsA {
			valOff, ecrOff = ecrOff, valOff
		}
		ShiftTimestamps(b, p, valOff, ecrOff)
	}
	f.a.ZeroLinkAddrs(b, lt)
}

// side returns the saved address of end i (0: A, 1: B) when it is mapped,
// or nil when it is kept.
func (f *Flow) side(i int) *[16]byte {
	if i == 0 && f.maskA || i == 1 && f.maskB {
		return &f.x.addr[i]
	}
	return nil
}

// Saved returns the address of end i (0: A, 1: B, whose address is raw)
// as the flow's file saves it.
func (f *Flow) Saved(i int, raw [16]byte) netip.Addr {
	if x := f.x; x != nil && x.mapped {
		if m := f.side(i); m != nil {
			raw = *m
		}
		return netip.AddrFrom16(raw).Unmap()
	}
	return f.a.Anonymized(netip.AddrFrom16(raw).Unmap())
}
