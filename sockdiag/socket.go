package sockdiag

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is a netlink socket: the small interface in front of the kernel, so
// that the Source's logic is tested with a fake.
type Conn interface {
	// Send writes one datagram of netlink messages.
	Send(b []byte) error
	// Receive reads one datagram into buf. After Close it returns an error
	// wrapping os.ErrClosed.
	Receive(buf []byte) (int, error)
	// Close may be called more than once, also concurrently.
	Close() error
}

// ErrNeedNetAdmin is returned by ListenDestroy when the process lacks
// CAP_NET_ADMIN, which the kernel requires to join the destroy broadcasts.
var ErrNeedNetAdmin = errors.New("joining the kernel's TCP socket destroy broadcasts needs CAP_NET_ADMIN")

// netlinkConn is a NETLINK_SOCK_DIAG socket read through Go's poller, so
// that Close unblocks a Receive in progress.
type netlinkConn struct {
	f *os.File
}

func open(groups ...int) (*netlinkConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag bind: %w", err)
	}
	for _, g := range groups {
		if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, g); err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.EPERM) {
				return nil, ErrNeedNetAdmin
			}
			return nil, fmt.Errorf("sock_diag join group %d: %w", g, err)
		}
	}
	if len(groups) > 0 {
		// Broadcasts come in bursts (a server closing many connections);
		// a larger buffer loses fewer. Forcing past rmem_max needs
		// CAP_NET_ADMIN, which joining the groups already required.
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20) != nil {
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
		}
	}
	return &netlinkConn{f: os.NewFile(uintptr(fd), "sock_diag")}, nil
}

// Dial opens a sock_diag socket for look-ups.
func Dial() (Conn, error) { return open() }

// ListenDestroy opens a sock_diag socket that receives the kernel's
// broadcast of every IPv4 and IPv6 TCP socket destroyed in this network
// namespace. It fails with ErrNeedNetAdmin without CAP_NET_ADMIN.
func ListenDestroy() (Conn, error) { return open(GroupTCPDestroy, GroupTCP6Destroy) }

func (c *netlinkConn) Send(b []byte) error {
	_, err := c.f.Write(b)
	return err
}

func (c *netlinkConn) Receive(buf []byte) (int, error) { return c.f.Read(buf) }

func (c *netlinkConn) Close() error { return c.f.Close() }

// SetReadDeadline bounds the wait for replies to a batch of look-ups.
func (c *netlinkConn) SetReadDeadline(t time.Time) error { return c.f.SetReadDeadline(t) }
