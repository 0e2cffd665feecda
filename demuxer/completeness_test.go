package demuxer

import (
	"bufio"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/anonymize"
)

// indexRecord is a flow index record as read back from the saver's files.
type indexRecord struct {
	UUID, Source, File string
	Src, Dst           struct {
		IP   string
		Port uint16
	}
	First, Last, Ended time.Time
	Packets, Bytes     int
	WireBytes          int            `json:"wire_bytes"`
	NotSavedRaw        map[string]int `json:"not_saved"`
	SYN                bool           `json:"syn"`
	SYNACK             bool           `json:"syn_ack"`
	End                string
	FlowEnd            string `json:"flow_end"`
	Verified           string
	VerifiedBy         string `json:"verified_by"`
	Missing            struct {
		Segments int
		S2D      struct {
			Segments int
			Bytes    *int
		} `json:"src_to_dst"`
		D2S struct {
			Segments int
			Bytes    *int
		} `json:"dst_to_src"`
		Handshake, Ending bool
	}
	Kernel  map[string]int
	Capture *struct {
		Interface string
		DropsMax  int `json:"drops_max"`
		Down      bool
	}
}

// records ends the demuxer, publishes the index and reads it back, by UUID;
// a UUID recorded twice fails the test.
func (h *harness) records() map[string]indexRecord {
	h.d.Close()
	h.sv.Wait()
	h.sv.PublishIndex(time.Time{})
	out := map[string]indexRecord{}
	filepath.Walk(h.sv.Dir(), func(p string, info os.FileInfo, err error) error {
		if err != nil || !strings.HasSuffix(p, ".jsonl") {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			h.t.Fatal(err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var r indexRecord
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				h.t.Fatalf("%s: %v", sc.Text(), err)
			}
			if _, dup := out[r.UUID]; dup {
				h.t.Errorf("%s recorded twice", r.UUID)
			}
			out[r.UUID] = r
		}
		return nil
	})
	return out
}

