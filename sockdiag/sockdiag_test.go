package sockdiag

import (
	"context"
	"errors"
	"flag"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/m-lab/tcp-info/tcp"
	"github.com/m-lab/uuid"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
)

var record = flag.Bool("record", false, "record real netlink replies into testdata/ (needs root)")

// pair opens a TCP connection on loopback and returns both ends.
func pair(t *testing.T, network, addr string) (client, server *net.TCPConn) {
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("no %s loopback: %v", network, err)
	}
	defer ln.Close()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// rawLookup sends one request on a real socket and returns the reply bytes.
func rawLookup(t *testing.T, local, remote netip.AddrPort) []byte {
	c, err := Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Send(AppendRequest(nil, 42, local, remote)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	n, err := c.Receive(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

// TestKernelLookup asks the real kernel for the cookie of live sockets and
// checks the UUID against m-lab/uuid's own, from getsockopt(SO_COOKIE).
func TestKernelLookup(t *testing.T) {
	for _, tt := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
		{"ipv4-mapped on a dual-stack socket", "tcp", "[::ffff:127.0.0.1]:0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			client, server := pair(t, tt.network, tt.addr)
			want, err := uuid.FromTCPConn(server)
			if err != nil {
				t.Fatal(err)
			}
			reply := rawLookup(t, addrPort(server.LocalAddr()), addrPort(server.RemoteAddr()))
			msgs, err := ParseMessages(reply)
			if err != nil || len(msgs) != 1 || msgs[0].Err != nil {
				t.Fatalf("ParseMessages = %+v, %v", msgs, err)
			}
			m := msgs[0]
			if got := uuid.FromCookie(m.Socket.Cookie); got != want || m.Seq != 42 || m.Socket.State != StateEstablished {
				t.Errorf("lookup named %s (seq %d, state %d), SO_COOKIE names %s", got, m.Seq, m.Socket.State, want)
			}
			if m.Socket.Local != addrPort(server.LocalAddr()) {
				t.Errorf("local end %v, want %v", m.Socket.Local, server.LocalAddr())
			}
			if *record && tt.network == "tcp4" {
				os.WriteFile("testdata/found-ipv4.bin", reply, 0o644)
			}
			if *record && tt.network == "tcp6" {
				os.WriteFile("testdata/found-ipv6.bin", reply, 0o644)
			}
			client.Close()
		})
	}
	// A 4-tuple without socket.
	reply := rawLookup(t, netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
	msgs, err := ParseMessages(reply)
	if err != nil || len(msgs) != 1 || !errors.Is(msgs[0].Err, ErrNotFound) {
		t.Errorf("lookup of no socket: %+v, %v", msgs, err)
	}
	if *record {
		os.WriteFile("testdata/not-found.bin", reply, 0o644)
	}
}

// TestKernelDestroyBroadcast closes a real connection and checks that its
// destroy broadcast names it as SO_COOKIE does.
func TestKernelDestroyBroadcast(t *testing.T) {
	c, err := ListenDestroy()
	if errors.Is(err, ErrNeedNetAdmin) {
		t.Skip("destroy broadcasts need CAP_NET_ADMIN: run as root")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client, server := pair(t, "tcp4", "127.0.0.1:0")
	want, _ := uuid.FromTCPConn(server)
	local, remote := addrPort(server.LocalAddr()), addrPort(server.RemoteAddr())
	// The client resets the connection; the server's socket is destroyed
	// when the server closes it. (A socket closed with SO_LINGER 0 by its
	// own application is disconnected first: its broadcast has no remote
	// port, and only a look-up made before can name it.)
	client.SetLinger(0)
	client.Close()
	time.Sleep(10 * time.Millisecond)
	server.Close()
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(5 * time.Second)
	c.(*netlinkConn).SetReadDeadline(deadline)
	for {
		n, err := c.Receive(buf)
		if err != nil {
			t.Fatalf("no destroy broadcast for %s: %v", want, err)
		}
		msgs, err := ParseMessages(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			if m.Socket.Local == local && m.Socket.Remote == remote && uuid.FromCookie(m.Socket.Cookie) == want {
				if *record {
					os.WriteFile("testdata/destroy.bin", buf[:n], 0o644)
				}
				return
			}
		}
	}
}

// TestParseRecorded parses replies recorded from a real kernel.
func TestParseRecorded(t *testing.T) {
	tests := []struct {
		file    string
		err     error
		family4 bool
	}{
		{"found-ipv4.bin", nil, true},
		{"found-ipv6.bin", nil, false},
		{"not-found.bin", ErrNotFound, false},
		{"destroy.bin", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			msgs, err := ParseMessages(b)
			if err != nil || len(msgs) != 1 {
				t.Fatalf("ParseMessages = %+v, %v", msgs, err)
			}
			m := msgs[0]
			if !errors.Is(m.Err, tt.err) {
				t.Fatalf("error %v, want %v", m.Err, tt.err)
			}
			if tt.err != nil {
				return
			}
			if m.Socket.Cookie == 0 || !m.Socket.Local.Addr().IsLoopback() || m.Socket.Local.Addr().Is4() != tt.family4 || m.Socket.Remote.Port() == 0 {
				t.Errorf("socket %+v", m.Socket)
			}
			// The destroy broadcast carries the socket's final tcp_info: the
			// server's socket of a connection the client reset right after
			// the handshake took in its SYN (counted once), the handshake's
			// ACK and the RST, and sent nothing after its SYN-ACK.
			if tt.file == "destroy.bin" {
				if i := m.Socket.Info; i == nil || i.State != StateClose || i.SegsIn != 3 || i.SegsOut != 0 || i.BytesReceived != 0 {
					t.Errorf("tcp_info %+v, want state CLOSE, segs_in 3, segs_out 0", i)
				}
			}
		})
	}
	if _, err := ParseMessages([]byte{1, 2, 3}); err == nil {
		t.Error("a truncated datagram parsed")
	}
}

func FuzzParseMessages(f *testing.F) {
	for _, name := range []string{"found-ipv4.bin", "found-ipv6.bin", "not-found.bin", "destroy.bin"} {
		if b, err := os.ReadFile(filepath.Join("testdata", name)); err == nil {
			f.Add(b)
		}
	}
	f.Add(AppendRequest(nil, 1, netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:2")))
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, _ := ParseMessages(b)
		for _, m := range msgs {
			if m.Err == nil && (!m.Socket.Local.IsValid() || !m.Socket.Remote.IsValid()) {
				t.Fatalf("a socket without valid addresses: %+v", m)
			}
		}
	})
}

// fakeConn answers look-ups from a table of sockets, like the kernel, and
// lets a test change the table (close a socket) at any time.
type fakeConn struct {
	mu      sync.Mutex
	sockets map[[2]netip.AddrPort]Socket
	replies [][]byte
	wake    chan struct{}
	closed  chan struct{}
	once    sync.Once // Close may be called twice at once (RunLookups's deferred close and its context's)
	sends   int
	onSend  func() // called after each Send, before the replies are made
}

func newFake() *fakeConn {
	return &fakeConn{sockets: map[[2]netip.AddrPort]Socket{}, wake: make(chan struct{}, 1000), closed: make(chan struct{})}
}

func (f *fakeConn) set(s Socket) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sockets[[2]netip.AddrPort{s.Local, s.Remote}] = s
}

func (f *fakeConn) remove(s Socket) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sockets, [2]netip.AddrPort{s.Local, s.Remote})
}

