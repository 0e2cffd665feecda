// Package live is the daemon: it composes the captures (capture: the
// kernel's ring per interface), the UUID sources (sockdiag: the kernel's
// socket cookies; tcpeventsocket: tcp-info's eventsocket, whose names win)
// and the pipeline that pipeline.New builds, serves the metrics and the
// health checks, and shuts it all down. Offline mode (package offline)
// drives the same pipeline from a capture file; main chooses between them.
package live

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/m-lab/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/health"
	pm "github.com/m-lab/packet-headers/metrics/exporter"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/selection"
	"github.com/m-lab/packet-headers/sockdiag"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// Config is what the live daemon is told: the pipeline's configuration
// (as offline mode builds it; Run adds the local addresses and the
// limits) and the live-only settings, each named by its flag.
type Config struct {
	Pipeline        pipeline.Config
	Interfaces      []string        // -interface; none: follow every interface up with an address
	EventSocket     string          // -tcpinfo.eventsocket
	KernelUUIDs     bool            // -uuid.kernel
	PrefixFile      string          // -uuid-prefix-file; unset: tcp-info's prefix is learnt
	MaxFlows        int64           // -maxflows
	MaxHeap         int64           // -maxheap
	MaxIdleRAM      int64           // -maxidleram
	MaxProcs        int             // -maxprocs; 0: Go's default
	ListenAddr      string          // -prometheusx.listen-address
	Pprof           bool            // -pprof
	HealthGrace     time.Duration   // -health.grace
	SigtermWait     time.Duration   // -sigtermwait
	ShutdownTimeout time.Duration   // -shutdown.timeout
	BatchDelay      time.Duration   // -capture.batchdelay
	BufferSize      int64           // -capture.buffersize
	Cgroups         []string        // -cgroup: cgroup v2 paths of the services saved; none: every service
	Retention       saver.Retention // -retention.*: deletes old days; zero: off
	Build           Build
}

// Check returns a one-line reason, naming the flag, for a setting the
// daemon cannot run with. With a PrefixFile it makes the file's prefix the
// one of kernel-named UUIDs (m-lab/uuid's, for the whole process).
func (c *Config) Check() error {
	switch {
	case c.SigtermWait < 0:
		return fmt.Errorf("-sigtermwait must not be negative, not %v", c.SigtermWait)
	case c.HealthGrace <= 0:
		return fmt.Errorf("-health.grace must be positive, not %v", c.HealthGrace)
	case c.ShutdownTimeout <= 0:
		return fmt.Errorf("-shutdown.timeout must be positive, not %v", c.ShutdownTimeout)
	case c.BatchDelay < 0 || c.BatchDelay > time.Second:
		return fmt.Errorf("-capture.batchdelay must be between 0 and 1s, not %v", c.BatchDelay)
	case c.BufferSize < 64<<10 || c.BufferSize > 2<<30:
		return fmt.Errorf("-capture.buffersize must be between 64KB and 2GB, not %d bytes", c.BufferSize)
	case c.MaxFlows < 0:
		return fmt.Errorf("-maxflows must not be negative, not %d", c.MaxFlows)
	case c.Retention.MaxBytes < 0:
		return fmt.Errorf("-retention.maxsize must not be negative, not %d", c.Retention.MaxBytes)
	case c.Retention.MaxDays < 0:
		return fmt.Errorf("-retention.maxdays must not be negative, not %d", c.Retention.MaxDays)
	case c.MaxProcs < 0 || c.MaxProcs > MaxProcs:
		// Go starts a garbage-collection worker per processor: 100,000 of
		// them ended in "thread exhaustion" and a 1.2M-line dump.
		return fmt.Errorf("-maxprocs must be from 0 to %d (this machine has %d CPUs), not %d", MaxProcs, runtime.NumCPU(), c.MaxProcs)
	case c.MaxHeap <= 0:
		return errors.New("-maxheap must be positive")
	case c.MaxIdleRAM <= 0:
		return errors.New("-maxidleram must be positive")
	case c.Pprof && !loopback(c.ListenAddr):
		return fmt.Errorf("-pprof needs a loopback -prometheusx.listen-address (such as 127.0.0.1:9990), not %q: profiles expose the process's memory", c.ListenAddr)
	case c.EventSocket == "" && !c.KernelUUIDs:
		return errors.New("no UUID source: with -uuid.kernel=false, -tcpinfo.eventsocket is required")
	}
	if c.PrefixFile != "" {
		// The prefix begins every kernel-named flow's file name: one that
		// cannot (a trailing newline, a '/') is refused here, not flow by flow.
		prefix, err := os.ReadFile(c.PrefixFile)
		if err == nil {
			err = saver.CheckUUID(string(prefix) + "_0000000000000000")
		}
		if err == nil {
			err = uuid.SetUUIDPrefixFile(c.PrefixFile)
		}
		if err != nil {
			return fmt.Errorf("-uuid-prefix-file: %w", err)
		}
	} else if err := saver.CheckUUID(uuid.FromCookie(0)); err != nil && c.KernelUUIDs {
		// The made-up prefix comes from the host name.
		return fmt.Errorf("the default UUID prefix cannot name files (%w): give -uuid-prefix-file", err)
	}
	return nil
}

