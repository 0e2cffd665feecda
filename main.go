// Command packet-headers captures the headers of every TCP connection that
// terminates on this server and saves each connection into its own pcap
// file, <datadir>/YYYY/MM/DD/<uuid>.pcap, named by the UUID that tcp-info
// gives the connection.
//
// main parses the flags into one configuration for either mode (exit
// status 2 and a one-line reason for a bad one), and runs the live daemon
// (package live: captures and UUID sources feeding the pipeline) or offline
// mode (package offline: a capture file feeding the same pipeline) until
// the signals end it. docs/architecture.md draws the parts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"github.com/m-lab/go/bytecount"
	"github.com/m-lab/go/flagx"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/live"
	"github.com/m-lab/packet-headers/offline"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/selection"
)

// config holds every flag: most are bound to the configuration of the
// pipeline (p) or of the live daemon (l) directly; the others are parsed
// into them by parse.
type config struct {
	p pipeline.Config
	l live.Config

	anonymize                flagx.Enum
	keyFile                  string
	excludePorts, excludeIPs flagx.StringArray
	localPorts               flagx.StringArray
	sample                   int
	sampleKeyFile            string
	minFree, retainFree      saver.FreeSpace
	read, events             string
	quiet, version           bool
	excludeLocal             bool
	localAddrs               flagx.StringArray
}

