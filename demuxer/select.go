package demuxer

import (
	"time"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/selection"
)

// verdictOutcome is the packet outcome of each verdict but Save.
var verdictOutcome = [...]PacketOutcome{
	selection.Excluded:    Excluded,
	selection.NotLocal:    NotLocal,
	selection.Outgoing:    Outgoing,
	selection.OtherPort:   OtherPort,
	selection.OtherCgroup: OtherCgroup,
}

// rejectSlots is the size of the table of connections not saved, and
// rejectFor how long a verdict is kept there: addresses and listeners that
// change are taken into account within it.
const (
	rejectSlots = 4096
	rejectFor   = int64(time.Second)
)

type rejectSlot struct {
	key     packet.Key
	until   int64 // the time (as the demuxer's packets) the verdict holds until
	verdict selection.Verdict
}

// selectFlow returns the verdict for the connection of k, whose packet p
// has no flow, at time tsn.
func (d *Demuxer) selectFlow(k *packet.Key, p *packet.Parsed, srcIsA bool, tsn int64) selection.Verdict {
	if d.o.Select == nil {
		return selection.Save
	}
	var s *rejectSlot
	if d.rejects != nil {
		s = &d.rejects[keyHash(k)>>(64-12)]
		// A SYN or SYN-ACK is decided afresh: it tells who opened the
		// connection, whatever came before it on the four-tuple (a blind
		// attacker's spoofed packet must not hide the connection that
		// follows it: TestSpoofedFirstPacket).
		if s.key == *k && tsn < s.until && p.Flags&packet.FlagSYN == 0 {
			return s.verdict
		}
	}
	v := d.o.Select(*k, p, srcIsA)
	if v != selection.Save {
		if d.rejects == nil {
			d.rejects = new([rejectSlots]rejectSlot)
			s = &d.rejects[keyHash(k)>>(64-12)]
		}
		*s = rejectSlot{key: *k, until: tsn + rejectFor, verdict: v}
	}
	return v
}
