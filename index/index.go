// Package index is the format of the flow index: for every flow file the
// daemon publishes, one JSON record that says how complete the trace is:
// what was kept, what was not and why, whether the handshake was captured,
// how the flow ended, and how many frames the capture itself may have lost
// meanwhile. Records are written as JSON Lines, in one file per hour (of the
// flows' ends) in each day directory that holds their flows' files,
// <datadir>/YYYY/MM/DD/flows-YYYYMMDDTHHZ.jsonl; the saver publishes it when
// the hour closes. docs/flow-index.md describes every field and
// docs/flow-index.schema.json is its JSON Schema (TestSchema checks the
// records against it).
//
// The package is a leaf: the demuxer fills a Record, the saver completes it
// with what it wrote and appends it to an index file.
package index

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// End is why a flow, or its file, ended.
type End uint8

// The ends of a flow. EndCaptureDuration is an end of the file only: the
// flow went on past -captureduration and its later packets were not saved.
const (
	EndNone            End = iota // not ended (never in a record)
	EndFIN                        // both ends' FINs were taken by their receivers
	EndRST                        // an RST its receiver accepts
	EndClose                      // tcp-info announced the socket closed
	EndTimeout                    // no packet for -flowtimeout
	EndReused                     // a new connection's SYN on the same 4-tuple
	EndShutdown                   // the daemon stopped, or the offline input ended
	EndCaptureDuration            // the file ended at -captureduration
	numEnds
)

var endNames = [numEnds]string{"", "fin", "rst", "close", "timeout", "reused", "shutdown", "captureduration"}

// Ends lists the end names, as records write them, in the order of the
// constants (without EndNone).
func Ends() []string { return append([]string(nil), endNames[1:]...) }

// String returns the end's name as records write it.
func (e End) String() string {
	if e < numEnds {
		return endNames[e]
	}
	return "end(" + strconv.Itoa(int(e)) + ")"
}

// Record is what the index says of one flow file.
type Record struct {
	UUID   string // the file's name, without its extension
	Source string // the UUID source that named the flow
	Sample int    // the sampling rate N (-sample: one connection in N), 0 or 1 without
	File   string // the file's path relative to the data directory
	// Src and Dst are the source and destination of the flow's first
	// packet (the client and the server when the SYN was captured), as
	// saved: anonymized as the file is.
	Src, Dst    netip.AddrPort
	First, Last time.Time // the first and last packets' capture times
	// Packets and Bytes are the records the file holds and their header
	// bytes (before compression); WireBytes are those packets' original
	// lengths; FileBytes is the file's size.
	Packets, Bytes, WireBytes, FileBytes uint64
	// Packets of the flow not saved, by reason: after -captureduration,
	// and refused by -maxflows or -maxheap before the flow was tracked
	// (as far as the demuxer's table of refused connections remembers:
	// at least this many).
	AfterDuration, FlowLimit, MemoryLimit uint64
	SYN, SYNACK                           bool // a pure SYN, a SYN-ACK was captured
	End                                   End  // why the file ended
	FlowEnd                               End  // why the flow ended (End, unless EndCaptureDuration)
	Ended                                 time.Time
	// Live capture only (Interface is "" offline): the capture's drops
	// between the flow's first and last packet, an upper bound (the
	// kernel's cumulative counter read at the last tick before the first
	// packet and the first tick after the last one), and whether the
	// capture failed (and reopened) meanwhile.
	Interface string
	DropsMax  uint64
	Down      bool
	// Verified says whether the trace holds every segment of the
	// connection that the capture could have seen, and VerifiedBy how
	// that was decided; Missing is what it lacks; Kernel, the local
	// socket's own counters, when the kernel reported them.
	Verified   Verdict
	VerifiedBy Method
	Missing    Missing
	Kernel     *Kernel
}

// Verdict is what a record says of its trace's completeness.
type Verdict uint8

// The verdicts.
const (
	Unknown     Verdict = iota // no evidence either way
	Complete                   // nothing is missing
	Incomplete                 // Missing says what is
	NumVerdicts                // how many there are
)

var verdictNames = [NumVerdicts]string{"unknown", "complete", "incomplete"}

// Verdicts lists the verdicts' names, in the order of the constants.
func Verdicts() []string { return append([]string(nil), verdictNames[:]...) }

