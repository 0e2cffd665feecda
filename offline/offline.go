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
// Each flow that no event names (all of them without events; with events,
// those tcp-info never announced within -uuidwaitduration, such as most
// short connections) is named by a deterministic fallback built from its
// first packet's time, its 4-tuple and its interface (see FallbackName),
// made unique within the run: no flow is lost for lack of a name, and the
// summary says how many each source named.
//
// Interfaces of a link type the decoder does not know are reported by
// name (Summary.Unsupported); BSD loopback captures (macOS) are read.
//
// A Run belongs to one goroutine; it starts the saver's writer goroutines
// and waits for them before it returns.
package offline

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/selection"
)

// Options configures a Run.
type Options struct {
	Read   string    // capture file, or "-" for Stdin
	Events string    // eventsocket JSON Lines file, or "" for fallback names
	Stdin  io.Reader // read when Read is "-"

	// Config is the pipeline's: the data directory, durations, mode and
	// anonymization. Its Local are the server's addresses, kept by
	// anonymization; the local ends of the events' connections are added.
	// Its Now is the packets' clock, set by Run.
	pipeline.Config

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
	// NamedByEvents and NamedByFallback count the flows each source named.
	NamedByEvents, NamedByFallback uint64
	// Unsupported says, per link type the decoder does not know, which
	// interfaces have it and how many of their frames (counted as
	// undecodable) were not decoded: one line per link type, however many
	// interfaces a pcapng declares (TestUnsupportedLinkTypes).
	Unsupported []string
	// UnsupportedPackets counts the frames of those interfaces.
	UnsupportedPackets uint64
	// Impossible counts the records refused for an impossible header (see
	// MaxOrigLen).
	Impossible uint64
	// LeftOut counts the connections each rule of the selection left out,
	// by verdict (tcp-info's exclusions, -localport, -outgoing's absence);
	// LeftOutAtLeast says the counts are lower bounds: more than
	// maxLeftOut connections were left out. NotSampled counts the flows
	// -sample left out.
	LeftOut        [selection.NumVerdicts]uint64
	LeftOutAtLeast bool
	NotSampled     uint64
	// OddTimes counts the frames dated too far ahead of the others, set
	// aside: TCP segments that no run of ConfirmJump confirmed, and every
	// other frame (see jumpGuard).
	OddTimes uint64
}

// ConfirmJump is how many TCP segments in a row, each more than
// -flowtimeout past the offline clock, make it jump.
const ConfirmJump = 8

// jumpGuard holds frames dated too far past the clock until they confirm
// a jump. It copies their bytes, at most ConfirmJump frames.
type jumpGuard struct {
	max  int64 // nanoseconds
	held []heldFrame
}

type heldFrame struct {
	data         []byte
	ts           int64
	origLen, ifc int
}

// hold keeps a frame and reports whether ConfirmJump are held.
func (g *jumpGuard) hold(data []byte, ts int64, origLen, ifc int) bool {
	g.held = append(g.held, heldFrame{data: bytes.Clone(data), ts: ts, origLen: origLen, ifc: ifc})
	return len(g.held) >= ConfirmJump
}

// release processes the held frames, in their order.
func (g *jumpGuard) release(process func([]byte, int64, int, int)) {
	for _, h := range g.held {
		process(h.data, h.ts, h.origLen, h.ifc)
	}
	g.held = g.held[:0]
}

// drop forgets the held frames and returns how many there were.
func (g *jumpGuard) drop() uint64 {
	n := len(g.held)
	g.held = g.held[:0]
	return uint64(n)
}

// unsupportedLines describes the interfaces of unsupported link types, one
// line per link type, in the order of their first interfaces.
func unsupportedLines(unsupported map[int]packet.LinkType, demuxers map[int]*demuxer.Demuxer) []string {
	type kind struct {
		ifcs    []int
		packets uint64
	}
	byType := map[packet.LinkType]*kind{}
	for ifc, lt := range unsupported {
		k := byType[lt]
		if k == nil {
			k = &kind{}
			byType[lt] = k
		}
		k.ifcs = append(k.ifcs, ifc)
		k.packets += demuxers[ifc].Counts().Captured
	}
	type line struct {
		first int
		text  string
	}
	var ls []line
	for lt, k := range byType {
		sort.Ints(k.ifcs)
		which := fmt.Sprintf("interface %d", k.ifcs[0])
		if len(k.ifcs) > 1 {
			which = fmt.Sprintf("%d interfaces (the first %d)", len(k.ifcs), k.ifcs[0])
		}
		ls = append(ls, line{k.ifcs[0], fmt.Sprintf("%s: link type %v is not supported (only %s): %d packets not decoded", which, lt, packet.SupportedLinkTypes, k.packets)})
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].first < ls[j].first })
	var lines []string
	for _, l := range ls {
		lines = append(lines, l.text)
	}
	return lines
}

