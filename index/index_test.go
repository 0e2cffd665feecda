package index

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// SchemaPath is the flow index's JSON Schema, from this package.
const schemaPath = "../docs/flow-index.schema.json"

func compileSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	s, err := c.Compile(schemaPath)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func validate(s *jsonschema.Schema, line []byte) error {
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(line))
	if err != nil {
		return err
	}
	return s.Validate(v)
}

var t0 = time.Date(2026, 12, 2, 4, 59, 59, 123, time.UTC)

func liveRecord() Record {
	return Record{UUID: "host_1764000000_00000000000ABCDE", Source: "eventsocket", File: "2026/12/02/host_1764000000_00000000000ABCDE.pcap",
		Src: netip.MustParseAddrPort("10.1.2.3:40000"), Dst: netip.MustParseAddrPort("10.1.2.4:443"),
		First: t0, Last: t0.Add(time.Second), Packets: 10, Bytes: 660, WireBytes: 9000, FileBytes: 844,
		AfterDuration: 3, FlowLimit: 1, SYN: true, SYNACK: true, End: EndCaptureDuration, FlowEnd: EndFIN,
		Ended: t0.Add(2 * time.Second), Interface: "eth0", DropsMax: 7, Down: true}
}

// TestSchema: records as the daemon writes them, live and offline, are
// valid by docs/flow-index.schema.json and say what they hold; records the
// schema must refuse are refused (the schema is not vacuous).
func TestSchema(t *testing.T) {
	s := compileSchema(t)
	live := liveRecord()
	offline := liveRecord()
	offline.Interface, offline.DropsMax, offline.Down = "", 0, false
	offline.Src, offline.Dst = netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[2001:db8::]:65535")
	offline.UUID, offline.Source, offline.File = `odd"name\`, "fallback", `2026/12/02/odd"name\.pcap.gz`
	offline.End, offline.FlowEnd = EndShutdown, EndShutdown
	sampled := liveRecord()
	sampled.Sample = 10
	verified := liveRecord()
	verified.Verified, verified.VerifiedBy = Incomplete, ByKernel
	verified.Missing = Missing{Segments: 3, SrcToDst: Direction{Segments: 3, Bytes: 4344}, DstToSrc: Direction{BytesUnknown: true}}
	verified.Kernel = &Kernel{Local: verified.Dst, SegsIn: 120, SegsOut: 80, DataSegsIn: 100, BytesReceived: 144801, SndMSS: 1448, RcvMSS: 1448}
	for name, r := range map[string]Record{"live": live, "offline": offline, "sampled": sampled, "verified": verified} {
		line := r.AppendJSON(nil)
		if !bytes.HasSuffix(line, []byte("}\n")) || bytes.Count(line, []byte("\n")) != 1 {
			t.Errorf("%s: not one line: %q", name, line)
		}
		if err := validate(s, line); err != nil {
			t.Errorf("%s: %s: %v", name, line, err)
		}
		var got map[string]any
		if err := json.Unmarshal(line, &got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		capture, hasCapture := got["capture"].(map[string]any)
		checks := map[string][2]any{
			"uuid":       {got["uuid"], r.UUID},
			"file":       {got["file"], r.File},
			"src ip":     {got["src"].(map[string]any)["ip"], r.Src.Addr().String()},
			"dst port":   {got["dst"].(map[string]any)["port"], float64(r.Dst.Port())},
			"first":      {got["first"], "2026-12-02T04:59:59.000000123Z"},
			"after":      {got["not_saved"].(map[string]any)["after_captureduration"], float64(r.AfterDuration)},
			"end":        {got["end"], r.End.String()},
			"flow_end":   {got["flow_end"], r.FlowEnd.String()},
			"capture":    {hasCapture, r.Interface != ""},
			"wire_bytes": {got["wire_bytes"], float64(r.WireBytes)},
		}
		if r.Sample > 1 {
			checks["sample"] = [2]any{got["sample"], float64(r.Sample)}
		} else if _, ok := got["sample"]; ok {
			checks["no sample"] = [2]any{got["sample"], nil}
		}
		missing := got["missing"].(map[string]any)
		checks["verified"] = [2]any{got["verified"], r.Verified.String()}
		checks["verified_by"] = [2]any{got["verified_by"], r.VerifiedBy.String()}
		checks["missing segments"] = [2]any{missing["segments"], float64(r.Missing.Segments)}
		if r.Missing.DstToSrc.BytesUnknown {
			checks["unknown bytes"] = [2]any{missing["dst_to_src"].(map[string]any)["bytes"], nil}
		}
		if kernel, ok := got["kernel"].(map[string]any); ok != (r.Kernel != nil) {
			t.Errorf("%s: kernel %v, want %v", name, got["kernel"], r.Kernel)
		} else if ok {
			checks["segs_in"] = [2]any{kernel["segs_in"], float64(r.Kernel.SegsIn)}
			checks["bytes_received"] = [2]any{kernel["bytes_received"], float64(r.Kernel.BytesReceived)}
			if _, leak := kernel["local"]; leak {
				t.Errorf("%s: the kernel's local address is written (it may be one the record anonymizes)", name)
			}
		}
		if hasCapture {
			checks["drops_max"] = [2]any{capture["drops_max"], float64(r.DropsMax)}
			checks["down"] = [2]any{capture["down"], r.Down}
		}
		for what, c := range checks {
			if c[0] != c[1] {
				t.Errorf("%s: %s is %v, want %v", name, what, c[0], c[1])
			}
		}
	}
	line := string(live.AppendJSON(nil))
	for name, bad := range map[string]string{
		"an unknown end":                    strings.Replace(line, `"end":"captureduration"`, `"end":"lost"`, 1),
		"captureduration as the flow's end": strings.Replace(line, `"flow_end":"fin"`, `"flow_end":"captureduration"`, 1),
		"a missing field":                   strings.Replace(line, `"syn":true,`, ``, 1),
		"an unknown field":                  strings.Replace(line, `{"uuid"`, `{"extra":1,"uuid"`, 1),
		"a negative count":                  strings.Replace(line, `"packets":10`, `"packets":-1`, 1),
		"a time without nanoseconds":        strings.Replace(line, `04:59:59.000000123Z`, `04:59:59Z`, 1),
		"a bad address":                     strings.Replace(line, `"10.1.2.3"`, `"10.1.2"`, 1),
		"a file outside a day":              strings.Replace(line, `"file":"2026/12/02/`, `"file":"../`, 1),
		"an unknown source":                 strings.Replace(line, `"source":"eventsocket"`, `"source":"guess"`, 1),
		"a sample of one":                   strings.Replace(line, `"source":"eventsocket"`, `"source":"eventsocket","sample":1`, 1),
		"an unknown verdict":                strings.Replace(line, `"verified":"unknown"`, `"verified":"maybe"`, 1),
		"no missing":                        strings.Replace(line, `,"missing":{`, `,"lacking":{`, 1),
		"a kernel without its counters":     strings.Replace(line, `}}`+"\n", `},"kernel":{}}`+"\n", 1),
	} {
		if bad == line {
			t.Fatalf("%s: the test's replacement did not apply", name)
		}
		if validate(s, []byte(bad)) == nil {
			t.Errorf("the schema takes %s: %s", name, bad)
		}
	}
}

func TestEnds(t *testing.T) {
	names := Ends()
	if len(names) != int(numEnds)-1 {
		t.Fatalf("%d names", len(names))
	}
	for e := EndFIN; e < numEnds; e++ {
		if e.String() != names[e-1] || e.String() == "" {
			t.Errorf("end %d: %q", e, e.String())
		}
	}
	if got := End(200).String(); got != "end(200)" {
		t.Errorf("unknown end: %q", got)
	}
}

func TestNames(t *testing.T) {
	h := Hour(t0)
	if want := time.Date(2026, 12, 2, 4, 0, 0, 0, time.UTC); !h.Equal(want) {
		t.Errorf("Hour: %v", h)
	}
	for n, want := range map[int]string{1: "flows-20261202T04Z.jsonl", 2: "flows-20261202T04Z-2.jsonl", 17: "flows-20261202T04Z-17.jsonl"} {
		name := Name(h, n)
		if name != want {
			t.Errorf("Name(%d) = %s, want %s", n, name, want)
		}
		gh, gn, err := ParseName(name)
		if err != nil || !gh.Equal(h) || gn != n {
			t.Errorf("ParseName(%s) = %v, %d, %v", name, gh, gn, err)
		}
	}
	for _, bad := range []string{"flows-20261202T04Z.json", "x.jsonl", "flows-20261302T04Z.jsonl", "flows-20261202T04Z-1.jsonl", "flows-20261202T04Z-x.jsonl", "flows-20261202T04Zz2.jsonl", "u.pcap"} {
		if _, _, err := ParseName(bad); err == nil {
			t.Errorf("ParseName(%s) took it", bad)
		}
	}
}

// BenchmarkAppendJSON measures a record's encoding: once per flow file;
// with the kernel's counters, as a live record verified by them.
func BenchmarkAppendJSON(b *testing.B) {
	for _, kernel := range []bool{false, true} {
		r := liveRecord()
		if kernel {
			r.Verified, r.VerifiedBy = Complete, ByKernel
			r.Kernel = &Kernel{SegsIn: 120, SegsOut: 80, DataSegsIn: 100, BytesReceived: 144801, BytesSent: 1000, SndMSS: 1448, RcvMSS: 1448}
		}
		b.Run(map[bool]string{false: "inference", true: "kernel"}[kernel], func(b *testing.B) {
			var buf []byte
			b.ReportAllocs()
			for b.Loop() {
				buf = r.AppendJSON(buf[:0])
			}
			b.SetBytes(int64(len(buf)))
			b.ReportMetric(float64(len(buf)), "bytes/record")
		})
	}
}