// String returns the verdict's name as records write it.
func (v Verdict) String() string {
	if v < NumVerdicts {
		return verdictNames[v]
	}
	return "verdict(" + strconv.Itoa(int(v)) + ")"
}

// Method is how a verdict was reached.
type Method uint8

// The methods: the kernel's counters of the local socket, compared with
// what the trace holds; or inference from the trace alone.
const (
	ByInference Method = iota
	ByKernel
	NumMethods // how many there are
)

var methodNames = [NumMethods]string{"inference", "kernel"}

// Methods lists the methods' names, in the order of the constants.
func Methods() []string { return append([]string(nil), methodNames[:]...) }

// String returns the method's name as records write it.
func (m Method) String() string {
	if m < NumMethods {
		return methodNames[m]
	}
	return "method(" + strconv.Itoa(int(m)) + ")"
}

// Missing is what a trace lacks: Segments in both directions together,
// and each direction's detail (from the record's Src to its Dst, and
// back). Handshake and Ending say that the trace has no handshake (it
// began mid-connection) or no ending (no FIN or RST from each end, or an
// accepted RST), which inference cannot see past.
type Missing struct {
	Segments           uint64
	SrcToDst, DstToSrc Direction
	Handshake, Ending  bool
}

// Direction is what a trace lacks of one direction: segments, and payload
// bytes. BytesUnknown says that the bytes could not be counted (more
// sequence holes at once than a flow keeps track of).
type Direction struct {
	Segments, Bytes uint64
	BytesUnknown    bool
}

// Kernel is the local socket's tcp_info counters at its destruction, as
// the kernel's sock_diag broadcast reported them (the fields of
// m-lab/tcp-info's tcp.LinuxTCPInfo of the same names). Local says which
// end of the connection the socket is; it is not written (it may be an
// address the record anonymizes).
type Kernel struct {
	Local                    netip.AddrPort
	SegsIn, SegsOut          uint64
	DataSegsIn, DataSegsOut  uint64
	BytesReceived, BytesSent uint64
	BytesAcked, BytesRetrans uint64
	TotalRetrans             uint64
	SndMSS, RcvMSS           uint32
}

// AppendJSON appends the record as one line of JSON, with its newline.
// Field names and order are documented in docs/flow-index.md.
func (r *Record) AppendJSON(b []byte) []byte {
	b = append(b, `{"uuid":`...)
	b = strconv.AppendQuote(b, r.UUID)
	b = append(b, `,"source":`...)
	b = strconv.AppendQuote(b, r.Source)
	if r.Sample > 1 {
		b = strconv.AppendInt(append(b, `,"sample":`...), int64(r.Sample), 10)
	}
	b = append(b, `,"file":`...)
	b = strconv.AppendQuote(b, r.File)
	b = appendEndpoint(append(b, `,"src":`...), r.Src)
	b = appendEndpoint(append(b, `,"dst":`...), r.Dst)
	b = appendTime(append(b, `,"first":`...), r.First)
	b = appendTime(append(b, `,"last":`...), r.Last)
	b = appendUint(b, `,"packets":`, r.Packets)
	b = appendUint(b, `,"bytes":`, r.Bytes)
	b = appendUint(b, `,"wire_bytes":`, r.WireBytes)
	b = appendUint(b, `,"file_bytes":`, r.FileBytes)
	b = appendUint(b, `,"not_saved":{"after_captureduration":`, r.AfterDuration)
	b = appendUint(b, `,"flow_limit":`, r.FlowLimit)
	b = appendUint(b, `,"memory_limit":`, r.MemoryLimit)
	b = strconv.AppendBool(append(b, `},"syn":`...), r.SYN)
	b = strconv.AppendBool(append(b, `,"syn_ack":`...), r.SYNACK)
	b = append(append(append(b, `,"end":"`...), r.End.String()...), '"')
	b = append(append(append(b, `,"flow_end":"`...), r.FlowEnd.String()...), '"')
	b = appendTime(append(b, `,"ended":`...), r.Ended)
	if r.Interface != "" {
		b = append(b, `,"capture":{"interface":`...)
		b = strconv.AppendQuote(b, r.Interface)
		b = appendUint(b, `,"drops_max":`, r.DropsMax)
		b = strconv.AppendBool(append(b, `,"down":`...), r.Down)
		b = append(b, '}')
	}
	b = append(append(append(b, `,"verified":"`...), r.Verified.String()...), '"')
	b = append(append(append(b, `,"verified_by":"`...), r.VerifiedBy.String()...), '"')
	b = appendUint(b, `,"missing":{"segments":`, r.Missing.Segments)
	b = appendDirection(append(b, `,"src_to_dst":`...), r.Missing.SrcToDst)
	b = appendDirection(append(b, `,"dst_to_src":`...), r.Missing.DstToSrc)
	b = strconv.AppendBool(append(b, `,"handshake":`...), r.Missing.Handshake)
	b = strconv.AppendBool(append(b, `,"ending":`...), r.Missing.Ending)
	b = append(b, '}')
	if k := r.Kernel; k != nil {
		b = appendUint(b, `,"kernel":{"segs_in":`, k.SegsIn)
		b = appendUint(b, `,"segs_out":`, k.SegsOut)
		b = appendUint(b, `,"data_segs_in":`, k.DataSegsIn)
		b = appendUint(b, `,"data_segs_out":`, k.DataSegsOut)
		b = appendUint(b, `,"bytes_received":`, k.BytesReceived)
		b = appendUint(b, `,"bytes_sent":`, k.BytesSent)
		b = appendUint(b, `,"bytes_acked":`, k.BytesAcked)
		b = appendUint(b, `,"bytes_retrans":`, k.BytesRetrans)
		b = appendUint(b, `,"total_retrans":`, k.TotalRetrans)
		b = appendUint(b, `,"snd_mss":`, uint64(k.SndMSS))
		b = appendUint(b, `,"rcv_mss":`, uint64(k.RcvMSS))
		b = append(b, '}')
	}
	return append(b, "}\n"...)
}

