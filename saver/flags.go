package saver

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/m-lab/go/bytecount"
)

// FreeSpace is a -minfreespace value, a flag.Value: bytes (a byte count
// such as 500MB) or a percentage of the filesystem (such as 5%), for
// Options.MinFreeBytes and Options.MinFreePercent.
type FreeSpace struct {
	Bytes   int64
	Percent float64
	text    string
}

func (f *FreeSpace) String() string { return f.text }

// Set parses a byte count or a percentage in [0, 100).
func (f *FreeSpace) Set(s string) error {
	*f = FreeSpace{text: s}
	if p, ok := strings.CutSuffix(s, "%"); ok {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v < 0 || v >= 100 {
			return fmt.Errorf("percentage %q not in [0, 100)", s)
		}
		f.Percent = v
		return nil
	}
	var b bytecount.ByteCount
	if err := b.Set(s); err != nil {
		return err
	}
	f.Bytes = int64(b)
	return nil
}

// Perm is a -fileperm value, a flag.Value: an octal permission for
// Options.Perm (which New checks further).
type Perm os.FileMode

func (m *Perm) String() string { return fmt.Sprintf("%#o", os.FileMode(*m)) }

// Set parses an octal permission.
func (m *Perm) Set(s string) error {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return fmt.Errorf("%q is not an octal permission", s)
	}
	*m = Perm(v)
	return nil
}
