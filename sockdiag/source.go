package sockdiag

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

// Sink takes the names found. *names.Table implements it.
type Sink interface {
	Open(ts time.Time, uuid string, k packet.Key, source names.Source, cookie uint64) bool
	Close(ts time.Time, uuid string) bool
	// Final gives a destroyed socket's counters to the entry of its
	// connection (names.Table.Final).
	Final(uuid string, k packet.Key, cookie uint64, c *index.Kernel) bool
	// NamedSince reports whether connection k has an announcement that a
	// flow may still claim, or one made since t.
	NamedSince(k packet.Key, t time.Time) bool
}

// Options configures a Source.
type Options struct {
	// Local are the addresses a connection's local end may have.
	Local []netip.Addr
	// IsLocal, when set, says instead whether an address is this host's,
	// as it is at the time of the look-up: a connection to an address
	// added after the start is looked up too (TestLocalFollowed).
	IsLocal func(netip.Addr) bool
	// UUID names a cookie; uuid.FromCookie in the daemon.
	UUID func(cookie uint64) string
	// Delay is how long after a request the first look-up is made; default
	// none. With tcp-info running, a delay lets tcp-info name the connection
	// first. (A look-up that finds the request socket of a connection whose
	// handshake the kernel has not finished yet is retried.)
	Delay time.Duration
	// GiveUp is how long look-ups are retried (for a socket not yet
	// established, or not found yet); default 5s.
	GiveUp time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
	// NoDestroy says that the destroy broadcasts are not read (the process
	// lacks CAP_NET_ADMIN): a look-up that gives up then leaves its
	// connection unnamed, counted as gave_up_no_broadcasts.
	NoDestroy bool
	// Exclude, when set, says which connections are never named.
	Exclude func(local, remote netip.AddrPort) bool
	// Authority, when set, reports since when the authoritative source
	// (tcp-info's eventsocket) has been connected without a break. While
	// it is, its silence is a decision: a connection it has not named
	// Silence after its request, and that is still open then, is one its
	// exclusion rules left out, and is not named here either (silenced);
	// the kernel names only connections that ended sooner, which it could
	// not have seen (short), and not those of a local port it only ever
	// silenced (excluded). TestAuthoritySilence.
	Authority func() (since time.Time, ok bool)
	// Silence is how long a connection must have lived for the
	// authority's silence about it to count; default DefaultSilence.
	Silence time.Duration
	// Selected, when set, reports whether a destroyed socket between local
	// and remote may be a connection the daemon saves (package selection's
	// Policy.Nameable): others are not named (not_selected), so that the
	// names table holds only what a flow may claim.
	Selected func(local, remote netip.AddrPort) bool
	// Ready, when set, reports whether UUID names cookies as the authority
	// does (its prefix is known). Names found before are held, and
	// announced once it does, or dropped after GiveUp (no_prefix), so that
	// no file takes a made-up prefix while the authority has a real one.
	Ready func() bool
}

// Source names connections from the kernel's socket cookies.
type Source struct {
	o    Options
	sink Sink
	reqs chan packet.Key
	auth *authority
	kick chan struct{} // wakes RunLookups when a name is held

	// Counters, read by the daemon's metrics, tests and benchmarks.
	Sends, Receives atomic.Uint64     // netlink system calls of the look-ups
	Lookups         *metrics.Counters // look-ups by LookupResults
	Destroys        *metrics.Counters // destroy broadcasts by DestroyResults
}

// LookupResults are the results of a look-up: found, not_found,
// not_established (not yet, or no longer), already_named (by the other
// source), not_local (no local end), queue_full, gave_up, gave_up_no_broadcasts
// (given up without the destroy broadcasts, which would name it), error,
// malformed (an answer that cannot be parsed); with Options.Exclude,
// excluded; with Options.Authority, silenced (open after Silence and not
// named by the authority), short (ended before: named here) and
// excluded (ended before, on a port the authority silences), behind
// (named here: the authority had announced nothing newer by half the
// give-up time); with Options.Ready, no_prefix (a name held until GiveUp,
// then dropped).
var LookupResults = []string{"found", "not_found", "not_established", "already_named", "not_local", "queue_full", "gave_up", "gave_up_no_broadcasts", "error", "malformed", "excluded", "silenced", "short", "behind", "no_prefix"}

