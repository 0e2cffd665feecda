package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/index"
)

// indexName is how a flow index file is named (index.Name).
var indexName = regexp.MustCompile(`^flows-[0-9]{8}T[0-9]{2}Z(-[0-9]+)?\.jsonl$`)

// isIndex reports whether path names a flow index file.
func isIndex(path string) bool { return indexName.MatchString(filepath.Base(path)) }

// indexRecord is a flow index record (docs/flow-index.md).
type indexRecord struct {
	UUID, Source, File string
	Src, Dst           struct {
		IP   string
		Port uint16
	}
	First, Last, Ended time.Time
	Packets, Bytes     int
	WireBytes          int            `json:"wire_bytes"`
	FileBytes          int            `json:"file_bytes"`
	NotSaved           map[string]int `json:"not_saved"`
	SYN                bool           `json:"syn"`
	SYNACK             bool           `json:"syn_ack"`
	End                string
	FlowEnd            string `json:"flow_end"`
	Capture            *struct {
		Interface string
		DropsMax  int `json:"drops_max"`
		Down      bool
	}
	Verified   string
	VerifiedBy string `json:"verified_by"`
	Missing    struct {
		Segments          int
		S2D               direction `json:"src_to_dst"`
		D2S               direction `json:"dst_to_src"`
		Handshake, Ending bool
	}
	Kernel    map[string]int
	indexFile string // where it was read, relative to the data directory
}

// direction is what a record says a trace lacks of one direction.
type direction struct {
	Segments int
	Bytes    *int
}

var (
	schemaOnce sync.Once
	schema     *jsonschema.Schema
	schemaErr  error
)

// flowIndexSchema is docs/flow-index.schema.json, compiled once.
func flowIndexSchema(t testing.TB) *jsonschema.Schema {
	schemaOnce.Do(func() {
		c := jsonschema.NewCompiler()
		c.AssertFormat()
		schema, schemaErr = c.Compile("../docs/flow-index.schema.json")
	})
	if schemaErr != nil {
		t.Fatal(schemaErr)
	}
	return schema
}

// readIndex reads every index file of a data directory, each line checked
// against the JSON Schema, and returns the records by UUID; a UUID
// recorded twice is an error.
func readIndex(t *testing.T, what, dir string) map[string]indexRecord {
	t.Helper()
	s := flowIndexSchema(t)
	out := map[string]indexRecord{}
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() || !isIndex(p) {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 || b[len(b)-1] != '\n' {
			t.Errorf("%s: %s does not end with a whole line", what, rel)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			v, err := jsonschema.UnmarshalJSON(bytes.NewReader(sc.Bytes()))
			if err == nil {
				err = s.Validate(v)
			}
			if err != nil {
				t.Errorf("%s: %s: %s: %v", what, rel, sc.Text(), err)
				continue
			}
			var r indexRecord
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("%s: %s: %v", what, rel, err)
			}
			r.indexFile = rel
			if _, dup := out[r.UUID]; dup {
				t.Errorf("%s: %s recorded twice", what, r.UUID)
			}
			out[r.UUID] = r
		}
		return nil
	})
	return out
}

// readWholeIndex checks that an index file is whole: lines of JSON, each
// with its newline.
func readWholeIndex(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) == 0 || b[len(b)-1] != '\n' {
		return "not whole lines"
	}
	for _, line := range bytes.Split(b[:len(b)-1], []byte("\n")) {
		if !json.Valid(line) {
			return fmt.Sprintf("not JSON: %q", line)
		}
	}
	return ""
}

// Kinds of connections the lab makes whose end is not read from the
// reference capture alone.
const (
	kindHeld = "held" // open, idle, when the daemons stop
	kindRST  = "rst"  // reset by the server (mode 'r')
)

// indexWant is what the test knows of a flow with a file: its reference
// connection and its kind ("" for the usual ones).
type indexWant struct {
	c    *refConn
	kind string
}

// refEnd returns how the reference connection ended, as the daemon's
// demuxer sees it: the first of an RST and the second of the two ends'
// FINs; "" if neither came.
func refEnd(c *refConn) string {
	fins := map[netip.AddrPort]bool{}
	for _, p := range c.pkts {
		if p.flags&0x04 != 0 {
			return "rst"
		}
		if p.flags&0x01 != 0 {
			if fins[p.src] = true; len(fins) == 2 {
				return "fin"
			}
		}
	}
	return ""
}