// Send parses the requests (with the same layout the kernel reads) and
// queues a reply per request, one datagram each.
func (f *fakeConn) Send(b []byte) error {
	if f.onSend != nil {
		f.onSend()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sends++
	for len(b) >= nlmsgHdrLen+reqV2Len {
		seq := uint32(b[8]) | uint32(b[9])<<8 | uint32(b[10])<<16 | uint32(b[11])<<24
		r := b[nlmsgHdrLen:]
		id := r[8:]
		var la, ra netip.Addr
		if r[0] == unix.AF_INET {
			la, ra = netip.AddrFrom4([4]byte(id[4:8])), netip.AddrFrom4([4]byte(id[20:24]))
		} else {
			la, ra = netip.AddrFrom16([16]byte(id[4:20])).Unmap(), netip.AddrFrom16([16]byte(id[20:36])).Unmap()
		}
		lp, rp := uint16(id[0])<<8|uint16(id[1]), uint16(id[2])<<8|uint16(id[3])
		s, ok := f.sockets[[2]netip.AddrPort{netip.AddrPortFrom(la, lp), netip.AddrPortFrom(ra, rp)}]
		if ok {
			f.replies = append(f.replies, diagReply(seq, s))
		} else {
			f.replies = append(f.replies, errReply(seq, unix.ENOENT))
		}
		f.wake <- struct{}{}
		b = b[nlmsgHdrLen+reqV2Len:]
	}
	return nil
}

func (f *fakeConn) Receive(buf []byte) (int, error) {
	select {
	case <-f.wake:
	case <-f.closed:
		return 0, os.ErrClosed
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.replies[0]
	f.replies = f.replies[1:]
	return copy(buf, r), nil
}

func (f *fakeConn) Close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

// push queues a datagram to be received (a destroy broadcast).
func (f *fakeConn) push(b []byte) {
	f.mu.Lock()
	f.replies = append(f.replies, b)
	f.mu.Unlock()
	f.wake <- struct{}{}
}

func diagReply(seq uint32, s Socket) []byte {
	b := make([]byte, nlmsgHdrLen+diagMsgLen)
	putU32 := func(o int, v uint32) { b[o], b[o+1], b[o+2], b[o+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24) }
	putU32(0, uint32(len(b)))
	b[4] = sockDiagByFamily
	putU32(8, seq)
	m := b[nlmsgHdrLen:]
	m[0] = unix.AF_INET
	la, ra := s.Local.Addr(), s.Remote.Addr()
	if !la.Is4() {
		m[0] = unix.AF_INET6
	}
	m[1] = s.State
	putSockID(m[4:], la, s.Local.Port(), ra, s.Remote.Port())
	putU32(nlmsgHdrLen+4+40, uint32(s.Cookie))
	putU32(nlmsgHdrLen+4+44, uint32(s.Cookie>>32))
	if s.Info != nil { // INET_DIAG_INFO, as the kernel lays tcp_info out
		raw := unsafe.Slice((*byte)(unsafe.Pointer(s.Info)), unsafe.Sizeof(*s.Info))
		attr := make([]byte, 4, 4+len(raw))
		attr[0], attr[1], attr[2] = byte(4+len(raw)), byte((4+len(raw))>>8), inetDiagInfo
		b = append(b, append(attr, raw...)...)
		putU32(0, uint32(len(b)))
	}
	return b
}

func errReply(seq uint32, errno unix.Errno) []byte {
	b := make([]byte, nlmsgHdrLen+4+nlmsgHdrLen)
	b[0] = byte(len(b))
	b[4] = unix.NLMSG_ERROR
	b[8], b[9], b[10], b[11] = byte(seq), byte(seq>>8), byte(seq>>16), byte(seq>>24)
	e := uint32(-int32(errno))
	b[16], b[17], b[18], b[19] = byte(e), byte(e>>8), byte(e>>16), byte(e>>24)
	return b
}

var (
	server = netip.MustParseAddr("192.0.2.1")
	local  = []netip.Addr{server}
)

func sock(port uint16, cookie uint64, state uint8) Socket {
	return Socket{Local: netip.AddrPortFrom(server, 443), Remote: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), port), Cookie: cookie, State: state}
}

