package live

import (
	"strconv"
	"sync/atomic"

	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/metrics/exporter"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/sockdiag"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// parts are what the daemon's metrics read at scrape time.
type parts struct {
	p              *pipeline.Pipeline
	kernel         *kernelNames
	events         *tcpeventsocket.Client // nil without -tcpinfo.eventsocket
	captures       *captureSet
	listeners      *listeners
	memoryReleases *atomic.Uint64
	retainer       *saver.Retainer // nil without -retention.*
	build          Build
}

// retention reads one of the retention's counts (0 without a retainer).
func (x *parts) retention(get func(*saver.RetentionCounts) int64) func() float64 {
	return func() float64 {
		if x.retainer == nil {
			return 0
		}
		return float64(get(&x.retainer.Counts))
	}
}

// families describes every pcap_* metric of the daemon, each read from
// the part that keeps the count (docs/operations.md lists them;
// TestEndToEnd checks them against a running daemon).
func families(x *parts) *exporter.Collector {
	c := &exporter.Collector{}
	counter := func(name, help string, read func() float64) exporter.Family {
		return exporter.Family{Name: name, Help: help, Read: func(emit func(float64, ...string)) { emit(read()) }}
	}
	gauge := func(name, help string, read func() float64) exporter.Family {
		f := counter(name, help, read)
		f.Gauge = true
		return f
	}
	byLabel := func(name, help, label string, read func(emit func(float64, ...string))) exporter.Family {
		return exporter.Family{Name: name, Help: help, Labels: []string{label}, Read: read}
	}
	perCapture := func(name, help string, read func(*liveCapture) (float64, bool)) exporter.Family {
		return byLabel(name, help, "interface", func(emit func(float64, ...string)) {
			for _, lc := range x.captures.list() {
				if v, ok := read(lc); ok {
					emit(v, lc.h.Name())
				}
			}
		})
	}
	// sum adds up one counter of every demuxer, retired ones too.
	sum := func(get func(*demuxer.Stats) uint64) float64 {
		var n uint64
		for _, s := range x.captures.stats() {
			n += get(s)
		}
		return float64(n)
	}
	emitAll := func(emit func(float64, ...string), cs *metrics.Counters) {
		for _, v := range cs.Values() {
			emit(float64(cs.Get(v)), v)
		}
	}
	sv, ix := x.p.Saver.Counts(), x.p.Saver.IndexCounts()
	events := tcpeventsocket.NewCounts() // zeros without an eventsocket
	if x.events != nil {
		events = x.events.Counts()
	}
	lookups, destroys := metrics.NewCounters(sockdiag.LookupResults...), metrics.NewCounters(sockdiag.DestroyResults...)
	var sends, recvs *atomic.Uint64 = new(atomic.Uint64), new(atomic.Uint64)
	if k := x.kernel.src; k != nil {
		lookups, destroys, sends, recvs = k.Lookups, k.Destroys, &k.Sends, &k.Receives
	}
	stats := func(lc *liveCapture) (capture.Stats, bool) {
		s, err := lc.h.Stats()
		return s, err == nil
	}

	c.Add(
		perCapture("pcap_packets_captured_total", "Frames read from the capture, per interface.",
			func(lc *liveCapture) (float64, bool) { return float64(lc.d.Stats().Captured.Load()), true }),
		perCapture("pcap_capture_errors_total", "Errors reading the capture, per interface.",
			func(lc *liveCapture) (float64, bool) { return float64(lc.errors.Load()), true }),
		perCapture("pcap_kernel_received_total", "Frames that passed the capture filter, per interface (the ring's tp_packets, or libpcap's ps_recv).",
			func(lc *liveCapture) (float64, bool) { s, ok := stats(lc); return float64(s.Received), ok }),
		perCapture("pcap_kernel_dropped_total", "Frames dropped because the capture buffer was full, per interface (the ring's tp_drops, or libpcap's ps_drop).",
			func(lc *liveCapture) (float64, bool) { s, ok := stats(lc); return float64(s.Dropped), ok }),
		perCapture("pcap_interface_dropped_total", "Frames dropped by the interface or driver, per interface (libpcap's ps_ifdrop; 0 for the ring).",
			func(lc *liveCapture) (float64, bool) { s, ok := stats(lc); return float64(s.IfaceDropped), ok }),
		byLabel("pcap_packets_total", "Captured frames by outcome: saved, excluded (tcp-info's exclusion rules), no_uuid, after_captureduration, flow_limit, memory_limit, undecodable, write_error, low_space, shutdown_no_uuid; not selected: not_local, outgoing (without -outgoing), other_port (-localport), not_sampled (-sample), other_cgroup (-cgroup).", "outcome",
			func(emit func(float64, ...string)) {
				emitAll(emit, sv.Packets)
				for o := range demuxer.NumPacketOutcomes {
					emit(sum(func(s *demuxer.Stats) uint64 { return s.Packets[o].Load() }), o.String())
				}
			}),
		byLabel("pcap_undecodable_packets_total", "Frames that were not decodable TCP/IP, by kind (truncated, bad_ip, bad_tcp, fragment, not_tcp, unknown_link, too_many_headers).", "kind",
			func(emit func(float64, ...string)) {
				for k := packet.Kind(1); k < packet.NumKinds; k++ {
					emit(sum(func(s *demuxer.Stats) uint64 { return s.Undecodable[k].Load() }), k.String())
				}
			}),
		counter("pcap_clock_steps_total", "Steps of the wall clock (against the monotonic clock) seen by the captures' demuxers; deadlines follow the monotonic clock, so a step changes no flow's fate.",
			func() float64 { return sum(func(s *demuxer.Stats) uint64 { return s.ClockSteps.Load() }) }),
		counter("pcap_flows_started_total", "Flows that began to be tracked.",
			func() float64 { return sum(func(s *demuxer.Stats) uint64 { return s.Started.Load() }) }),
		byLabel("pcap_flows_ended_total", "Tracked flows that ended, by outcome: saved, uuid_timeout, write_error, low_space, shutdown, evicted (unnamed, its handshake not seen complete, its place taken at -maxflows), not_sampled (named, not in the -sample).", "outcome",
			func(emit func(float64, ...string)) {
				emitAll(emit, sv.Flows)
				for o := range demuxer.NumEndOutcomes {
					emit(sum(func(s *demuxer.Stats) uint64 { return s.Ended[o].Load() }), o.String())
				}
			}),
		exporter.Family{Name: "pcap_traces_verified_total", Help: "Traces (flow files' index records) by verified (complete, incomplete, unknown) and how it was decided (by: kernel, from the socket's counters; inference, from the trace alone).",
			Labels: []string{"verified", "by"}, Read: func(emit func(float64, ...string)) {
				for v := range index.NumVerdicts {
					for m := range index.NumMethods {
						i := int(v)*int(index.NumMethods) + int(m)
						emit(sum(func(s *demuxer.Stats) uint64 { return s.Verified[i].Load() }), v.String(), m.String())
					}
				}
			}},
		byLabel("pcap_flows_refused_total", "New flows not tracked because a limit was reached, by limit (flow_limit for -maxflows, memory_limit for -maxheap); counted on their SYN.", "limit",
			func(emit func(float64, ...string)) {
				for l := range demuxer.NumRefusals {
					emit(sum(func(s *demuxer.Stats) uint64 { return s.Refused[l].Load() }), l.String())
				}
			}),
		byLabel("pcap_uuids_total", "Flows named, by the source of the UUID (eventsocket: tcp-info; kernel: sock_diag socket cookies).", "source",
			func(emit func(float64, ...string)) {
				named := map[names.Source]uint64{names.EventSocket: 0, names.Kernel: 0}
				for _, s := range x.captures.stats() {
					for src, n := range s.Named() {
						named[src] += n
					}
				}
				for src, n := range named {
					emit(float64(n), string(src))
				}
			}),
		counter("pcap_files_written_total", "Per-flow pcap files completed and renamed into place.",
			func() float64 { files, _, _ := x.p.Saver.Written(); return float64(files) }),
		counter("pcap_bytes_written_total", "Bytes written to per-flow pcap files.",
			func() float64 { _, bytes, _ := x.p.Saver.Written(); return float64(bytes) }),
		byLabel("pcap_write_errors_total", "Failed file operations, by operation (name: a UUID that is not a plain file name; mkdir, create, write, close, compress, rename).", "op",
			func(emit func(float64, ...string)) { emitAll(emit, sv.WriteErrors) }),
		byLabel("pcap_index_records_total", "Flow index records written, one per file, by how the file ended (fin, rst, close, timeout, reused, shutdown, captureduration).", "end",
			func(emit func(float64, ...string)) { emitAll(emit, ix.Records) }),
		byLabel("pcap_index_incomplete_records_total", "Flow index records that say the trace may be incomplete, by reason (no_handshake, captureduration, limits, capture_drops, capture_down); a record may count for several.", "reason",
			func(emit func(float64, ...string)) { emitAll(emit, ix.Incomplete) }),
		counter("pcap_index_files_total", "Flow index files published (one per day directory and hour).",
			func() float64 { return float64(ix.Files.Load()) }),
		counter("pcap_index_recovered_files_total", "Flow index files a crash left being written, published at start.",
			func() float64 { return float64(ix.Recovered.Load()) }),
		byLabel("pcap_index_errors_total", "Failed flow index file operations, by operation (create, write, close, rename).", "op",
			func(emit func(float64, ...string)) { emitAll(emit, ix.Errors) }),
		counter("pcap_index_lost_records_total", "Flow index records not written for an error (their files were written).",
			func() float64 { return float64(ix.Lost.Load()) }),
		gauge("pcap_eventsocket_connected", "1 while connected to tcp-info's eventsocket, else 0.", func() float64 {
			if x.events != nil && x.events.Connected() {
				return 1
			}
			return 0
		}),
		counter("pcap_eventsocket_reconnects_total", "Attempts to connect to the eventsocket after the first one.",
			func() float64 { return float64(events.Reconnects.Load()) }),
		byLabel("pcap_eventsocket_events_total", "Events received from the eventsocket, by type (open, close, unknown).", "type",
			func(emit func(float64, ...string)) { emitAll(emit, events.Events) }),
		counter("pcap_eventsocket_malformed_lines_total", "Eventsocket lines that were not valid events, or whose UUID cannot name a file (skipped).",
			func() float64 { return float64(events.Malformed.Load()) }),
		byLabel("pcap_kernel_uuid_lookups_total", "Look-ups of socket cookies through sock_diag, by result (found, not_found, not_established, already_named, not_local, gave_up, gave_up_no_broadcasts, queue_full, error, malformed; excluded; beside tcp-info: silenced, short, behind, no_prefix).", "result",
			func(emit func(float64, ...string)) { emitAll(emit, lookups) }),
		byLabel("pcap_kernel_uuid_netlink_calls_total", "System calls made for sock_diag look-ups, by operation (send, recv).", "op",
			func(emit func(float64, ...string)) {
				emit(float64(sends.Load()), "send")
				emit(float64(recvs.Load()), "recv")
			}),
		byLabel("pcap_kernel_destroy_events_total", "TCP socket destroy broadcasts from sock_diag, by result (named; disconnected: closed with SO_LINGER 0, no remote port; ignored: listeners; lost; malformed; excluded; not_selected: a socket no capture sees or the selection leaves out; silenced: left unnamed by tcp-info).", "result",
			func(emit func(float64, ...string)) { emitAll(emit, destroys) }),
		gauge("pcap_kernel_destroy_broadcasts", "1 while the kernel's socket destroy broadcasts are read (they need CAP_NET_ADMIN), 0 without them.", func() float64 {
			if x.kernel.destroy != nil {
				return 1
			}
			return 0
		}),
		exporter.Family{Name: "pcap_capture_up", Help: "1 while capturing on the interface, 0 while it is gone and being reopened.", Labels: []string{"interface"}, Gauge: true,
			Read: func(emit func(float64, ...string)) {
				for _, lc := range x.captures.list() {
					v := 0.0
					if lc.h.Up() {
						v = 1
					}
					emit(v, lc.h.Name())
				}
			}},
		gauge("pcap_sample_rate", "N: one named connection in N is saved (-sample; 1: every connection).", func() float64 { return float64(x.p.SampleRate()) }),
		gauge("pcap_flows_active", "Flows being tracked.", func() float64 { return float64(x.p.Limits.Active()) }),
		counter("pcap_uuid_renames_total", "Flows the authoritative source (tcp-info) named after the kernel source had named them otherwise: their files take tcp-info's UUID.",
			func() float64 { return float64(x.p.Names.Renames()) }),
		gauge("pcap_uuid_announcements", "Connections announced by the UUID source and held in the names table.", func() float64 { return float64(x.p.Names.Len()) }),
		gauge("pcap_saver_active", "Flow files being written.", func() float64 { return float64(x.p.Saver.Active()) }),
		gauge("pcap_datadir_free_bytes", "Free space in the data directory's filesystem (for unprivileged users).", func() float64 {
			free, _, err := x.p.Saver.Space()
			if err != nil {
				return -1
			}
			return float64(free)
		}),
		gauge("pcap_compressors_in_use", "gzip compressors compressing a finished flow now (-compress).", func() float64 { return float64(x.p.Saver.CompressorsInUse()) }),
		counter("pcap_compressors_created_total", "gzip compressors created by the saver's pool (-compress); a steady value means they are reused.",
			func() float64 { return float64(x.p.Saver.CompressorsCreated()) }),
		counter("pcap_retention_deleted_dirs_total", "Day directories deleted by the retention (-retention.*), oldest first.", x.retention(func(c *saver.RetentionCounts) int64 { return c.Days.Load() })),
		counter("pcap_retention_deleted_files_total", "Files deleted with those day directories.", x.retention(func(c *saver.RetentionCounts) int64 { return c.Files.Load() })),
		counter("pcap_retention_deleted_bytes_total", "Bytes (on disk) of the files deleted with those day directories.", x.retention(func(c *saver.RetentionCounts) int64 { return c.Bytes.Load() })),
		counter("pcap_retention_errors_total", "Retention runs that failed to read or delete a day directory.", x.retention(func(c *saver.RetentionCounts) int64 { return c.Errors.Load() })),
		gauge("pcap_retention_oldest_day_timestamp_seconds", "Start (UTC midnight) of the oldest day directory kept, as the retention last saw it; 0 without -retention.* or days.", x.retention(func(c *saver.RetentionCounts) int64 { return c.Oldest.Load() })),
		counter("pcap_memory_releases_total", "Times idle heap above -maxidleram was returned to the OS.",
			func() float64 { return float64(x.memoryReleases.Load()) }),
	)
	v, commit, goVersion := x.build.Version, x.build.Commit, x.build.GoVersion
	c.Add(
		exporter.Family{Name: "git_short_commit", Help: "The git commit interpreted as a number, as m-lab/go's prometheusx exports it.", Labels: []string{"commit"}, Gauge: true,
			Read: func(emit func(float64, ...string)) { emit(commitNumber(commit), commit) }},
		exporter.Family{Name: "pcap_build_info", Help: "1, labelled with the daemon's version, commit and Go version.", Labels: []string{"version", "commit", "goversion"}, Gauge: true,
			Read: func(emit func(float64, ...string)) { emit(1, v, commit, goVersion) }},
	)
	c.AddHistogram(exporter.HistogramFamily{Name: "pcap_uuid_wait_seconds",
		Help: "Time from a flow's first packet to the arrival of its UUID (0 when the UUID came first).",
		Read: func() []*metrics.Histogram {
			var hs []*metrics.Histogram
			for _, s := range x.captures.stats() {
				hs = append(hs, s.UUIDWait)
			}
			return hs
		}})
	return c
}

// commitNumber is the short commit read as hexadecimal, the value of
// git_short_commit as m-lab/go's prometheusx sets it (0 if not hex).
func commitNumber(c string) float64 {
	n, err := strconv.ParseInt(c, 16, 64)
	if err != nil {
		return 0
	}
	return float64(n)
}