// checkIndex checks a daemon's flow index against its files and what the
// test knows: a record for every file and for nothing else, in the file's
// day directory and its end's hour; what each record says the file holds
// is what it holds; and for the flows in want, the reference capture's
// packets (saved or not after -captureduration), handshake and end, and the
// endpoints as saved. Live records say the capture dropped nothing (no
// ring overflows here) and was never down; offline ones have no capture.
func checkIndex(t *testing.T, l *lab, d *daemon, files map[string]string, want map[string]indexWant, offline, allKinds bool) {
	t.Helper()
	recs := readIndex(t, d.name, d.dataDir)
	for u := range files {
		if _, ok := recs[u]; !ok {
			t.Errorf("%s: no index record for the file of %s", d.name, u)
		}
	}
	kinds := map[string]int{}
	for u, r := range recs {
		path, ok := files[u]
		if !ok {
			t.Errorf("%s: an index record for %s, which has no file", d.name, u)
			continue
		}
		if msg := checkRecordFile(t, d, r, path, offline, l); msg != "" {
			t.Errorf("%s: %s: %s", d.name, u, msg)
			continue
		}
		w, ok := want[u]
		if !ok {
			continue
		}
		if msg := checkRecordRef(d, r, w); msg != "" {
			t.Errorf("%s: %s (%s): %s\nrecord %+v", d.name, u, w.c.key, msg, r)
			continue
		}
		kinds[r.End+"/"+r.FlowEnd]++
	}
	t.Logf("%s: %d index records, one for each file; %d checked against the reference, by end: %v", d.name, len(recs), len(want), kinds)
	held := kinds["shutdown/shutdown"]
	if d.capDur < 10*time.Second {
		held = kinds["captureduration/shutdown"] // talked past the limit
	}
	if allKinds && (kinds["rst/rst"] == 0 || kinds["fin/fin"] == 0 || held == 0) {
		t.Errorf("%s: not every kind of end was checked: %v", d.name, kinds)
	}
}

// checkRecordFile checks a record against its file.
func checkRecordFile(t *testing.T, d *daemon, r indexRecord, path string, offline bool, l *lab) string {
	rel, _ := filepath.Rel(d.dataDir, path)
	if r.File != rel {
		return fmt.Sprintf("file %s, the file is %s", r.File, rel)
	}
	if filepath.Dir(r.indexFile) != filepath.Dir(rel) {
		return fmt.Sprintf("recorded in %s, not in the file's day directory", r.indexFile)
	}
	if hour, _, err := index.ParseName(filepath.Base(r.indexFile)); err != nil || !hour.Equal(index.Hour(r.Ended)) {
		return fmt.Sprintf("recorded in %s, ended at %v", r.indexFile, r.Ended)
	}
	recs, _ := readPcap(t, path)
	st, _ := os.Stat(path)
	hdr, wire := 0, 0
	for _, x := range recs {
		hdr, wire = hdr+len(x.data), wire+x.origLen
	}
	after := r.NotSaved["after_captureduration"]
	switch {
	case r.Packets != len(recs) || r.Bytes != hdr || r.WireBytes != wire || r.FileBytes != int(st.Size()):
		return fmt.Sprintf("record says %d packets, %d header bytes, %d on the wire, %d in the file; the file holds %d, %d, %d, %d",
			r.Packets, r.Bytes, r.WireBytes, r.FileBytes, len(recs), hdr, wire, st.Size())
	case len(recs) == 0 || !r.First.Equal(recs[0].ts):
		return fmt.Sprintf("first %v, the file's first packet %v", r.First, recs)
	case after == 0 && !r.Last.Equal(recs[len(recs)-1].ts), after > 0 && !r.Last.After(recs[len(recs)-1].ts):
		return fmt.Sprintf("last %v with %d packets after -captureduration, the file's last packet %v", r.Last, after, recs[len(recs)-1].ts)
	case offline && r.Capture != nil:
		return "an offline record with a capture"
	case !offline && (r.Capture == nil || r.Capture.Interface != l.nsIf || uint64(r.Capture.DropsMax) > d.drops || r.Capture.Down):
		return fmt.Sprintf("capture %+v, want %s, at most the %d frames the kernel dropped, never down", r.Capture, l.nsIf, d.drops)
	}
	return ""
}

