package anonymize

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/m-lab/packet-headers/packet"
)

// Config is an anonymization: the addresses' mode, and rewrites beyond the
// addresses that keep the analyses the traces exist for.
type Config struct {
	Mode  Mode
	Local []netip.Addr // the server's addresses, kept
	Key   []byte       // KeySize bytes: Keyed mode's, and TSOffset's
	// ZeroMAC zeroes link-layer addresses (Ethernet's two, Linux cooked
	// captures' one), which identify a client on the server's link.
	ZeroMAC bool
	// TSOffset adds to each end's TCP timestamps (its TSval, and the
	// TSecr that echoes it) a constant of its own, drawn per flow from
	// Key: differences, which RTT and clock-rate analyses use, are kept;
	// the clock offset, which links a host's flows, is hidden.
	TSOffset bool
}

// NewConfig returns the anonymizer of c.
func NewConfig(c Config) (*Anonymizer, error) {
	a := New(c.Mode, c.Local)
	if c.Mode == Keyed {
		k, err := NewKeyed(c.Key, c.Local)
		if err != nil {
			return nil, err
		}
		a = k
	}
	a.zeroMAC = c.ZeroMAC
	if c.TSOffset {
		if len(c.Key) != KeySize {
			return nil, errors.New("timestamp offsets need a key")
		}
		block, err := aes.NewCipher(c.Key[:16])
		if err != nil {
			return nil, err
		}
		a.ts = &tsKey{block: block}
		copy(a.ts.iv[:], c.Key[16:])
	}
	return a, nil
}

// tsKey draws timestamp offsets: a CBC-MAC of the flow's key under AES,
// a pseudo-random function of the 4-tuple, so that the same key gives the
// same offsets live and offline.
type tsKey struct {
	block cipher.Block
	iv    [16]byte
}

// PerFlow reports whether flows need state of their own for the
// anonymization (Map's addresses, TSOffsets), computed once per flow.
func (a *Anonymizer) PerFlow() bool { return a != nil && (a.cp != nil || a.ts != nil) }

// TSOffsets returns the timestamp offsets of the flow's A and B ends (0, 0
// without TSOffset).
func (a *Anonymizer) TSOffsets(k *packet.Key) (offA, offB uint32) {
	if a == nil || a.ts == nil {
		return 0, 0
	}
	var x, y [16]byte
	for i := range x {
		x[i] = a.ts.iv[i] ^ k.A[i]
	}
	a.ts.block.Encrypt(y[:], x[:])
	for i := range x {
		x[i] = y[i] ^ k.B[i]
	}
	a.ts.block.Encrypt(y[:], x[:])
	y[0] ^= byte(k.APort >> 8)
	y[1] ^= byte(k.APort)
	y[2] ^= byte(k.BPort >> 8)
	y[3] ^= byte(k.BPort)
	a.ts.block.Encrypt(x[:], y[:])
	return binary.BigEndian.Uint32(x[:4]), binary.BigEndian.Uint32(x[4:8])
}

// ShiftTimestamps adds valOff to the segment's TSval and, when it
// acknowledges (TSecr is meaningful only then, RFC 7323), ecrOff to its
// TSecr, and updates the TCP checksum. A segment without the option, or
// whose option was not captured whole, is left alone.
func ShiftTimestamps(b []byte, p *packet.Parsed, valOff, ecrOff uint32) {
	off, ok := p.Timestamps(b)
	if !ok {
		return
	}
	var delta uint32
	shift := func(at int, by uint32) {
		old := binary.BigEndian.Uint32(b[at:])
		binary.BigEndian.PutUint32(b[at:], old+by)
		// Byte by byte, each in its half of a 16-bit word of the TCP
		// header (an option need not be word-aligned); the other half is
		// unchanged and cancels out (~u + u is zero in ones' complement),
		// so it is taken as 0 (TestShiftTimestamps).
		for j := at; j < at+4; j++ {
			sh := 8 * (1 - (j-p.TCPOffset)&1)
			o, n := uint16(byte(old>>(8*(at+3-j))))<<sh, uint16(b[j])<<sh
			delta += uint32(^o) + uint32(n)
		}
	}
	shift(off+2, valOff)
	if p.Flags&0x10 != 0 { // ACK
		shift(off+6, ecrOff)
	}
	updateChecksum(b, p.TCPOffset+16, delta)
}

// ZeroLinkAddrs zeroes the link-layer addresses of a frame of link type lt
// when the anonymizer's Config asks for it.
func (a *Anonymizer) ZeroLinkAddrs(b []byte, lt packet.LinkType) {
	if a == nil || !a.zeroMAC {
		return
	}
	var from, to int
	switch lt {
	case packet.LinkTypeEthernet:
		from, to = 0, 12
	case packet.LinkTypeLinuxSLL: // packet type, ARPHRD, address length, address (8)
		from, to = 6, 14
	case packet.LinkTypeLinuxSLL2: // protocol, reserved, ifindex, ARPHRD, packet type, address length, address (8)
		from, to = 12, 20
	default:
		return
	}
	if to <= len(b) {
		clear(b[from:to])
	}
}