// TestRecordEnds: each way a flow ends is its record's end; a file cut by
// -captureduration says so, with the flow's own end and the packets not
// saved.
func TestRecordEnds(t *testing.T) {
	tests := []struct {
		name          string
		run           func(h *harness, c *conn)
		end, flowEnd  string
		afterDuration int
		packets       int
		noSYNACK      bool // the server never answered
	}{
		{"fin", func(h *harness, c *conn) {
			h.packet(10*ms, c.fin(t, true))
			h.packet(11*ms, c.fin(t, false))
			h.packet(12*ms, c.ack(t, true))
			h.tick(1100 * ms)
		}, "fin", "fin", 0, 5, false},
		{"rst", func(h *harness, c *conn) {
			h.packet(10*ms, c.frame(t, true, func(p *layers.TCP) { p.RST = true }, 0))
			h.tick(1100 * ms)
		}, "rst", "rst", 0, 3, false},
		{"an RST the receiver ignores, then FINs", func(h *harness, c *conn) {
			h.packet(10*ms, c.frame(t, true, func(p *layers.TCP) { p.RST, p.Seq = true, p.Seq+100000 }, 0))
			h.packet(20*ms, c.fin(t, true))
			h.packet(21*ms, c.fin(t, false))
			h.tick(1100 * ms)
		}, "fin", "fin", 0, 5, false},
		{"tcp-info's Close applied before the block with the FINs", func(h *harness, c *conn) {
			h.names.Close(t0.Add(12*ms), "u")
			h.tick(14 * ms)
			h.packet(10*ms, c.fin(t, true))
			h.packet(11*ms, c.fin(t, false))
			h.tick(1200 * ms)
		}, "fin", "fin", 0, 4, false},
		{"FINs, then an RST", func(h *harness, c *conn) {
			h.packet(10*ms, c.fin(t, true))
			h.packet(11*ms, c.fin(t, false))
			h.packet(12*ms, c.frame(t, true, func(p *layers.TCP) { p.RST = true }, 0))
			h.tick(1200 * ms)
		}, "fin", "fin", 0, 5, false},
		{"close", func(h *harness, c *conn) {
			h.names.Close(t0.Add(20*ms), "u")
			h.tick(100 * ms)
			h.tick(1200 * ms)
		}, "close", "close", 0, 2, false},
		{"timeout", func(h *harness, c *conn) {
			h.tick(31 * time.Second)
		}, "timeout", "timeout", 0, 2, false},
		{"reused", func(h *harness, c *conn) {
			h.open(5*ms, "u2", c)
			c.isn += 1000
			h.packet(500*ms, c.syn(t)) // another connection's SYN on the 4-tuple, never synchronized
		}, "reused", "reused", 0, 1, true},
		{"shutdown", func(h *harness, c *conn) {
			h.packet(10*ms, c.data(t, true, 10))
		}, "shutdown", "shutdown", 0, 3, false},
		{"FINs, then shutdown during the linger", func(h *harness, c *conn) {
			h.packet(10*ms, c.fin(t, true))
			h.packet(11*ms, c.fin(t, false))
		}, "fin", "fin", 0, 4, false},
		{"captureduration", func(h *harness, c *conn) {
			h.packet(10*ms, c.data(t, true, 10))
			h.packet(1500*ms, c.data(t, true, 10))
			h.packet(1600*ms, c.data(t, false, 10))
			h.packet(1700*ms, c.fin(t, true))
			h.packet(1701*ms, c.fin(t, false))
			h.tick(3000 * ms)
		}, "captureduration", "fin", 4, 3, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.CaptureDuration = time.Second })
			c := newConn(1000, 1)
			h.open(0, "u", c)
			h.packet(0, c.syn(t))
			if !tt.noSYNACK {
				h.packet(1*ms, c.synack(t))
			}
			tt.run(h, c)
			recs := h.records()
			r, ok := recs["u"]
			if !ok {
				t.Fatalf("no record of u: %v", recs)
			}
			if r.End != tt.end || r.FlowEnd != tt.flowEnd || r.NotSavedRaw["after_captureduration"] != tt.afterDuration || r.Packets != tt.packets || !r.SYN || r.SYNACK == tt.noSYNACK {
				t.Errorf("record %+v: want end %s, flow end %s, %d after -captureduration, %d packets, SYN, SYN-ACK %v", r, tt.end, tt.flowEnd, tt.afterDuration, tt.packets, !tt.noSYNACK)
			}
			if n := len(h.file("u")); n != r.Packets {
				t.Errorf("the file has %d packets, its record %d", n, r.Packets)
			}
		})
	}
}

// TestRecordContents: a record says what the file holds: the first
// packet's direction as saved (anonymized), the times, the wire and header
// bytes, whether the handshake was captured (not for a flow seen from its
// middle), and the UUID's source.
func TestRecordContents(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Anonymizer = anonymize.New(anonymize.Netblock, []netip.Addr{netip.MustParseAddr("192.0.2.1")})
	})
	c := newConn(1000, 1)
	h.open(0, "mid", c)
	data := c.data(t, false, 1400) // from the server: a flow seen from its middle
	h.d.Packet(data[:100], t0.Add(5*ms), len(data))
	ack := c.ack(t, true)
	h.packet(7*ms, ack)
	recs := h.records()
	r := recs["mid"]
	if r.Src.IP != "192.0.2.1" || r.Src.Port != 443 || r.Dst.IP != "203.0.113.0" || r.Dst.Port != 1000 {
		t.Errorf("endpoints %+v -> %+v, want the server's, then the client's masked", r.Src, r.Dst)
	}
	if r.SYN || r.SYNACK || r.Packets != 2 || r.WireBytes != len(data)+len(ack) || r.Bytes != 2*54 || r.Source != "test" {
		t.Errorf("record %+v", r)
	}
	if !r.First.Equal(t0.Add(5*ms)) || !r.Last.Equal(t0.Add(7*ms)) || r.Capture != nil {
		t.Errorf("first %v last %v capture %v", r.First, r.Last, r.Capture)
	}
}