// checkRecordRef checks a record against the flow's reference connection.
func checkRecordRef(d *daemon, r indexRecord, w indexWant) string {
	c := w.c
	first := c.pkts[0]
	syn, synack := false, false
	for _, p := range c.pkts {
		syn = syn || p.flags&0x12 == 0x02
		synack = synack || p.flags&0x12 == 0x12
	}
	client := first.src
	server := c.key.a
	if server == client {
		server = c.key.b
	}
	saved := client.Addr()
	switch {
	case d.netblock:
		saved = anonymize.MaskAddr(saved)
	case d.anon != nil:
		saved = d.anon.Anonymized(saved)
	}
	flowEnd := refEnd(c)
	switch w.kind {
	case kindHeld:
		flowEnd = "shutdown"
	case kindRST:
		if flowEnd != "rst" {
			return "the lab's reset connection has no RST in the reference"
		}
	}
	dur := c.pkts[len(c.pkts)-1].ts.Sub(first.ts)
	after := r.NotSaved["after_captureduration"]
	switch {
	case r.SYN != syn || r.SYNACK != synack:
		return fmt.Sprintf("SYN %v, SYN-ACK %v; the reference %v, %v", r.SYN, r.SYNACK, syn, synack)
	case r.Src.IP != saved.String() || r.Src.Port != client.Port() || r.Dst.IP != server.Addr().String() || r.Dst.Port != server.Port():
		return fmt.Sprintf("endpoints %+v -> %+v, want %v:%d -> %v", r.Src, r.Dst, saved, client.Port(), server)
	case r.Packets+after != len(c.pkts):
		return fmt.Sprintf("%d packets saved and %d after -captureduration; the reference has %d", r.Packets, after, len(c.pkts))
	case flowEnd != "" && r.FlowEnd != flowEnd:
		return fmt.Sprintf("flow end %s, the reference's %s", r.FlowEnd, flowEnd)
	case dur > d.capDur+timestampOutlier && (r.End != "captureduration" || after == 0):
		return fmt.Sprintf("end %s with %d packets after -captureduration, for a connection of %v", r.End, after, dur)
	case dur < d.capDur-timestampOutlier && (r.End != r.FlowEnd || after != 0):
		return fmt.Sprintf("end %s with %d packets after -captureduration, for a connection of %v", r.End, after, dur)
	}
	return ""
}

// labKinds are the lab's connections whose end the reference capture
// alone does not tell, by 4-tuple.
type labKinds struct {
	held, reset map[flowKey]bool // by 4-tuple: a client port is reused toward other servers
}

// of returns the kind of a reference connection.
func (k *labKinds) of(c *refConn) string {
	switch {
	case k == nil:
		return ""
	case k.held[c.key]:
		return kindHeld
	case k.reset[c.key]:
		return kindRST
	}
	return ""
}

// holdConns opens n echo connections to the lab's server from each family,
// each exchanging a message, and returns their 4-tuples, a function that
// makes each exchange another (past a short -captureduration) and one that
// closes them: the daemons see them open, idle, when they stop.
func holdConns(t *testing.T, l *lab, port, n int) (conns4 map[flowKey]bool, talk, closeAll func()) {
	conns4 = map[flowKey]bool{}
	var conns []net.Conn
	closeAll = func() {
		for _, c := range conns {
			c.Close()
		}
	}
	echo := func(c net.Conn, msg string) error {
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			return err
		}
		got := make([]byte, len(msg)+1)
		_, err := io.ReadFull(c, got)
		return err
	}
	for i := 0; i < n; i++ {
		for _, a := range []netip.Addr{l.srv4, l.srv6} {
			c, err := net.Dial("tcp", netip.AddrPortFrom(a, uint16(port)).String())
			if err != nil {
				closeAll()
				t.Fatal(err)
			}
			conns = append(conns, c)
			conns4[connKey(c)] = true
			if _, err := c.Write([]byte("e")); err != nil {
				t.Fatal(err)
			}
			if err := echo(c, "hello"); err != nil {
				t.Fatal(err)
			}
		}
	}
	talk = func() {
		for _, c := range conns {
			if err := echo(c, "again"); err != nil {
				t.Errorf("held connection: %v", err)
			}
		}
	}
	return conns4, talk, closeAll
}

// resetConns makes n connections from each family that the server resets
// after its answer (mode 'r'), each open long enough for tcp-info's polls
// to see it, and returns their 4-tuples.
func resetConns(t *testing.T, l *lab, port, n int) map[flowKey]bool {
	conns4 := map[flowKey]bool{}
	for i := 0; i < n; i++ {
		for _, a := range []netip.Addr{l.srv4, l.srv6} {
			c, err := net.Dial("tcp", netip.AddrPortFrom(a, uint16(port)).String())
			if err != nil {
				t.Fatal(err)
			}
			conns4[connKey(c)] = true
			time.Sleep(40 * time.Millisecond)
			c.Write([]byte("rreset me\n"))
			io.ReadFull(c, make([]byte, len("reset me\n")))
			c.Read(make([]byte, 1)) // the RST
			c.Close()
		}
	}
	return conns4
}