// DestroyResults are the results of a destroy broadcast: named,
// disconnected (closed with SO_LINGER 0: no remote port), ignored
// (listeners), lost (the socket's buffer overflowed), malformed, excluded
// (Options.Exclude), not_selected (Options.Selected), silenced (a connection
// the authority left unnamed, or on a port it silences).
var DestroyResults = []string{"named", "disconnected", "ignored", "lost", "malformed", "excluded", "not_selected", "silenced"}

const (
	batchMax        = 64
	queueLen        = 1 << 14
	retryHandshake  = 500 * time.Microsecond
	fastRetries     = 40 // 20 ms of quick retries while the handshake completes
	retrySlow       = 50 * time.Millisecond
	notFoundRetries = 1
)

// NewSource returns a source that puts the names it finds into sink.
func NewSource(sink Sink, o Options) *Source {
	if o.GiveUp <= 0 {
		o.GiveUp = 5 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Silence <= 0 {
		o.Silence = DefaultSilence
	}
	return &Source{o: o, sink: sink, reqs: make(chan packet.Key, queueLen), auth: newAuthority(), kick: make(chan struct{}, 1),
		Lookups: metrics.NewCounters(LookupResults...), Destroys: metrics.NewCounters(DestroyResults...)}
}

// Request asks for connection k to be named, once its handshake is
// complete. It never blocks: when the queue is full the request is dropped,
// counted, and the connection may still be named by its destroy broadcast.
// It is safe for concurrent use.
func (s *Source) Request(k packet.Key) {
	select {
	case s.reqs <- k:
	default:
		s.Lookups.Inc("queue_full")
	}
}

type pending struct {
	key           packet.Key
	local, remote netip.AddrPort
	asked         time.Time
	due, giveUp   time.Time
	notFound      int  // answers without a connection
	handshake     bool // the last answer was a request socket: the child comes soon
	fast          int  // quick retries made for a request socket
	// With the authority connected at the request: since when it was,
	// and, once found, the socket's cookie (the look-up due at
	// asked+Silence then decides).
	watched bool
	since   time.Time
	cookie  uint64
}

// localEnds orders k's endpoints as (local, remote), or reports that
// neither end is a local address.
func (s *Source) localEnds(k packet.Key) (local, remote netip.AddrPort, ok bool) {
	a := netip.AddrPortFrom(netip.AddrFrom16(k.A).Unmap(), k.APort)
	b := netip.AddrPortFrom(netip.AddrFrom16(k.B).Unmap(), k.BPort)
	if s.o.IsLocal != nil {
		switch {
		case s.o.IsLocal(a.Addr()):
			return a, b, true
		case s.o.IsLocal(b.Addr()):
			return b, a, true
		}
		return a, b, false
	}
	for _, l := range s.o.Local {
		if l == a.Addr() {
			return a, b, true
		}
		if l == b.Addr() {
			return b, a, true
		}
	}
	return a, b, false
}

// RunLookups serves requests with look-ups on conn until ctx is done, then
// closes conn.
func (s *Source) RunLookups(ctx context.Context, conn Conn) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	var queue []*pending
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var seq uint32
	buf := make([]byte, 64<<10)
	for {
		next := time.Hour
		now := s.o.Now()
		for _, p := range queue {
			next = min(next, p.due.Sub(now))
		}
		if s.o.Ready != nil && s.flushHeld(now) {
			next = min(next, 10*time.Millisecond)
		}
		timer.Reset(max(next, 0))
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
			continue
		case k := <-s.reqs:
			l, r, ok := s.localEnds(k)
			if !ok {
				s.Lookups.Inc("not_local")
				continue
			}
			if s.o.Exclude != nil && s.o.Exclude(l, r) {
				s.Lookups.Inc("excluded")
				continue
			}
			now := s.o.Now()
			p := &pending{key: k, local: l, remote: r, asked: now, due: now.Add(s.o.Delay), giveUp: now.Add(s.o.GiveUp)}
			if since, ok := s.authoritySince(); ok && since.Before(now) {
				p.watched, p.since = true, since
			}
			queue = append(queue, p)
			continue
		case <-timer.C:
		}
		// Every look-up that is due goes out now, in batches.
		now = s.o.Now()
		var due []*pending
		rest := queue[:0]
		for _, p := range queue {
			switch {
			case s.sink.NamedSince(p.key, p.asked):
				s.Lookups.Inc("already_named")
			case !p.due.After(now):
				due = append(due, p)
			default:
				rest = append(rest, p)
			}
		}
		queue = rest
		for len(due) > 0 {
			batch := due[:min(len(due), batchMax)]
			due = due[len(batch):]
			retry, err := s.lookup(conn, batch, &seq, buf)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
					return nil
				}
				s.Lookups.Add("error", uint64(len(retry)))
			}
			queue = append(queue, s.reschedule(retry)...)
		}
	}
}