func newFlagSet(c *config) *flag.FlagSet {
	fs := flag.NewFlagSet("packet-headers", flag.ContinueOnError)
	c.anonymize = flagx.Enum{Options: anonymize.Modes, Value: "none"}
	c.l.MaxIdleRAM, c.l.MaxHeap, c.l.BufferSize = 3<<30, 8<<30, 8<<20
	fs.Var(&c.anonymize, "anonymize.ip", "How to anonymize remote IP addresses in saved headers: none; netblock (IPv4 to /24, IPv6 to /48); or cryptopan (keyed, prefix-preserving, one to one: give -anonymize.keyfile). The server's own addresses are kept")
	fs.StringVar(&c.keyFile, "anonymize.keyfile", "", "With -anonymize.ip=cryptopan or -anonymize.tsoffset: file holding the 32-byte key (raw, or 64 hex digits); the same key gives the same mapping on every server")
	fs.BoolVar(&c.p.ZeroMAC, "anonymize.zeromac", false, "Zero the link-layer addresses of saved frames (a client on the server's link is known by its MAC address)")
	fs.BoolVar(&c.p.TSOffset, "anonymize.tsoffset", false, "Add to each end's TCP timestamps (TSval, and the TSecr echoing it) a constant per flow drawn from -anonymize.keyfile: differences kept, the clock offset that links a host's flows hidden")
	fs.DurationVar(&c.p.CaptureDuration, "captureduration", 30*time.Second, "Save a flow's packets for at most this long after its first packet")
	fs.StringVar(&c.p.Saver.Dir, "datadir", ".", "Directory under which YYYY/MM/DD/<uuid>.pcap files are written")
	fs.DurationVar(&c.p.FlowTimeout, "flowtimeout", 30*time.Second, "A flow with no packet for this long has ended")
	fs.Var((*flagx.StringArray)(&c.l.Interfaces), "interface", "Interface to capture on (repeatable); unset: every interface that is up and has an address, loopback excluded")
	fs.IntVar(&c.p.MaxHeaderSize, "maxheadersize", 256, "Longest prefix of a packet that is saved (also the capture snaplen); headers are cut at the end of the TCP header in any case")
	fs.Var((*bytecount.ByteCount)(&c.l.MaxIdleRAM), "maxidleram", "When idle heap memory exceeds this, return it to the OS (e.g. 1500MB)")
	fs.StringVar(&c.l.ListenAddr, "prometheusx.listen-address", ":9990", "Address on which /metrics, /healthz and /readyz are served (bind it to 127.0.0.1 unless something else must scrape it)")
	fs.BoolVar(&c.l.Pprof, "pprof", false, "Serve /debug/pprof/ beside /metrics; only on a loopback -prometheusx.listen-address (profiles expose the process's memory, and a trace read slowly grows memory that -maxheap cannot see)")
	fs.DurationVar(&c.l.SigtermWait, "sigtermwait", time.Second, "On SIGTERM or SIGINT, keep capturing this long before saving every named flow and exiting")
	fs.BoolVar(&c.p.Stream, "stream", false, "Write each flow's file incrementally once its UUID is known, instead of all at once when the flow ends")
	fs.StringVar(&c.l.EventSocket, "tcpinfo.eventsocket", "", "Path of tcp-info's eventsocket; when set, tcp-info's UUIDs are authoritative")
	fs.StringVar(&c.l.PrefixFile, "uuid-prefix-file", "", "File holding the UUID prefix (<hostname>_<boot time>), the one tcp-info is given, so that both name a socket alike; unset: a made-up prefix containing _unsafe")
	fs.BoolVar(&c.l.KernelUUIDs, "uuid.kernel", true, "Name flows from the kernel's socket cookies (sock_diag): all flows without -tcpinfo.eventsocket, those tcp-info never announced with it")
	fs.DurationVar(&c.p.UUIDWait, "uuidwaitduration", 5*time.Second, "Drop a flow's headers if no UUID arrived this long after its first packet")
	fs.DurationVar(&c.l.BatchDelay, "capture.batchdelay", capture.DefaultBatchDelay, "Longest a captured packet waits in the kernel's buffer so that packets are read in batches: more saves CPU under load, less names very short connections from the kernel sooner (0: read each packet at once)")
	fs.Var((*bytecount.ByteCount)(&c.l.BufferSize), "capture.buffersize", "Kernel capture buffer per interface (e.g. 32MB): more absorbs longer bursts without kernel drops")
	fs.Int64Var(&c.l.MaxFlows, "maxflows", 0, "Track at most this many concurrent flows; beyond it new flows are not tracked (0: unlimited)")
	fs.Var((*bytecount.ByteCount)(&c.l.MaxHeap), "maxheap", "When the heap exceeds this, new flows are not tracked until it shrinks; also the Go runtime's soft memory limit. Default: 8GB, or two thirds of the cgroup's memory limit if lower")
	c.minFree.Set("1%")
	fs.Var(&c.retainFree, "retention.minfree", "Delete whole day directories of the datadir, oldest first (never today's or the one made ahead), while its filesystem has less free space than this, as bytes (2GB) or a percentage (10%); above -minfreespace. Off by default: not with an uploader that deletes what it sent (M-Lab's pusher)")
	fs.Var((*bytecount.ByteCount)(&c.l.Retention.MaxBytes), "retention.maxsize", "Delete the oldest day directories, as -retention.minfree does, while the days take more than this (1500GB); 0: no budget")
	fs.IntVar(&c.l.Retention.MaxDays, "retention.maxdays", 0, "Keep the day directories of today and of this many days before it, deleting older ones, as -retention.minfree does; 0: no limit")
	fs.Var(&c.minFree, "minfreespace", "Keep this much free space in the datadir's filesystem, as bytes (500MB) or a percentage (5%): below it, new flows are not written (counted); 0 disables")
	fs.DurationVar(&c.l.HealthGrace, "health.grace", time.Minute, "/healthz fails once a capture or the eventsocket has been down this long (/readyz fails at once)")
	fs.IntVar(&c.l.MaxProcs, "maxprocs", 1, "Processors that run the daemon's Go code (GOMAXPROCS) in live mode; 0: Go's default (one per CPU, as with an explicit GOMAXPROCS unless set). One keeps the capture path free of wake-ups between Go's threads")
	fs.BoolVar(&c.p.Saver.Compress, "compress", true, "Write <uuid>.pcap.gz, compressed from the buffered records with pooled compressors (one gzip member per batch written: the whole file for most flows), the files M-Lab's ETL parses; -compress=false writes <uuid>.pcap")
	fs.Var(&c.excludePorts, "exclude-srcport", "Never save connections with these local ports (comma-separated, repeatable), as tcp-info's flag of the same name")
	fs.Var(&c.excludeIPs, "exclude-dstip", "Never save connections with these remote addresses (comma-separated, repeatable), as tcp-info's flag of the same name; loopback, link-local, multicast and unspecified addresses are always excluded, as by tcp-info")
	fs.BoolVar(&c.p.Outgoing, "outgoing", false, "Also save the connections this host opened (by default only those it accepted are: their SYN came for a local listener)")
	fs.Var(&c.localPorts, "localport", "Save only connections whose local port is one of these (comma-separated ports and ranges such as 443,3001-3010; repeatable); unset: every port")
	fs.Var((*flagx.StringArray)(&c.l.Cgroups), "cgroup", "Save only connections to services of this cgroup v2 (a path under the cgroup v2 mount, or relative to it: system.slice/ndt.service, a container's; repeatable): those to a port on which a socket of the cgroup, or of one below it, listens")
	fs.IntVar(&c.sample, "sample", 1, "Save one connection in this many, chosen by a keyed hash of its UUID (HMAC-SHA256 with -sample.keyfile's key), so that every server and an offline re-split choose the same ones; 1: every connection")
	fs.StringVar(&c.sampleKeyFile, "sample.keyfile", "", "With -sample: the file holding the sample's key (its bytes as they are; not readable by others); unset: an empty key, so that anyone can tell which UUIDs have traces")
	fs.BoolVar(&c.version, "version", false, "Print the version and exit")
	fs.StringVar(&c.read, "read", "", "Offline mode: split this pcap or pcapng file (gzip allowed; - for stdin) instead of capturing, then exit")
	fs.StringVar(&c.events, "events", "", "Offline mode: tcp-info eventsocket JSON Lines (gzip allowed) naming the flows of -read; unset: fallback names from time and 4-tuple")
	fs.BoolVar(&c.quiet, "quiet", false, "Offline mode: no progress line on a terminal")
	fs.BoolVar(&c.excludeLocal, "exclude-local", false, "Offline mode: leave out connections with a loopback, link-local, multicast or unspecified address, as tcp-info and live mode always do; unset: offline keeps them (a capture taken on loopback is split whole)")
	fs.Var(&c.localAddrs, "localaddr", "Offline mode: an address of the server (repeatable), kept by -anonymize.ip; the local ends in -events are added")
	c.p.Saver.Perm = 0o640
	fs.Var((*saver.Perm)(&c.p.Saver.Perm), "fileperm", "Permissions of the files written (octal; directories get search permission where read is given): 0640 lets the owner and its group (an uploader's) read; 0644 lets everyone read; no write permission beyond the owner's")
	fs.StringVar(&c.p.Saver.PartialDir, "partialdir", "", "Directory where files are written before they are renamed into the datadir: outside it (an uploader watching the datadir sees only finished files) and on its filesystem; unset: .<datadir's name>.partial beside the datadir")
	fs.DurationVar(&c.l.ShutdownTimeout, "shutdown.timeout", 20*time.Second, "On SIGTERM or SIGINT, the longest the daemon waits for the files being written (after -sigtermwait) before it says which are not written and exits 1; a second signal exits at once")
	return fs
}

