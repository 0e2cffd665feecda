package sockdiag

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// DefaultSilence is Options.Silence's default. tcp-info polls the socket
// table every 10 ms and announces a socket at the poll that first sees it;
// a socket that lived 200 ms saw about 20 polls, so tcp-info's silence about
// it is its exclusion rules, not a miss, unless tcp-info's polling fell
// more than 200 ms behind (TestKubernetesDropIn measures the delay of its
// announcements with both cores busy).
const DefaultSilence = 200 * time.Millisecond

// authority is what the source knows of the authoritative source's
// silences (Options.Authority): which connections it let pass unnamed, and
// the local ports it never names. Its maps are shared by the look-up and
// destroy loops, under mu; each is touched once per connection, never per
// packet.
type authority struct {
	mu       sync.Mutex
	silenced map[packet.Key]struct{} // open after Silence and not named: excluded
	// silentPorts counts the connections of each local port the
	// authority left unnamed though they lived past Silence; announced
	// says which ports it named a connection of. A port with silences and
	// no announcement is one the authority excludes (-exclude-srcport), so
	// its connections shorter than Silence are not named either.
	silentPorts map[uint16]uint32
	announced   map[uint16]bool
	held        []heldName // names waiting for Options.Ready
	// opened holds the time of the newest announcement of each family
	// (the authority's own clock: the poll that saw the socket), unix
	// nanoseconds, [0] IPv4 and [1] IPv6. tcp-info dumps IPv6 sockets
	// first, then IPv4, and announces the IPv4 ones first with the later
	// time: an IPv4 announcement says nothing of the IPv6 sockets of its
	// poll. Its Closes are no evidence at all: they are stamped when its
	// saver processed a poll, which may lag the poll by seconds on a
	// loaded machine (TestAuthorityFamilies).
	opened [2]atomic.Int64
}

// maxSilenced bounds the silenced connections remembered for their
// destroy broadcasts; past it the set starts again (a connection
// forgotten so is named at its destroy, then claimed by no flow).
const maxSilenced = 1 << 16

// heldName is a kernel name waiting until Options.Ready says the UUID
// function names as the authority does.
type heldName struct {
	ts     time.Time
	cookie uint64
	key    packet.Key
	closed bool
}

func newAuthority() *authority {
	return &authority{silenced: map[packet.Key]struct{}{},
		silentPorts: map[uint16]uint32{}, announced: map[uint16]bool{}}
}

// authoritySince reports since when the authority has been connected, if
// it is and the source defers to it.
func (s *Source) authoritySince() (time.Time, bool) {
	if s.o.Authority == nil {
		return time.Time{}, false
	}
	return s.o.Authority()
}

// Announced tells the source that the authority named a connection with
// this local end, at ts by its clock: the port is not one the authority
// excludes, and the authority has looked at the sockets of local's family
// as they were at ts. It is safe for concurrent use.
func (s *Source) Announced(ts time.Time, local netip.AddrPort) {
	raise(&s.auth.opened[family(local.Addr())], ts)
	a := s.auth
	a.mu.Lock()
	a.announced[local.Port()] = true
	a.mu.Unlock()
}

func raise(v *atomic.Int64, ts time.Time) {
	for ns := ts.UnixNano(); ; {
		old := v.Load()
		if ns <= old || v.CompareAndSwap(old, ns) {
			return
		}
	}
}

func family(a netip.Addr) int {
	if a.Unmap().Is4() {
		return 0
	}
	return 1
}

// caughtUp reports whether the authority has looked at the sockets of a
// connection with local end local since Silence after t: it announced a
// connection of the same family that it saw Silence or more after t, so
// a connection open since t that it did not announce is one it chose not
// to.
func (s *Source) caughtUp(t time.Time, local netip.AddrPort) bool {
	return s.auth.opened[family(local.Addr())].Load() >= t.Add(s.o.Silence).UnixNano()
}

// portSilent reports whether the authority excludes the local port, as
// far as its silences tell. a.mu must be held.
func (a *authority) portSilent(port uint16) bool {
	return a.silentPorts[port] > 0 && !a.announced[port]
}

// silence records that p's connection lived past Silence unnamed by the
// authority: it is remembered for its destroy broadcast, and counts
// against its local port.
func (s *Source) silence(p *pending) {
	a := s.auth
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.silenced) >= maxSilenced {
		clear(a.silenced)
	}
	a.silenced[p.key] = struct{}{}
	a.silentPorts[p.local.Port()]++
}

// shortOK reports whether a connection that ended before Silence may be
// named: not when the authority's silences show that it excludes its
// local port.
func (s *Source) shortOK(local netip.AddrPort) bool {
	s.auth.mu.Lock()
	defer s.auth.mu.Unlock()
	return !s.auth.portSilent(local.Port())
}

// destroyNameable decides whether a destroy broadcast of connection k
// names it while the authority is connected: not when it was silenced,
// nor on a port the authority excludes. Any other ended before Silence
// (its look-up is still to decide), or before its request came, or was
// never captured (then no flow claims it): it is named.
func (s *Source) destroyNameable(k packet.Key, local netip.AddrPort) bool {
	a := s.auth
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.silenced[k]; ok {
		delete(a.silenced, k)
		return false
	}
	return !a.portSilent(local.Port())
}

// name announces a kernel name, or holds it until Options.Ready.
func (s *Source) name(ts time.Time, cookie uint64, k packet.Key, closed bool) {
	if s.o.Ready != nil && !s.o.Ready() {
		s.auth.mu.Lock()
		s.auth.held = append(s.auth.held, heldName{ts: ts, cookie: cookie, key: k, closed: closed})
		s.auth.mu.Unlock()
		select {
		case s.kick <- struct{}{}:
		default:
		}
		return
	}
	u := s.o.UUID(cookie)
	s.sink.Open(ts, u, k, names.Kernel, cookie)
	if closed {
		s.sink.Close(ts, u)
	}
}

// flushHeld announces the held names once Options.Ready says so, and drops
// those held longer than GiveUp (their flows gave up on a name too). It
// reports whether names are still held.
func (s *Source) flushHeld(now time.Time) bool {
	a := s.auth
	a.mu.Lock()
	held := a.held
	if len(held) == 0 {
		a.mu.Unlock()
		return false
	}
	ready := s.o.Ready()
	if ready {
		a.held = nil
	}
	a.mu.Unlock()
	if ready {
		for _, h := range held {
			s.name(h.ts, h.cookie, h.key, h.closed)
		}
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	kept := a.held[:0]
	for _, h := range a.held {
		if now.Sub(h.ts) > s.o.GiveUp {
			s.Lookups.Inc("no_prefix")
			continue
		}
		kept = append(kept, h)
	}
	a.held = kept
	return len(kept) > 0
}
