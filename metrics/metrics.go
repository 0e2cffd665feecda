// Package metrics defines every Prometheus metric the daemon exports (all
// named pcap_*) and serves them, with pprof, over HTTP.
//
// Event counters are package-level vectors. Hot loops never touch them per
// packet: the demuxer counts in plain local fields and adds its counts here
// in batches. Kernel counters (the capture ring's received and dropped
// frames) are read at scrape time by a custom collector. Everything here is safe for
// concurrent use.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Packet outcomes, the values of the outcome label of PacketsTotal.
const (
	OutcomeSaved               = "saved"                 // written to a file
	OutcomeNoUUID              = "no_uuid"               // its flow was never named
	OutcomeAfterCaptureDur     = "after_captureduration" // arrived after -captureduration
	OutcomeFlowLimit           = "flow_limit"            // its flow was refused by -maxflows
	OutcomeMemoryLimit         = "memory_limit"          // its flow was refused by -maxheap
	OutcomeUndecodable         = "undecodable"           // not a decodable TCP/IP frame
	OutcomeWriteError          = "write_error"           // its file could not be written
	OutcomeShutdownWithoutUUID = "shutdown_no_uuid"      // still unnamed at shutdown
	OutcomeLowSpace            = "low_space"             // its file was not written: -minfreespace
)

// Flow outcomes, the values of the outcome label of FlowsEnded.
const (
	FlowSaved       = "saved"        // its file was written
	FlowUUIDTimeout = "uuid_timeout" // no UUID within -uuidwaitduration
	FlowWriteError  = "write_error"  // its file could not be written
	FlowShutdown    = "shutdown"     // unnamed at shutdown
	FlowLowSpace    = "low_space"    // not written: free space below -minfreespace
)

