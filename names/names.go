// Package names holds the UUIDs announced for TCP connections and hands each
// one to exactly one captured flow.
//
// Announcements (Open, Close) come from UUID sources such as tcp-info's
// eventsocket; flows claim them from the demuxers. An announcement may come
// before or after a flow's first packet. Each announcement is claimed at most
// once, so two flows never get the same UUID (a connection seen on two
// interfaces, or a flow that restarts after an idle timeout, stays unnamed
// rather than overwrite a file). A repeated Open for a UUID already known
// changes nothing, which makes a tcp-info restart harmless.
//
// The Authority source's name for a socket (the same cookie) wins over
// another source's whatever their order: an Open from the authority renames
// the socket's entry, also after a flow claimed it (the flow's file is then
// published under the new name, see Entry.Name), and the other source's
// name stays an alias for Close (TestAuthorityWinsInAnyOrder).
//
// Memory is bounded: announcements that no flow claimed are forgotten after
// the table's TTL, closed ones after a grace period, and the table holds at
// most MaxEntries of them (extra Opens are counted and dropped).
//
// A Table is safe for concurrent use. Its methods take one mutex for a map
// operation; they are called per flow and per event, never per packet.
package names

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
)

// Source is who named a connection: a closed set, the values of the
// source label of pcap_uuids_total and of the flow index's "source".
type Source string

// The sources of names.
const (
	EventSocket Source = "eventsocket" // tcp-info's eventsocket
	Kernel      Source = "kernel"      // the kernel's socket cookie (package sockdiag)
	Fallback    Source = "fallback"    // offline mode's name from the time and the 4-tuple
)

// Sources are every Source.
var Sources = []Source{EventSocket, Kernel, Fallback}

// Entry is one announced connection.
type Entry struct {
	// UUID is the name the entry was claimed with; Name returns the name
	// it has now.
	UUID     string
	Key      packet.Key
	Source   Source    // who announced it
	Cookie   uint64    // the kernel's socket cookie, 0 if unknown
	OpenedAt time.Time // the announcement's timestamp

	closedAt atomic.Int64                 // unix nanoseconds of the Close, 0 while open
	renamed  atomic.Pointer[renaming]     // the authority's name, given after the claim
	final    atomic.Pointer[index.Kernel] // the socket's counters at its destruction

	// Guarded by Table.mu.
	alias   string // another name of the entry in byUUID (the other source's)
	claimed bool
	created time.Time // when the table learnt of it (table clock)
	seen    time.Time // when the table learnt of it or last changed it (table clock)
}

// Name returns the entry's name as it is now: UUID, or the authoritative
// source's name given after a flow claimed the entry. It is safe to call
// without the table's lock.
func (e *Entry) Name() string {
	if n := e.renamed.Load(); n != nil {
		return n.name
	}
	return e.UUID
}

// NameSource returns the entry's name as it is now and the source that
// gave it. It is safe to call without the table's lock.
func (e *Entry) NameSource() (name string, source Source) {
	if n := e.renamed.Load(); n != nil {
		return n.name, n.source
	}
	return e.UUID, e.Source
}

// renaming is a name given after the claim, and its source.
type renaming struct {
	name   string
	source Source
}

// Closed returns when the connection was announced closed, or false while it
// is open. It is safe to call without the table's lock.
func (e *Entry) Closed() (time.Time, bool) {
	ns := e.closedAt.Load()
	if ns == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, ns), true
}

// Final returns the socket's counters at its destruction, nil until the
// kernel reported them (Table.Final). It is safe to call without the
// table's lock.
func (e *Entry) Final() *index.Kernel { return e.final.Load() }

// Options configures a Table. The zero value asks for the defaults.
type Options struct {
	// TTL is how long an unclaimed announcement is kept; default 1 minute.
	TTL time.Duration
	// MaxEntries bounds the number of announcements held; default 1<<20.
	MaxEntries int
	// Now is the table's clock; default time.Now.
	Now func() time.Time
	// Authority is the source whose name for a socket (same cookie) replaces
	// another source's, as long as no flow claimed that one.
	Authority Source
}

// Table maps connections to their announced UUIDs.
type Table struct {
	ttl       time.Duration
	authority Source
	max       int
	now       func() time.Time
	mu        sync.Mutex
	byKey     map[packet.Key]*Entry // the newest announcement for a connection
	byUUID    map[string]*Entry     // every open announcement by each of its names, for Close
	dropped   atomic.Uint64
	renames   atomic.Uint64
}

// New returns an empty table.
func New(opts *Options) *Table {
	t := &Table{ttl: time.Minute, max: 1 << 20, now: time.Now,
		byKey: map[packet.Key]*Entry{}, byUUID: map[string]*Entry{}}
	if opts != nil {
		if opts.TTL > 0 {
			t.ttl = opts.TTL
		}
		if opts.MaxEntries > 0 {
			t.max = opts.MaxEntries
		}
		if opts.Now != nil {
			t.now = opts.Now
		}
		t.authority = opts.Authority
	}
	return t
}

