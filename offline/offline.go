// Package offline splits an existing capture into the per-flow header pcaps
// that the daemon would have written, deterministically.
//
// The input is a pcap or pcapng file (gzip-compressed or not) and,
// optionally, the JSON Lines that tcp-info's eventsocket sent during the same
// period. The pipeline is the live one (demuxer, anonymizer, saver); only the
// clock differs: it is the packets' timestamps, and events are applied in
// timestamp order between packets. Timeouts, -captureduration and
// -uuidwaitduration therefore behave as they did live, and the same input
// always gives the same files, byte for byte.
//
// Without events, each flow is named by a deterministic fallback built from
// its first packet's time and its 4-tuple (see FallbackName).
//
// A Run belongs to one goroutine; it starts the saver's writer goroutines
// and waits for them before it returns.
package offline

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// Options configures a Run.
type Options struct {
	Read   string    // capture file, or "-" for Stdin
	Events string    // eventsocket JSON Lines file, or "" for fallback names
	Stdin  io.Reader // read when Read is "-"

	Dir             string
	MaxHeaderSize   int
	CaptureDuration time.Duration
	FlowTimeout     time.Duration
	UUIDWait        time.Duration
	Stream          bool
	Anonymize       anonymize.Mode
	// Local are the server's addresses, kept by netblock anonymization; the
	// local ends of the events' connections are added to them.
	Local []netip.Addr

	// Compress writes <uuid>.pcap.gz files.
	Compress bool

	// Progress, when set, gets a progress line every second.
	Progress io.Writer
}

// Summary is what a Run did.
type Summary struct {
	Packets, Undecodable uint64
	Flows                uint64
	Files, Bytes         int64
	WriteErrors          int64
	Events, BadEvents    int
	NoUUID               uint64 // packets of flows never named
	AfterDuration        uint64 // packets after -captureduration
}

// String is the one-line summary.
func (s Summary) String() string {
	return fmt.Sprintf("read %d packets (%d undecodable) in %d flows; wrote %d files (%d bytes); dropped %d packets without UUID and %d after -captureduration; %d events (%d skipped); %d write errors",
		s.Packets, s.Undecodable, s.Flows, s.Files, s.Bytes, s.NoUUID, s.AfterDuration, s.Events, s.BadEvents, s.WriteErrors)
}

// FallbackName is the name of a flow when no events are given: the UTC time
// of its first packet to the nanosecond, then its two endpoints in key order
// (IPv6 colons as dashes), e.g.
// offline_20261125T232153.694760613Z_10.99.0.1_38918_10.99.0.2_8080.
// Masked addresses appear masked.
func FallbackName(k packet.Key, first time.Time, a *anonymize.Anonymizer) string {
	ep := func(addr [16]byte, port uint16) string {
		ip := netip.AddrFrom16(addr).Unmap()
		if a.ShouldMask(&addr) {
			ip = anonymize.MaskAddr(ip)
		}
		return fmt.Sprintf("%s_%d", strings.ReplaceAll(ip.String(), ":", "-"), port)
	}
	return fmt.Sprintf("offline_%s_%s_%s", first.UTC().Format("20060102T150405.000000000Z"), ep(k.A, k.APort), ep(k.B, k.BPort))
}

// fallbackNamer names every flow that the table cannot name.
type fallbackNamer struct {
	t    *names.Table
	anon *anonymize.Anonymizer
}

func (f fallbackNamer) Claim(k packet.Key, first time.Time) *names.Entry {
	if e := f.t.Claim(k, first); e != nil {
		return e
	}
	return &names.Entry{UUID: FallbackName(k, first, f.anon), Key: k, Source: "fallback", OpenedAt: first}
}

func (f fallbackNamer) Release(e *names.Entry) {
	if e.Source != "fallback" {
		f.t.Release(e)
	}
}

// eventCollector gathers the events of a file.
type eventCollector struct{ evs []tcpeventsocket.Parsed }

