package anonymize

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/m-lab/packet-headers/internal/keyfile"
)

// KeySize is the size of a Crypto-PAn key: an AES-128 key, then the 16
// bytes that AES turns into the pad.
const KeySize = 32

// CryptoPAn is the keyed, prefix-preserving, one-to-one address mapping of
// Xu, Fan, Ammar and Moon (2002): two addresses that share a k-bit prefix
// map to two that share exactly a k-bit prefix, and the same key gives the
// same mapping everywhere, every time. Bit i of an address is flipped by
// the first bit of AES(first i bits of the address, then the pad's). IPv4
// addresses are mapped over 32 bits exactly as the reference implementation
// does (TestCryptoPAnReference: its sample, bit for bit), IPv6 addresses
// over 128 with the same construction. Safe for concurrent use.
type CryptoPAn struct {
	block cipher.Block
	pad   [16]byte
}

// NewCryptoPAn returns the mapping of a key of KeySize bytes.
func NewCryptoPAn(key []byte) (*CryptoPAn, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("a Crypto-PAn key has %d bytes, not %d", KeySize, len(key))
	}
	block, err := aes.NewCipher(key[:16])
	if err != nil {
		return nil, err
	}
	c := &CryptoPAn{block: block}
	block.Encrypt(c.pad[:], key[16:])
	return c, nil
}

// LoadKey reads the key that the -anonymize.* flags call for: keyFile's
// with -anonymize.ip=cryptopan (mode Keyed) or -anonymize.tsoffset, and a
// one-line reason, naming the flags, when one is given without the other.
func LoadKey(mode Mode, tsOffset bool, keyFile string) ([]byte, error) {
	switch {
	case mode == Keyed && keyFile == "":
		return nil, errors.New("-anonymize.ip=cryptopan needs -anonymize.keyfile")
	case tsOffset && keyFile == "":
		return nil, errors.New("-anonymize.tsoffset needs -anonymize.keyfile")
	case mode != Keyed && !tsOffset && keyFile != "":
		return nil, errors.New("-anonymize.keyfile goes with -anonymize.ip=cryptopan or -anonymize.tsoffset")
	case keyFile == "":
		return nil, nil
	}
	key, err := ReadKey(keyFile)
	if err != nil {
		return nil, fmt.Errorf("-anonymize.keyfile: %w", err)
	}
	return key, nil
}

// ReadKey reads a key file: KeySize bytes, or 2*KeySize hexadecimal digits
// (as `openssl rand -hex 32` writes them, a final newline allowed). Its
// errors never quote the file's contents.
func ReadKey(path string) ([]byte, error) {
	b, err := keyfile.Read(path, 4*KeySize)
	if errors.Is(err, keyfile.ErrTooLong) {
		return nil, fmt.Errorf("%s: %w (it has more than %d bytes)", path, ErrKeySize, 4*KeySize)
	}
	if err != nil {
		return nil, err
	}
	if len(b) == KeySize {
		return b, nil
	}
	if s := strings.TrimRight(string(b), "\r\n"); len(s) == 2*KeySize {
		if key, err := hex.DecodeString(s); err == nil {
			return key, nil
		}
	}
	return nil, fmt.Errorf("%s: %w (it has %d bytes)", path, ErrKeySize, len(b))
}

// ErrKeyExposed is wrapped by ReadKey's error for a key file that users
// other than its owner and group can read: whoever reads the key can
// invert the mapping.
var ErrKeyExposed = keyfile.ErrExposed

// ErrKeySize is wrapped by ReadKey's error for a file that holds no key.
var ErrKeySize = fmt.Errorf("not a Crypto-PAn key: want %d bytes, or %d hexadecimal digits", KeySize, 2*KeySize)

// Map4 maps an IPv4 address.
func (c *CryptoPAn) Map4(a [4]byte) [4]byte {
	orig := binary.BigEndian.Uint32(a[:])
	pad := binary.BigEndian.Uint32(c.pad[:4])
	in, out := c.pad, [16]byte{}
	var otp uint32
	for pos := 0; pos < 32; pos++ {
		// The address's first pos bits, then the pad's (a shift by 32 of
		// a uint32 is 0 in Go: pos 0 is the pad alone).
		binary.BigEndian.PutUint32(in[:4], orig>>(32-pos)<<(32-pos)|pad<<pos>>pos)
		c.block.Encrypt(out[:], in[:])
		otp |= uint32(out[0]>>7) << (31 - pos)
	}
	var r [4]byte
	binary.BigEndian.PutUint32(r[:], orig^otp)
	return r
}

// Map16 maps an IPv6 address over its 128 bits.
func (c *CryptoPAn) Map16(a [16]byte) [16]byte {
	var out, otp [16]byte
	in := c.pad
	for pos := 0; pos < 128; pos++ {
		i, bit := pos/8, pos%8
		copy(in[:i], a[:i])       // (in[i+1:] is still the pad's)
		keep := byte(0xff) >> bit // the pad's bits in byte i
		in[i] = a[i]&^keep | c.pad[i]&keep
		c.block.Encrypt(out[:], in[:])
		otp[i] |= out[0] >> 7 << (7 - bit)
	}
	for i := range a {
		a[i] ^= otp[i]
	}
	return a
}

// Map maps an address: IPv4 and IPv4-mapped IPv6 over 32 bits (a mapped
// address stays mapped), other IPv6 addresses over 128.
func (c *CryptoPAn) Map(addr netip.Addr) netip.Addr {
	if addr.Is4() {
		return netip.AddrFrom4(c.Map4(addr.As4()))
	}
	b := c.map16(addr.As16())
	return netip.AddrFrom16(b).WithZone(addr.Zone())
}

// map16 maps a 16-byte address, IPv4-mapped ones over their last 32 bits.
func (c *CryptoPAn) map16(b [16]byte) [16]byte {
	if netip.AddrFrom16(b).Is4In6() {
		m := c.Map4([4]byte(b[12:]))
		copy(b[12:], m[:])
		return b
	}
	return c.Map16(b)
}
