package names

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/packet"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func key(port uint16) packet.Key {
	return packet.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:443"), netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), port))
}

// clock is a settable clock for the table.
type clock struct{ now time.Time }

func (c *clock) Now() time.Time { return c.now }

func TestClaimOrderAndOnce(t *testing.T) {
	tests := []struct {
		name string
		do   func(tb *Table) *Entry
		want string // UUID claimed, "" for none
	}{
		{"open before first packet", func(tb *Table) *Entry {
			tb.Open(t0, "u1", key(1), "test", 0)
			return tb.Claim(key(1), t0.Add(time.Millisecond))
		}, "u1"},
		{"open after first packet", func(tb *Table) *Entry {
			tb.Open(t0.Add(time.Second), "u1", key(1), "test", 0)
			return tb.Claim(key(1), t0)
		}, "u1"},
		{"no open", func(tb *Table) *Entry { return tb.Claim(key(1), t0) }, ""},
		{"other connection", func(tb *Table) *Entry {
			tb.Open(t0, "u1", key(2), "test", 0)
			return tb.Claim(key(1), t0)
		}, ""},
		{"claimed once only", func(tb *Table) *Entry {
			tb.Open(t0, "u1", key(1), "test", 0)
			tb.Claim(key(1), t0)
			return tb.Claim(key(1), t0.Add(time.Second))
		}, ""},
		{"repeated open does not rename", func(tb *Table) *Entry {
			tb.Open(t0, "u1", key(1), "test", 0)
			tb.Claim(key(1), t0)
			if tb.Open(t0.Add(time.Minute), "u1", key(1), "test", 0) {
				panic("repeated Open reported as new")
			}
			return tb.Claim(key(1), t0.Add(time.Second))
		}, ""},
		{"closed before the flow began: an earlier connection", func(tb *Table) *Entry {
			tb.Open(t0, "old", key(1), "test", 0)
			tb.Close(t0.Add(time.Second), "old")
			return tb.Claim(key(1), t0.Add(2*time.Second))
		}, ""},
		{"closed after the flow began: a short connection", func(tb *Table) *Entry {
			tb.Open(t0, "u1", key(1), "test", 0)
			tb.Close(t0.Add(time.Second), "u1")
			return tb.Claim(key(1), t0.Add(time.Millisecond))
		}, "u1"},
		{"port reuse: new open replaces", func(tb *Table) *Entry {
			tb.Open(t0, "old", key(1), "test", 0)
			tb.Claim(key(1), t0)
			tb.Open(t0.Add(time.Minute), "new", key(1), "test", 0)
			return tb.Claim(key(1), t0.Add(time.Minute))
		}, "new"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := tt.do(New(nil))
			got := ""
			if e != nil {
				got = e.UUID
			}
			if got != tt.want {
				t.Errorf("claimed %q, want %q", got, tt.want)
			}
		})
	}
}

func TestCloseReachesClaimedEntry(t *testing.T) {
	tb := New(nil)
	tb.Open(t0, "u1", key(1), "test", 0)
	e := tb.Claim(key(1), t0)
	if _, closed := e.Closed(); closed {
		t.Fatal("closed before Close")
	}
	tb.Open(t0.Add(time.Second), "u2", key(1), "test", 0) // replaced for its key
	if !tb.Close(t0.Add(2*time.Second), "u1") {
		t.Fatal("Close of a claimed, replaced entry not found")
	}
	if ts, closed := e.Closed(); !closed || !ts.Equal(t0.Add(2*time.Second)) {
		t.Errorf("Closed() = %v, %v", ts, closed)
	}
	if tb.Close(t0, "never-opened") {
		t.Error("Close without Open reported as known")
	}
}

