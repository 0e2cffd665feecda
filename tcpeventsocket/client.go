// Package tcpeventsocket is a client of tcp-info's eventsocket: a unix
// stream socket on which tcp-info writes one JSON object per line for every
// TCP connection it sees open or close.
//
// tcp-info writes to its clients while holding a lock, so a slow client
// stalls tcp-info itself. The client therefore reads continuously and hands
// each event to a Handler that must return quickly (a map insert). The
// connection is retried with capped exponential backoff, both when the
// socket is missing at start and after tcp-info restarts. A malformed line,
// an unknown event type or an over-long line is counted and skipped, never
// fatal.
package tcpeventsocket

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/metrics"
)

// Handler receives events. Its methods are called from the client's
// goroutine, one at a time, and must not block. An event the handler
// refuses (a UUID that cannot name a file, say) is counted as malformed.
type Handler interface {
	// Open is called for a connection that tcp-info saw open; local is the
	// server's end; cookie is the kernel's socket cookie (0 if not sent).
	Open(ts time.Time, uuid string, local, remote netip.AddrPort, cookie uint64) error
	// Close is called for a connection that tcp-info saw close.
	Close(ts time.Time, uuid string) error
}

// Event types, as tcp-info's eventsocket package numbers them.
const (
	eventOpen  = 0
	eventClose = 1
)

// MaxLineBytes is the longest event line accepted; longer lines are skipped.
const MaxLineBytes = 64 << 10

// event is the wire form of one line (tcp-info's eventsocket.FlowEvent).
type event struct {
	Event     *int
	Timestamp time.Time
	UUID      string
	ID        *struct {
		SPort, DPort uint16
		SrcIP, DstIP string
		Cookie       int64 // the kernel's uint64 socket cookie, as tcp-info sends it
	}
}

// Errors wrapped by the errors ParseLine returns.
var (
	ErrMalformed   = errors.New("malformed event")
	ErrUnknownType = errors.New("unknown event type")
)

// Parsed is one decoded event line.
type Parsed struct {
	Open          bool
	Timestamp     time.Time
	UUID          string
	Local, Remote netip.AddrPort // for Open events
	Cookie        uint64         // for Open events; 0 if tcp-info did not send it
}