func keyOf(s Socket) packet.Key { return packet.KeyFromAddrPorts(s.Local, s.Remote) }

func startSource(t *testing.T, tbl *names.Table, lookups, destroys Conn) *Source {
	return runSource(t, NewSource(tbl, Options{Local: local, UUID: uuid.FromCookie, Delay: time.Millisecond, GiveUp: 2 * time.Second}), lookups, destroys)
}

// runSource runs a source's loops until the test ends.
func runSource(t *testing.T, s *Source, lookups, destroys Conn) *Source {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.RunLookups(ctx, lookups) }()
	go func() { defer wg.Done(); s.RunDestroy(ctx, destroys) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return s
}

func waitClaim(t *testing.T, tbl *names.Table, k packet.Key) *names.Entry {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if e := tbl.Claim(k, time.Unix(0, 1)); e != nil {
			return e
		}
	}
	t.Fatalf("connection %v never named", k)
	return nil
}

func TestSourceNamesEstablished(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	// The requests are queued before the loop runs, so that how they are
	// batched does not depend on when the loop's goroutine gets a CPU.
	src := NewSource(tbl, Options{Local: local, UUID: uuid.FromCookie, Delay: time.Millisecond, GiveUp: 2 * time.Second})
	var socks []Socket
	for i := 0; i < 100; i++ {
		s := sock(uint16(1000+i), uint64(5000+i), StateEstablished)
		lk.set(s)
		socks = append(socks, s)
		src.Request(keyOf(s))
	}
	runSource(t, src, lk, ds)
	for _, s := range socks {
		if e := waitClaim(t, tbl, keyOf(s)); e.UUID != uuid.FromCookie(s.Cookie) || e.Source != names.Kernel {
			t.Errorf("named %s by %s, want %s", e.UUID, e.Source, uuid.FromCookie(s.Cookie))
		}
	}
	if sends := src.Sends.Load(); sends > 10 {
		t.Errorf("%d sends for 100 look-ups: not batched", sends)
	}
}

