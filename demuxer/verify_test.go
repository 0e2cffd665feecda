package demuxer

import (
	"testing"
	"time"

	"github.com/google/gopacket/layers"

	"github.com/m-lab/packet-headers/index"
)

// mssOption is the MSS option of 1460 bytes, for SYNs.
var mssOption = []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}}

// verifyFlow is one connection of the verification tests: the client
// sends 100 bytes, the server 4000 in one TSO super-packet (3 segments of
// the 1460-byte MSS), then both close. skip names the frames the capture
// misses; the server acknowledges every byte whatever the capture saw.
func verifyFlow(t *testing.T, h *harness, c *conn, handshake bool, skip map[string]bool) {
	frames := []struct {
		name string
		b    []byte
	}{}
	add := func(name string, b []byte) {
		frames = append(frames, struct {
			name string
			b    []byte
		}{name, b})
	}
	if handshake {
		add("syn", c.frame(t, true, func(p *layers.TCP) { p.SYN, p.Seq, p.Options = true, c.isn, mssOption }, 0))
		add("synack", c.frame(t, false, func(p *layers.TCP) { p.SYN, p.ACK, p.Seq, p.Options = true, true, srvISN, mssOption }, 0))
		add("ack", c.ack(t, true))
	} else {
		c.next[0]++
		c.next[1]++
	}
	add("request", c.data(t, true, 100))
	add("request ack", c.ack(t, false))
	add("response", c.data(t, false, 4000))
	add("response ack", c.ack(t, true))
	add("client fin", c.fin(t, true))
	add("server fin", c.fin(t, false))
	add("last ack", c.ack(t, true))
	for i, f := range frames {
		if !skip[f.name] {
			h.packet(time.Duration(i)*ms, f.b)
		}
	}
}

// serverCounters are what the server's socket counts of verifyFlow's
// connection, all of it received and sent: 5 segments from the client
// after its SYN, which counts once; 5 segments sent after the SYN-ACK,
// which does not; 100 bytes and the client's FIN received, 4000 sent.
func serverCounters(c *conn) *index.Kernel {
	return &index.Kernel{Local: c.srv, SegsIn: 6, SegsOut: 5, DataSegsIn: 1, DataSegsOut: 3,
		BytesReceived: 101, BytesSent: 4000, BytesAcked: 4001, SndMSS: 1460, RcvMSS: 1460}
}

