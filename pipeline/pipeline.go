// Package pipeline builds everything downstream of the packet sources, the
// same way for the live daemon and for offline mode: the saver, the names
// table (and the rule for how long an announcement waits), the anonymizer,
// the flow limits and each demuxer's options. It is also the one path from
// a UUID announcement into the names table, and checks there that the
// announced UUID can name a file.
//
// The composition roots (package main for live capture, package offline)
// give it the sources and a clock; it imports no capture code and builds
// without cgo.
package pipeline

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/selection"
)

// Config is what the pipeline is built from.
type Config struct {
	Saver           saver.Options
	MaxHeaderSize   int
	CaptureDuration time.Duration
	FlowTimeout     time.Duration
	UUIDWait        time.Duration
	Stream          bool
	Anonymize       anonymize.Mode
	Key             []byte // the key of anonymize.Keyed mode and of TSOffset
	ZeroMAC         bool   // see anonymize.Config
	TSOffset        bool   // see anonymize.Config
	// Local are the server's addresses, which anonymization keeps and
	// which tell the local end of a connection for Exclude.
	Local []netip.Addr
	// Exclude are the connections never saved, tcp-info's rules (nil: the
	// local addresses only, which tcp-info always excludes).
	Exclude *exclude.Rules
	// Ports, Outgoing and Strict select the connections saved (package
	// selection): the local ports (nil: all), the connections this host
	// opened too, and only those with a local end (live).
	Ports    *selection.Ports
	Outgoing bool
	Strict   bool
	// KeepLocal keeps the connections that tcp-info's always-on local rule
	// excludes (offline without -exclude-local).
	KeepLocal bool
	// Sample chooses one named connection in N (nil: all).
	Sample *selection.Sample
	// Authoritative makes tcp-info's announcements win over the kernel's
	// names for the same socket (live mode with an eventsocket).
	Authoritative bool
	MaxFlows      int64  // 0: no limit
	MaxHeap       uint64 // 0: no limit
	// Now is the names table's clock: nil for the wall clock; offline
	// mode's is the packets' time.
	Now func() time.Time
}

// Check returns a one-line reason, naming the flag, for a setting that
// neither mode can run with.
func (c *Config) Check() error {
	switch {
	case c.CaptureDuration <= 0:
		return fmt.Errorf("-captureduration must be positive, not %v", c.CaptureDuration)
	case c.FlowTimeout <= 0:
		return fmt.Errorf("-flowtimeout must be positive, not %v", c.FlowTimeout)
	case c.UUIDWait <= 0:
		return fmt.Errorf("-uuidwaitduration must be positive, not %v", c.UUIDWait)
	case c.UUIDWait > c.CaptureDuration:
		return fmt.Errorf("-uuidwaitduration (%v) must not exceed -captureduration (%v)", c.UUIDWait, c.CaptureDuration)
	case c.MaxHeaderSize < 64 || c.MaxHeaderSize > 65535:
		return fmt.Errorf("-maxheadersize must be between 64 and 65535, not %d", c.MaxHeaderSize)
	}
	return nil
}

// Pipeline is the shared part of a run. Its fields are for the
// composition root: to wire sources to it, report on it and shut it down.
type Pipeline struct {
	Saver  *saver.Saver
	Names  *names.Table
	Anon   *anonymize.Anonymizer
	Limits *demuxer.Limits
	// Select decides which connections are saved; live mode keeps its
	// local addresses and listening ports up to date.
	Select *selection.Policy
	c      Config
	writer demuxer.Writer
}

// New builds the pipeline; it fails only when the saver cannot use its
// directories, or the Crypto-PAn key is not one.
func New(c Config) (*Pipeline, error) {
	anon, err := anonymize.NewConfig(anonymize.Config{Mode: c.Anonymize, Local: c.Local, Key: c.Key, ZeroMAC: c.ZeroMAC, TSOffset: c.TSOffset})
	if err != nil {
		return nil, err
	}
	if c.Saver.Snaplen == 0 {
		c.Saver.Snaplen = c.MaxHeaderSize // the files' snaplen is the records' longest
	}
	if c.Exclude == nil {
		c.Exclude = &exclude.Rules{}
	}
	c.Exclude.SetLocal(c.Local)
	sel := &selection.Policy{Exclude: c.Exclude, Ports: c.Ports, Outgoing: c.Outgoing, Strict: c.Strict, KeepLocal: c.KeepLocal}
	sel.SetLocal(c.Local)
	sv, err := saver.New(c.Saver)
	if err != nil {
		return nil, err
	}
	// An announcement that no flow claimed within this long never will be.
	o := &names.Options{TTL: max(c.CaptureDuration, c.FlowTimeout) + c.UUIDWait, Now: c.Now}
	if c.Authoritative {
		o.Authority = names.EventSocket
	}
	return &Pipeline{
		Saver:  sv,
		Names:  names.New(o),
		Anon:   anon,
		Limits: &demuxer.Limits{MaxFlows: c.MaxFlows, MaxHeap: c.MaxHeap},
		Select: sel,
		c:      c,
		writer: demuxer.WriterFunc(func(u string, lt packet.LinkType, first time.Time) demuxer.FlowWriter {
			return sv.Start(u, lt, first)
		}),
	}, nil
}