// TestSourceWaitsForEstablishment answers with a request socket first (its
// cookie is not the connection's), as inet_diag reports one (SYN_RECV) or
// by its own state, then with the established socket.
func TestSourceWaitsForEstablishment(t *testing.T) {
	for _, state := range []uint8{StateSynRecv, StateNewSynRecv} {
		tbl := names.New(nil)
		lk, ds := newFake(), newFake()
		src := startSource(t, tbl, lk, ds)
		s := sock(1000, 77, state)
		lk.set(s)
		src.Request(keyOf(s))
		time.Sleep(30 * time.Millisecond)
		if tbl.NamedSince(keyOf(s), time.Time{}) {
			t.Fatalf("named from a request socket's cookie (state %d)", state)
		}
		s.Cookie, s.State = 78, StateEstablished
		lk.set(s)
		if e := waitClaim(t, tbl, keyOf(s)); e.Cookie != 78 {
			t.Errorf("state %d: named from cookie %d, want 78", state, e.Cookie)
		}
	}
}

// TestCloseBeforeLookup is the race between a connection's close and its
// look-up: the socket is gone when the look-up runs, and its destroy
// broadcast names it; a second look-up after that is skipped.
func TestCloseBeforeLookup(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	s := sock(1000, 99, StateEstablished)
	gone := s
	lk.onSend = func() { lk.remove(gone) } // closed between request and look-up
	lk.set(s)
	src := startSource(t, tbl, lk, ds)
	src.Request(keyOf(s))
	time.Sleep(20 * time.Millisecond) // not found, retried
	s.State = 7                       // TCP_CLOSE
	ds.push(diagReply(0, s))
	e := waitClaim(t, tbl, keyOf(s))
	if e.UUID != uuid.FromCookie(99) {
		t.Errorf("named %s", e.UUID)
	}
	if _, closed := e.Closed(); !closed {
		t.Error("a destroyed socket must be announced closed")
	}
}

func TestDestroyIgnoresListenersAndUnconnected(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	startSource(t, tbl, lk, ds)
	listener := Socket{Local: netip.AddrPortFrom(server, 443), Remote: netip.AddrPortFrom(netip.IPv4Unspecified(), 0), Cookie: 5, State: StateListen}
	ds.push(diagReply(0, listener))
	real := sock(1234, 6, 7)
	ds.push(diagReply(0, real))
	waitClaim(t, tbl, keyOf(real))
	if tbl.Len() != 1 {
		t.Errorf("%d announcements, want 1", tbl.Len())
	}
}

func TestNotLocalIsNotLookedUp(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	src := startSource(t, tbl, lk, ds)
	src.Request(packet.KeyFromAddrPorts(netip.MustParseAddrPort("198.51.100.1:1"), netip.MustParseAddrPort("198.51.100.2:2")))
	time.Sleep(20 * time.Millisecond)
	lk.mu.Lock()
	defer lk.mu.Unlock()
	if lk.sends != 0 {
		t.Error("a flow with no local end was looked up")
	}
}

// TestListeners dumps the kernel's listeners: an address and port listened
// on (IPv4 and IPv6) is among them, one connected from is not.
func TestListeners(t *testing.T) {
	ln4, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln4.Close()
	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer ln6.Close()
	client, err := net.Dial("tcp4", ln4.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ls, err := Listeners(c, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range []net.Listener{ln4, ln6} {
		if at := ln.Addr().(*net.TCPAddr).AddrPort(); !hasKey(ls, at) {
			t.Errorf("%v listened on is not in %v", at, ls)
		}
	}
	if at := client.LocalAddr().(*net.TCPAddr).AddrPort(); hasKey(ls, at) {
		t.Errorf("the client's %v is taken for a listener", at)
	}
}

// TestDestroySelected: a destroyed socket that Options.Selected refuses is
// not named (not_selected), so the table holds only what flows may claim.
func TestDestroySelected(t *testing.T) {
	tbl := names.New(nil)
	s := NewSource(tbl, Options{UUID: uuid.FromCookie, Selected: func(l, r netip.AddrPort) bool { return l.Port() == 443 }})
	remote := netip.MustParseAddrPort("198.51.100.7:40000")
	for cookie, port := range map[uint64]uint16{1: 443, 2: 80} {
		s.destroyed(Socket{Local: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), port), Remote: remote, Cookie: cookie, State: StateClose})
	}
	if s.Destroys.Get("named") != 1 || s.Destroys.Get("not_selected") != 1 || tbl.Len() != 1 {
		t.Errorf("named %d, not_selected %d, %d entries; want 1, 1, 1", s.Destroys.Get("named"), s.Destroys.Get("not_selected"), tbl.Len())
	}
	if e := tbl.Claim(packet.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:80"), remote), time.Now()); e != nil {
		t.Errorf("the refused socket was named %s", e.UUID)
	}
}