// Open records that the connection k was opened with the given UUID at ts.
// A connection already announced with the same UUID, or with the same
// non-zero socket cookie (the same socket named by another source), is not
// announced again. It reports whether the announcement was new.
func (t *Table) Open(ts time.Time, uuid string, k packet.Key, source Source, cookie uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.byUUID[uuid]; ok {
		return false
	}
	if old, ok := t.byKey[k]; ok && (old.UUID == uuid || cookie != 0 && old.Cookie == cookie) {
		if old.Name() != uuid && source == t.authority && old.Source != t.authority {
			// The authoritative source names a socket another source
			// named first (with another prefix): its name wins, and the
			// other stays an alias, for that source's Close.
			t.renames.Add(1)
			if old.alias == "" {
				old.alias = old.UUID
			}
			t.byUUID[uuid] = old
			if !old.claimed {
				old.UUID, old.Source, old.OpenedAt = uuid, source, ts
			} else {
				old.renamed.Store(&renaming{uuid, source})
			}
			return true
		}
		return false // a repeat, late or from another source
	}
	if len(t.byUUID) >= t.max || len(t.byKey) >= t.max {
		t.dropped.Add(1)
		return false
	}
	now := t.now()
	e := &Entry{UUID: uuid, Key: k, Source: source, Cookie: cookie, OpenedAt: ts, created: now, seen: now}
	t.byUUID[uuid] = e
	t.byKey[k] = e
	return true
}

// Close records that the connection with the given UUID closed at ts. It
// reports whether the UUID was known.
func (t *Table) Close(ts time.Time, uuid string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byUUID[uuid]
	if !ok {
		return false
	}
	t.forget(e)
	ns := ts.UnixNano()
	if ns == 0 {
		ns = 1
	}
	e.closedAt.Store(ns)
	e.seen = t.now()
	return true
}

// Final gives the counters c of the destroyed socket with this cookie, of
// connection k, to its entry: the one named uuid, or the newest for k if
// it has the cookie. It reports whether there was one.
func (t *Table) Final(uuid string, k packet.Key, cookie uint64, c *index.Kernel) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byUUID[uuid]
	if !ok || e.Cookie != cookie && e.Cookie != 0 {
		if e, ok = t.byKey[k]; !ok || e.Cookie != cookie {
			return false
		}
	}
	e.final.Store(c)
	return true
}

// Claim hands the announcement for connection k to a flow whose first packet
// was at first, if there is one that no other flow claimed and that did not
// close before the flow began (an earlier connection on the same 4-tuple).
func (t *Table) Claim(k packet.Key, first time.Time) *Entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byKey[k]
	if !ok || e.claimed {
		return nil
	}
	if closed, ok := e.Closed(); ok && closed.Before(first) {
		return nil
	}
	e.claimed = true
	return e
}

// Release says that the flow that claimed e has ended. The announcement is
// kept while the connection is open, so that a repeated Open cannot name a
// second flow, and forgotten after the TTL once closed.
func (t *Table) Release(e *Entry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.seen = t.now()
}

// Sweep forgets announcements that can no longer be claimed: closed ones
// and unclaimed ones older than the TTL. Claimed open announcements are kept
// for four TTLs, in case their Close never comes. It returns how many
// entries remain.
func (t *Table) Sweep() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	for k, e := range t.byKey {
		_, closed := e.Closed()
		age := now.Sub(e.seen)
		if (closed || !e.claimed) && age > t.ttl || age > 4*t.ttl {
			delete(t.byKey, k)
			t.forget(e)
		}
	}
	for u, e := range t.byUUID {
		if t.byKey[e.Key] != e && now.Sub(e.seen) > 4*t.ttl {
			delete(t.byUUID, u) // replaced for its key and never closed
		}
	}
	return len(t.byKey)
}

// forget removes e's names from byUUID.
func (t *Table) forget(e *Entry) {
	for _, n := range [...]string{e.UUID, e.alias, e.Name()} {
		if n != "" && t.byUUID[n] == e {
			delete(t.byUUID, n)
		}
	}
}

// NamedSince reports whether connection k has an announcement that a new
// flow could claim (open and not claimed yet), or one that arrived at or
// after t (by the table's clock).
func (t *Table) NamedSince(k packet.Key, since time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byKey[k]
	if !ok {
		return false
	}
	if !e.created.Before(since) {
		return true
	}
	_, closed := e.Closed()
	return !e.claimed && !closed
}

// Len returns the number of connections with an announcement.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.byKey)
}

// Dropped returns how many Opens were dropped because the table was full.
func (t *Table) Dropped() uint64 { return t.dropped.Load() }

// Renames returns how many entries the authority renamed.
func (t *Table) Renames() uint64 { return t.renames.Load() }

// Prefix is the prefix of the UUIDs made from socket cookies, as
// m-lab/uuid makes them (<prefix>_<cookie as 16 upper-case hex digits>),
// which may be learnt from another source's names: without a prefix file
// shared with tcp-info, its made-up prefix can differ from this process's
// by a second (TestLearnPrefix). It is safe for concurrent use.
type Prefix struct {
	p      atomic.Pointer[string]
	learnt atomic.Bool
}

// NewPrefix returns a prefix that starts as p.
func NewPrefix(p string) *Prefix {
	x := &Prefix{}
	x.p.Store(&p)
	return x
}

// String returns the prefix as it is now.
func (x *Prefix) String() string { return *x.p.Load() }

// FromCookie names a socket cookie with the prefix.
func (x *Prefix) FromCookie(cookie uint64) string {
	return fmt.Sprintf("%s_%016X", *x.p.Load(), cookie)
}

// Learnt reports whether a prefix was learnt.
func (x *Prefix) Learnt() bool { return x.learnt.Load() }

// Learn takes the prefix of uuid, the name another source gave the socket
// with this cookie, the first time it is called with a name of that form.
// It returns the prefix learnt and true when it changed the prefix.
func (x *Prefix) Learn(uuid string, cookie uint64) (string, bool) {
	suffix := fmt.Sprintf("_%016X", cookie)
	if cookie == 0 || x.learnt.Load() || len(uuid) <= len(suffix) || uuid[len(uuid)-len(suffix):] != suffix {
		return "", false
	}
	if !x.learnt.CompareAndSwap(false, true) {
		return "", false
	}
	p := uuid[:len(uuid)-len(suffix)]
	old := x.p.Swap(&p)
	return p, *old != p
}