// Demuxer returns a demuxer for the frames of one interface, of link type
// lt, with the pipeline's options; with, when not nil, adds the source's
// own (a kernel look-up, a fallback namer).
func (p *Pipeline) Demuxer(lt packet.LinkType, with func(*demuxer.Options)) *demuxer.Demuxer {
	o := demuxer.Options{
		LinkType: lt, MaxHeaderSize: p.c.MaxHeaderSize,
		CaptureDuration: p.c.CaptureDuration, FlowTimeout: p.c.FlowTimeout, UUIDWait: p.c.UUIDWait,
		Stream: p.c.Stream, Names: p.Names, Writer: p.writer, Anonymizer: p.Anon, Limits: p.Limits,
		Select: p.Select.Decide,
	}
	if p.c.Sample != nil {
		o.Sample, o.SampleRate = p.c.Sample.Chosen, p.c.Sample.Rate()
	}
	if with != nil {
		with(&o)
	}
	return demuxer.New(o)
}

// SampleRate is the sample's N: one named connection in N is saved.
func (p *Pipeline) SampleRate() int { return p.c.Sample.Rate() }

// Excluded reports whether the connection between local and remote is
// never saved (Config.Exclude): the kernel source asks before naming one.
func (p *Pipeline) Excluded(local, remote netip.AddrPort) bool {
	return p.c.Exclude.Excluded(local, remote) || p.c.Ports != nil && !p.c.Ports.Has(local.Port())
}

// Open announces a connection tcp-info opened. A UUID that cannot name a
// file is refused with an error wrapping saver.ErrBadUUID, and changes
// nothing (TestAnnouncements).
func (p *Pipeline) Open(ts time.Time, uuid string, local, remote netip.AddrPort, cookie uint64) error {
	if err := saver.CheckUUID(uuid); err != nil {
		return fmt.Errorf("Open of %v-%v: %w", local, remote, err)
	}
	p.Gate().Open(ts, uuid, packet.KeyFromAddrPorts(local, remote), names.EventSocket, cookie)
	return nil
}

// Close announces that tcp-info saw a connection close; a UUID that
// cannot name a file is refused, as by Open.
func (p *Pipeline) Close(ts time.Time, uuid string) error {
	if err := saver.CheckUUID(uuid); err != nil {
		return fmt.Errorf("Close: %w", err)
	}
	p.Gate().Close(ts, uuid)
	return nil
}

// Gate is the one path of every name to the names table, whatever its
// source: tcp-info's announcements (Pipeline.Open and Close), the
// kernel's (package sockdiag takes a Gate as its Sink) and offline mode's
// fallback names (Fallback). Each name is checked once here (saver.CheckUUID:
// it must be able to name a file); one that cannot changes nothing
// (TestGate).
type Gate struct{ p *Pipeline }

// Gate returns the pipeline's gate.
func (p *Pipeline) Gate() Gate { return Gate{p} }

// Open announces connection k, opened at ts, named uuid by source, and
// reports whether the table took it.
func (g Gate) Open(ts time.Time, uuid string, k packet.Key, source names.Source, cookie uint64) bool {
	return saver.CheckUUID(uuid) == nil && g.p.Names.Open(ts, uuid, k, source, cookie)
}

// Close announces that the connection named uuid closed at ts, and
// reports whether the table knew it.
func (g Gate) Close(ts time.Time, uuid string) bool {
	return saver.CheckUUID(uuid) == nil && g.p.Names.Close(ts, uuid)
}

// Final gives a destroyed socket's counters to its connection's entry
// (names.Table.Final).
func (g Gate) Final(uuid string, k packet.Key, cookie uint64, c *index.Kernel) bool {
	return g.p.Names.Final(uuid, k, cookie, c)
}

// NamedSince reports whether connection k has an announcement a flow may
// still claim, or one made since t (names.Table.NamedSince).
func (g Gate) NamedSince(k packet.Key, t time.Time) bool { return g.p.Names.NamedSince(k, t) }

// Fallback returns the entry of a name that offline mode made up for
// connection k, whose first packet came at first (names.Fallback), or nil
// if the name cannot name a file. Fallback names are the demuxer's own and
// never enter the table.
func (g Gate) Fallback(name string, k packet.Key, first time.Time) *names.Entry {
	if saver.CheckUUID(name) != nil {
		return nil
	}
	return &names.Entry{UUID: name, Key: k, Source: names.Fallback, OpenedAt: first}
}

// Wait waits until every flow handed to the saver is written, with its
// index record, and publishes the index files still open.
func (p *Pipeline) Wait() {
	p.Saver.Wait()
	p.Saver.PublishIndex(time.Time{})
}
