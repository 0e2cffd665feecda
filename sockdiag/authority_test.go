package sockdiag

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/m-lab/uuid"

	"github.com/m-lab/packet-headers/names"
)

// authorityFake stands in for tcp-info's eventsocket client: connected
// since a time, or not.
type authorityFake struct {
	since atomic.Int64 // unix nanoseconds; 0: not connected
}

func (a *authorityFake) get() (time.Time, bool) {
	ns := a.since.Load()
	return time.Unix(0, ns), ns != 0
}

func sockOn(localPort, remotePort uint16, cookie uint64, state uint8) Socket {
	return Socket{Local: netip.AddrPortFrom(server, localPort), Remote: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), remotePort), Cookie: cookie, State: state}
}

func startAuthoritySource(t *testing.T, tbl *names.Table, lk, ds Conn, o Options) *Source {
	if o.Local == nil {
		o.Local = local
	}
	o.UUID, o.GiveUp, o.Delay = uuid.FromCookie, 2*time.Second, time.Millisecond
	s := NewSource(tbl, o)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.RunLookups(ctx, lk) }()
	go func() { defer wg.Done(); s.RunDestroy(ctx, ds) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return s
}

// waitCount waits until the named result was counted n times.
func waitCount(t *testing.T, what string, get func() uint64, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if get() >= n {
			return
		}
	}
	t.Fatalf("%s counted %d times, want %d", what, get(), n)
}

// TestAuthoritySilence: while tcp-info is connected, a connection still
// open Silence after its request and not announced by it is one its rules
// excluded, and the kernel does not name it, not even at its destroy; one
// that ended sooner is named; one tcp-info announced is left to it; a
// local port whose connections tcp-info only ever left unnamed is excluded
// for short connections too, until tcp-info announces one of it.
func TestAuthoritySilence(t *testing.T) {
	tbl := names.New(&names.Options{Authority: "eventsocket"})
	lk, ds := newFake(), newFake()
	var auth authorityFake
	auth.since.Store(time.Now().Add(-time.Minute).UnixNano())
	src := startAuthoritySource(t, tbl, lk, ds, Options{Authority: auth.get, Silence: 50 * time.Millisecond})

	long := sockOn(9100, 1000, 11, StateEstablished)    // an excluded port's long connection
	short := sockOn(443, 1001, 12, StateEstablished)    // ends before tcp-info could see it
	told := sockOn(443, 1002, 13, StateEstablished)     // tcp-info announces it
	timewait := sockOn(443, 1003, 14, StateEstablished) // closes early, then sits in TIME_WAIT
	for _, s := range []Socket{long, short, told, timewait} {
		lk.set(s)
		src.Request(keyOf(s))
	}
	tbl.Open(time.Now(), "tcpinfo_1_000000000000000D", keyOf(told), "eventsocket", 13)
	src.Announced(time.Now(), told.Local)
	// tcp-info goes on announcing: it has looked at the sockets well after
	// these were made, so its silence about them is a decision.
	src.Announced(time.Now().Add(time.Hour), netip.AddrPortFrom(server, 8443))
	waitCount(t, "found", func() uint64 { return src.Lookups.Get("found") + src.Lookups.Get("already_named") }, 4)
	lk.remove(short)
	tw := timewait
	tw.State = StateTimeWait
	lk.set(tw)
	waitCount(t, "silenced", func() uint64 { return src.Lookups.Get("silenced") }, 1)
	waitCount(t, "short", func() uint64 { return src.Lookups.Get("short") }, 2)
	if tbl.NamedSince(keyOf(long), time.Time{}) {
		t.Error("a connection open past Silence and not announced by tcp-info was named")
	}
	for _, s := range []Socket{short, timewait} {
		if e := waitClaim(t, tbl, keyOf(s)); e.UUID != uuid.FromCookie(s.Cookie) {
			t.Errorf("short connection named %s", e.UUID)
		} else if _, closed := e.Closed(); !closed {
			t.Errorf("a short connection must be announced closed")
		}
	}
	if e := waitClaim(t, tbl, keyOf(told)); e.Source != "eventsocket" {
		t.Errorf("tcp-info's connection named by %s", e.Source)
	}

	// Its destroy names it no more than its look-up did.
	closed := long
	closed.State = StateClose
	ds.push(diagReply(0, closed))
	waitCount(t, "destroy silenced", func() uint64 { return src.Destroys.Get("silenced") }, 1)
	if tbl.NamedSince(keyOf(long), time.Time{}) {
		t.Error("a silenced connection was named by its destroy broadcast")
	}
	// A short connection of that port: not named, by look-up or destroy.
	shortEx := sockOn(9100, 1004, 15, StateEstablished)
	lk.set(shortEx)
	src.Request(keyOf(shortEx))
	waitCount(t, "found", func() uint64 { return src.Lookups.Get("found") + src.Lookups.Get("already_named") }, 5)
	lk.remove(shortEx)
	waitCount(t, "excluded", func() uint64 { return src.Lookups.Get("excluded") }, 1)
	unseen := sockOn(9100, 1005, 16, StateClose)
	ds.push(diagReply(0, unseen))
	waitCount(t, "destroy silenced", func() uint64 { return src.Destroys.Get("silenced") }, 2)
	for _, s := range []Socket{shortEx, unseen} {
		if tbl.NamedSince(keyOf(s), time.Time{}) {
			t.Errorf("a connection of a port tcp-info silences was named (%v)", s.Remote)
		}
	}
	// Once tcp-info announces a connection of the port, its short ones
	// are named again.
	src.Announced(time.Now(), long.Local)
	again := sockOn(9100, 1006, 17, StateClose)
	ds.push(diagReply(0, again))
	waitClaim(t, tbl, keyOf(again))

	// Without tcp-info connected, the kernel names at once, as before.
	auth.since.Store(0)
	alone := sockOn(443, 1007, 18, StateEstablished)
	lk.set(alone)
	src.Request(keyOf(alone))
	if e := waitClaim(t, tbl, keyOf(alone)); e.UUID != uuid.FromCookie(18) {
		t.Errorf("named %s", e.UUID)
	}
}

