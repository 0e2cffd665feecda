// Package demuxer splits the packets of one capture into flows (TCP
// connections, keyed by their direction-independent 4-tuple) and drives each
// flow through its lifecycle until its headers are handed to the saver.
//
// # Flow lifecycle
//
//   - A flow starts at its first captured packet (unless -maxflows or
//     -maxheap is reached: then the packet is counted and dropped, and its
//     flow is not tracked; but at -maxflows a new flow first takes the place
//     of the oldest half-open one, see Fairness). Its headers are copied once into the flow's
//     chunked buffer, anonymized there, and never contain a payload byte.
//   - The flow claims its UUID from the names table: at its first packet,
//     then at every tick (every 100 ms, and at most a second after the last
//     packet when the traffic stops; every second when over ten thousand
//     flows wait, as in a SYN flood) until it has one. The announcement may
//     have come before or after the first packet. If no UUID comes within
//     -uuidwaitduration of the first packet, the buffered headers are
//     dropped and later packets of the flow are discarded cheaply (counted
//     as no_uuid).
//   - Packets later than -captureduration after the first packet are not
//     saved (counted as after_captureduration); the file is finished at once.
//   - A flow ends when no packet arrived for -flowtimeout, or a short linger
//     after both FINs or an RST that its receiver accepts, or after the UUID
//     source announced the connection closed. Deadlines are applied by Tick
//     and, exactly, before each packet of the flow: a packet that comes
//     after its flow's deadline starts a new flow, as it would have after
//     a tick (TestDeadlinesBeforePackets). An unnamed flow is kept until
//     its UUID deadline, in
//     case the announcement is late. When a flow with a UUID ends, its file
//     is finished: in buffer mode it is written in one go now, unless the
//     flow is long (once named, its chunks were handed to the saver
//     SpillBytes at a time, so that a flow holds little memory however long
//     it lasts); in stream mode (-stream) chunks were handed to the saver as
//     they filled since the flow was named. The last ones are handed now.
//   - A pure SYN on the 4-tuple of a tracked flow that does not repeat that
//     flow's SYN (another initial sequence number) ends the old flow at once
//     and starts a new one, so nothing of one connection lands in the
//     other's file, but only where the server's TCP would take it for a new
//     connection: when the old one was not synchronized yet, or had ended
//     (both FINs, or an accepted RST: a port reused, TIME_WAIT included).
//   - When a flow with a file is forgotten, its writer gets the flow's index
//     record (index.Record): how it ended (the packets' FINs or RST win over
//     a Close announcement applied first), the packets not saved, whether
//     the handshake was captured, and the capture's drops and failures
//     between the reading of its counters (Options.Capture, once per tick)
//     before the first packet and the first one after the last
//     (TestRecordEnds, TestRecordDrops). The flow keeps a few counters for
//     it, nothing per packet but a sum.
//
// # Fairness under a flood
//
// A flow is established once the capture saw its handshake: a SYN, the
// other end's SYN-ACK acknowledging it, the SYN sender's ACK of that. Until
// then, or until it is named (the kernel or tcp-info vouching for a
// connection the daemon joined mid-way), it is no more than a SYN-only
// flow, as every flow of a spoofed-SYN scan or flood, and of a spoofed-ACK
// one, stays: any packet can carry an ACK flag, only a real peer the right
// number. At -maxflows, a new flow evicts the oldest unnamed flow not
// established of its demuxer instead of being refused, so a flood cannot
// keep a connection out: its SYN gets in, and once its handshake
// completes it is no longer evictable; if it was evicted before (a round
// trip longer than the flood's turnover), its next packets get in, and
// its name from the kernel keeps them. An unnamed flow not established is
// forgotten at its UUID deadline, not kept until its timeout. Evicted
// flows are counted (pcap_flows_ended_total
// {outcome="evicted"}); TestHalfOpenEvicted, TestSpoofedACKsEvictable, and
// e2e's TestSYNScanAtFlowLimit.
//
// # Packets the receiver ignores
//
// The trace keeps every packet, and a segment that the receiving TCP
// would not accept changes nothing else about its flow: a SYN on a
// synchronized connection (RFC 5961 section 4 answers it with a challenge
// ACK), an RST whose sequence number is not exactly the next one expected
// (section 3: an in-window RST gets a challenge ACK, others are dropped),
// a FIN that is neither in sequence nor acknowledged. What the receiver
// expects is followed per end: segments without a gap before them and the
// receiver's own acknowledgments move it (so the capture's drops do not
// stall it), and only segments within the window the receiver advertised
// (scaled, RFC 7323) count, so injected packets far out of window move
// nothing. An RST is also taken at the end of the highest in-window
// segment an end sent, where a sender's own RST is when the capture missed
// data before it (TestInjectedSegments; in e2e, TestInjection).
//
// # Cost model and concurrency
//
// A Demuxer belongs to the goroutine that reads its capture: Packet and
// Tick must be called from that goroutine only. Packet decodes into a
// reused struct, looks the flow up (the previous packet's flow first, then
// a map keyed by a comparable value), copies the headers once and counts
// outcomes in local fields: it allocates only when a flow starts or a chunk
// fills, takes no lock and makes no syscall. Tick checks the heap against
// Limits.MaxHeap, does the per-flow work (naming, timeouts) and publishes
// the counters: it visits the flows waiting for a UUID, and the others,
// SweepPerTick at a time, or a tenth of them when there are more, so that
// with tens of thousands of flows a deadline is applied up to a second
// late rather than costing a visit of every flow ten times a second. The
// only state shared with other goroutines is the names table (locked per
// flow, not per packet), the Limits (atomics, per flow) and the saver's
// flows (locked per chunk).
package demuxer
