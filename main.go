// Command packet-headers captures the headers of every TCP connection that
// terminates on this server and saves each connection into its own pcap
// file, <datadir>/YYYY/MM/DD/<uuid>.pcap, named by the UUID that tcp-info
// gives the connection.
//
// main parses the flags and composes the daemon (live.go): the captures
// (capture: the kernel's ring per interface, read natively) and the UUID
// sources (sockdiag: the kernel's socket cookies; tcpeventsocket: tcp-info's
// eventsocket, whose names win) feed the pipeline that pipeline.New builds
// (demuxer -> saver, with names and anonymize), the same one that offline
// mode (-read) drives from a capture file. docs/architecture.md draws it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/m-lab/go/bytecount"
	"github.com/m-lab/go/flagx"
	"github.com/m-lab/uuid"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/exclude"
	"github.com/m-lab/packet-headers/health"
	"github.com/m-lab/packet-headers/names"
	"github.com/m-lab/packet-headers/offline"
	"github.com/m-lab/packet-headers/pipeline"
	"github.com/m-lab/packet-headers/saver"
)

// config holds every flag.
type config struct {
	anonymize       flagx.Enum
	mode            anonymize.Mode // parsed from anonymize
	keyFile         string
	key             []byte // read from keyFile; never logged
	zeroMAC         bool
	tsOffset        bool
	captureDuration time.Duration
	dataDir         string
	flowTimeout     time.Duration
	interfaces      flagx.StringArray
	maxHeaderSize   int
	maxIdleRAM      bytecount.ByteCount
	listenAddr      string
	sigtermWait     time.Duration
	stream          bool
	eventSocket     string
	uuidWait        time.Duration
	maxFlows        int64
	maxHeap         bytecount.ByteCount
	uuidPrefixFile  string
	kernelUUIDs     bool
	read, events    string
	quiet           bool
	localAddrs      flagx.StringArray
	local           []netip.Addr // parsed localAddrs
	minFree         freeSpace
	compress        bool
	maxProcs        int
	healthGrace     time.Duration
	excludePorts    flagx.StringArray
	excludeIPs      flagx.StringArray
	exclude         *exclude.Rules // parsed from excludePorts and excludeIPs
	version         bool
	pprof           bool
	batchDelay      time.Duration
	bufferSize      bytecount.ByteCount
	partialDir      string
	fileMode        fileMode
	shutdownTimeout time.Duration
}

// fileMode is the -fileperm flag: an octal permission.
type fileMode os.FileMode

func (m *fileMode) String() string { return fmt.Sprintf("%#o", os.FileMode(*m)) }

func (m *fileMode) Set(s string) error {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return fmt.Errorf("%q is not an octal permission", s)
	}
	*m = fileMode(v)
	return nil
}

// freeSpace is the -minfreespace flag: bytes (a byte count such as 500MB)
// or a percentage of the filesystem (such as 5%).
type freeSpace struct {
	bytes   int64
	percent float64
	text    string
}

func (f *freeSpace) String() string { return f.text }

func (f *freeSpace) Set(s string) error {
	*f = freeSpace{text: s}
	if p, ok := strings.CutSuffix(s, "%"); ok {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v < 0 || v >= 100 {
			return fmt.Errorf("percentage %q not in [0, 100)", s)
		}
		f.percent = v
		return nil
	}
	var b bytecount.ByteCount
	if err := b.Set(s); err != nil {
		return err
	}
	f.bytes = int64(b)
	return nil
}