// TestAuthorityReconnect: a connection requested while tcp-info was
// connected, which reconnected before the decision, is named: events of the
// gap may be lost, so the silence says nothing.
func TestAuthorityReconnect(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	var auth authorityFake
	auth.since.Store(time.Now().Add(-time.Minute).UnixNano())
	src := startAuthoritySource(t, tbl, lk, ds, Options{Authority: auth.get, Silence: 50 * time.Millisecond})
	s := sockOn(443, 2000, 21, StateEstablished)
	lk.set(s)
	src.Request(keyOf(s))
	waitCount(t, "found", func() uint64 { return src.Lookups.Get("found") }, 1)
	auth.since.Store(time.Now().UnixNano())
	waitClaim(t, tbl, keyOf(s))
}

// TestHeldUntilReady: names found before the authority's prefix is known
// wait for it; those still waiting after GiveUp are dropped.
func TestHeldUntilReady(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	var ready atomic.Bool
	prefix := names.NewPrefix("made_up_unsafe")
	src := startAuthoritySource(t, tbl, lk, ds, Options{Ready: ready.Load})
	src.o.UUID = prefix.FromCookie
	s := sockOn(443, 3000, 0x31, StateClose)
	ds.push(diagReply(0, s))
	waitCount(t, "named", func() uint64 { return src.Destroys.Get("named") }, 1)
	time.Sleep(30 * time.Millisecond)
	if tbl.NamedSince(keyOf(s), time.Time{}) {
		t.Fatal("named before the prefix was known")
	}
	prefix.Learn("tcpinfo_7_0000000000000031", 0x31)
	ready.Store(true)
	if e := waitClaim(t, tbl, keyOf(s)); e.UUID != "tcpinfo_7_0000000000000031" {
		t.Errorf("named %s, want tcp-info's prefix", e.UUID)
	}
}