// loopback reports whether a listen address binds a loopback address only.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// Build is what the binary says of itself (-version, and the metrics).
type Build struct{ Version, Commit, GoVersion string }

// UsageError is an error of the configuration (the interfaces, the
// directories): main exits 2 on it.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

func usage(err error) error { return UsageError{err} }

// MaxProcs is the most -maxprocs takes: beyond the CPUs, processors add
// threads and no speed.
const MaxProcs = 1024

// Run runs the daemon until ctx is done, then shuts it down within
// c.SigtermWait and c.ShutdownTimeout. Everything opened is closed by a
// defer.
func Run(ctx context.Context, c *Config) error {
	if c.MaxProcs > 0 {
		// One processor: a goroutine made runnable (the capture's, once
		// per block of frames) never wakes a second thread to look for
		// work (the lab's CPU row, BenchmarkLab, measures the difference).
		runtime.GOMAXPROCS(c.MaxProcs)
	}
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set {
		// -maxheap is also the runtime's soft limit, as the predecessor
		// set it: the collector works harder near it instead of letting a
		// flood's garbage take the pod over its memory limit.
		debug.SetMemoryLimit(c.MaxHeap)
	}
	ifaces, local, err := interfaces(c)
	if err != nil {
		return err
	}
	p, err := newPipeline(c, local)
	if err != nil {
		return err
	}
	checker, reg := health.New(c.HealthGrace), pm.NewRegistry()
	stopHTTP, err := serveHTTP(c, reg, checker)
	if err != nil {
		return err
	}
	defer stopHTTP()
	// Without a prefix file shared with tcp-info, tcp-info's prefix is
	// learnt from its first Open (see eventHandler).
	prefix := names.NewPrefix(strings.TrimSuffix(uuid.FromCookie(0), "_0000000000000000"))
	h := &eventHandler{p: p, prefix: prefix, learn: c.PrefixFile == ""}
	var events *tcpeventsocket.Client
	if c.EventSocket != "" {
		events = tcpeventsocket.New(c.EventSocket, h, nil)
	}
	k, err := openKernel(c, p, prefix, events)
	if err != nil {
		return err
	}
	defer k.close()
	h.kernel = k.src
	cgroups, err := cgroupDirs(c.Cgroups)
	if err != nil {
		return usage(err)
	}
	listeners := openListeners(p, cgroups)
	defer listeners.Close()
	set := newCaptureSet(c, p, k, checker)
	if err := set.open(ifaces); err != nil {
		return err
	}
	defer set.closeAll()
	logStart(c, p, set, local, k)

	x := &parts{p: p, kernel: k, events: events, captures: set, listeners: listeners, memoryReleases: new(atomic.Uint64), build: c.Build}
	if c.Retention.On() {
		x.retainer = p.Saver.NewRetainer(c.Retention)
	}
	bg, cancelBG := context.WithCancel(context.Background())
	defer cancelBG()
	var bgWG sync.WaitGroup // owns the background goroutines
	startBackground(bg, &bgWG, c, x, checker)
	reg.MustRegister(families(x))
	checker.Serving() // /readyz: every capture and the eventsocket are registered
	<-ctx.Done()
	if err := shutdown(c, p, set); err != nil {
		return err // at once: a stuck disk may hold the background too
	}
	cancelBG()
	bgWG.Wait()
	return nil
}

// interfaces returns the interfaces to capture on and the local addresses.
func interfaces(c *Config) ([]capture.Interface, []netip.Addr, error) {
	ifaces, err := capture.Interfaces(c.Interfaces)
	if err == nil {
		ifaces, err = usable(ifaces, len(c.Interfaces) > 0)
	}
	if err != nil {
		return nil, nil, usage(err)
	}
	local, err := capture.LocalAddrs()
	return ifaces, local, err
}