// String is the one-line summary.
func (s Summary) String() string {
	impossible := ""
	if s.Impossible > 0 {
		impossible = fmt.Sprintf("; %d records refused (impossible length or time)", s.Impossible)
	}
	if s.OddTimes > 0 {
		impossible += fmt.Sprintf("; %d frames dated far ahead of the others set aside", s.OddTimes)
	}
	return fmt.Sprintf("read %d packets (%d undecodable) in %d flows; wrote %d files (%d bytes); named %d flows from events and %d by fallback; dropped %d packets without UUID and %d after -captureduration; %s; %d events (%d skipped); %d write errors",
		s.Packets, s.Undecodable, s.Flows, s.Files, s.Bytes, s.NamedByEvents, s.NamedByFallback, s.NoUUID, s.AfterDuration, s.leftOut(), s.Events, s.BadEvents, s.WriteErrors) + impossible
}

// leftOut says how many connections the selection left out, by rule.
func (s Summary) leftOut() string {
	var total uint64
	var rules []string
	for v, n := range s.LeftOut {
		if n > 0 {
			total += n
			rules = append(rules, fmt.Sprintf("%d %s", n, selection.Verdict(v)))
		}
	}
	if s.NotSampled > 0 {
		total += s.NotSampled
		rules = append(rules, fmt.Sprintf("%d not_sampled", s.NotSampled))
	}
	atLeast := ""
	if s.LeftOutAtLeast {
		atLeast = "at least "
	}
	if total == 0 {
		return "left out no connection"
	}
	return fmt.Sprintf("left out %s%d connections (%s)", atLeast, total, strings.Join(rules, ", "))
}

// maxLeftOut is how many connections left out by the selection a run
// remembers, to count each once: a capture of millions of them (a scan)
// must not hold millions of keys; beyond it, the counts are lower bounds.
const maxLeftOut = 1 << 18

// leftOut counts the distinct connections that each verdict left out.
type leftOut struct {
	seen map[packet.Key]struct{}
	sum  *Summary
}

// wrap returns sel, counting what it leaves out. The demuxers asking it
// all run on the reading goroutine.
func (l *leftOut) wrap(sel func(packet.Key, *packet.Parsed, bool) selection.Verdict) func(packet.Key, *packet.Parsed, bool) selection.Verdict {
	return func(k packet.Key, p *packet.Parsed, srcIsA bool) selection.Verdict {
		v := sel(k, p, srcIsA)
		if v == selection.Save {
			return v
		}
		if _, ok := l.seen[k]; !ok {
			if len(l.seen) < maxLeftOut {
				l.seen[k] = struct{}{}
				l.sum.LeftOut[v]++
			} else {
				l.sum.LeftOutAtLeast = true
			}
		}
		return v
	}
}

// FallbackName is the name of a flow when no events are given: the UTC time
// of its first packet to the nanosecond, then its two endpoints in key order
// (IPv6 colons as dashes), e.g.
// offline_20261125T232153.694760613Z_10.99.0.1_38918_10.99.0.2_8080.
// Anonymized addresses appear as they are saved.
func FallbackName(k packet.Key, first time.Time, a *anonymize.Anonymizer) string {
	ep := func(addr [16]byte, port uint16) string {
		ip := netip.AddrFrom16(addr).Unmap()
		if a != nil {
			ip = a.Anonymized(ip).Unmap()
		}
		return fmt.Sprintf("%s_%d", strings.ReplaceAll(ip.String(), ":", "-"), port)
	}
	return fmt.Sprintf("offline_%s_%s_%s", first.UTC().Format("20060102T150405.000000000Z"), ep(k.A, k.APort), ep(k.B, k.BPort))
}

// fallbacks makes the fallback names of a run unique: the base name of
// FallbackName, then _if<N> for a pcapng interface other than the first,
// then _<n> for the nth flow with the same name (timestamps that jump
// back, one connection twice on one interface). The input's order decides,
// so the same input always gives the same names.
type fallbacks struct {
	anon *anonymize.Anonymizer
	gate pipeline.Gate
	// The names given, in two generations of at most fallbackGeneration
	// each: two flows can have one base name only if their first packets
	// have the same time to the nanosecond, so they are named close
	// together, and the names of a long capture need not all be kept
	// (the memory of TestOfflineMemoryBound).
	cur, prev map[string]int
}

const fallbackGeneration = 1 << 16

