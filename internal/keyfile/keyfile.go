// Package keyfile reads the small secret files the daemon is given (the
// Crypto-PAn key, the sample's key). A key file is named by a flag, so it
// may be anything: it is opened without blocking (a FIFO or a terminal
// would hold start-up with no word), and the descriptor read is the one
// checked: a regular file that others cannot read, of at most a given
// size (TestRead).
package keyfile

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// ErrExposed is wrapped by Read's error for a file that users other than
// its owner and group can read: whoever reads a key can use it.
var ErrExposed = errors.New("the key file is readable by others")

// ErrTooLong is wrapped by Read's error for a file longer than asked.
var ErrTooLong = errors.New("the key file is too long")

// Read returns the contents of the key file at path, at most max bytes.
func Read(path string, max int) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, st.Mode().Type())
	}
	if st.Mode().Perm()&0o004 != 0 {
		return nil, fmt.Errorf("%s: %w (mode %#o): chmod o-r", path, ErrExposed, st.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, int64(max)+1))
	if err != nil {
		return nil, err
	}
	if len(b) > max {
		return nil, fmt.Errorf("%s: %w: more than %d bytes", path, ErrTooLong, max)
	}
	return b, nil
}