// usable returns the interfaces worth capturing: those with an address
// that is neither loopback nor link-local (connections between such
// addresses are excluded, as tcp-info excludes them). An interface named
// with -interface that has none is an error (nothing would be saved);
// found by looking (the default), it is skipped: an interface with only an
// IPv6 link-local address (a veth just made, a bridge port) must not stop
// the daemon (TestUsableInterfaces).
func usable(ifaces []capture.Interface, named bool) ([]capture.Interface, error) {
	var out []capture.Interface
	for _, ifc := range ifaces {
		if !ifc.Loopback && (len(ifc.Addrs) == 0 && named || slices.ContainsFunc(ifc.Addrs, func(a netip.Addr) bool { return !exclude.Local(a) })) {
			out = append(out, ifc)
		} else if named {
			return nil, fmt.Errorf("interface %s has only loopback or link-local addresses: connections between them are excluded, as tcp-info excludes them, so nothing would be saved", ifc.Name)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no interface to capture on: none is up with an address that is neither loopback nor link-local (name one with -interface)")
	}
	return out, nil
}

// newPipeline builds the pipeline the flags describe, with live mode's
// limits and addresses, and today's and
// tomorrow's directories.
func newPipeline(c *Config, local []netip.Addr) (*pipeline.Pipeline, error) {
	cfg := c.Pipeline
	cfg.Local, cfg.Authoritative, cfg.Strict = local, c.EventSocket != "", true
	cfg.MaxFlows, cfg.MaxHeap = c.MaxFlows, uint64(c.MaxHeap)
	p, err := pipeline.New(cfg)
	if err != nil {
		return nil, usage(err)
	}
	return p, p.Saver.PrepareDays(time.Now())
}

// serveHTTP serves the registry's metrics, pprof and the health checks;
// stop ends it.
func serveHTTP(c *Config, reg *prometheus.Registry, checker *health.Checker) (stop func(), err error) {
	srv, err := pm.Listen(c.ListenAddr, reg, pm.Options{Pprof: c.Pprof, Extra: map[string]http.Handler{
		"/healthz": http.HandlerFunc(checker.Live),
		"/readyz":  http.HandlerFunc(checker.Ready),
	}})
	if err != nil {
		return nil, err
	}
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}, nil
}

// startBackground starts the UUID sources' loops and the housekeeping, on
// goroutines that wg owns and ctx ends.
func startBackground(ctx context.Context, wg *sync.WaitGroup, c *Config, x *parts, checker *health.Checker) {
	goRun := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	if client := x.events; client != nil {
		checker.Add("eventsocket", client.Connected)
		goRun(func() { client.Run(ctx) })
	}
	x.kernel.start(ctx, goRun)
	goRun(func() { x.captures.followInterfaces(ctx) })
	goRun(func() { housekeeping(ctx, c, x, checker) })
	if x.retainer != nil {
		goRun(func() { retain(ctx, x.retainer) })
	}
	// The flow index's records are written, and its closed hours
	// published, on a goroutine of their own, which a stuck disk may hold
	// (never the housekeeping's health checks).
	goRun(func() { everySecond(ctx, x.p.Saver.PublishIndex) })
}

// RetainEvery is how often the retention looks at the data directory: a
// statfs, and with -retention.maxsize a stat of each file of the open days.
const RetainEvery = 5 * time.Second

