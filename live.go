package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
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
	"github.com/m-lab/packet-headers/sockdiag"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// exitError is an error with the exit status it calls for.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }

// usage marks err as bad input: exit status 2.
func usage(err error) error { return exitError{2, err} }

// run runs the daemon until ctx is done and returns the exit code.
func run(ctx context.Context, c *config) (int, error) {
	err := live(ctx, c)
	var ee exitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		return ee.code, ee.err
	}
	return 1, err
}

// live composes the daemon: the pipeline, its sources (captures, the
// kernel's and tcp-info's UUIDs) and its reports (metrics, health), and
// shuts it down when ctx is done. Everything opened is closed by a defer.
func live(ctx context.Context, c *config) error {
	if c.maxProcs > 0 {
		// One processor: a goroutine made runnable (the capture's, once
		// per block of frames) never wakes a second thread to look for
		// work (the lab's CPU row, BenchmarkLab, measures the difference).
		runtime.GOMAXPROCS(c.maxProcs)
	}
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set {
		// -maxheap is also the runtime's soft limit, as the predecessor
		// set it: the collector works harder near it instead of letting a
		// flood's garbage take the pod over its memory limit.
		debug.SetMemoryLimit(int64(c.maxHeap))
	}
	ifaces, local, err := interfaces(c)
	if err != nil {
		return err
	}
	p, err := newPipeline(c, local)
	if err != nil {
		return err
	}
	checker, reg := health.New(c.healthGrace), pm.NewRegistry()
	stopHTTP, err := serveHTTP(c, reg, checker)
	if err != nil {
		return err
	}
	defer stopHTTP()
	// Without a prefix file shared with tcp-info, tcp-info's prefix is
	// learnt from its first Open (see eventHandler).
	prefix := names.NewPrefix(strings.TrimSuffix(uuid.FromCookie(0), "_0000000000000000"))
	h := &eventHandler{p: p, prefix: prefix, learn: c.uuidPrefixFile == ""}
	var events *tcpeventsocket.Client
	if c.eventSocket != "" {
		events = tcpeventsocket.New(c.eventSocket, h, nil)
	}
	k, err := openKernel(c, p, local, prefix, events)
	if err != nil {
		return err
	}
	defer k.close()
	h.kernel = k.src
	set := newCaptureSet(c, p, k, checker, local)
	if err := set.open(ifaces); err != nil {
		return err
	}
	defer set.closeAll()
	logStart(c, p, set, local, k)

	x := &parts{p: p, kernel: k, events: events, captures: set, memoryReleases: new(atomic.Uint64)}
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
func interfaces(c *config) ([]capture.Interface, []netip.Addr, error) {
	ifaces, err := capture.Interfaces(c.interfaces)
	if err == nil && len(ifaces) == 0 {
		err = errors.New("no interface to capture on: none is up with an address (name one with -interface)")
	}
	if err != nil {
		return nil, nil, usage(err)
	}
	for _, ifc := range ifaces {
		if ifc.Loopback || len(ifc.Addrs) > 0 && !slices.ContainsFunc(ifc.Addrs, func(a netip.Addr) bool { return !exclude.Local(a) }) {
			return nil, nil, usage(fmt.Errorf("interface %s has only loopback or link-local addresses: connections between them are excluded, as tcp-info excludes them, so nothing would be saved", ifc.Name))
		}
	}
	local, err := capture.LocalAddrs()
	return ifaces, local, err
}

// newPipeline builds the pipeline the flags describe, with live mode's
// limits and addresses, and today's and
// tomorrow's directories.
func newPipeline(c *config, local []netip.Addr) (*pipeline.Pipeline, error) {
	cfg := c.pipelineConfig()
	cfg.Local, cfg.Authoritative = local, c.eventSocket != ""
	cfg.MaxFlows, cfg.MaxHeap = c.maxFlows, uint64(c.maxHeap)
	p, err := pipeline.New(cfg)
	if err != nil {
		return nil, usage(err)
	}
	return p, p.Saver.PrepareDays(time.Now())
}

// serveHTTP serves the registry's metrics, pprof and the health checks;
// stop ends it.
func serveHTTP(c *config, reg *prometheus.Registry, checker *health.Checker) (stop func(), err error) {
	srv, err := pm.Listen(c.listenAddr, reg, pm.Options{Pprof: c.pprof, Extra: map[string]http.Handler{
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
func startBackground(ctx context.Context, wg *sync.WaitGroup, c *config, x *parts, checker *health.Checker) {
	goRun := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	if client := x.events; client != nil {
		checker.Add("eventsocket", client.Connected)
		goRun(func() { client.Run(ctx) })
	}
	x.kernel.start(ctx, goRun)
	if x.captures.follow {
		goRun(func() { x.captures.followInterfaces(ctx) })
	}
	goRun(func() { housekeeping(ctx, c, x.p.Names, checker, x.p.Saver, x.memoryReleases) })
	// The flow index's records are written, and its closed hours
	// published, on a goroutine of their own, which a stuck disk may hold
	// (never the housekeeping's health checks).
	goRun(func() { everySecond(ctx, x.p.Saver.PublishIndex) })
}

// shutdown keeps capturing for -sigtermwait, then closes the captures and
// waits until every named flow is written, for at most -shutdown.timeout;
// a second signal ends it at once.
func shutdown(c *config, p *pipeline.Pipeline, set *captureSet) error {
	second := make(chan os.Signal, 1)
	signal.Notify(second, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(second)
	log.Printf("packet-headers: signal received, capturing %v more", c.sigtermWait)
	done := make(chan struct{})
	go func() { // ends with the process if the shutdown does not
		defer close(done)
		time.Sleep(c.sigtermWait)
		set.closeAll()
		set.wg.Wait() // the demuxers hand every named flow to the saver
		p.Wait()
	}()
	select {
	case <-done:
	case sig := <-second:
		return fmt.Errorf("second signal (%v): exiting now; %s", sig, notWritten(p.Saver))
	case <-time.After(c.sigtermWait + c.shutdownTimeout):
		return fmt.Errorf("shutdown took longer than -sigtermwait and -shutdown.timeout (%v): exiting; %s", c.sigtermWait+c.shutdownTimeout, notWritten(p.Saver))
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
func openKernel(c *config, p *pipeline.Pipeline, local []netip.Addr, prefix *names.Prefix, events *tcpeventsocket.Client) (*kernelNames, error) {
	k := &kernelNames{}
	if !c.kernelUUIDs {
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
	o := sockdiag.Options{Local: local, UUID: prefix.FromCookie, GiveUp: c.uuidWait, NoDestroy: k.destroy == nil, Exclude: p.Excluded}
	if events != nil {
		o.Authority = events.ConnectedSince
		if c.uuidPrefixFile == "" {
			// tcp-info's prefix is learnt from its first Open: names wait
			// for it while tcp-info is there to teach it.
			o.Ready = func() bool { return prefix.Learnt() || !events.Connected() }
		}
	}
	k.src = sockdiag.NewSource(p.Names, o)
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

func logStart(c *config, p *pipeline.Pipeline, set *captureSet, local []netip.Addr, k *kernelNames) {
	var ifnames []string
	for _, lc := range set.list() {
		ifnames = append(ifnames, lc.h.Name())
	}
	sources := []string{}
	if c.eventSocket != "" {
		sources = append(sources, "tcp-info eventsocket")
	}
	if k.src != nil {
		sources = append(sources, "kernel socket cookies")
	}
	log.Printf("packet-headers: capturing on %s, %d local addresses, writing to %s (anonymize=%s, stream=%v, UUIDs from %s)",
		strings.Join(ifnames, ","), len(local), p.Saver.Dir(), c.mode, c.stream, strings.Join(sources, " and "))
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
	if err := h.p.Close(ts, id); err != nil {
		return err
	}
	if h.kernel != nil {
		h.kernel.Heard(ts)
	}
	return nil
}