var (
	// PacketsCaptured counts frames read from the capture, per interface.
	PacketsCaptured = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_packets_captured_total",
		Help: "Frames read from the capture, per interface.",
	}, []string{"interface"})

	// PacketsTotal counts captured frames by what became of them.
	PacketsTotal = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_packets_total",
		Help: "Captured frames by outcome: saved, no_uuid, after_captureduration, flow_limit, memory_limit, undecodable, write_error, low_space, shutdown_no_uuid.",
	}, []string{"outcome"})

	// Undecodable counts frames that were not decodable TCP/IP, by kind.
	Undecodable = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_undecodable_packets_total",
		Help: "Frames that were not decodable TCP/IP, by kind (truncated, bad_ip, bad_tcp, fragment, not_tcp, unknown_link, too_many_headers).",
	}, []string{"kind"})

	// FlowsStarted counts flows that began to be tracked.
	FlowsStarted = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_flows_started_total",
		Help: "Flows that began to be tracked.",
	})

	// FlowsEnded counts tracked flows that ended, by outcome.
	FlowsEnded = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_flows_ended_total",
		Help: "Tracked flows that ended, by outcome: saved, uuid_timeout, write_error, low_space, shutdown.",
	}, []string{"outcome"})

	// FlowsRefused counts connection attempts (SYNs) not tracked because of
	// a limit.
	FlowsRefused = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_flows_refused_total",
		Help: "New flows not tracked because a limit was reached, by limit (flow_limit for -maxflows, memory_limit for -maxheap); counted on their SYN.",
	}, []string{"limit"})

	// FilesWritten counts pcap files that were completed and renamed into place.
	FilesWritten = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_files_written_total",
		Help: "Per-flow pcap files completed and renamed into place.",
	})

	// BytesWritten counts bytes written to pcap files.
	BytesWritten = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_bytes_written_total",
		Help: "Bytes written to per-flow pcap files.",
	})

	// WriteErrors counts failed file operations, by operation.
	WriteErrors = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_write_errors_total",
		Help: "Failed file operations, by operation (name: a UUID that is not a plain file name; mkdir, create, write, close, compress, rename).",
	}, []string{"op"})

	// EventSocketConnected is 1 while connected to tcp-info's eventsocket.
	EventSocketConnected = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "pcap_eventsocket_connected",
		Help: "1 while connected to tcp-info's eventsocket, else 0.",
	})

	// EventSocketReconnects counts connection attempts after the first.
	EventSocketReconnects = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_eventsocket_reconnects_total",
		Help: "Attempts to connect to the eventsocket after the first one.",
	})

	// EventSocketEvents counts events received, by type.
	EventSocketEvents = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_eventsocket_events_total",
		Help: "Events received from the eventsocket, by type (open, close, unknown).",
	}, []string{"type"})

	// EventSocketMalformed counts lines that were not valid events.
	EventSocketMalformed = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_eventsocket_malformed_lines_total",
		Help: "Eventsocket lines that were not valid JSON events (skipped).",
	})

	// UUIDWait is the time from a flow's first packet to its UUID.
	UUIDWait = promauto.NewHistogram(prometheus.HistogramOpts{
		Name:    "pcap_uuid_wait_seconds",
		Help:    "Time from a flow's first packet to the arrival of its UUID (0 when the UUID came first).",
		Buckets: []float64{0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10},
	})

	// UUIDs counts UUIDs given to flows, by source.
	UUIDs = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_uuids_total",
		Help: "Flows named, by the source of the UUID (eventsocket: tcp-info; kernel: sock_diag socket cookies).",
	}, []string{"source"})

	// CaptureErrors counts read errors of the capture other than timeouts.
	CaptureErrors = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_capture_errors_total",
		Help: "Errors reading the capture, per interface.",
	}, []string{"interface"})

	// KernelLookups counts look-ups of connections' socket cookies in the
	// kernel, by result.
	KernelLookups = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_kernel_uuid_lookups_total",
		Help: "Look-ups of socket cookies through sock_diag, by result (found, not_found, not_established, already_named, not_local, gave_up, queue_full, error, malformed).",
	}, []string{"result"})

	// KernelNetlinkCalls counts netlink system calls of the look-ups.
	KernelNetlinkCalls = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_kernel_uuid_netlink_calls_total",
		Help: "System calls made for sock_diag look-ups, by operation (send, recv).",
	}, []string{"op"})

	// KernelDestroyEvents counts the kernel's TCP socket destroy broadcasts.
	KernelDestroyEvents = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "pcap_kernel_destroy_events_total",
		Help: "TCP socket destroy broadcasts from sock_diag, by result (named; disconnected: closed with SO_LINGER 0, no remote port; ignored: listeners; lost; malformed).",
	}, []string{"result"})

	// CompressorsCreated counts the gzip compressors the saver's pool made.
	CompressorsCreated = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_compressors_created_total",
		Help: "gzip compressors created by the saver's pool (-compress); a steady value means they are reused.",
	})

	// MemoryReleases counts times idle heap was returned to the OS.
	MemoryReleases = promauto.NewCounter(prometheus.CounterOpts{
		Name: "pcap_memory_releases_total",
		Help: "Times idle heap above -maxidleram was returned to the OS.",
	})
)

// StatsFunc returns the capture's received, kernel-dropped and interface-dropped
// counters for one capture.
type StatsFunc func() (received, dropped, ifaceDropped uint64, err error)

type captureCollector struct {
	mu      sync.Mutex
	sources map[string]StatsFunc
	ups     map[string]func() bool
	rx, drp *prometheus.Desc
	ifdrp   *prometheus.Desc
	up      *prometheus.Desc
}

var captures = &captureCollector{
	sources: map[string]StatsFunc{},
	ups:     map[string]func() bool{},
	up:      prometheus.NewDesc("pcap_capture_up", "1 while capturing on the interface, 0 while it is gone and being reopened.", []string{"interface"}, nil),
	rx:      prometheus.NewDesc("pcap_kernel_received_total", "Frames that passed the capture filter, per interface (the ring's tp_packets, or libpcap's ps_recv).", []string{"interface"}, nil),
	drp:     prometheus.NewDesc("pcap_kernel_dropped_total", "Frames dropped because the capture buffer was full, per interface (the ring's tp_drops, or libpcap's ps_drop).", []string{"interface"}, nil),
	ifdrp:   prometheus.NewDesc("pcap_interface_dropped_total", "Frames dropped by the interface or driver, per interface (libpcap's ps_ifdrop; 0 for the ring).", []string{"interface"}, nil),
}