func (c *eventCollector) Open(ts time.Time, uuid string, local, remote netip.AddrPort, cookie uint64) {
	c.evs = append(c.evs, tcpeventsocket.Parsed{Open: true, Timestamp: ts, UUID: uuid, Local: local, Remote: remote, Cookie: cookie})
}

func (c *eventCollector) Close(ts time.Time, uuid string) {
	c.evs = append(c.evs, tcpeventsocket.Parsed{Timestamp: ts, UUID: uuid})
}

// open opens a file or "-", decompressing gzip.
func open(path string, stdin io.Reader) (io.Reader, func(), error) {
	var r io.Reader = stdin
	closeFn := func() {}
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, nil, err
		}
		r, closeFn = f, func() { f.Close() }
	}
	br := bufio.NewReaderSize(r, 1<<16)
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			closeFn()
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
		return bufio.NewReaderSize(zr, 1<<16), closeFn, nil
	}
	return br, closeFn, nil
}

// readEvents reads every event of the file, in timestamp order.
func readEvents(path string, stdin io.Reader) ([]tcpeventsocket.Parsed, int, error) {
	r, closeFn, err := open(path, stdin)
	if err != nil {
		return nil, 0, fmt.Errorf("events: %w", err)
	}
	defer closeFn()
	var c eventCollector
	lines := tcpeventsocket.Serve(r, &c)
	sort.SliceStable(c.evs, func(i, j int) bool { return c.evs[i].Timestamp.Before(c.evs[j].Timestamp) })
	return c.evs, lines - len(c.evs), nil
}

// source is a capture file's records.
type source interface {
	// Next returns the next frame (valid until the next call), its
	// timestamp in Unix nanoseconds, its original length and the index of
	// its interface (0 in a pcap file; in pcapng, numbered across
	// sections); io.EOF at the end of the file.
	Next() (data []byte, ts int64, origLen, ifc int, err error)
	// LinkType returns the link type of an interface.
	LinkType(ifc int) packet.LinkType
	// Offset returns the offset in the file just past the last record
	// read, also after Next failed.
	Offset() int64
}

// newSource detects the format: pcap (read by pcapFile) or pcapng (by
// ngFile).
func newSource(r io.Reader) (source, error) {
	br := bufio.NewReaderSize(r, 1<<16) // large reads pass through it
	b, err := br.Peek(4)
	if err != nil {
		return nil, fmt.Errorf("not a capture file: %w", err)
	}
	switch magic := binary.LittleEndian.Uint32(b); magic {
	case ngSectionHeader:
		f, err := newNgFile(br)
		if err != nil {
			return nil, fmt.Errorf("pcapng: %w", err)
		}
		return f, nil
	case 0xa1b2c3d4, 0xd4c3b2a1, 0xa1b23c4d, 0x4d3cb2a1:
		f, err := newPcapFile(br)
		if err != nil {
			return nil, fmt.Errorf("pcap: %w", err)
		}
		return f, nil
	default:
		return nil, fmt.Errorf("not a pcap or pcapng file (magic %x)", b)
	}
}

