package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/m-lab/uuid"
)

// writeFile writes content to a new file and returns its path.
func writeFile(t *testing.T, content string) string {
	f, err := os.CreateTemp(t.TempDir(), "file")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(content)
	f.Close()
	return f.Name()
}

func TestParse(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	ok := []string{"-tcpinfo.eventsocket", "/run/x.sock"}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
	}{
		{"defaults", ok, nil, ""},
		{"help", []string{"-help"}, nil, "help requested"},
		{"unknown anonymize mode", append([]string{"-anonymize.ip", "sha1"}, ok...), nil, "anonymize.ip"},
		{"uuidwait beyond captureduration", append([]string{"-uuidwaitduration", "10s", "-captureduration", "5s"}, ok...), nil, "must not exceed"},
		{"negative flowtimeout", append([]string{"-flowtimeout", "-1s"}, ok...), nil, "flowtimeout must be positive"},
		{"negative sigtermwait", append([]string{"-sigtermwait", "-1s"}, ok...), nil, "sigtermwait"},
		{"tiny maxheadersize", append([]string{"-maxheadersize", "20"}, ok...), nil, "maxheadersize"},
		{"negative maxflows", append([]string{"-maxflows", "-3"}, ok...), nil, "maxflows"},
		{"negative maxprocs", append([]string{"-maxprocs", "-1"}, ok...), nil, "maxprocs"},
		{"retention", append([]string{"-retention.minfree=10%", "-retention.maxsize=1500GB", "-retention.maxdays=30"}, ok...), nil, ""},
		{"retention in bytes", append([]string{"-retention.minfree=2GB", "-minfreespace=500MB"}, ok...), nil, ""},
		{"retention below minfreespace", append([]string{"-retention.minfree=1%"}, ok...), nil, "-retention.minfree must be above -minfreespace"},
		{"negative retention days", append([]string{"-retention.maxdays=-1"}, ok...), nil, "-retention.maxdays"},
		{"offline retention", []string{"-read", "x.pcap", "-retention.maxdays=3"}, nil, "-retention.maxdays is for live capture"},
		{"huge maxprocs", append([]string{"-maxprocs", "100000"}, ok...), nil, "-maxprocs must be from 0 to 1024"},
		{"negative batch delay", append([]string{"-capture.batchdelay", "-5ms"}, ok...), nil, "capture.batchdelay"},
		{"immediate capture", append([]string{"-capture.batchdelay", "0"}, ok...), nil, ""},
		{"tiny capture buffer", append([]string{"-capture.buffersize", "1KB"}, ok...), nil, "capture.buffersize"},
		{"capture buffer by env", ok, map[string]string{"CAPTURE_BUFFERSIZE": "64MB"}, ""},
		{"free space percent", append([]string{"-minfreespace", "5%"}, ok...), nil, ""},
		{"free space bytes", append([]string{"-minfreespace", "500MB"}, ok...), nil, ""},
		{"bad free space", append([]string{"-minfreespace", "150%"}, ok...), nil, "minfreespace"},
		{"bad byte count", append([]string{"-maxheap", "lots"}, ok...), nil, "maxheap"},
		{"no UUID source", []string{"-uuid.kernel=false"}, nil, "no UUID source"},
		{"kernel source alone", nil, nil, ""},
		{"missing prefix file", []string{"-uuid-prefix-file", "/nonexistent"}, nil, "uuid-prefix-file"},
		{"prefix with a newline", []string{"-uuid-prefix-file", writeFile(t, "host_1764000000\n")}, nil, "control character"},
		{"prefix with a slash", []string{"-uuid-prefix-file", writeFile(t, "../host_1764000000")}, nil, "uuid-prefix-file"},
		{"good prefix", []string{"-uuid-prefix-file", writeFile(t, "host_1764000000")}, nil, ""},
		{"stray argument", append(ok, "extra"), nil, "unexpected argument"},
		{"from the environment", nil, map[string]string{"TCPINFO_EVENTSOCKET": "/run/x.sock", "ANONYMIZE_IP": "netblock"}, ""},
		{"bad value from the environment", ok, map[string]string{"FLOWTIMEOUT": "soon"}, "FLOWTIMEOUT"},
		{"offline", []string{"-read", "x.pcap", "-events", "x.jsonl", "-localaddr", "192.0.2.1"}, nil, ""},
		{"offline with live limits", []string{"-read", "x.pcap", "-maxflows=10"}, nil, "-maxflows is for live capture"},
		{"offline with a live setting from the environment", []string{"-read", "x.pcap"}, map[string]string{"MAXHEAP": "1GB"}, "-maxheap is for live capture"},
		{"offline with its own settings", []string{"-read", "x.pcap", "-minfreespace=5%", "-partialdir=/tmp/p", "-fileperm=0600", "-exclude-srcport=9100"}, nil, ""},
		{"events without read", []string{"-events", "x.jsonl"}, nil, "-events goes with -read"},
		{"read with interface", []string{"-read", "x.pcap", "-interface", "eth0"}, nil, "replaces capture"},
		{"both stdin", []string{"-read", "-", "-events", "-"}, nil, "both be stdin"},
		{"bad localaddr", []string{"-read", "x.pcap", "-localaddr", "host"}, nil, "-localaddr"},
		{"localaddr live", []string{"-localaddr", "192.0.2.1"}, nil, "offline mode"},
		{"cryptopan", append([]string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", writeFile(t, strings.Repeat("ab", 32)+"\n")}, ok...), nil, ""},
		{"cryptopan without key", append([]string{"-anonymize.ip=cryptopan"}, ok...), nil, "needs -anonymize.keyfile"},
		{"key without cryptopan", append([]string{"-anonymize.keyfile", file}, ok...), nil, "goes with -anonymize.ip=cryptopan"},
		{"tsoffset without key", append([]string{"-anonymize.tsoffset"}, ok...), nil, "needs -anonymize.keyfile"},
		{"tsoffset with netblock", append([]string{"-anonymize.ip=netblock", "-anonymize.tsoffset", "-anonymize.zeromac", "-anonymize.keyfile", writeFile(t, strings.Repeat("x", 32))}, ok...), nil, ""},
		{"short key", append([]string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", writeFile(t, "secret-bytes")}, ok...), nil, "not a Crypto-PAn key"},
		{"missing key file", append([]string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", "/nonexistent"}, ok...), nil, "no such file"},
		{"tcp-info's exclusions", append([]string{"-exclude-srcport=9100,9090,9991", "-exclude-dstip=172.25.0.1,35.202.153.90"}, ok...), nil, ""},
		{"exclusions from the environment", ok, map[string]string{"EXCLUDE_SRCPORT": "9100,9990", "EXCLUDE_DSTIP": "2001:db8::1"}, ""},
		{"bad excluded port", append([]string{"-exclude-srcport=9100,http"}, ok...), nil, "-exclude-srcport"},
		{"bad excluded address", ok, map[string]string{"EXCLUDE_DSTIP": "172.25.0"}, "-exclude-dstip"},
		{"version", []string{"-version"}, nil, ""},
		{"selected ports", append([]string{"-localport=443,3001-3010", "-localport", "80", "-outgoing"}, ok...), nil, ""},
		{"bad selected port", append([]string{"-localport=443,http"}, ok...), nil, "-localport"},
		{"offline selection", []string{"-read", "x.pcap", "-localport=443", "-outgoing"}, nil, ""},
		{"sample", append([]string{"-sample=10"}, ok...), nil, ""},
		{"keyed sample", append([]string{"-sample=10", "-sample.keyfile", writeFile(t, "k")}, ok...), nil, ""},
		{"sample of none", append([]string{"-sample=0"}, ok...), nil, "-sample must be"},
		{"sample key without a sample", append([]string{"-sample.keyfile", writeFile(t, "k")}, ok...), nil, "goes with -sample"},
		{"sample key readable by others", append([]string{"-sample=3", "-sample.keyfile", file}, ok...), nil, "readable by others"},
		{"offline sample", []string{"-read", "x.pcap", "-sample=3"}, nil, ""},
		{"offline cgroup", []string{"-read", "x.pcap", "-cgroup=system.slice"}, nil, "-cgroup is for live capture"},
		{"offline exclude-local", []string{"-read", "x.pcap", "-exclude-local"}, nil, ""},
		{"exclude-local live", append([]string{"-exclude-local"}, ok...), nil, "offline mode"},
		{"pprof on loopback", append([]string{"-pprof", "-prometheusx.listen-address=127.0.0.1:9990"}, ok...), nil, ""},
		{"pprof on [::1]", append([]string{"-pprof", "-prometheusx.listen-address=[::1]:9990"}, ok...), nil, ""},
		{"pprof on every address", append([]string{"-pprof"}, ok...), nil, "-pprof needs a loopback"},
		{"pprof on a public address", append([]string{"-pprof", "-prometheusx.listen-address=192.0.2.1:9990"}, ok...), nil, "-pprof needs a loopback"},
		{"cryptopan from the environment", ok, map[string]string{"ANONYMIZE_IP": "cryptopan", "ANONYMIZE_KEYFILE": writeFile(t, strings.Repeat("x", 32))}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			var c config
			var stderr bytes.Buffer
			err := parse(tt.args, &c, &stderr)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("parse: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("parse = %v, want an error about %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("the reason is not one line: %q", err)
			}
			if strings.Contains(err.Error(), "secret-bytes") {
				t.Errorf("the reason quotes the key file: %q", err)
			}
		})
	}
	// Offline keeps local addresses unless -exclude-local; live never does.
	for args, want := range map[string]bool{"": true, "-exclude-local": false, "-exclude-local=false": true} {
		var c config
		if err := parse(append([]string{"-read", "x.pcap"}, strings.Fields(args)...), &c, io.Discard); err != nil || c.p.KeepLocal != want {
			t.Errorf("-read x.pcap %s: KeepLocal %v (%v), want %v", args, c.p.KeepLocal, err, want)
		}
	}
	var live config
	if parse(ok, &live, io.Discard) != nil || live.p.KeepLocal {
		t.Error("live mode keeps local addresses")
	}
	// -maxprocs: one, with or without -compress (igzip's compression is
	// cheap enough to share the capture's processor), Go's default with an
	// explicit GOMAXPROCS, unless -maxprocs is given.
	for _, tt := range []struct {
		args []string
		env  string
		want int
	}{
		{[]string{"-compress=false"}, "", 1}, {nil, "", 1}, {[]string{"-compress=false"}, "4", 0}, {nil, "4", 0},
		{[]string{"-compress", "-maxprocs", "2"}, "", 2}, {[]string{"-maxprocs", "3"}, "4", 3},
	} {
		t.Setenv("GOMAXPROCS", tt.env)
		if tt.env == "" {
			os.Unsetenv("GOMAXPROCS")
		}
		var c config
		if err := parse(tt.args, &c, nil); err != nil || c.l.MaxProcs != tt.want {
			t.Errorf("%v with GOMAXPROCS=%q: -maxprocs %d (%v), want %d", tt.args, tt.env, c.l.MaxProcs, err, tt.want)
		}
	}
	// The same from the environment (flagx sets it through Value.Set,
	// which fs.Visit does not see).
	for _, tt := range []struct {
		env  map[string]string
		want int
	}{
		{map[string]string{"MAXPROCS": "1", "COMPRESS": "true"}, 1},
		{map[string]string{"MAXPROCS": "2"}, 2},
		{map[string]string{"COMPRESS": "true"}, 1},
		{map[string]string{"MAXPROCS": "0", "COMPRESS": "true"}, 0},
		{map[string]string{"COMPRESS": "false"}, 1},
	} {
		os.Unsetenv("GOMAXPROCS")
		for k, v := range tt.env {
			t.Setenv(k, v)
		}
		var c config
		if err := parse(nil, &c, nil); err != nil || c.l.MaxProcs != tt.want {
			t.Errorf("environment %v: -maxprocs %d (%v), want %d", tt.env, c.l.MaxProcs, err, tt.want)
		}
		for k := range tt.env {
			os.Unsetenv(k)
		}
	}
	// Without a prefix file, the made-up prefix (from the host name) is
	// checked too.
	uuid.SetUUIDPrefixFile(writeFile(t, "bad/host_1764000000"))
	if err := parse(nil, &config{}, nil); err == nil || !strings.Contains(err.Error(), "default UUID prefix") {
		t.Errorf("a default prefix with a '/': %v", err)
	}
	uuid.SetUUIDPrefixFile(writeFile(t, "host_1764000000"))
	var c config
	if err := parse([]string{"-tcpinfo.eventsocket=x", "-interface=a", "-interface=b"}, &c, nil); err != nil || len(c.l.Interfaces) != 2 {
		t.Errorf("-interface is not repeatable: %v %v", c.l.Interfaces, err)
	}
	c = config{}
	if err := parse([]string{"-tcpinfo.eventsocket=x", "-interface=a", "-interface=b", "-interface=a"}, &c, nil); err != nil || !slices.Equal(c.l.Interfaces, []string{"a", "b"}) {
		t.Errorf("a repeated -interface: %v %v, want each once", c.l.Interfaces, err)
	}
	if err := parse([]string{"-help"}, &c, &bytes.Buffer{}); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-help: %v", err)
	}
}

// TestExitCodes runs the built binary: invalid configurations exit 2 with
// a one-line reason, before capturing anything.
func TestExitCodes(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "packet-headers")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v9.9.9 -X main.commit=0123abc", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "-version").Output(); err != nil || !strings.HasPrefix(string(out), "packet-headers v9.9.9 (commit 0123abc, go") {
		t.Errorf("-version: %q %v", out, err)
	}
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	private := filepath.Join(t.TempDir(), "private")
	os.WriteFile(private, nil, 0o600)
	sock := "-tcpinfo.eventsocket=/nonexistent.sock"
	split := []string{"-read", "offline/testdata/lab.pcap", "-datadir", t.TempDir(), "-quiet"}
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-help"}, 0, "-maxheadersize"},
		{[]string{"-anonymize.ip=md5", sock}, 2, "anonymize.ip"},
		{[]string{"-interface=no-such-interface0", sock}, 2, "unknown interface"},
		{[]string{"-uuidwaitduration=1m", sock}, 2, "must not exceed"},
		{[]string{"-datadir", filepath.Join(file, "sub"), sock}, 2, "datadir"},
		{[]string{"-interface=lo", sock}, 2, "loopback"},
		{[]string{"-exclude-srcport=9100,ssh", sock}, 2, "-exclude-srcport"},
		{[]string{"-fileperm=0666", sock}, 2, "file permissions"},
		{[]string{"-captureduration=-5s", sock}, 2, "captureduration"},
		{[]string{"-uuid.kernel=false"}, 2, "no UUID source"},
		{[]string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", file, sock}, 2, "readable by others"},
		{[]string{"-anonymize.ip=cryptopan", "-anonymize.keyfile", private, sock}, 2, "not a Crypto-PAn key"},
		{split, 0, ""},
		{split, 1, "3 flows were not written"}, // the files are there already: none is replaced
		{[]string{"-read", file}, 1, "not a capture file"},
	} {
		cmd := exec.Command(bin, tt.args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("%v: did not exit", tt.args)
		}
		if code := cmd.ProcessState.ExitCode(); code != tt.code {
			t.Errorf("%v: exit %d, want %d (%s)", tt.args, code, tt.code, stderr.String())
		}
		out := strings.TrimSpace(stderr.String())
		if !strings.Contains(out, tt.want) {
			t.Errorf("%v: stderr %q, want it to mention %q", tt.args, out, tt.want)
		}
		if tt.code == 2 && strings.Count(out, "\n") != 0 {
			t.Errorf("%v: reason is not one line: %q", tt.args, out)
		}
	}
}