// parse parses and checks the arguments and the environment (FLAG_NAME for
// -flag.name). It returns flag.ErrHelp for -help and a one-line error for
// anything invalid.
func parse(args []string, c *config, stderr io.Writer) error {
	fs := newFlagSet(c)
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stderr)
			fmt.Fprintf(stderr, "Usage: packet-headers [flags]\n\nSaves the headers of every TCP connection to this server in <datadir>/YYYY/MM/DD/<uuid>.pcap.\nEvery flag can also be set by an environment variable: -flowtimeout as FLOWTIMEOUT, -anonymize.ip as ANONYMIZE_IP.\n\n")
			fs.PrintDefaults()
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := flagx.ArgsFromEnvWithLog(fs, false); err != nil || c.version {
		return err
	}
	// A flag is set on the command line or by its environment variable
	// (flagx sets those through Value.Set, which fs.Visit does not see).
	set := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := os.LookupEnv(flagx.MakeShellVariableName(f.Name)); ok {
			set[f.Name] = true
		}
	})
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err := c.p.Check(); err != nil {
		return err
	}
	if c.read != "" {
		if err := checkOffline(c, set); err != nil {
			return err
		}
		c.p.KeepLocal = !c.excludeLocal
	} else {
		if !set["maxheap"] {
			c.l.MaxHeap = int64(live.DefaultMaxHeap("/"))
		}
		if !set["maxprocs"] && os.Getenv("GOMAXPROCS") != "" {
			c.l.MaxProcs = 0 // an explicit GOMAXPROCS wins
		}
		switch {
		case c.events != "":
			return errors.New("-events goes with -read (offline mode)")
		case len(c.localAddrs) > 0:
			return errors.New("-localaddr is for offline mode (-read); live mode knows its addresses")
		case set["exclude-local"]:
			return errors.New("-exclude-local is for offline mode (-read); live mode always leaves out local addresses, as tcp-info does")
		}
		if err := c.l.Check(); err != nil {
			return err
		}
		c.l.Interfaces = dedupe(c.l.Interfaces)
	}
	c.p.Saver.MinFreeBytes, c.p.Saver.MinFreePercent = c.minFree.Bytes, c.minFree.Percent
	c.l.Retention.MinFreeBytes, c.l.Retention.MinFreePercent = c.retainFree.Bytes, c.retainFree.Percent
	if r := c.l.Retention; r.MinFreeBytes > 0 && r.MinFreeBytes <= c.minFree.Bytes || r.MinFreePercent > 0 && r.MinFreePercent <= c.minFree.Percent {
		return errors.New("-retention.minfree must be above -minfreespace: writing would stop before deleting began")
	}
	c.p.Exclude = &exclude.Rules{}
	for _, l := range c.excludePorts {
		if err := c.p.Exclude.AddSrcPorts(l); err != nil {
			return err
		}
	}
	for _, l := range c.excludeIPs {
		if err := c.p.Exclude.AddDstIPs(l); err != nil {
			return err
		}
	}
	if len(c.localPorts) > 0 {
		c.p.Ports = &selection.Ports{}
		for _, l := range c.localPorts {
			if err := c.p.Ports.Add(l); err != nil {
				return fmt.Errorf("-localport: %w", err)
			}
		}
	}
	var err error
	if c.p.Sample, err = selection.LoadSample(c.sample, c.sampleKeyFile); err != nil {
		return err
	}
	if c.p.Anonymize, err = anonymize.ParseMode(c.anonymize.Value); err != nil {
		return err
	}
	c.p.Key, err = anonymize.LoadKey(c.p.Anonymize, c.p.TSOffset, c.keyFile)
	return err
}