func TestSweepBoundsMemory(t *testing.T) {
	c := &clock{now: t0}
	tb := New(&Options{TTL: time.Minute, MaxEntries: 1000, Now: c.Now})
	for i := 0; i < 2000; i++ {
		tb.Open(t0, fmt.Sprint("flood", i), key(uint16(i)), "test", 0)
	}
	if tb.Len() != 1000 || tb.Dropped() != 1000 {
		t.Fatalf("Len %d Dropped %d, want 1000 1000", tb.Len(), tb.Dropped())
	}
	tb.Claim(key(1), t0) // a live, claimed connection survives a TTL
	c.now = t0.Add(2 * time.Minute)
	if n := tb.Sweep(); n != 1 {
		t.Errorf("after a TTL %d entries remain, want 1 (the claimed one)", n)
	}
	c.now = t0.Add(5 * time.Minute)
	if n := tb.Sweep(); n != 0 {
		t.Errorf("after four TTLs %d entries remain, want 0", n)
	}
	if tb.Open(t0, "new", key(5000), "test", 0); tb.Len() != 1 {
		t.Error("the table does not take new entries after a sweep")
	}
}

func TestConcurrentUse(t *testing.T) {
	tb := New(nil)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				u := fmt.Sprint(g, "-", i)
				k := key(uint16(g*1000 + i))
				tb.Open(t0, u, k, "test", 0)
				if e := tb.Claim(k, t0); e != nil {
					e.Closed()
					tb.Release(e)
				}
				tb.Close(t0, u)
			}
		}(g)
	}
	wg.Wait()
	tb.Sweep()
}

// TestAuthorityWinsInAnyOrder: tcp-info's name (the authority) for a socket
// that the kernel source named first with another prefix replaces the
// kernel's, before and after a flow claimed the entry; the kernel's name
// still closes it; the kernel's name after tcp-info's changes nothing.
func TestAuthorityWinsInAnyOrder(t *testing.T) {
	for _, claimFirst := range []bool{false, true} {
		tb := New(&Options{Authority: "eventsocket"})
		tb.Open(t0, "host_1_00000000000000AA", key(1), "kernel", 0xAA)
		var e *Entry
		if claimFirst {
			e = tb.Claim(key(1), t0)
		}
		if !tb.Open(t0, "host_2_00000000000000AA", key(1), "eventsocket", 0xAA) {
			t.Errorf("claimed %v: the authority's name was not taken", claimFirst)
		}
		if !claimFirst {
			e = tb.Claim(key(1), t0)
		}
		if e == nil || e.Name() != "host_2_00000000000000AA" {
			t.Fatalf("claimed %v: entry %v, want tcp-info's name", claimFirst, e)
		}
		if tb.Open(t0, "host_1_00000000000000AA", key(1), "kernel", 0xAA) || e.Name() != "host_2_00000000000000AA" {
			t.Errorf("claimed %v: the kernel's name after tcp-info's renamed the entry to %s", claimFirst, e.Name())
		}
		if !tb.Close(t0.Add(time.Second), "host_1_00000000000000AA") {
			t.Errorf("claimed %v: the kernel's name no longer closes the entry", claimFirst)
		}
		if _, closed := e.Closed(); !closed || tb.Close(t0, "host_2_00000000000000AA") {
			t.Errorf("claimed %v: closed %v; both names must be forgotten after one Close", claimFirst, closed)
		}
		if tb.Renames() != 1 {
			t.Errorf("claimed %v: %d renames", claimFirst, tb.Renames())
		}
	}
}

// TestLearnPrefix: the prefix of the first name that ends in its cookie is
// taken, once.
func TestLearnPrefix(t *testing.T) {
	p := NewPrefix("vm_1796148445_unsafe")
	if p.FromCookie(0x1001) != "vm_1796148445_unsafe_0000000000001001" {
		t.Errorf("FromCookie: %s", p.FromCookie(0x1001))
	}
	if _, ok := p.Learn("odd-name", 0x1001); ok || p.String() != "vm_1796148445_unsafe" {
		t.Errorf("learnt from a name without the cookie: %s", p)
	}
	if got, ok := p.Learn("vm_1796148444_unsafe_0000000000001001", 0x1001); !ok || got != "vm_1796148444_unsafe" {
		t.Errorf("Learn = %q %v", got, ok)
	}
	if _, ok := p.Learn("other_0000000000001002", 0x1002); ok || p.FromCookie(0x1002) != "vm_1796148444_unsafe_0000000000001002" {
		t.Errorf("the prefix changed twice: %s", p)
	}
}