// reschedule decides when to look again, or to give up.
func (s *Source) reschedule(retry []*pending) []*pending {
	now := s.o.Now()
	var out []*pending
	for _, p := range retry {
		switch {
		case p.cookie != 0:
			// Found with the authority connected: due at asked+Silence.
		case now.After(p.giveUp) || p.notFound > notFoundRetries:
			// Not found twice after its handshake: closed before it could
			// be looked up (its destroy broadcast names it), or a socket in
			// another network namespace (never named).
			if s.o.NoDestroy {
				s.Lookups.Inc("gave_up_no_broadcasts")
			} else {
				s.Lookups.Inc("gave_up")
			}
			continue
		case p.handshake && p.fast < fastRetries:
			// The kernel is finishing the handshake: look again soon,
			// before a connection that lasts a few milliseconds is gone.
			p.fast++
			p.due = now.Add(retryHandshake)
		default:
			p.due = now.Add(retrySlow)
		}
		out = append(out, p)
	}
	return out
}

// lookup sends one batch of requests and reads the replies. It returns the
// requests to try again: sockets not found or not established yet.
func (s *Source) lookup(conn Conn, batch []*pending, seq *uint32, buf []byte) (retry []*pending, err error) {
	bySeq := make(map[uint32]*pending, len(batch))
	req := make([]byte, 0, len(batch)*(nlmsgHdrLen+reqV2Len))
	for _, p := range batch {
		*seq++
		bySeq[*seq] = p
		req = AppendRequest(req, *seq, p.local, p.remote)
	}
	s.Sends.Add(1)
	if err := conn.Send(req); err != nil {
		return batch, err
	}
	if dl, ok := conn.(interface{ SetReadDeadline(time.Time) error }); ok {
		dl.SetReadDeadline(time.Now().Add(time.Second))
	}
	for len(bySeq) > 0 {
		n, err := conn.Receive(buf)
		s.Receives.Add(1)
		if err != nil {
			for _, p := range bySeq {
				retry = append(retry, p)
			}
			return retry, err
		}
		msgs, perr := ParseMessages(buf[:n])
		if perr != nil {
			s.Lookups.Inc("malformed")
		}
		for _, m := range msgs {
			p, ok := bySeq[m.Seq]
			if !ok {
				continue
			}
			delete(bySeq, m.Seq)
			if p.cookie != 0 {
				if s.decide(p, m) {
					p.due = s.o.Now().Add(retrySlow)
					retry = append(retry, p)
				}
				continue
			}
			switch {
			case errors.Is(m.Err, ErrNotFound) || m.Err == nil && m.Socket.State == StateListen:
				// Without a connection for the 4-tuple the kernel answers
				// with the listening socket of the local port, if any.
				s.Lookups.Inc("not_found")
				p.handshake = false
				p.notFound++
				retry = append(retry, p)
			case m.Err != nil:
				s.Lookups.Inc("error")
			case m.Socket.State == StateSynRecv || m.Socket.State == StateNewSynRecv || m.Socket.Cookie == 0:
				// Looked up as the handshake's last ACK is captured, before
				// TCP has made the connection's socket of the request's
				// (TestSourceWaitsForEstablishment).
				s.Lookups.Inc("not_established")
				p.handshake = m.Socket.State != StateEstablished
				retry = append(retry, p)
			case p.watched:
				s.Lookups.Inc("found")
				p.cookie, p.due = m.Socket.Cookie, p.asked.Add(s.o.Silence)
				retry = append(retry, p)
			default:
				s.Lookups.Inc("found")
				s.name(s.o.Now(), m.Socket.Cookie, p.key, false)
			}
		}
	}
	return retry, nil
}

