package demuxer

import (
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/saver"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

// conn makes the frames of one TCP connection, as gopacket encodes them,
// with the sequence and acknowledgment numbers a real one would have.
type conn struct {
	cli, srv netip.AddrPort
	isn      uint32
	next     [2]uint32 // the next sequence number of the client and the server
}

// srvISN is the server's initial sequence number.
const srvISN = 7777

func newConn(cliPort uint16, isn uint32) *conn {
	return &conn{cli: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.5"), cliPort), srv: netip.MustParseAddrPort("192.0.2.1:443"), isn: isn,
		next: [2]uint32{isn, srvISN}}
}

func (c *conn) frame(t testing.TB, fromClient bool, f func(*layers.TCP), payload int) []byte {
	src, dst := c.cli, c.srv
	side := 0
	if !fromClient {
		src, dst = dst, src
		side = 1
	}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: c.next[side], Ack: c.next[1-side], Window: 1000}
	f(tcp)
	end := tcp.Seq + uint32(payload)
	if tcp.SYN {
		end++
	}
	if tcp.FIN {
		end++
	}
	if int32(end-c.next[side]) > 0 && !tcp.RST {
		c.next[side] = end
	}
	tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		&layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4},
		ip, tcp, gopacket.Payload(make([]byte, payload)))
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func (c *conn) syn(t testing.TB) []byte {
	return c.frame(t, true, func(p *layers.TCP) { p.SYN, p.Seq = true, c.isn }, 0) // first or again
}

func (c *conn) synack(t testing.TB) []byte {
	return c.frame(t, false, func(p *layers.TCP) { p.SYN, p.ACK, p.Seq = true, true, srvISN }, 0)
}

func (c *conn) data(t testing.TB, fromClient bool, n int) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.ACK, p.PSH = true, true }, n)
}

func (c *conn) fin(t testing.TB, fromClient bool) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.FIN, p.ACK = true, true }, 0)
}

func (c *conn) ack(t testing.TB, fromClient bool) []byte {
	return c.frame(t, fromClient, func(p *layers.TCP) { p.ACK = true }, 0)
}

func (c *conn) key() packet.Key { return packet.KeyFromAddrPorts(c.srv, c.cli) }

// harness is a demuxer with a real names table and a real saver writing to
// a temporary directory.
type harness struct {
	t     *testing.T
	d     *Demuxer
	names *names.Table
	sv    *saver.Saver
	lim   *Limits
}

func newHarness(t *testing.T, mod func(*Options)) *harness {
	sv, err := saver.New(saver.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, names: names.New(nil), sv: sv, lim: &Limits{}}
	t.Cleanup(func() { sv.Wait(); sv.PublishIndex(time.Time{}) }) // before the directory's removal
	o := Options{LinkType: packet.LinkTypeEthernet, MaxHeaderSize: 256,
		CaptureDuration: 30 * time.Second, FlowTimeout: 30 * time.Second, UUIDWait: 5 * time.Second,
		Names: h.names, Writer: WriterFunc(func(u string, lt packet.LinkType, first time.Time) FlowWriter { return sv.Start(u, lt, first) }), Limits: h.lim}
	if mod != nil {
		mod(&o)
	}
	h.d = New(o)
	return h
}

func (h *harness) packet(at time.Duration, b []byte) { h.d.Packet(b, t0.Add(at), len(b)) }

func (h *harness) tick(at time.Duration) { h.d.Tick(t0.Add(at)) }

func (h *harness) open(at time.Duration, uuid string, c *conn) {
	h.names.Open(t0.Add(at), uuid, c.key(), "test", 0)
}

// file reads a saved flow back with gopacket; nil if there is none.
func (h *harness) file(uuid string) [][]byte {
	h.sv.Wait()
	f, err := os.Open(h.sv.Path(uuid, t0))
	if err != nil {
		return nil
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		h.t.Fatal(err)
	}
	var out [][]byte
	for {
		data, _, err := r.ReadPacketData()
		if err == io.EOF {
			return out
		}
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, data)
	}
}

func (h *harness) files() int {
	h.sv.Wait()
	n := 0
	filepath.Walk(h.sv.Dir(), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && filepath.Ext(p) == ".pcap" {
			n++
		}
		return nil
	})
	return n
}

const ms = time.Millisecond

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
