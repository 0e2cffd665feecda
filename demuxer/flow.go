package demuxer

import (
	"time"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// state is where a flow is in its life. Every flow starts waiting; the
// transitions are made in lifecycle.go only:
//
//	waiting --claim (a UUID came), or the fallback--> named
//	waiting --named, not in the sample (-sample)--> unsampled
//	waiting --UUID deadline, eviction, shutdown--> discarded
//	named --end, -captureduration, shutdown (finish)--> finished
//
// A flow leaves the table (remove) in any state; a waiting one gets one
// last claim first (lastClaim). What a flow saw on the wire (its ends'
// sequence models, SYN, SYN-ACK, FINs and RST) is kept apart from its
// state, in the fields below and in its ends.
type state uint8

const (
	waiting   state = iota // collecting headers, no UUID yet
	named                  // collecting headers, UUID known
	finished               // file handed to the saver; later packets are dropped
	discarded              // no UUID in time; later packets are dropped
	unsampled              // named, not in the sample; later packets are dropped
)

// flow is one tracked connection, owned by its demuxer.
type flow struct {
	key         packet.Key
	st          state
	anon        anonymize.Flow // computed once, at the first packet
	syn         bool           // the flow began with a pure SYN; synSeq is its sequence number
	lookedUp    bool           // Options.Lookup was asked
	inWaiting   bool           // in Demuxer.waiting (else in Demuxer.settled)
	synced      bool           // a SYN-ACK was seen, or ACKs from both ends: RFC 5961 applies
	ended       bool           // both FINs or an accepted RST: a new SYN is a new connection
	sawSYN      bool           // a pure SYN was captured
	sawSYNACK   bool           // a SYN-ACK was captured
	firstFromA  bool           // the first packet's source is the key's A
	hs          handshake      // the capture's view of the three segments that open it
	end         index.End      // why endAt was set
	synSeq      uint32
	afterDur    uint32              // packets after -captureduration
	refused     [NumRefusals]uint32 // packets refused by the limits before the flow was tracked (refusedTable)
	wire        uint64              // the original lengths of the packets kept
	start       captureCounts       // the capture's counters before the first packet
	source      names.Source        // the UUID source of the file's name, at its final Push
	ends        [2]end              // A and B
	first, last int64               // unix nanoseconds, plus Demuxer.corr
	corr        int64               // Demuxer.corr at the first packet: first-corr is its wall time
	endAt       int64               // when non-zero, the flow ends at this time
	entry       *names.Entry
	out         FlowWriter // once named in stream mode, or once spilled
	outName     string     // the name out was started or renamed with
	buf         record.Buffer
	idx         int // position in its list
}

// firstWall returns the wall time of f's first packet, for names, dates
// and the UUID sources' times.
func (f *flow) firstWall() time.Time { return time.Unix(0, f.first-f.corr) }

// established reports whether the capture saw f's handshake complete: a
// SYN, a SYN-ACK from the other end acknowledging it, and an ACK of that
// from the SYN's sender. Any packet can carry the ACK flag, so a spoofed
// bare ACK (which a blind attacker sends at no cost) is no evidence of a
// connection; a flow the daemon joined mid-way proves itself by its name
// instead (the kernel or tcp-info), and until then is evictable as a
// SYN-only flow is (TestSpoofedACKsEvictable).
func (f *flow) established() bool { return f.hs.stage == hsDone }

// handshake follows the opening of a connection, segment by segment,
// checking each acknowledgment number against the sequence number it
// answers.
type handshake struct {
	stage       uint8  // hsNone to hsDone
	fromA       bool   // the SYN's sender is the key's A end
	syn, synack uint32 // the sequence numbers of the SYN and the SYN-ACK
}

// The handshake's stages: what it saw last.
const (
	hsNone   = iota
	hsSYN    // a SYN (the latest one counts)
	hsSYNACK // a SYN-ACK acknowledging it
	hsDone   // the ACK of the SYN-ACK
)

// step advances the handshake by one segment, from the key's A end when
// srcIsA.
func (h *handshake) step(flags uint8, seq, ack uint32, srcIsA bool) {
	const syn, ackf, rst = packet.FlagSYN, packet.FlagACK, packet.FlagRST
	switch {
	case h.stage == hsDone || flags&rst != 0:
	case flags&(syn|ackf) == syn:
		h.stage, h.fromA, h.syn = hsSYN, srcIsA, seq
	case flags&(syn|ackf) == syn|ackf:
		if h.stage >= hsSYN && srcIsA != h.fromA && ack == h.syn+1 {
			h.stage, h.synack = hsSYNACK, seq
		}
	case flags&ackf != 0:
		if h.stage == hsSYNACK && srcIsA == h.fromA && ack == h.synack+1 {
			h.stage = hsDone
		}
	}
}

// endedOr returns how the flow ended if its FINs, RST or Close came (its
// linger may be over, or cut short by a timeout, a new connection or the
// shutdown), else why.
func (f *flow) endedOr(why index.End) index.End {
	if f.end != index.EndNone {
		return f.end
	}
	return why
}