// decide settles a connection found with the authority connected, from
// the look-up due Silence after its request (TestAuthoritySilence). It
// reports whether to look again later: the connection is open, but the
// authority has announced nothing it saw after it yet (it is behind, on a
// loaded machine), so its silence says nothing yet. Past half the give-up
// time without that, the connection is named here: a lagging authority
// must not cost a connection (TestAuthorityBehind).
func (s *Source) decide(p *pending, m Message) (again bool) {
	open := m.Err == nil && m.Socket.Cookie == p.cookie && m.Socket.State != StateTimeWait && m.Socket.State != StateClose
	since, connected := s.authoritySince()
	switch {
	case m.Err != nil && !errors.Is(m.Err, ErrNotFound):
		s.Lookups.Inc("error")
	case !connected || !since.Equal(p.since):
		// The authority was not there throughout: its silence says
		// nothing, as without it.
		s.name(s.o.Now(), p.cookie, p.key, !open)
	case open && s.caughtUp(p.asked, p.local):
		s.Lookups.Inc("silenced")
		s.silence(p)
	case open && s.o.Now().Sub(p.asked) < s.o.GiveUp/2:
		return true
	case open:
		s.Lookups.Inc("behind")
		s.name(s.o.Now(), p.cookie, p.key, false)
	case !s.shortOK(p.local):
		s.Lookups.Inc("excluded")
	default:
		s.Lookups.Inc("short")
		s.name(s.o.Now(), p.cookie, p.key, true)
	}
	return false
}

// RunDestroy names connections from the kernel's destroy broadcasts read on
// conn (see ListenDestroy) until ctx is done, then closes conn. Each
// destroyed socket is announced opened and closed at once.
func (s *Source) RunDestroy(ctx context.Context, conn Conn) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := conn.Receive(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil
			}
			// ENOBUFS: broadcasts were lost in a burst. Count and go on.
			s.Destroys.Inc("lost")
			continue
		}
		msgs, perr := ParseMessages(buf[:n])
		if perr != nil {
			s.Destroys.Inc("malformed")
		}
		for _, m := range msgs {
			s.destroyed(m.Socket)
		}
	}
}

func (s *Source) destroyed(sk Socket) {
	if sk.Cookie == 0 || sk.State == StateListen {
		s.Destroys.Inc("ignored")
		return
	}
	if sk.Remote.Port() == 0 || sk.Remote.Addr().IsUnspecified() {
		// A socket its application closed with SO_LINGER 0 is disconnected
		// before it is destroyed: the broadcast lost the remote port. Its
		// connection can only have been named by a look-up; close that.
		u := s.o.UUID(sk.Cookie)
		if sk.Info != nil {
			s.sink.Final(u, packet.Key{}, sk.Cookie, kernelCounters(sk))
		}
		s.sink.Close(s.o.Now(), u)
		s.Destroys.Inc("disconnected")
		return
	}
	if sk.Info != nil {
		// Whoever names the connection (or named it: tcp-info), its flow
		// gets the socket's final counters (TestFinalCounters).
		defer s.sink.Final(s.o.UUID(sk.Cookie), packet.KeyFromAddrPorts(sk.Local, sk.Remote), sk.Cookie, kernelCounters(sk))
	}
	if s.o.Exclude != nil && s.o.Exclude(sk.Local, sk.Remote) {
		s.Destroys.Inc("excluded")
		return
	}
	if s.o.Selected != nil && !s.o.Selected(sk.Local, sk.Remote) {
		s.Destroys.Inc("not_selected")
		return
	}
	k := packet.KeyFromAddrPorts(sk.Local, sk.Remote)
	if _, ok := s.authoritySince(); ok && !s.destroyNameable(k, sk.Local) {
		s.Destroys.Inc("silenced")
		return
	}
	s.Destroys.Inc("named")
	s.name(s.o.Now(), sk.Cookie, k, true)
}

// kernelCounters returns what the flow index keeps of a destroyed socket's
// tcp_info.
func kernelCounters(sk Socket) *index.Kernel {
	i := sk.Info
	return &index.Kernel{Local: sk.Local,
		SegsIn: uint64(uint32(i.SegsIn)), SegsOut: uint64(uint32(i.SegsOut)),
		DataSegsIn: uint64(i.DataSegsIn), DataSegsOut: uint64(i.DataSegsOut),
		BytesReceived: uint64(i.BytesReceived), BytesSent: uint64(i.BytesSent),
		BytesAcked: uint64(i.BytesAcked), BytesRetrans: uint64(i.BytesRetrans),
		TotalRetrans: uint64(i.TotalRetrans), SndMSS: i.SndMSS, RcvMSS: i.RcvMSS}
}