// TestIndexDrops overflows a daemon's capture ring (1 MB, the daemon
// stopped with SIGSTOP for a second while a bulk flow sends about 15 MB a
// second) and checks the flow index against the reference capture (a
// 64 MB buffer, which holds the burst): the bulk flow's record counts at
// least the packets its file misses, and at most the interface's drops,
// and it is incomplete by exactly the segments the reference shows
// missing; flows that ended before the overflow, and flows that began
// after it, count none and are complete.
func TestIndexDrops(t *testing.T) {
	l := newLab(t, 17)
	refFile, tcpdump := l.startReference()
	d := &daemon{name: "drops", capDur: 30 * time.Second}
	l.startDaemon(d, 9990, "-interface", l.nsIf, "-capture.buffersize", "1MB")
	l.server(8097)

	before := flows(t, l.srv4, 8097, 5)
	time.Sleep(500 * time.Millisecond) // a few ticks after their last packets
	var bulkClient netip.AddrPort
	done := make(chan error, 1)
	half := make(chan struct{}) // half a second in: the daemon stops reading
	go func() {
		var once sync.Once
		defer once.Do(func() { close(half) })
		c, err := net.Dial("tcp", netip.AddrPortFrom(l.srv4, 8097).String())
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		bulkClient = clientEnd(c)
		go io.Copy(io.Discard, c)
		c.Write([]byte("e"))
		block := make([]byte, 64<<10)
		for start := time.Now(); time.Since(start) < 2*time.Second; time.Sleep(4 * time.Millisecond) {
			if _, err := c.Write(block); err != nil {
				done <- err
				return
			}
			if time.Since(start) > 500*time.Millisecond {
				once.Do(func() { close(half) })
			}
		}
		done <- nil
	}()
	<-half
	d.cmd.Process.Signal(syscall.SIGSTOP)
	time.Sleep(time.Second)
	d.cmd.Process.Signal(syscall.SIGCONT)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // the bulk flow's FINs, its linger, and ticks after it
	after := flows(t, l.srv6, 8097, 5)
	time.Sleep(1500 * time.Millisecond)
	metricsText := scrape(d.metrics)
	if _, err := stop(t, d.cmd, syscall.SIGTERM, 6*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, l.log("daemon-drops.log"))
	}
	time.Sleep(200 * time.Millisecond)
	stop(t, tcpdump, syscall.SIGINT, 5*time.Second)

	drops, _ := metricValue(metricsText, fmt.Sprintf(`pcap_kernel_dropped_total{interface="%s"}`, l.nsIf))
	if drops == 0 {
		t.Fatalf("the ring did not overflow (no kernel drops)\n%s", metricsText)
	}
	ref := readReference(t, refFile)
	refDrops := referenceDrops(t, l)
	files := daemonFiles(t, d)
	recs := readIndex(t, d.name, d.dataDir)
	for u := range files {
		if _, ok := recs[u]; !ok {
			t.Errorf("no index record for %s", u)
		}
	}
	checked := map[string]int{}
	for u, r := range recs {
		if r.Capture == nil {
			t.Errorf("%s: no capture in a live record", u)
			continue
		}
		client := netip.AddrPortFrom(netip.MustParseAddr(r.Src.IP), r.Src.Port)
		server := netip.AddrPortFrom(netip.MustParseAddr(r.Dst.IP), r.Dst.Port)
		conns := ref[keyOf(client, server)]
		if len(conns) != 1 {
			continue // a metrics scrape, or a 4-tuple used twice
		}
		missing := len(conns[0].pkts) - r.Packets - r.NotSaved["after_captureduration"]
		switch {
		case client == bulkClient:
			checked["bulk"]++
			t.Logf("bulk flow: %d packets in the reference, %d saved, drops at most %d of the interface's %.0f", len(conns[0].pkts), r.Packets, r.Capture.DropsMax, drops)
			if missing <= 0 || r.Capture.DropsMax < missing || float64(r.Capture.DropsMax) > drops || r.Capture.Down {
				t.Errorf("bulk flow: %d packets missing, record %+v", missing, r.Capture)
			}
			// The kernel's counters of the server's socket say exactly how
			// many segments the trace lacks: as many as the reference
			// shows missing (offloads are off: a frame is a segment), give
			// or take what the reference's own capture dropped (its buffer
			// holds the burst: none, as a rule).
			t.Logf("bulk flow: verified %s by %s, missing %d segments (src_to_dst %d segments, %s bytes; dst_to_src %d segments); the reference shows %d missing, and dropped %d", r.Verified, r.VerifiedBy, r.Missing.Segments, r.Missing.S2D.Segments, deref(r.Missing.S2D.Bytes), r.Missing.D2S.Segments, missing, refDrops)
			// Its bytes are missing too, or unknown: the ring's drops may
			// leave more holes at once than a flow keeps track of.
			if d := r.Missing.Segments - missing; r.Verified != "incomplete" || r.VerifiedBy != "kernel" || d < -refDrops || d > refDrops || r.Missing.S2D.Bytes != nil && *r.Missing.S2D.Bytes == 0 {
				t.Errorf("bulk flow: verified %s by %s, missing %d segments (src_to_dst bytes %s); want incomplete by the kernel, %d segments", r.Verified, r.VerifiedBy, r.Missing.Segments, deref(r.Missing.S2D.Bytes), missing)
			}
		case before[client] || after[client]:
			checked["short"]++
			if r.Capture.DropsMax == 0 && !r.Capture.Down {
				if missing != 0 || r.Verified != "complete" || r.VerifiedBy != "kernel" {
					t.Errorf("%v (before %v): %d packets missing, verified %s by %s, missing %+v; want none, complete by the kernel", client, before[client], missing, r.Verified, r.VerifiedBy, r.Missing)
				}
				break
			}
			// The daemon, starved on a busy machine, had not yet caught up
			// with its small ring when this flow came: the ring dropped
			// frames meanwhile, and the record must say exactly how many
			// of the flow's (handshake included).
			t.Logf("%v (before %v): %d packets missing while the ring dropped %d frames; verified %s by %s, missing %d segments", client, before[client], missing, r.Capture.DropsMax, r.Verified, r.VerifiedBy, r.Missing.Segments)
			if r.VerifiedBy != "kernel" || r.Missing.Segments != missing || (missing > 0) != (r.Verified == "incomplete") {
				t.Errorf("%v (before %v): %d packets missing, verified %s by %s, missing %+v", client, before[client], missing, r.Verified, r.VerifiedBy, r.Missing)
			}
		}
	}
	if checked["bulk"] != 1 || checked["short"] != len(before)+len(after) {
		t.Errorf("checked %v, want the bulk flow and %d short ones", checked, len(before)+len(after))
	}
}