// TestRecordRefused: the packets of a connection that -maxflows refused
// are counted in the record of its flow once one is tracked.
func TestRecordRefused(t *testing.T) {
	h := newHarness(t, nil)
	h.lim.MaxFlows = 1
	a, b := newConn(1000, 1), newConn(2000, 2)
	h.open(0, "a", a)
	h.open(0, "b", b)
	h.packet(0, a.syn(t))
	h.packet(1*ms, b.syn(t)) // refused
	h.packet(2*ms, b.syn(t)) // refused
	h.packet(3*ms, a.frame(t, true, func(p *layers.TCP) { p.RST = true }, 0))
	h.tick(2 * time.Second) // a ends
	h.packet(3*time.Second, b.syn(t))
	recs := h.records()
	if r := recs["b"]; r.NotSavedRaw["flow_limit"] != 2 || r.Packets != 1 {
		t.Errorf("b: %+v, want 2 packets refused by the flow limit", r)
	}
	if r := recs["a"]; r.NotSavedRaw["flow_limit"] != 0 {
		t.Errorf("a: %+v", r)
	}
}

// TestRecordDrops: a record's drops are the capture's counter read at the
// last tick before its first packet and the first after its last (those of
// later ticks do not count), and the capture's failures meanwhile say it
// was down; a flow ended at a packet waits for the next tick's reading.
func TestRecordDrops(t *testing.T) {
	var dropped, failures uint64
	h := newHarness(t, func(o *Options) {
		o.Interface = "eth9"
		o.Capture = func() (uint64, uint64) { return dropped, failures }
	})
	a, b, c, e := newConn(1000, 1), newConn(2000, 2), newConn(3000, 3), newConn(4000, 4)
	for _, x := range []struct {
		uuid string
		c    *conn
	}{{"a", a}, {"b", b}, {"c", c}, {"e", e}} {
		h.open(0, x.uuid, x.c)
	}
	dropped = 3
	h.tick(0)
	h.packet(50*ms, a.syn(t))
	dropped = 5
	h.tick(100 * ms)
	h.packet(150*ms, a.synack(t))
	h.packet(160*ms, a.fin(t, true))
	h.packet(170*ms, a.fin(t, false))
	dropped = 9
	h.tick(200 * ms)
	dropped, failures = 100, 1 // after a's last packet
	h.tick(300 * ms)
	h.tick(1300 * ms) // a ends
	h.packet(1350*ms, b.syn(t))
	h.packet(1360*ms, b.synack(t))
	h.tick(1400 * ms)
	h.packet(1450*ms, c.syn(t))
	c.isn += 1000
	h.packet(1460*ms, c.syn(t)) // c ends at a packet, before any reading after its last
	dropped = 104
	h.tick(1500 * ms)
	b.isn += 1000
	h.packet(1550*ms, b.syn(t)) // ignored (b is synchronized): b lasts until Close, its drops until the reading at 2 s
	dropped = 200
	h.tick(2000 * ms)
	h.packet(2000*ms, e.syn(t)) // a reading at its first packet's time counts as before it
	h.tick(2100 * ms)
	recs := h.records()
	for uuid, want := range map[string]struct {
		drops int
		down  bool
	}{"a": {6, false}, "b": {100, false}, "c": {4, false}, "e": {0, false}} {
		r := recs[uuid]
		if r.Capture == nil || r.Capture.Interface != "eth9" || r.Capture.DropsMax != want.drops || r.Capture.Down != want.down {
			t.Errorf("%s: capture %+v, want %d drops, down %v", uuid, r.Capture, want.drops, want.down)
		}
	}
	// A flow across a failure.
	h = newHarness(t, func(o *Options) {
		o.Interface = "eth9"
		o.Capture = func() (uint64, uint64) { return dropped, failures }
	})
	h.open(0, "d", a)
	h.tick(0)
	h.packet(10*ms, a.syn(t))
	failures++
	h.tick(100 * ms)
	if r := h.records()["d"]; r.Capture == nil || !r.Capture.Down || r.Capture.DropsMax != 0 {
		t.Errorf("d: capture %+v, want down", r.Capture)
	}
}