func appendDirection(b []byte, d Direction) []byte {
	b = appendUint(b, `{"segments":`, d.Segments)
	if d.BytesUnknown {
		return append(b, `,"bytes":null}`...)
	}
	return append(appendUint(b, `,"bytes":`, d.Bytes), '}')
}

func appendUint(b []byte, key string, v uint64) []byte {
	return strconv.AppendUint(append(b, key...), v, 10)
}

func appendEndpoint(b []byte, ap netip.AddrPort) []byte {
	b = append(b, `{"ip":"`...)
	b = ap.Addr().AppendTo(b)
	b = appendUint(b, `","port":`, uint64(ap.Port()))
	return append(b, '}')
}

// appendTime writes t in UTC as RFC 3339 with nanoseconds (always nine
// digits, so that the strings sort as the times do).
func appendTime(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, "2006-01-02T15:04:05.000000000Z07:00")
	return append(b, '"')
}

// Hour returns the start of t's UTC hour: the hour of the index file a
// record ended at t goes into.
func Hour(t time.Time) time.Time { return t.UTC().Truncate(time.Hour) }

// Name returns the name of the index file of an hour; n > 1 numbers
// another file of the same hour (after a restart, or records that came after
// the hour's file was published).
func Name(hour time.Time, n int) string {
	name := "flows-" + hour.UTC().Format("20060102T15") + "Z"
	if n > 1 {
		name += "-" + strconv.Itoa(n)
	}
	return name + ".jsonl"
}

// ParseName returns the hour and number of an index file's name.
func ParseName(name string) (hour time.Time, n int, err error) {
	s, ok := strings.CutPrefix(name, "flows-")
	if ok {
		s, ok = strings.CutSuffix(s, ".jsonl")
	}
	if !ok || len(s) < len("20060102T15Z") {
		return time.Time{}, 0, fmt.Errorf("%q is not an index file's name", name)
	}
	hour, err = time.Parse("20060102T15Z", s[:12])
	if err != nil {
		return time.Time{}, 0, fmt.Errorf("%q is not an index file's name: %w", name, err)
	}
	n = 1
	if rest := s[12:]; rest != "" {
		if n, err = strconv.Atoi(strings.TrimPrefix(rest, "-")); err != nil || rest[0] != '-' || n < 2 {
			return time.Time{}, 0, fmt.Errorf("%q is not an index file's name", name)
		}
	}
	return hour, n, nil
}
