package demuxer

import (
	"testing"
	"time"

	"github.com/google/gopacket/layers"
)

// TestInjectedSegments: on an established connection, segments that its
// receiver would drop or answer with a challenge ACK (RFC 5961), sent as
// either end, are kept in the flow's file and neither end it (after the
// linger) nor split it; the connection's later packets land in the same
// file. The exact RST ends it.
func TestInjectedSegments(t *testing.T) {
	tests := []struct {
		name       string
		fromClient bool
		mod        func(p *layers.TCP, next uint32)
		ends       bool
	}{
		{"RST in window, client", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+500 }, false},
		{"RST in window, server", false, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+500 }, false},
		{"RST far out of window", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n+1<<31 }, false},
		{"RST just before", false, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n-10 }, false},
		{"RST with ACK in window", true, func(p *layers.TCP, n uint32) { p.RST, p.ACK, p.Seq = true, true, n+1 }, false},
		{"SYN with a fresh ISN, client", true, func(p *layers.TCP, n uint32) { p.SYN, p.Seq = true, 999999 }, false},
		{"SYN with a fresh ISN, server", false, func(p *layers.TCP, n uint32) { p.SYN, p.Seq = true, 999999 }, false},
		{"SYN-ACK, server", false, func(p *layers.TCP, n uint32) { p.SYN, p.ACK, p.Seq = true, true, 5 }, false},
		{"FIN far out of window", true, func(p *layers.TCP, n uint32) { p.FIN, p.ACK, p.Seq = true, true, n+1<<30 }, false},
		{"FIN ahead of a gap", false, func(p *layers.TCP, n uint32) { p.FIN, p.ACK, p.Seq = true, true, n+300 }, false},
		{"data far out of window", true, func(p *layers.TCP, n uint32) { p.ACK, p.Seq = true, n+1<<31 }, false},
		{"the exact RST, client", true, func(p *layers.TCP, n uint32) { p.RST, p.Seq = true, n }, true},
		{"the exact RST, server", false, func(p *layers.TCP, n uint32) { p.RST, p.ACK, p.Seq = true, true, n }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			c := newConn(1000, 1)
			h.open(0, "u", c)
			h.packet(0, c.syn(t))
			h.packet(1*ms, c.synack(t))
			h.packet(2*ms, c.ack(t, true))
			h.packet(3*ms, c.data(t, true, 100))
			h.packet(4*ms, c.data(t, false, 200))
			side := 0
			if !tt.fromClient {
				side = 1
			}
			spoof := *c // the injector's numbers, not the connection's
			injected := spoof.frame(t, tt.fromClient, func(p *layers.TCP) { tt.mod(p, c.next[side]) }, 0)
			h.packet(10*ms, injected)
			h.tick(1500 * ms) // past the linger
			if tt.ends {
				if h.d.Flows() != 0 {
					t.Fatal("the exact RST did not end the flow")
				}
				if got := len(h.file("u")); got != 6 {
					t.Errorf("%d packets in the file, want 6", got)
				}
				return
			}
			h.packet(1600*ms, c.data(t, true, 100))
			h.packet(1700*ms, c.fin(t, true))
			h.packet(1701*ms, c.fin(t, false))
			h.packet(1702*ms, c.ack(t, true))
			h.tick(1800 * ms)
			if h.d.Flows() != 1 {
				t.Errorf("%d flows after the connection's last packets, want its one", h.d.Flows())
			}
			h.tick(3 * time.Second) // the linger after the real FINs
			if h.d.Flows() != 0 {
				t.Error("the real FINs did not end the flow")
			}
			got := h.file("u")
			if len(got) != 10 {
				t.Fatalf("%d packets in the file, want all 10, the injected one included", len(got))
			}
			if string(got[5]) != string(injected[:min(len(injected), len(got[5]))]) {
				t.Error("the injected packet is not the file's sixth")
			}
		})
	}
}

// TestPortReuseAfterRST: a connection reset at the exact sequence number,
// then a new one on the same 4-tuple, each in its own file.
func TestPortReuseAfterRST(t *testing.T) {
	h := newHarness(t, nil)
	c1, c2 := newConn(1000, 111), newConn(1000, 90000)
	h.open(0, "first", c1)
	h.packet(1*ms, c1.syn(t))
	h.packet(2*ms, c1.synack(t))
	h.packet(3*ms, c1.ack(t, true))
	h.packet(4*ms, c1.frame(t, false, func(p *layers.TCP) { p.RST = true }, 0))
	h.packet(20*ms, c2.syn(t)) // within the linger
	h.open(21*ms, "second", c2)
	h.packet(22*ms, c2.synack(t))
	h.packet(23*ms, c2.ack(t, true))
	h.d.Close()
	if a, b := len(h.file("first")), len(h.file("second")); a != 4 || b != 3 {
		t.Errorf("first %d packets (want 4), second %d (want 3)", a, b)
	}
}