func newFlagSet(c *config) *flag.FlagSet {
	fs := flag.NewFlagSet("packet-headers", flag.ContinueOnError)
	c.anonymize = flagx.Enum{Options: anonymize.Modes, Value: "none"}
	c.maxIdleRAM = 3 * bytecount.Gigabyte
	c.maxHeap = 8 * bytecount.Gigabyte
	c.bufferSize = 8 * bytecount.Megabyte
	fs.Var(&c.anonymize, "anonymize.ip", "How to anonymize remote IP addresses in saved headers: none; netblock (IPv4 to /24, IPv6 to /48); or cryptopan (keyed, prefix-preserving, one to one: give -anonymize.keyfile). The server's own addresses are kept")
	fs.StringVar(&c.keyFile, "anonymize.keyfile", "", "With -anonymize.ip=cryptopan or -anonymize.tsoffset: file holding the 32-byte key (raw, or 64 hex digits); the same key gives the same mapping on every server")
	fs.BoolVar(&c.zeroMAC, "anonymize.zeromac", false, "Zero the link-layer addresses of saved frames (a client on the server's link is known by its MAC address)")
	fs.BoolVar(&c.tsOffset, "anonymize.tsoffset", false, "Add to each end's TCP timestamps (TSval, and the TSecr echoing it) a constant per flow drawn from -anonymize.keyfile: differences kept, the clock offset that links a host's flows hidden")
	fs.DurationVar(&c.captureDuration, "captureduration", 30*time.Second, "Save a flow's packets for at most this long after its first packet")
	fs.StringVar(&c.dataDir, "datadir", ".", "Directory under which YYYY/MM/DD/<uuid>.pcap files are written")
	fs.DurationVar(&c.flowTimeout, "flowtimeout", 30*time.Second, "A flow with no packet for this long has ended")
	fs.Var(&c.interfaces, "interface", "Interface to capture on (repeatable); unset: every interface that is up and has an address, loopback excluded")
	fs.IntVar(&c.maxHeaderSize, "maxheadersize", 256, "Longest prefix of a packet that is saved (also the capture snaplen); headers are cut at the end of the TCP header in any case")
	fs.Var(&c.maxIdleRAM, "maxidleram", "When idle heap memory exceeds this, return it to the OS (e.g. 1500MB)")
	fs.StringVar(&c.listenAddr, "prometheusx.listen-address", ":9990", "Address on which /metrics, /healthz and /readyz are served (bind it to 127.0.0.1 unless something else must scrape it)")
	fs.BoolVar(&c.pprof, "pprof", false, "Serve /debug/pprof/ beside /metrics; only on a loopback -prometheusx.listen-address (profiles expose the process's memory, and a trace read slowly grows memory that -maxheap cannot see)")
	fs.DurationVar(&c.sigtermWait, "sigtermwait", time.Second, "On SIGTERM or SIGINT, keep capturing this long before saving every named flow and exiting")
	fs.BoolVar(&c.stream, "stream", false, "Write each flow's file incrementally once its UUID is known, instead of all at once when the flow ends")
	fs.StringVar(&c.eventSocket, "tcpinfo.eventsocket", "", "Path of tcp-info's eventsocket; when set, tcp-info's UUIDs are authoritative")
	fs.StringVar(&c.uuidPrefixFile, "uuid-prefix-file", "", "File holding the UUID prefix (<hostname>_<boot time>), the one tcp-info is given, so that both name a socket alike; unset: a made-up prefix containing _unsafe")
	fs.BoolVar(&c.kernelUUIDs, "uuid.kernel", true, "Name flows from the kernel's socket cookies (sock_diag): all flows without -tcpinfo.eventsocket, those tcp-info never announced with it")
	fs.DurationVar(&c.uuidWait, "uuidwaitduration", 5*time.Second, "Drop a flow's headers if no UUID arrived this long after its first packet")
	fs.DurationVar(&c.batchDelay, "capture.batchdelay", capture.DefaultBatchDelay, "Longest a captured packet waits in the kernel's buffer so that packets are read in batches: more saves CPU under load, less names very short connections from the kernel sooner (0: read each packet at once)")
	fs.Var(&c.bufferSize, "capture.buffersize", "Kernel capture buffer per interface (e.g. 32MB): more absorbs longer bursts without kernel drops")
	fs.Int64Var(&c.maxFlows, "maxflows", 0, "Track at most this many concurrent flows; beyond it new flows are not tracked (0: unlimited)")
	fs.Var(&c.maxHeap, "maxheap", "When the heap exceeds this, new flows are not tracked until it shrinks; also the Go runtime's soft memory limit. Default: 8GB, or two thirds of the cgroup's memory limit if lower")
	c.minFree.Set("1%")
	fs.Var(&c.minFree, "minfreespace", "Keep this much free space in the datadir's filesystem, as bytes (500MB) or a percentage (5%): below it, new flows are not written (counted); 0 disables")
	fs.DurationVar(&c.healthGrace, "health.grace", time.Minute, "/healthz fails once a capture or the eventsocket has been down this long (/readyz fails at once)")
	fs.IntVar(&c.maxProcs, "maxprocs", 1, "Processors that run the daemon's Go code (GOMAXPROCS) in live mode; 0: Go's default (one per CPU, as with -compress unless set). One keeps the capture path free of wake-ups between Go's threads")
	fs.BoolVar(&c.compress, "compress", true, "Write <uuid>.pcap.gz, compressed from the buffered records with pooled compressors (one gzip member per batch written: the whole file for most flows), the files M-Lab's ETL parses; -compress=false writes <uuid>.pcap")
	fs.Var(&c.excludePorts, "exclude-srcport", "Never save connections with these local ports (comma-separated, repeatable), as tcp-info's flag of the same name")
	fs.Var(&c.excludeIPs, "exclude-dstip", "Never save connections with these remote addresses (comma-separated, repeatable), as tcp-info's flag of the same name; loopback, link-local, multicast and unspecified addresses are always excluded, as by tcp-info")
	fs.BoolVar(&c.version, "version", false, "Print the version and exit")
	fs.StringVar(&c.read, "read", "", "Offline mode: split this pcap or pcapng file (gzip allowed; - for stdin) instead of capturing, then exit")
	fs.StringVar(&c.events, "events", "", "Offline mode: tcp-info eventsocket JSON Lines (gzip allowed) naming the flows of -read; unset: fallback names from time and 4-tuple")
	fs.BoolVar(&c.quiet, "quiet", false, "Offline mode: no progress line on a terminal")
	fs.Var(&c.localAddrs, "localaddr", "Offline mode: an address of the server (repeatable), kept by -anonymize.ip; the local ends in -events are added")
	c.fileMode = 0o640
	fs.Var(&c.fileMode, "fileperm", "Permissions of the files written (octal; directories get search permission where read is given): 0640 lets the owner and its group (an uploader's) read; 0644 lets everyone read; no write permission beyond the owner's")
	fs.StringVar(&c.partialDir, "partialdir", "", "Directory where files are written before they are renamed into the datadir: outside it (an uploader watching the datadir sees only finished files) and on its filesystem; unset: .<datadir's name>.partial beside the datadir")
	fs.DurationVar(&c.shutdownTimeout, "shutdown.timeout", 20*time.Second, "On SIGTERM or SIGINT, the longest the daemon waits for the files being written (after -sigtermwait) before it says which are not written and exits 1; a second signal exits at once")
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
	if err := flagx.ArgsFromEnvWithLog(fs, false); err != nil {
		return err
	}
	if c.version {
		return nil
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
	if c.read != "" {
		for _, f := range liveOnly {
			if set[f] {
				return fmt.Errorf("-%s is for live capture: offline mode (-read) does not use it", f)
			}
		}
	}
	if !set["maxheap"] {
		c.maxHeap = defaultMaxHeap(cgroupRoot)
	}
	if !set["maxprocs"] && (c.compress || os.Getenv("GOMAXPROCS") != "") {
		c.maxProcs = 0 // compression wants every CPU; an explicit GOMAXPROCS wins
	}
	switch {
	case c.captureDuration <= 0:
		return fmt.Errorf("-captureduration must be positive, not %v", c.captureDuration)
	case c.flowTimeout <= 0:
		return fmt.Errorf("-flowtimeout must be positive, not %v", c.flowTimeout)
	case c.uuidWait <= 0:
		return fmt.Errorf("-uuidwaitduration must be positive, not %v", c.uuidWait)
	case c.sigtermWait < 0:
		return fmt.Errorf("-sigtermwait must not be negative, not %v", c.sigtermWait)
	case c.uuidWait > c.captureDuration:
		return fmt.Errorf("-uuidwaitduration (%v) must not exceed -captureduration (%v)", c.uuidWait, c.captureDuration)
	case c.maxHeaderSize < 64 || c.maxHeaderSize > 65535:
		return fmt.Errorf("-maxheadersize must be between 64 and 65535, not %d", c.maxHeaderSize)
	case c.healthGrace <= 0:
		return fmt.Errorf("-health.grace must be positive, not %v", c.healthGrace)
	case c.shutdownTimeout <= 0:
		return fmt.Errorf("-shutdown.timeout must be positive, not %v", c.shutdownTimeout)
	case c.batchDelay < 0 || c.batchDelay > time.Second:
		return fmt.Errorf("-capture.batchdelay must be between 0 and 1s, not %v", c.batchDelay)
	case c.bufferSize < 64*bytecount.Kilobyte || c.bufferSize > 2*bytecount.Gigabyte:
		return fmt.Errorf("-capture.buffersize must be between 64KB and 2GB, not %v", c.bufferSize)
	case c.maxFlows < 0:
		return fmt.Errorf("-maxflows must not be negative, not %d", c.maxFlows)
	case c.maxProcs < 0:
		return fmt.Errorf("-maxprocs must not be negative, not %d", c.maxProcs)
	case c.maxHeap <= 0:
		return fmt.Errorf("-maxheap must be positive")
	case c.maxIdleRAM <= 0:
		return fmt.Errorf("-maxidleram must be positive")
	case c.pprof && !loopback(c.listenAddr):
		return fmt.Errorf("-pprof needs a loopback -prometheusx.listen-address (such as 127.0.0.1:9990), not %q: profiles expose the process's memory", c.listenAddr)
	case c.read == "" && c.eventSocket == "" && !c.kernelUUIDs:
		return errors.New("no UUID source: with -uuid.kernel=false, -tcpinfo.eventsocket is required")
	case c.events != "" && c.read == "":
		return errors.New("-events goes with -read (offline mode)")
	case c.read != "" && (c.eventSocket != "" || len(c.interfaces) > 0):
		return errors.New("-read (offline mode) replaces capture and the eventsocket: drop -interface and -tcpinfo.eventsocket")
	case c.read == "-" && c.events == "-":
		return errors.New("-read and -events cannot both be stdin")
	case len(c.localAddrs) > 0 && c.read == "":
		return errors.New("-localaddr is for offline mode (-read); live mode knows its addresses")
	}
	c.exclude = &exclude.Rules{}
	for _, l := range c.excludePorts {
		if err := c.exclude.AddSrcPorts(l); err != nil {
			return err
		}
	}
	for _, l := range c.excludeIPs {
		if err := c.exclude.AddDstIPs(l); err != nil {
			return err
		}
	}
	mode, err := anonymize.ParseMode(c.anonymize.Value)
	if err != nil {
		return err
	}
	c.mode = mode
	switch {
	case c.anonymize.Value == "cryptopan" && c.keyFile == "":
		return errors.New("-anonymize.ip=cryptopan needs -anonymize.keyfile")
	case c.tsOffset && c.keyFile == "":
		return errors.New("-anonymize.tsoffset needs -anonymize.keyfile")
	case c.anonymize.Value != "cryptopan" && !c.tsOffset && c.keyFile != "":
		return errors.New("-anonymize.keyfile goes with -anonymize.ip=cryptopan or -anonymize.tsoffset")
	case c.keyFile != "":
		key, err := anonymize.ReadKey(c.keyFile)
		if err != nil {
			return fmt.Errorf("-anonymize.keyfile: %w", err)
		}
		c.key = key
	}
	c.interfaces = dedupe(c.interfaces)
	for _, s := range c.localAddrs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("-localaddr: %w", err)
		}
		c.local = append(c.local, a.Unmap())
	}
	if c.uuidPrefixFile != "" {
		// The prefix begins every kernel-named flow's file name: one that
		// cannot (a trailing newline, a '/') is refused here, not flow by flow.
		prefix, err := os.ReadFile(c.uuidPrefixFile)
		if err == nil {
			err = saver.CheckUUID(string(prefix) + "_0000000000000000")
		}
		if err == nil {
			err = uuid.SetUUIDPrefixFile(c.uuidPrefixFile)
		}
		if err != nil {
			return fmt.Errorf("-uuid-prefix-file: %w", err)
		}
	} else if err := saver.CheckUUID(uuid.FromCookie(0)); err != nil && c.read == "" && c.kernelUUIDs {
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

// liveOnly are the flags that offline mode refuses rather than ignores
// (-interface and -tcpinfo.eventsocket have reasons of their own).
var liveOnly = []string{"capture.batchdelay", "capture.buffersize", "maxflows", "maxheap", "maxidleram", "maxprocs",
	"health.grace", "sigtermwait", "shutdown.timeout", "prometheusx.listen-address", "pprof", "uuid.kernel", "uuid-prefix-file"}

// cgroupRoot is where defaultMaxHeap finds /proc and /sys (tests change it).
var cgroupRoot = "/"

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
	run := run
	if c.read != "" {
		run = runOffline
	}
	code, err := run(ctx, &c)
	if err != nil {
		fmt.Fprintf(os.Stderr, "packet-headers: %v\n", err)
	}
	os.Exit(code)
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

// runOffline splits a capture file into per-flow files and prints a
// one-line summary.
func runOffline(ctx context.Context, c *config) (int, error) {
	o := offline.Options{Read: c.read, Events: c.events, Stdin: os.Stdin, Config: c.pipelineConfig()}
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

// pipelineConfig is what live and offline mode build alike from the
// flags; live mode adds its limits, free-space rule, partial directory and
// the addresses it finds.
func (c *config) pipelineConfig() pipeline.Config {
	return pipeline.Config{
		Saver: saver.Options{Dir: c.dataDir, Compress: c.compress, Perm: os.FileMode(c.fileMode),
			PartialDir: c.partialDir, MinFreeBytes: c.minFree.bytes, MinFreePercent: c.minFree.percent},
		MaxHeaderSize: c.maxHeaderSize, CaptureDuration: c.captureDuration, FlowTimeout: c.flowTimeout,
		UUIDWait: c.uuidWait, Stream: c.stream, Local: c.local, Exclude: c.exclude,
		Anonymize: c.mode, Key: c.key, ZeroMAC: c.zeroMAC, TSOffset: c.tsOffset,
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
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
// the names table and makes the day directories ahead, every second, until
// ctx is done. (-maxheap is enforced
// by the demuxers' ticks: a wake-up of its own ten times a second cost the
// capture several percent of its CPU.)
func housekeeping(ctx context.Context, c *config, table *names.Table, checker *health.Checker, sv *saver.Saver, releases *atomic.Uint64) {
	samples := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
	var lastRelease time.Time
	everySecond(ctx, func(now time.Time) {
		checker.Sample(now)
		metrics.Read(samples)
		if samples[0].Value.Uint64() > uint64(c.maxIdleRAM) && now.Sub(lastRelease) > 10*time.Second {
			debug.FreeOSMemory()
			releases.Add(1)
			lastRelease = now
		}
		table.Sweep()
		if err := sv.PrepareDays(now); err != nil {
			log.Printf("packet-headers: %v", err)
		}
	})
}