func hasKey[K comparable, V any](m map[K]V, k K) bool {
	_, ok := m[k]
	return ok
}

// TestLocalFollowed: with Options.IsLocal, a connection to an address the
// host gained after the source started is looked up and named, and one to
// an address it lost is not.
func TestLocalFollowed(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	added := netip.MustParseAddr("198.51.100.7")
	var have atomic.Pointer[netip.Addr]
	have.Store(&server)
	isLocal := func(a netip.Addr) bool { return a == *have.Load() }
	src := runSource(t, NewSource(tbl, Options{IsLocal: isLocal, UUID: uuid.FromCookie, Delay: time.Millisecond, GiveUp: 2 * time.Second}), lk, ds)

	s := Socket{Local: netip.AddrPortFrom(added, 443), Remote: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), 7000), Cookie: 71, State: StateEstablished}
	lk.set(s)
	src.Request(keyOf(s))
	waitCount(t, "not_local", func() uint64 { return src.Lookups.Get("not_local") }, 1)
	have.Store(&added)
	src.Request(keyOf(s))
	if e := waitClaim(t, tbl, keyOf(s)); e.UUID != uuid.FromCookie(71) {
		t.Errorf("named %s", e.UUID)
	}
	gone := sock(7001, 72, StateEstablished)
	lk.set(gone)
	src.Request(keyOf(gone))
	waitCount(t, "not_local", func() uint64 { return src.Lookups.Get("not_local") }, 2)
}

// TestFinalCounters: a destroy broadcast's tcp_info reaches the entry of
// its connection, whether the kernel source named it or tcp-info did (the
// same cookie), and that of a socket its application disconnected (no
// remote port) reaches the entry of its name.
func TestFinalCounters(t *testing.T) {
	tbl := names.New(nil)
	lk, ds := newFake(), newFake()
	src := startSource(t, tbl, lk, ds)
	info := func(segsIn int32) *tcp.LinuxTCPInfo {
		return &tcp.LinuxTCPInfo{SegsIn: segsIn, BytesReceived: 101, DataSegsIn: 1}
	}

	disconnected := sock(8002, 83, StateEstablished)
	lk.set(disconnected)
	src.Request(keyOf(disconnected))
	looked := waitClaim(t, tbl, keyOf(disconnected))
	byTCPInfo := sock(8001, 82, StateClose)
	tbl.Open(time.Now(), "tcpinfo_prefix_0000000000000052", keyOf(byTCPInfo), "eventsocket", 82)
	told := tbl.Claim(keyOf(byTCPInfo), time.Unix(0, 1))

	byKernel := sock(8000, 81, StateClose)
	byKernel.Info, byTCPInfo.Info = info(6), info(7)
	gone := disconnected
	gone.Remote, gone.Info, gone.State = netip.AddrPortFrom(netip.IPv4Unspecified(), 0), info(8), StateClose
	ds.push(diagReply(0, byKernel))
	ds.push(diagReply(0, byTCPInfo))
	ds.push(diagReply(0, gone))
	waitFinal(t, waitClaim(t, tbl, keyOf(byKernel)), 6)
	waitFinal(t, told, 7)
	waitFinal(t, looked, 8)
}

func waitFinal(t *testing.T, e *names.Entry, segsIn uint64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if k := e.Final(); k != nil {
			if k.SegsIn != segsIn || k.BytesReceived != 101 || k.DataSegsIn != 1 {
				t.Errorf("%s: counters %+v, want segs_in %d", e.UUID, k, segsIn)
			}
			return
		}
	}
	t.Errorf("%s: no final counters", e.UUID)
}