// checkReadmeQuery runs the README's jq line on a daemon's flow index and
// checks that it lists exactly the files whose records say they may be
// incomplete (and some).
func checkReadmeQuery(t *testing.T, d *daemon) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("<!-- the line TestEndToEnd runs -->\n```sh\njq -r '([^']+)' (\\S+)\n```").FindSubmatch(b)
	if m == nil {
		t.Fatal("README.md: no jq line after its marker")
	}
	indexes, _ := filepath.Glob(filepath.Join(d.dataDir, "*", "*", "*", filepath.Base(string(m[2]))))
	if len(indexes) == 0 {
		t.Fatalf("%s: no index file matches %s", d.name, m[2])
	}
	out, err := exec.Command("jq", append([]string{"-r", string(m[1])}, indexes...)...).Output()
	if err != nil {
		t.Fatalf("jq: %v", err)
	}
	got := map[string]bool{}
	for _, f := range strings.Fields(string(out)) {
		got[f] = true
	}
	want := map[string]bool{}
	for _, r := range readIndex(t, d.name, d.dataDir) {
		if r.Verified != "complete" || r.End == "captureduration" || r.VerifiedBy == "inference" && r.Capture != nil && (r.Capture.DropsMax > 0 || r.Capture.Down) {
			want[r.File] = true
		}
	}
	if len(want) == 0 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s: the README's jq line lists %d files, %d records say they may be incomplete:\n%v\n%v", d.name, len(got), len(want), got, want)
	}
	t.Logf("%s: the README's jq line lists the %d files that may be incomplete", d.name, len(got))
}

// connKey is the 4-tuple of a connection, as the reference capture keys it.
func connKey(c net.Conn) flowKey {
	return keyOf(clientEnd(c), netip.MustParseAddrPort(c.RemoteAddr().String()))
}