// retain applies the retention every RetainEvery, on a goroutine of its
// own (deleting a day of files takes the time it takes), until ctx is
// done; ctx also stops a deletion between two days.
func retain(ctx context.Context, r *saver.Retainer) {
	tick := time.NewTicker(RetainEvery)
	defer tick.Stop()
	var lastLog time.Time
	for {
		if err := r.Run(ctx, time.Now()); err != nil && time.Since(lastLog) > time.Minute {
			log.Printf("packet-headers: %v", err)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// shutdown keeps capturing for -sigtermwait, then closes the captures and
// waits until every named flow is written, for at most -shutdown.timeout;
// a second signal ends it at once.
func shutdown(c *Config, p *pipeline.Pipeline, set *captureSet) error {
	second := make(chan os.Signal, 1)
	signal.Notify(second, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(second)
	log.Printf("packet-headers: signal received, capturing %v more", c.SigtermWait)
	done := make(chan struct{})
	go func() { // ends with the process if the shutdown does not
		defer close(done)
		time.Sleep(c.SigtermWait)
		set.closeAll()
		set.wg.Wait() // the demuxers hand every named flow to the saver
		p.Wait()
	}()
	select {
	case <-done:
	case sig := <-second:
		return fmt.Errorf("second signal (%v): exiting now; %s", sig, notWritten(p.Saver))
	case <-time.After(c.SigtermWait + c.ShutdownTimeout):
		return fmt.Errorf("shutdown took longer than -sigtermwait and -shutdown.timeout (%v): exiting; %s", c.SigtermWait+c.ShutdownTimeout, notWritten(p.Saver))
	}
	log.Printf("packet-headers: every named flow saved; exiting")
	return nil
}

// kernelNames is the kernel's UUID source (sockdiag), or nothing with
// -uuid.kernel=false.
type kernelNames struct {
	src             *sockdiag.Source
	lookup, destroy sockdiag.Conn // destroy is nil without CAP_NET_ADMIN
}

// openKernel opens the kernel's UUID source. Beside tcp-info (events), it
// defers to tcp-info: a connection tcp-info leaves unnamed though it could
// have seen it is one tcp-info's rules excluded, and the kernel names only
// those it could not have seen (sockdiag.Options.Authority); without a
// prefix file, its names wait for the prefix learnt from tcp-info's events.
func openKernel(c *Config, p *pipeline.Pipeline, prefix *names.Prefix, events *tcpeventsocket.Client) (*kernelNames, error) {
	k := &kernelNames{}
	if !c.KernelUUIDs {
		return k, nil
	}
	var err error
	if k.lookup, err = sockdiag.Dial(); err != nil {
		return nil, err
	}
	if k.destroy, err = sockdiag.ListenDestroy(); errors.Is(err, sockdiag.ErrNeedNetAdmin) {
		// As the predecessor ran (CAP_NET_RAW only): look-ups by 4-tuple
		// need no capability; connections that close before theirs are
		// not named (counted as gave_up_no_broadcasts).
		log.Printf("packet-headers: %v: connections that close before their look-up (a few milliseconds after the handshake) are not named from the kernel; grant CAP_NET_ADMIN to name them", err)
		k.destroy, err = nil, nil
	}
	if err != nil {
		k.lookup.Close()
		return nil, err
	}
	o := sockdiag.Options{IsLocal: p.Select.IsLocal, UUID: prefix.FromCookie, GiveUp: c.Pipeline.UUIDWait, NoDestroy: k.destroy == nil, Exclude: p.Excluded,
		Selected: p.Select.Nameable}
	if events != nil {
		o.Authority = events.ConnectedSince
		if c.PrefixFile == "" {
			// tcp-info's prefix is learnt from its first Open: names wait
			// for it while tcp-info is there to teach it.
			o.Ready = func() bool { return prefix.Learnt() || !events.Connected() }
		}
	}
	k.src = sockdiag.NewSource(p.Gate(), o)
	return k, nil
}

// start runs the kernel source's loops.
func (k *kernelNames) start(ctx context.Context, goRun func(func())) {
	if k.src != nil {
		goRun(func() { k.src.RunLookups(ctx, k.lookup) })
	}
	if k.destroy != nil {
		goRun(func() { k.src.RunDestroy(ctx, k.destroy) })
	}
}

// close closes the kernel source's netlink sockets, those of loops that
// never started among them (a loop closes its own too: twice is harmless).
func (k *kernelNames) close() {
	if k.src == nil {
		return
	}
	k.lookup.Close()
	if k.destroy != nil {
		k.destroy.Close()
	}
}

func logStart(c *Config, p *pipeline.Pipeline, set *captureSet, local []netip.Addr, k *kernelNames) {
	var ifnames []string
	for _, lc := range set.list() {
		ifnames = append(ifnames, lc.h.Name())
	}
	sources := []string{}
	if c.EventSocket != "" {
		sources = append(sources, "tcp-info eventsocket")
	}
	if k.src != nil {
		sources = append(sources, "kernel socket cookies")
	}
	log.Printf("packet-headers: capturing on %s, %d local addresses, writing to %s (anonymize=%s, stream=%v, UUIDs from %s)",
		strings.Join(ifnames, ","), len(local), p.Saver.Dir(), c.Pipeline.Anonymize, c.Pipeline.Stream, strings.Join(sources, " and "))
}

// eventHandler feeds eventsocket events into the pipeline, and keeps the
// kernel source's prefix in step with tcp-info's.
type eventHandler struct {
	p      *pipeline.Pipeline
	prefix *names.Prefix    // the kernel source's
	learn  bool             // take tcp-info's prefix (no -uuid-prefix-file)
	kernel *sockdiag.Source // nil without the kernel source
	warned bool             // that tcp-info's prefix differs from ours
}

func (h *eventHandler) Open(ts time.Time, id string, local, remote netip.AddrPort, cookie uint64) error {
	if err := h.p.Open(ts, id, local, remote, cookie); err != nil {
		return err
	}
	if h.kernel != nil {
		h.kernel.Announced(ts, local)
	}
	if h.learn {
		if p, changed := h.prefix.Learn(id, cookie); changed {
			log.Printf("packet-headers: UUID prefix %s taken from tcp-info's events, so that flows named from kernel cookies get tcp-info's names", p)
		}
	} else if h.kernel != nil && !h.warned && cookie != 0 && h.prefix.FromCookie(cookie) != id {
		h.warned = true
		log.Printf("WARNING: tcp-info's UUIDs have another prefix than this daemon's (%s, not %s): give both the same -uuid-prefix-file, or flows named from kernel cookies will not match tcp-info's", id, h.prefix.FromCookie(cookie))
	}
	return nil
}

func (h *eventHandler) Close(ts time.Time, id string) error {
	return h.p.Close(ts, id)
}

// notWritten says which files were still being written.
func notWritten(sv *saver.Saver) string {
	w := sv.Writing()
	n := len(w)
	if n == 0 {
		return "no file was being written"
	}
	const most = 20
	more := ""
	if n > most {
		more = fmt.Sprintf(" and %d more", n-most)
		w = w[:most]
	}
	return fmt.Sprintf("%d files not written: %s%s", n, strings.Join(w, ", "), more)
}

// everySecond calls f with the time every second until ctx is done.
func everySecond(ctx context.Context, f func(now time.Time)) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			f(now)
		}
	}
}

// housekeeping enforces -maxidleram, samples the health checks, sweeps
// the names table, reads the listeners and makes the day directories
// ahead, every second, until
// ctx is done. (-maxheap is enforced by the demuxers' ticks: a wake-up of
// its own ten times a second cost the capture several percent of its CPU.)
func housekeeping(ctx context.Context, c *Config, x *parts, checker *health.Checker) {
	table, sv, releases := x.p.Names, x.p.Saver, x.memoryReleases
	samples := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
	var lastRelease time.Time
	everySecond(ctx, func(now time.Time) {
		checker.Sample(now)
		metrics.Read(samples)
		if samples[0].Value.Uint64() > uint64(c.MaxIdleRAM) && now.Sub(lastRelease) > 10*time.Second {
			debug.FreeOSMemory()
			releases.Add(1)
			lastRelease = now
		}
		table.Sweep()
		x.listeners.refresh()
		if err := sv.PrepareDays(now); err != nil {
			log.Printf("packet-headers: %v", err)
		}
	})
}

// listeners keeps the selection's listeners (package selection: a
// connection whose SYN the capture missed is incoming when a socket
// listens on its local address and port) up to date, from the kernel's sockets. Without a sock_diag
// socket they stay unknown, and such connections are saved.
type listeners struct {
	conn    sockdiag.Conn // nil if none could be opened
	sel     *selection.Policy
	cgroups []string // -cgroup's directories, whose ids are read again each time
	warn    bool     // an error was logged
}

// openListeners opens the listener dumps' socket and reads the ports once,
// before any capture starts.
func openListeners(p *pipeline.Pipeline, cgroups []string) *listeners {
	l := &listeners{sel: p.Select, cgroups: cgroups}
	// Before any capture starts: the demuxers read it unsynchronized.
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		var lo, hi uint16
		if n, _ := fmt.Sscan(string(b), &lo, &hi); n == 2 && lo > 0 && lo <= hi {
			p.Select.Ephemeral = [2]uint16{lo, hi}
		}
	}
	conn, err := sockdiag.Dial()
	if err != nil {
		log.Printf("packet-headers: %v: connections whose SYN is not captured are saved whichever end opened them", err)
		return l
	}
	l.conn = conn
	l.refresh()
	return l
}

func (l *listeners) refresh() {
	if len(l.cgroups) > 0 {
		// A service's processes may move to new cgroups below the one
		// named (a container restarted): their ids are read again.
		l.sel.SetCgroups(cgroupIDs(l.cgroups))
	}
	if l.conn == nil {
		return
	}
	ls, err := sockdiag.Listeners(l.conn, 500*time.Millisecond)
	if err != nil {
		if !l.warn {
			l.warn = true
			log.Printf("packet-headers: listeners: %v", err)
		}
		// A fresh socket, so that no late answer is taken for the next.
		l.conn.Close()
		l.conn = nil
		if conn, err := sockdiag.Dial(); err == nil {
			l.conn = conn
		}
		return
	}
	l.sel.SetListening(ls)
}

// Close closes the socket. The housekeeping, which refreshes, has ended.
func (l *listeners) Close() {
	if l.conn != nil {
		l.conn.Close()
	}
}