// TestExcludedNeverNamed: connections the rules exclude are neither
// looked up nor named by their destroy broadcasts.
func TestExcludedNeverNamed(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	src := startAuthoritySource(t, tbl, lk, ds, Options{Exclude: func(l, r netip.AddrPort) bool { return l.Port() == 9100 }})
	s := sockOn(9100, 4000, 41, StateEstablished)
	lk.set(s)
	src.Request(keyOf(s))
	s.State = StateClose
	ds.push(diagReply(0, s))
	waitCount(t, "excluded", func() uint64 { return src.Lookups.Get("excluded") + src.Destroys.Get("excluded") }, 2)
	if tbl.Len() != 0 {
		t.Errorf("%d names for an excluded connection", tbl.Len())
	}
}

// TestAuthorityBehind: a connection still open Silence after its request,
// while tcp-info has announced nothing it saw later (it is behind, on a
// loaded machine), is not taken for excluded: the kernel names it once
// half the give-up time has passed, and it is counted.
func TestAuthorityBehind(t *testing.T) {
	tbl := names.New(&names.Options{Authority: "eventsocket"})
	lk, ds := newFake(), newFake()
	var auth authorityFake
	auth.since.Store(time.Now().Add(-time.Minute).UnixNano())
	src := startAuthoritySource(t, tbl, lk, ds, Options{Authority: auth.get, Silence: 50 * time.Millisecond})
	src.Announced(time.Now().Add(-time.Second), netip.AddrPortFrom(server, 443)) // its last word, before the connection
	s := sockOn(443, 5000, 51, StateEstablished)
	lk.set(s)
	asked := time.Now()
	src.Request(keyOf(s))
	e := waitClaim(t, tbl, keyOf(s))
	if e.UUID != uuid.FromCookie(51) || src.Lookups.Get("behind") != 1 || src.Lookups.Get("silenced") != 0 {
		t.Errorf("named %s; behind %d, silenced %d", e.UUID, src.Lookups.Get("behind"), src.Lookups.Get("silenced"))
	}
	if d := time.Since(asked); d < time.Second-50*time.Millisecond {
		t.Errorf("named after %v, before half the give-up time (1 s) for tcp-info to catch up", d)
	}
}

// TestAuthorityFamilies: tcp-info dumps IPv6 sockets, then IPv4 ones, and
// announces the IPv4 ones first, stamped later; it stamps a Close when its
// saver processes a poll, seconds after the poll on a loaded machine.
// Neither proves it has looked at an IPv6 socket: an unannounced IPv6
// connection is silenced only once tcp-info announced an IPv6 connection
// it saw Silence after it.
func TestAuthorityFamilies(t *testing.T) {
	server6 := netip.MustParseAddr("2001:db8::1")
	tbl := names.New(&names.Options{Authority: "eventsocket"})
	lk, ds := newFake(), newFake()
	var auth authorityFake
	auth.since.Store(time.Now().Add(-time.Minute).UnixNano())
	const silence = 50 * time.Millisecond
	src := startAuthoritySource(t, tbl, lk, ds, Options{Authority: auth.get, Silence: silence,
		Local: []netip.Addr{server, server6}})
	s := Socket{Local: netip.AddrPortFrom(server6, 443), Remote: netip.AddrPortFrom(netip.MustParseAddr("2001:db8::9"), 6000),
		Cookie: 61, State: StateEstablished}
	lk.set(s)
	asked := time.Now()
	src.Request(keyOf(s))
	src.Announced(asked.Add(time.Hour), netip.AddrPortFrom(server, 443)) // a later IPv4 announcement
	waitCount(t, "found", func() uint64 { return src.Lookups.Get("found") }, 1)
	time.Sleep(4 * silence)
	if n := src.Lookups.Get("silenced"); n != 0 {
		t.Fatalf("silenced on another family's announcement")
	}
	src.Announced(asked.Add(time.Hour), netip.AddrPortFrom(server6, 8443))
	waitCount(t, "silenced", func() uint64 { return src.Lookups.Get("silenced") }, 1)
	if tbl.NamedSince(keyOf(s), time.Time{}) {
		t.Error("a silenced connection was named")
	}
}