// Run reads the capture and writes the per-flow files. It returns the
// summary; on a read error it still writes every flow read before it and
// returns the error, which names the offset.
func Run(ctx context.Context, o Options) (Summary, error) {
	var sum Summary
	var evs []tcpeventsocket.Parsed
	local := append([]netip.Addr{}, o.Local...)
	if o.Events != "" {
		var err error
		if evs, sum.BadEvents, err = readEvents(o.Events, o.Stdin); err != nil {
			return sum, err
		}
		sum.Events = len(evs)
		for _, e := range evs {
			if e.Open {
				local = append(local, e.Local.Addr())
			}
		}
	}
	in, closeFn, err := open(o.Read, o.Stdin)
	if err != nil {
		return sum, fmt.Errorf("read: %w", err)
	}
	defer closeFn()
	src, err := newSource(in)
	if err != nil {
		return sum, fmt.Errorf("read %s: %w", o.Read, err)
	}
	sv, err := saver.New(saver.Options{Dir: o.Dir, Snaplen: o.MaxHeaderSize, Compress: o.Compress})
	if err != nil {
		return sum, err
	}

	// The packets' clock, in Unix nanoseconds: the latest timestamp read.
	var clock int64
	now := func() time.Time { return time.Unix(0, clock) }
	table := names.New(&names.Options{TTL: max(o.CaptureDuration, o.FlowTimeout) + o.UUIDWait, Now: now})
	anon := anonymize.New(o.Anonymize, local)
	var namer demuxer.Namer = table
	if o.Events == "" {
		namer = fallbackNamer{t: table, anon: anon}
	}
	demuxers := map[int]*demuxer.Demuxer{} // by interface (pcapng) or 0
	get := func(ifc int) *demuxer.Demuxer {
		d, ok := demuxers[ifc]
		if !ok {
			d = demuxer.New(demuxer.Options{Interface: fmt.Sprint("offline", ifc), LinkType: src.LinkType(ifc),
				MaxHeaderSize: o.MaxHeaderSize, CaptureDuration: o.CaptureDuration, FlowTimeout: o.FlowTimeout,
				UUIDWait: o.UUIDWait, Stream: o.Stream, Names: namer, Writer: demuxer.SaverWriter{Saver: sv},
				Anonymizer: anon})
			demuxers[ifc] = d
		}
		return d
	}
	apply := func(all bool) {
		for len(evs) > 0 && (all || evs[0].Timestamp.UnixNano() <= clock) {
			e := evs[0]
			if e.Open {
				table.Open(e.Timestamp, e.UUID, packet.KeyFromAddrPorts(e.Local, e.Remote), "eventsocket", e.Cookie)
			} else {
				table.Close(e.Timestamp, e.UUID)
			}
			evs = evs[1:]
		}
	}

	var readErr error
	var lastTick, lastSweep int64
	lastProgress := time.Now()
	var n uint64
	var last struct { // the last packet's interface and demuxer
		ifc int
		d   *demuxer.Demuxer
	}
	for n&1023 != 0 || ctx.Err() == nil { // the context, every 1024 packets
		data, ts, origLen, ifc, err := src.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// A reader stays past the last good record when it fails.
			readErr = fmt.Errorf("read %s: truncated or corrupt capture at offset %d (after packet %d): %w", o.Read, src.Offset(), n, err)
			break
		}
		n++
		clock = max(clock, ts)
		apply(false)
		if last.d == nil || ifc != last.ifc {
			last.ifc, last.d = ifc, get(ifc)
		}
		last.d.Packet(data, time.Unix(0, ts), origLen)
		if clock-lastTick >= int64(demuxer.TickInterval) {
			for _, d := range demuxers {
				d.Tick(now())
			}
			lastTick = clock
			if clock-lastSweep >= int64(time.Second) {
				table.Sweep()
				lastSweep = clock
			}
		}
		if o.Progress != nil && n%4096 == 0 && time.Since(lastProgress) >= time.Second {
			lastProgress = time.Now()
			files, _, _ := sv.Written()
			fmt.Fprintf(o.Progress, "\r%d packets, %d files, at %s ", n, files, now().UTC().Format(time.RFC3339))
		}
	}
	if o.Progress != nil && n >= 4096 {
		fmt.Fprintln(o.Progress)
	}
	apply(true)
	for _, d := range demuxers {
		d.Tick(now())
		d.Close()
	}
	sv.Wait()
	os.Remove(sv.PartialDir()) // empty now; the output is only the files
	for _, d := range demuxers {
		c := d.Counts()
		sum.Packets += c.Packets
		sum.Undecodable += c.Undecodable
		sum.Flows += c.Flows
		sum.NoUUID += c.NoUUID + c.ShutdownNoUUID
		sum.AfterDuration += c.AfterDuration
	}
	sum.Files, sum.Bytes, sum.WriteErrors = sv.Written()
	if readErr == nil && ctx.Err() != nil {
		readErr = ctx.Err()
	}
	return sum, readErr
}
