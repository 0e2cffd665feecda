package saver

import (
	"errors"
	"fmt"
	"strings"
)

// MaxUUIDLen is the longest UUID accepted: a file name may have 255 bytes,
// and the saver adds ".pcap.gz".
const MaxUUIDLen = 255 - len(".pcap.gz")

// ErrBadUUID is wrapped by the errors CheckUUID returns.
var ErrBadUUID = errors.New("UUID is not a usable file name")

// CheckUUID returns an error wrapping ErrBadUUID unless uuid can name a
// file in the data directory and nowhere else: 1 to MaxUUIDLen bytes of
// printable ASCII but space and '/', not starting with '.' (no "..", no hidden
// file, no clash with the saver's partial directory). tcp-info's UUIDs
// (<hostname>_<boot time>_<cookie in hex>) always can; a UUID that cannot
// is bad input, never a path.
func CheckUUID(uuid string) error {
	var why string
	switch {
	case uuid == "":
		why = "empty"
	case len(uuid) > MaxUUIDLen:
		why = fmt.Sprintf("%d bytes, more than %d", len(uuid), MaxUUIDLen)
	case uuid[0] == '.':
		why = "starts with '.'"
	case strings.IndexByte(uuid, '/') >= 0:
		why = "contains '/'"
	case strings.IndexFunc(uuid, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0:
		// Printable ASCII only, as tcp-info's names are: a C1 control
		// (U+0085), a bidirectional override (U+202E) or invalid UTF-8
		// would spoof log lines and break the flow index's JSON.
		why = "contains a space, a control character or a byte outside printable ASCII"
	default:
		return nil
	}
	return fmt.Errorf("%w: %.80q: %s", ErrBadUUID, uuid, why)
}