// TestVerifyKernel: a trace with every segment the server's socket counted
// is complete by the kernel, a TSO super-packet counting as its segments;
// one without the client's request lacks exactly its segment and bytes, on
// the client's side; counters that come after the flow's end, within
// FinalWait, are waited for; without them, the verdict is inferred.
func TestVerifyKernel(t *testing.T) {
	for _, tc := range []struct {
		name          string
		skip          map[string]bool
		final         time.Duration // when the counters come (0: never)
		verified, by  string
		missing, s2d  int
		s2dBytes, d2s int
		kernelInIndex bool
		counters      func(*index.Kernel) // how the socket's counters differ from serverCounters'
	}{
		{name: "whole", final: 20 * ms, verified: "complete", by: "kernel", kernelInIndex: true},
		{name: "request missed", skip: map[string]bool{"request": true}, final: 20 * ms, verified: "incomplete", by: "kernel", missing: 1, s2d: 1, s2dBytes: 100, kernelInIndex: true},
		{name: "counters after the end", final: 2500 * ms, verified: "complete", by: "kernel", kernelInIndex: true},
		{name: "no counters", verified: "complete", by: "inference"},
		// The server's path MTU was smaller than the MSS: its 4000 bytes
		// went as 4 segments of 1000 in the super-packet, not 3. The
		// bytes are all there: nothing is missing.
		{name: "segments under the MSS", final: 20 * ms, verified: "complete", by: "kernel", kernelInIndex: true,
			counters: func(k *index.Kernel) { k.SegsOut, k.DataSegsOut = 6, 4 }},
		// The handshake missed: the socket counted the SYN, and sent the
		// SYN-ACK without counting it; both are missing.
		{name: "handshake missed", skip: map[string]bool{"syn": true, "synack": true}, final: 20 * ms, verified: "incomplete", by: "kernel", kernelInIndex: true,
			missing: 2, s2d: 1, d2s: 1},
		// A pure ACK the capture missed is a segment without bytes.
		{name: "an ACK missed", skip: map[string]bool{"response ack": true}, final: 20 * ms, verified: "incomplete", by: "kernel", kernelInIndex: true,
			missing: 1, s2d: 1},
		{name: "no counters, request missed", skip: map[string]bool{"request": true}, verified: "incomplete", by: "inference", missing: 1, s2d: 1, s2dBytes: 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.KernelCounters = true })
			c := newConn(40000, 1000)
			h.names.Open(t0, "verified", c.key(), "test", 77)
			verifyFlow(t, h, c, true, tc.skip)
			counters := serverCounters(c)
			if tc.counters != nil {
				tc.counters(counters)
			}
			ticks := []time.Duration{100 * ms, 1500 * ms, 2000 * ms, 3000 * ms, 3500 * ms, 5000 * ms}
			for _, at := range ticks {
				if tc.final != 0 && at > tc.final && at-500*ms <= tc.final {
					h.names.Final("verified", c.key(), 77, counters)
				}
				h.tick(at)
			}
			if tc.final >= 2000*ms && tc.final < 5000*ms {
				h.names.Final("verified", c.key(), 77, counters)
				h.tick(5500 * ms)
			}
			r, ok := h.records()["verified"]
			if !ok {
				t.Fatal("no record")
			}
			m := r.Missing
			got := []any{r.Verified, r.VerifiedBy, m.Segments, m.S2D.Segments, deref(m.S2D.Bytes), m.D2S.Segments, deref(m.D2S.Bytes), r.Kernel != nil}
			want := []any{tc.verified, tc.by, tc.missing, tc.s2d, tc.s2dBytes, tc.d2s, 0, tc.kernelInIndex}
			for i := range got {
				if got[i] != want[i] {
					t.Errorf("verified, by, missing, src_to_dst segments and bytes, dst_to_src segments and bytes, kernel: %v, want %v", got, want)
					break
				}
			}
		})
	}
}

func deref(p *int) int {
	if p == nil {
		return -1
	}
	return *p
}

// TestVerifyInference: without the kernel's counters, a trace is complete
// when it has its handshake and ending and every byte acknowledged was
// captured; a flow seen from its middle lacks its handshake; one that
// ends unseen (a timeout) is unknown; data acknowledged but not captured
// is missing, at least a segment per hole; a spoofed acknowledgment beyond
// what the sender could have sent changes nothing.
func TestVerifyInference(t *testing.T) {
	h := newHarness(t, nil)
	whole, middle, quiet, holed, spoofed := newConn(40001, 1000), newConn(40002, 2000), newConn(40003, 3000), newConn(40004, 4000), newConn(40005, 5000)
	for i, c := range []*conn{whole, middle, quiet, holed, spoofed} {
		h.names.Open(t0, []string{"whole", "middle", "quiet", "holed", "spoofed"}[i], c.key(), "test", 0)
	}
	verifyFlow(t, h, whole, true, nil)
	verifyFlow(t, h, middle, false, nil)
	verifyFlow(t, h, holed, true, map[string]bool{"response": true})
	// A spoofed ACK far past what the server sent, which the server's TCP
	// ignores, before the connection goes on as usual.
	h.packet(0, spoofed.frame(t, true, func(p *layers.TCP) { p.SYN, p.Seq, p.Options = true, spoofed.isn, mssOption }, 0))
	h.packet(0, spoofed.frame(t, false, func(p *layers.TCP) { p.SYN, p.ACK, p.Seq, p.Options = true, true, srvISN, mssOption }, 0))
	h.packet(0, spoofed.frame(t, true, func(p *layers.TCP) { p.ACK, p.Ack = true, srvISN+1+1<<30 }, 0))
	spoofed.next[0]--
	spoofed.next[1]-- // verifyFlow without a handshake moves both past the SYNs
	verifyFlow(t, h, spoofed, false, nil)
	for _, b := range [][]byte{quiet.syn(t), quiet.synack(t), quiet.ack(t, true), quiet.data(t, true, 10), quiet.ack(t, false)} {
		h.packet(0, b)
	}
	h.tick(time.Second)
	h.tick(40 * time.Second) // past -flowtimeout
	recs := h.records()
	for name, want := range map[string][]any{
		"whole":   {"complete", false, false, 0, 0},
		"middle":  {"incomplete", true, false, 0, 0},
		"quiet":   {"unknown", false, true, 0, 0},
		"holed":   {"incomplete", false, false, 3, 4000}, // the server's 4000 bytes, at least 3 segments of 1460
		"spoofed": {"complete", false, false, 0, 0},
	} {
		r := recs[name]
		m := r.Missing
		got := []any{r.Verified, m.Handshake, m.Ending, m.Segments, deref(m.D2S.Bytes)}
		for i := range got {
			if got[i] != want[i] {
				t.Errorf("%s: verified, handshake and ending missing, segments, dst_to_src bytes: %v, want %v", name, got, want)
				break
			}
		}
		if r.VerifiedBy != "inference" || r.Kernel != nil {
			t.Errorf("%s: verified by %s, kernel %v", name, r.VerifiedBy, r.Kernel)
		}
	}
}