// ParseLine decodes one event line. An unknown event type is an error
// wrapping ErrUnknownType; invalid JSON, a missing UUID and an Open without
// a valid ID are errors wrapping ErrMalformed. Whether the UUID can name a
// file is for the handler to check.
func ParseLine(line []byte) (Parsed, error) {
	var ev event
	if err := json.Unmarshal(line, &ev); err != nil {
		return Parsed{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if ev.Event == nil || ev.UUID == "" {
		return Parsed{}, fmt.Errorf("%w: no Event or UUID", ErrMalformed)
	}
	switch *ev.Event {
	case eventClose:
		return Parsed{Timestamp: ev.Timestamp, UUID: ev.UUID}, nil
	case eventOpen:
		if ev.ID == nil {
			return Parsed{}, fmt.Errorf("%w: Open without ID", ErrMalformed)
		}
		src, err1 := netip.ParseAddr(ev.ID.SrcIP)
		dst, err2 := netip.ParseAddr(ev.ID.DstIP)
		if err1 != nil || err2 != nil {
			return Parsed{}, fmt.Errorf("%w: bad address in ID", ErrMalformed)
		}
		return Parsed{Open: true, Timestamp: ev.Timestamp, UUID: ev.UUID,
			Local:  netip.AddrPortFrom(src.Unmap().WithZone(""), ev.ID.SPort),
			Remote: netip.AddrPortFrom(dst.Unmap().WithZone(""), ev.ID.DPort),
			Cookie: uint64(ev.ID.Cookie)}, nil
	}
	return Parsed{}, fmt.Errorf("%w %d", ErrUnknownType, *ev.Event)
}

// Options configures a Client. The zero value asks for the defaults.
type Options struct {
	MinBackoff time.Duration // first retry delay; default 100ms
	MaxBackoff time.Duration // longest retry delay; default 5s
}

// Counts are what a Client, or Serve, counted. Safe for concurrent use.
type Counts struct {
	Events     *metrics.Counters // events taken, by type: open, close, unknown
	Malformed  atomic.Uint64     // lines that were not valid events, or that the handler refused
	Reconnects atomic.Uint64     // connection attempts after the first

	refusedLogged atomic.Bool
}

// EventTypes are the values of Counts.Events.
var EventTypes = []string{"open", "close", "unknown"}

// NewCounts returns zero counts.
func NewCounts() *Counts { return &Counts{Events: metrics.NewCounters(EventTypes...)} }

// Client reads events from one eventsocket.
type Client struct {
	path      string
	handler   Handler
	min       time.Duration
	max       time.Duration
	connected atomic.Bool
	since     atomic.Int64 // unix nanoseconds of the connection, 0 while not connected
	counts    *Counts
}

// Counts returns the client's counts.
func (c *Client) Counts() *Counts { return c.counts }

// Connected reports whether the client is connected now. It is safe for
// concurrent use.
func (c *Client) Connected() bool { return c.connected.Load() }

// ConnectedSince reports since when the client has been connected without
// a break, and whether it is connected now. It is safe for concurrent use.
func (c *Client) ConnectedSince() (time.Time, bool) {
	ns := c.since.Load()
	return time.Unix(0, ns), ns != 0
}

// New returns a client for the socket at path.
func New(path string, h Handler, opts *Options) *Client {
	c := &Client{path: path, handler: h, min: 100 * time.Millisecond, max: 5 * time.Second, counts: NewCounts()}
	if opts != nil {
		if opts.MinBackoff > 0 {
			c.min = opts.MinBackoff
		}
		if opts.MaxBackoff > 0 {
			c.max = opts.MaxBackoff
		}
	}
	return c
}

// Run connects, reads and reconnects until ctx is done; it then returns nil.
func (c *Client) Run(ctx context.Context) error {
	backoff := c.min
	attempts := 0
	loggedDown := false
	for ctx.Err() == nil {
		if attempts > 0 {
			c.counts.Reconnects.Add(1)
		}
		attempts++
		var d net.Dialer
		conn, err := d.DialContext(ctx, "unix", c.path)
		if err != nil {
			if !loggedDown {
				log.Printf("eventsocket %s: %v (retrying)", c.path, err)
				loggedDown = true
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, c.max)
			continue
		}
		log.Printf("eventsocket %s: connected", c.path)
		loggedDown = false
		c.since.Store(time.Now().UnixNano())
		c.connected.Store(true)
		n := c.read(ctx, conn)
		c.connected.Store(false)
		c.since.Store(0)
		if ctx.Err() == nil {
			log.Printf("eventsocket %s: connection lost after %d events (reconnecting)", c.path, n)
		}
		if n > 0 {
			backoff = c.min
		}
	}
	return nil
}

// read serves one connection until it ends or ctx is done, and returns the
// number of lines read.
func (c *Client) read(ctx context.Context, conn net.Conn) int {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	return Serve(conn, c.handler, c.counts)
}

// Serve reads event lines from r until it ends, hands them to h, counts
// them in counts (nil: not counted), and returns the number of non-empty
// lines read.
func Serve(r io.Reader, h Handler, counts *Counts) int {
	if counts == nil {
		counts = NewCounts()
	}
	br := bufio.NewReaderSize(r, MaxLineBytes)
	n := 0
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			counts.Malformed.Add(1)
			for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of the line
				_, err = br.ReadSlice('\n')
			}
			n++
			if err != nil {
				return n
			}
			continue
		}
		if line = bytesTrim(line); len(line) > 0 {
			n++
			dispatch(line, h, counts)
		}
		if err != nil {
			return n
		}
	}
}

func bytesTrim(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

func dispatch(line []byte, h Handler, counts *Counts) {
	ev, err := ParseLine(line)
	switch {
	case errors.Is(err, ErrUnknownType):
		counts.Events.Inc("unknown")
		return
	case err != nil:
		counts.Malformed.Add(1)
		return
	}
	if ev.Open {
		err = h.Open(ev.Timestamp, ev.UUID, ev.Local, ev.Remote, ev.Cookie)
	} else {
		err = h.Close(ev.Timestamp, ev.UUID)
	}
	switch {
	case err != nil:
		counts.Malformed.Add(1)
		if !counts.refusedLogged.Swap(true) {
			log.Printf("eventsocket: event refused (counted as malformed; logged once): %v", err)
		}
	case ev.Open:
		counts.Events.Inc("open")
	default:
		counts.Events.Inc("close")
	}
}