// checkOffline refuses the flags of live capture with -read, rather than
// ignore them, and reads -localaddr.
func checkOffline(c *config, set map[string]bool) error {
	for _, f := range liveOnly {
		if set[f] {
			return fmt.Errorf("-%s is for live capture: offline mode (-read) does not use it", f)
		}
	}
	switch {
	case set["tcpinfo.eventsocket"] || set["interface"]:
		return errors.New("-read (offline mode) replaces capture and the eventsocket: drop -interface and -tcpinfo.eventsocket")
	case c.read == "-" && c.events == "-":
		return errors.New("-read and -events cannot both be stdin")
	}
	for _, s := range c.localAddrs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("-localaddr: %w", err)
		}
		c.p.Local = append(c.p.Local, a.Unmap())
	}
	return nil
}

// liveOnly are the flags that offline mode refuses rather than ignores
// (-interface and -tcpinfo.eventsocket have reasons of their own).
var liveOnly = []string{"capture.batchdelay", "capture.buffersize", "maxflows", "maxheap", "maxidleram", "maxprocs",
	"health.grace", "sigtermwait", "shutdown.timeout", "prometheusx.listen-address", "pprof", "uuid.kernel", "uuid-prefix-file", "cgroup",
	"retention.minfree", "retention.maxsize", "retention.maxdays"}

// dedupe returns the interfaces named, each once, in their first order: a
// repeated -interface would open two captures on one interface, track
// every flow twice and overwrite its metrics.
func dedupe(ifaces []string) []string {
	var out []string
	for _, i := range ifaces {
		if !slices.Contains(out, i) {
			out = append(out, i)
		}
	}
	return out
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	var c config
	if err := parse(os.Args[1:], &c, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "packet-headers: %v\n", err)
		os.Exit(2)
	}
	if c.version {
		fmt.Println("packet-headers", buildVersion())
		os.Exit(0)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	run := runLive
	if c.read != "" {
		run = runOffline
	}
	nudged := make(chan struct{})
	go nudgeSignals(nudged)
	code, err := run(ctx, &c)
	close(nudged)
	if err != nil {
		fmt.Fprintf(os.Stderr, "packet-headers: %v\n", err)
	}
	os.Exit(code)
}

// runLive runs the daemon until ctx is done and returns the exit code.
func runLive(ctx context.Context, c *config) (int, error) {
	v, commit, goVersion := buildInfo()
	c.l.Pipeline, c.l.Build = c.p, live.Build{Version: v, Commit: commit, GoVersion: goVersion}
	err := live.Run(ctx, &c.l)
	var ue live.UsageError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ue):
		return 2, ue.Err
	}
	return 1, err
}

// runOffline splits a capture file into per-flow files and prints a
// one-line summary.
func runOffline(ctx context.Context, c *config) (int, error) {
	o := offline.Options{Read: c.read, Events: c.events, Stdin: os.Stdin, Config: c.p}
	if !c.quiet && isTerminal(os.Stderr) {
		o.Progress = os.Stderr
	}
	sum, err := offline.Run(ctx, o)
	for _, u := range sum.Unsupported {
		fmt.Fprintf(os.Stderr, "packet-headers: %s\n", u)
	}
	fmt.Printf("packet-headers: %s\n", sum)
	if err == nil && sum.Packets > 0 && sum.UnsupportedPackets == sum.Packets {
		err = errors.New("no packet is on an interface of a supported link type")
	}
	if err == nil && sum.WriteErrors > 0 { // the output is incomplete: say so in the status too
		err = fmt.Errorf("%d flows were not written (their errors are logged above)", sum.WriteErrors)
	}
	if errors.Is(err, saver.ErrUnsafeDir) {
		return 2, err // bad input, as live
	}
	if err != nil {
		return 1, err
	}
	return 0, nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