// used returns how many flows took name.
func (f *fallbacks) used(name string) int { return f.cur[name] + f.prev[name] }

func (f *fallbacks) name(k packet.Key, first time.Time, ifc int) *names.Entry {
	base := FallbackName(k, first, f.anon)
	if ifc > 0 {
		base += fmt.Sprintf("_if%d", ifc)
	}
	if len(f.cur) >= fallbackGeneration {
		f.prev, f.cur = f.cur, map[string]int{}
	}
	name := base
	for n := f.used(base) + 1; f.used(name) > 0; n++ {
		name = fmt.Sprintf("%s_%d", base, n)
	}
	f.cur[base]++
	if name != base {
		f.cur[name]++
	}
	return f.gate.Fallback(name, k, first)
}

// fallbackNamer names every flow that the table cannot name, at its first
// packet (without events there is nothing to wait for).
type fallbackNamer struct {
	t   *names.Table
	fb  *fallbacks
	ifc int
}

func (f fallbackNamer) Claim(k packet.Key, first time.Time) *names.Entry {
	if e := f.t.Claim(k, first); e != nil {
		return e
	}
	return f.fb.name(k, first, f.ifc)
}

func (f fallbackNamer) Release(e *names.Entry) {
	if e.Source != names.Fallback {
		f.t.Release(e)
	}
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
	var evs *eventStream
	cfg := o.Config
	local := append([]netip.Addr{}, o.Local...)
	if o.Events != "" {
		// The server's addresses first (anonymization keeps them), then
		// the events as the packets' clock reaches them.
		if o.Events != "-" {
			more, err := eventLocals(o.Events, nil)
			if err != nil {
				return sum, err
			}
			local = append(local, more...)
		}
		var err error
		if evs, err = openEvents(o.Events, o.Stdin); err != nil {
			return sum, err
		}
		defer evs.close()
		if o.Events == "-" { // read whole: its addresses are there
			for _, e := range evs.h {
				if e.Open {
					local = append(local, e.Local.Addr())
				}
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
	// The packets' clock, in Unix nanoseconds: the latest timestamp read.
	var clock int64
	now := func() time.Time { return time.Unix(0, clock) }
	cfg.Local, cfg.Now = local, now
	p, err := pipeline.New(cfg)
	if err != nil {
		return sum, err
	}
	sv, table := p.Saver, p.Names
	fb := &fallbacks{anon: p.Anon, gate: p.Gate(), cur: map[string]int{}}
	demuxers := map[int]*demuxer.Demuxer{} // by interface (pcapng) or 0
	lo := &leftOut{seen: map[packet.Key]struct{}{}, sum: &sum}
	unsupported := map[int]packet.LinkType{}
	get := func(ifc int) *demuxer.Demuxer {
		d, ok := demuxers[ifc]
		if !ok {
			lt := src.LinkType(ifc)
			if !lt.Supported() {
				unsupported[ifc] = lt
			}
			d = p.Demuxer(lt, func(do *demuxer.Options) {
				if do.Select != nil {
					do.Select = lo.wrap(do.Select)
				}
				if o.Events == "" {
					do.Names = fallbackNamer{t: table, fb: fb, ifc: ifc}
				} else {
					// Flows that no event names within -uuidwaitduration.
					do.Fallback = func(k packet.Key, first time.Time) *names.Entry { return fb.name(k, first, ifc) }
				}
			})
			demuxers[ifc] = d
		}
		return d
	}
	apply := func(all bool) {
		if evs == nil {
			return
		}
		for e, ok := evs.next(clock, all); ok; e, ok = evs.next(clock, all) {
			var err error
			switch {
			case !e.Open && e.Timestamp.UnixNano() > clock:
				// Past the capture's end, which is its shutdown: a live
				// daemon stopped then never hears of this close, and its
				// flow ends "shutdown" (TestCloseAfterCapture). An open
				// still names its flow: tcp-info stamps it late.
			case e.Open:
				err = p.Open(e.Timestamp, e.UUID, e.Local, e.Remote, e.Cookie)
			default:
				err = p.Close(e.Timestamp, e.UUID)
			}
			if err != nil { // a UUID that cannot name a file
				sum.BadEvents++
			} else {
				sum.Events++
			}
		}
	}

	var readErr error
	var ticks, sweeps demuxer.Schedule
	lastProgress := time.Now()
	var n uint64
	var last struct { // the last packet's interface and demuxer
		ifc int
		d   *demuxer.Demuxer
	}
	// The reader waits for the writers: a capture of many short flows,
	// read faster than the disk takes their files, would otherwise hold
	// them all in memory (TestDrainingBounded).
	maxDraining := int64(max(8, 4*runtime.GOMAXPROCS(0)))
	process := func(data []byte, ts int64, origLen, ifc int) {
		if sv.Draining() > maxDraining {
			sv.WaitDraining(maxDraining)
		}
		n++
		clock = max(clock, ts)
		apply(false)
		if last.d == nil || ifc != last.ifc {
			last.ifc, last.d = ifc, get(ifc)
		}
		// The tick that the packet's time calls for comes before the
		// packet, as the wall clock's would have live.
		if ticks.Due(clock, demuxer.TickInterval) {
			for _, d := range demuxers {
				d.Tick(now())
			}
			if sweeps.Due(clock, time.Second) {
				table.Sweep()
				sv.PublishIndex(now()) // index files close as their hours close, as live
			}
		}
		last.d.Packet(data, time.Unix(0, ts), origLen)
		if o.Progress != nil && n%4096 == 0 && time.Since(lastProgress) >= time.Second {
			lastProgress = time.Now()
			files, _, _ := sv.Written()
			fmt.Fprintf(o.Progress, "\r%d packets, %d files, at %s ", n, files, now().UTC().Format(time.RFC3339))
		}
	}
	// The clock is the packets' time, so a frame dated far ahead of the
	// others (a corrupt timestamp, a clock step in the capturing host)
	// would end every open flow at the next tick. A frame more than
	// -flowtimeout past the clock is held until ConfirmJump of them in a
	// row confirm the jump (a pause in the capture); a frame within it
	// first drops the held ones, counted as odd (TestFutureFrame). Only TCP
	// segments, frames of the flows themselves, are held and confirm it.
	guard := jumpGuard{max: int64(o.Config.FlowTimeout)}
	var tcp packet.Parsed
	for n&1023 != 0 || ctx.Err() == nil { // the context, every 1024 packets
		data, ts, origLen, ifc, err := src.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err == nil {
			err = plausible(data, origLen)
		}
		if errors.Is(err, errImpossible) {
			sum.Impossible++ // never copied, never a clock
			continue
		}
		if err != nil {
			// A reader stays past the last good record when it fails.
			readErr = fmt.Errorf("read %s: truncated or corrupt capture at offset %d (after packet %d): %w", o.Read, src.Offset(), n, err)
			break
		}
		if n > 0 && ts > clock+guard.max {
			if tcp.Decode(src.LinkType(ifc), data) != packet.TCP {
				// Not a frame of any flow: set aside, it neither confirms a
				// jump nor breaks the run of those that do (TestFutureFrame).
				sum.OddTimes++
				continue
			}
			if guard.hold(data, ts, origLen, ifc) {
				guard.release(process)
			}
			continue
		}
		sum.OddTimes += guard.drop()
		process(data, ts, origLen, ifc)
	}
	guard.release(process) // the end of the capture: nothing to confirm them
	if o.Progress != nil && n >= 4096 {
		fmt.Fprintln(o.Progress)
	}
	apply(true)
	if evs != nil {
		sum.BadEvents += evs.bad
		if readErr == nil {
			readErr = evs.err
		}
	}
	ifcs := make([]int, 0, len(demuxers))
	for ifc := range demuxers {
		ifcs = append(ifcs, ifc)
	}
	sort.Ints(ifcs)
	for _, ifc := range ifcs {
		demuxers[ifc].Tick(now())
		demuxers[ifc].Close()
	}
	p.Wait()
	if o.Config.Saver.PartialDir == "" {
		os.Remove(sv.PartialDir()) // its own, empty now: the output is only the files
	}
	sum.Unsupported = unsupportedLines(unsupported, demuxers)
	for ifc, d := range demuxers {
		c := d.Counts()
		sum.Packets += c.Captured
		sum.Undecodable += c.Packets[demuxer.Undecodable]
		if _, ok := unsupported[ifc]; ok {
			sum.UnsupportedPackets += c.Captured
		}
		sum.NamedByEvents += c.Named[names.EventSocket]
		sum.NamedByFallback += c.Named[names.Fallback]
		sum.Flows += c.Started
		sum.NoUUID += c.Packets[demuxer.NoUUID] + c.Packets[demuxer.ShutdownNoUUID]
		sum.AfterDuration += c.Packets[demuxer.AfterCaptureDuration]
		sum.NotSampled += c.Ended[demuxer.EndedNotSampled]
	}
	sum.Files, sum.Bytes, sum.WriteErrors = sv.Written()
	if readErr == nil && ctx.Err() != nil {
		readErr = ctx.Err()
	}
	return sum, readErr
}