// TestCoverage: the sequence space covered counts each byte once, whatever
// the order and overlap of the segments; holes are filled, split and
// counted; past maxHoles at once the bytes are no longer known.
func TestCoverage(t *testing.T) {
	var c coverage
	c.start(1000)
	c.add(1000, 1100)
	c.add(1200, 1300) // hole [1100, 1200)
	c.add(1000, 1100) // a retransmission
	c.add(1140, 1160) // splits the hole
	c.add(1050, 1150) // fills its left part, overlapping
	if c.bytes != 260 || c.n != 1 || c.holes[0] != [2]uint32{1160, 1200} {
		t.Errorf("bytes %d, holes %v (%d); want 260, [1160 1200]", c.bytes, c.holes[:c.n], c.n)
	}
	c.ack(1300, 1<<16)
	if b, s := c.unseen(10); b != 40 || s != 4 {
		t.Errorf("unseen %d bytes in %d segments, want 40 in 4", b, s)
	}
	for i := uint32(0); i < maxHoles; i++ {
		c.add(1400+200*i, 1500+200*i)
	}
	if !c.lost {
		t.Error("more holes than maxHoles, and the bytes are still taken as known")
	}
	var w coverage // across the wrap of the sequence space
	w.add(0xffffff00, 0xffffffff)
	w.add(0xffffffff, 0x100)
	if w.bytes != 0x200 || w.n != 0 {
		t.Errorf("across the wrap: %d bytes, %d holes", w.bytes, w.n)
	}
}

// BenchmarkVerdict measures what a flow's end costs for its completeness:
// taking its ends' tallies and comparing them with the socket's counters
// (the per-packet part is in BenchmarkPacket).
func BenchmarkVerdict(b *testing.B) {
	var f flow
	c := newConn(40000, 1000)
	f.key, f.firstFromA, f.sawSYN, f.sawSYNACK, f.ended = c.key(), false, true, true, true
	f.ends[0].tally = tally{segs: 5, dataSegs: 3, bytes: 4000, mss: 1460, syns: 1}
	f.ends[1].tally = tally{segs: 5, dataSegs: 1, bytes: 100, mss: 1460, syns: 1, pureSYNs: 1}
	f.ends[1].cov.add(1001, 1102)
	k := serverCounters(c)
	var r index.Record
	b.ReportAllocs()
	for b.Loop() {
		v := verdictOf(&f)
		v.apply(&r, k)
	}
	if r.Verified != index.Complete {
		b.Fatalf("verified %v, missing %+v", r.Verified, r.Missing)
	}
}
