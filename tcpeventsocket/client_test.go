package tcpeventsocket

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/m-lab/tcp-info/eventsocket"
	"github.com/m-lab/tcp-info/inetdiag"

	"github.com/m-lab/packet-headers/saver"
)

// recorder records the events it takes; it refuses those whose UUID
// cannot name a file, as the daemon's handler does.
type recorder struct {
	mu     sync.Mutex
	opens  []string
	closes []string
	locals []netip.AddrPort
}

func (r *recorder) Open(ts time.Time, uuid string, local, remote netip.AddrPort, cookie uint64) error {
	if err := saver.CheckUUID(uuid); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opens = append(r.opens, uuid)
	r.locals = append(r.locals, local)
	return nil
}

func (r *recorder) Close(ts time.Time, uuid string) error {
	if err := saver.CheckUUID(uuid); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closes = append(r.closes, uuid)
	return nil
}

func (r *recorder) counts() (int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.opens), len(r.closes)
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// startServer runs tcp-info's own eventsocket server at path.
func startServer(t *testing.T, path string) (eventsocket.Server, context.CancelFunc) {
	srv := eventsocket.New(path)
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go srv.Serve(ctx)
	return srv, cancel
}

// TestAgainstTCPInfoServer runs the client against tcp-info's eventsocket
// server, through a restart of the server.
func TestAgainstTCPInfoServer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tcpevents.sock")
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	c := New(path, rec, &Options{MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	go func() { done <- c.Run(ctx) }() // the socket does not exist yet: the client retries

	time.Sleep(50 * time.Millisecond)
	srv, stop := startServer(t, path)
	waitFor(t, "connection", func() bool { return c.Connected() })
	// The server registers a client after accepting it: an event sent
	// before then reaches no one, so each is sent again until it arrives.
	id := inetdiag.SockID{SPort: 8080, DPort: 40000, SrcIP: "::ffff:192.0.2.1", DstIP: "203.0.113.5", Cookie: 7}
	var last time.Time
	waitFor(t, "the Open event", func() bool {
		if o, _ := rec.counts(); o > 0 {
			return true
		}
		if time.Since(last) > 50*time.Millisecond {
			srv.FlowCreated(time.Now(), "u1", id)
			last = time.Now()
		}
		return false
	})
	srv.FlowDeleted(time.Now(), "u1")
	waitFor(t, "the Close event", func() bool { _, c := rec.counts(); return c == 1 })
	rec.mu.Lock()
	for i, u := range rec.opens {
		if want := netip.MustParseAddrPort("192.0.2.1:8080"); u != "u1" || rec.locals[i] != want {
			t.Errorf("Open %q with local end %v, want u1 with %v (unmapped)", u, rec.locals[i], want)
		}
	}
	if rec.closes[0] != "u1" {
		t.Errorf("Close %q, want u1", rec.closes[0])
	}
	rec.mu.Unlock()

	stop()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// TestReconnects serves the socket with a plain listener that drops the
// connection after one event, as a tcp-info restart does, and checks that
// the client comes back for more.
func TestReconnects(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tcpevents.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for i := 0; ; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, `{"Event":0,"Timestamp":"2026-11-25T21:56:47Z","UUID":"u%d","ID":{"SPort":1,"DPort":2,"SrcIP":"10.0.0.1","DstIP":"10.0.0.2"}}`+"\n", i)
			c.Close()
		}
	}()
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	client := New(path, rec, &Options{MinBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond})
	go func() { done <- client.Run(ctx) }()
	waitFor(t, "three connections", func() bool { o, _ := rec.counts(); return o >= 3 })
	if client.Counts().Reconnects.Load() < 2 {
		t.Error("reconnects not counted")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestServeSkipsBadLines(t *testing.T) {
	t.Parallel() // its counts are its own
	good := `{"Event":0,"Timestamp":"2026-11-25T21:56:47.466285449Z","UUID":"host_1","ID":{"SPort":39616,"DPort":8081,"SrcIP":"10.99.0.1","DstIP":"10.99.0.2","Interface":0,"Cookie":4097}}`
	lines := []string{
		good,
		"not json at all",
		`{"Event":7,"UUID":"x","Timestamp":"2026-11-25T21:56:47Z"}`,          // unknown type
		`{"Event":0,"UUID":"x","ID":null}`,                                   // open without ID
		`{"Event":0,"UUID":"x","ID":{"SrcIP":"bogus","DstIP":"10.0.0.1"}}`,   // bad address
		`{"Event":1,"Timestamp":"2026-11-25T21:56:48Z","UUID":"","ID":null}`, // no UUID
		`{"Event":0,"Timestamp":"2026-11-25T21:56:47Z","UUID":"../../../../tmp/x","ID":{"SPort":1,"DPort":2,"SrcIP":"10.0.0.1","DstIP":"10.0.0.2"}}`, // a path
		`{"Event":1,"Timestamp":"2026-11-25T21:56:48Z","UUID":"a/b"}`,                                                                                // a path
		strings.Repeat("x", 10<<20), // a 10 MB line
		"",                          // empty line
		`{"Event":1,"Timestamp":"2026-11-25T21:56:48Z","UUID":"host_1","ID":null}`,
	}
	rec := &recorder{}
	counts := NewCounts()
	n := Serve(strings.NewReader(strings.Join(lines, "\n")), rec, counts)
	if o, c := rec.counts(); o != 1 || c != 1 {
		t.Errorf("%d opens and %d closes, want 1 and 1", o, c)
	}
	if n != 10 {
		t.Errorf("Serve read %d lines, want 10", n)
	}
	if got := counts.Malformed.Load(); got != 7 {
		t.Errorf("%v malformed lines counted, want 7", got)
	}
	if got := counts.Events.Get("unknown"); got != 1 {
		t.Errorf("%v unknown events counted, want 1", got)
	}
}

// TestNeverBlocksTCPInfo checks that a fast writer is drained: 20k events
// written without pause all arrive.
func TestNeverBlocksTCPInfo(t *testing.T) {
	a, b := net.Pipe()
	rec := &recorder{}
	done := make(chan int)
	go func() { done <- Serve(b, rec, nil) }()
	for i := 0; i < 20000; i++ {
		fmt.Fprintf(a, `{"Event":0,"Timestamp":"2026-11-25T21:56:47Z","UUID":"u%d","ID":{"SPort":1,"DPort":2,"SrcIP":"10.0.0.1","DstIP":"10.0.0.2"}}`+"\n", i)
	}
	a.Close()
	<-done
	if o, _ := rec.counts(); o != 20000 {
		t.Errorf("%d of 20000 events arrived", o)
	}
}

func FuzzParseLine(f *testing.F) {
	f.Add([]byte(`{"Event":0,"Timestamp":"2026-11-25T21:56:47.466285449Z","UUID":"host_1795643619_0000000000001001","ID":{"SPort":39616,"DPort":8081,"SrcIP":"10.99.0.1","DstIP":"10.99.0.2","Interface":0,"Cookie":4097}}`))
	f.Add([]byte(`{"Event":1,"Timestamp":"2026-11-25T21:56:47.466285449Z","UUID":"host_1795643619_0000000000001001","ID":null}`))
	f.Add([]byte(`{"Event":0,"ID":{"SrcIP":"fe80::1%eth0","DstIP":"::ffff:1.2.3.4"},"UUID":"u"}`))
	f.Add([]byte(`{"Event":1,"UUID":"../x\u0000"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		ev, err := ParseLine(line)
		if err != nil {
			return
		}
		if ev.UUID == "" {
			t.Fatalf("accepted an event without UUID: %q", line)
		}
		if ev.Open && (!ev.Local.Addr().IsValid() || !ev.Remote.Addr().IsValid() || ev.Local.Addr().Is4In6() || ev.Local.Addr().Zone() != "") {
			t.Fatalf("accepted an Open with addresses %v %v", ev.Local, ev.Remote)
		}
	})
}