func init() {
	prometheus.MustRegister(captures)
	// The label values of outcomes are exported from the start, at 0, so
	// that rates and dashboards work before the first event of a kind;
	// per-interface series appear with their interface.
	for _, o := range []string{OutcomeSaved, OutcomeNoUUID, OutcomeAfterCaptureDur, OutcomeFlowLimit, OutcomeMemoryLimit,
		OutcomeUndecodable, OutcomeWriteError, OutcomeShutdownWithoutUUID, OutcomeLowSpace} {
		PacketsTotal.WithLabelValues(o)
	}
	for _, o := range []string{FlowSaved, FlowUUIDTimeout, FlowWriteError, FlowShutdown, FlowLowSpace} {
		FlowsEnded.WithLabelValues(o)
	}
	for _, l := range []string{OutcomeFlowLimit, OutcomeMemoryLimit} {
		FlowsRefused.WithLabelValues(l)
	}
	for _, op := range []string{"name", "mkdir", "create", "write", "close", "rename"} {
		WriteErrors.WithLabelValues(op)
	}
	for _, o := range []string{"found", "not_found", "not_established", "already_named", "not_local", "queue_full", "gave_up", "gave_up_no_broadcasts", "error", "malformed"} {
		KernelLookups.WithLabelValues(o)
	}
	for _, o := range []string{"named", "disconnected", "ignored", "lost", "malformed"} {
		KernelDestroyEvents.WithLabelValues(o)
	}
	for _, c := range []string{"send", "recv"} {
		KernelNetlinkCalls.WithLabelValues(c)
	}
	for _, t := range []string{"open", "close", "unknown"} {
		EventSocketEvents.WithLabelValues(t)
	}
	for _, s := range []string{"eventsocket", "kernel"} {
		UUIDs.WithLabelValues(s)
	}
}

// Describe implements prometheus.Collector.
func (c *captureCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.rx
	ch <- c.drp
	ch <- c.ifdrp
	ch <- c.up
}

// Collect implements prometheus.Collector, reading the counters now.
func (c *captureCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, f := range c.sources {
		rx, drp, ifdrp, err := f()
		if err != nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.rx, prometheus.CounterValue, float64(rx), name)
		ch <- prometheus.MustNewConstMetric(c.drp, prometheus.CounterValue, float64(drp), name)
		ch <- prometheus.MustNewConstMetric(c.ifdrp, prometheus.CounterValue, float64(ifdrp), name)
	}
	for name, f := range c.ups {
		v := 0.0
		if f() {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, v, name)
	}
}

// RegisterCapture makes the kernel counters of the capture on an interface,
// and whether it is up, part of every scrape, until the returned function
// is called.
func RegisterCapture(iface string, f StatsFunc, up func() bool) (unregister func()) {
	captures.mu.Lock()
	captures.sources[iface] = f
	captures.ups[iface] = up
	captures.mu.Unlock()
	return func() {
		captures.mu.Lock()
		delete(captures.sources, iface)
		delete(captures.ups, iface)
		captures.mu.Unlock()
	}
}

// RegisterGaugeFunc exports a gauge whose value is read at scrape time.
func RegisterGaugeFunc(name, help string, f func() float64) {
	promauto.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
}

// RegisterCounterFunc exports a counter whose value, kept by its owner, is
// read at scrape time.
func RegisterCounterFunc(name, help string, f func() float64) {
	promauto.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f)
}

// Server serves /metrics and /debug/pprof/.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	done chan error
}

// Listen binds addr (":0" picks a free port) and starts serving /metrics,
// pprof, and the extra handlers by path.
func Listen(addr string, extra map[string]http.Handler) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/metrics", promhttp.Handler())
	for path, h := range extra {
		mux.Handle(path, h)
	}
	s := &Server{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln: ln, done: make(chan error, 1)}
	go func() { s.done <- s.srv.Serve(ln) }()
	return s, nil
}

// Addr returns the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Shutdown stops the server, waiting for requests in flight until ctx ends,
// and for the serving goroutine.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if serr := <-s.done; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}
