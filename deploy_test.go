package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/m-lab/go/bytecount"
	apps "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// readManifest reads the shipped manifest's ConfigMap and DaemonSet,
// validated against the Kubernetes API types (strict: an unknown or
// misspelt field is an error).
func readManifest(t *testing.T) (*corev1.ConfigMap, *apps.DaemonSet) {
	t.Helper()
	b, err := os.ReadFile("deploy/kubernetes/packet-headers.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	var ds apps.DaemonSet
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var meta struct{ Kind string }
		yaml.Unmarshal([]byte(doc), &meta)
		var err error
		switch meta.Kind {
		case "ConfigMap":
			err = yaml.UnmarshalStrict([]byte(doc), &cm)
		case "DaemonSet":
			err = yaml.UnmarshalStrict([]byte(doc), &ds)
		default:
			t.Fatalf("an unexpected %q in the manifest", meta.Kind)
		}
		if err != nil {
			t.Fatalf("not a valid %s: %v", meta.Kind, err)
		}
	}
	return &cm, &ds
}

// flagValue returns the value of -name=value in args.
func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "-"+name+"="); ok {
			return v
		}
	}
	return ""
}

// TestKubernetesManifest checks the DaemonSet as M-Lab would merge it: the
// daemon's arguments and environment are valid flags; it runs as 65534
// with NET_RAW and NET_ADMIN, bound to 127.0.0.1 on M-Lab's port for it,
// its probes on that address; every sidecar is on its port of M-Lab's map,
// on loopback; tcp-info and the daemon take their exclusions from one
// environment block; pusher is at a version whose flags it is given and
// uploads both the traces and tcp-info's output; the grace period outlasts
// the sidecars' shutdown; the memory limit leaves room above -maxheap; the
// prefix file is written by M-Lab's uuid init container; the retention is
// off (pusher deletes what it uploaded).
func TestKubernetesManifest(t *testing.T) {
	cm, ds := readManifest(t)
	pod := ds.Spec.Template
	if ds.Spec.Selector == nil || pod.Labels["workload"] != ds.Spec.Selector.MatchLabels["workload"] {
		t.Error("the selector does not match the pod's labels")
	}
	containers := map[string]*corev1.Container{}
	for i, c := range pod.Spec.Containers {
		containers[c.Name] = &pod.Spec.Containers[i]
	}
	ph, ti, pusher := containers["packet-headers"], containers["tcp-info"], containers["pusher"]
	if ph == nil || ti == nil || pusher == nil {
		t.Fatal("the pod needs packet-headers, tcp-info and pusher containers")
	}
	// The arguments and the environment must parse as the daemon's flags
	// (the prefix file is written by the init container at run time: a
	// stand-in here).
	prefix := filepath.Join(t.TempDir(), "prefix")
	os.WriteFile(prefix, []byte("node_1"), 0o644)
	var args []string
	for _, a := range ph.Args {
		args = append(args, strings.Replace(a, "/var/local/uuid/prefix", prefix, 1))
	}
	env := map[string]string{}
	for _, from := range ph.EnvFrom {
		if from.ConfigMapRef == nil || from.ConfigMapRef.Name != cm.Name {
			t.Fatalf("packet-headers' environment from %+v, not the manifest's ConfigMap", from)
		}
		for k, v := range cm.Data {
			env[k] = v
			t.Setenv(k, v)
		}
	}
	var c config
	if err := parse(args, &c, &bytes.Buffer{}); err != nil {
		t.Fatalf("packet-headers arguments: %v", err)
	}
	if c.p.Exclude.Empty() || env["EXCLUDE_SRCPORT"] == "" {
		t.Error("packet-headers gets no exclusions")
	}
	if c.l.Retention.On() {
		t.Error("the retention must stay off at M-Lab: pusher deletes what it uploaded, and a second deleter loses traces not uploaded yet")
	}
	if len(ti.EnvFrom) != 1 || ti.EnvFrom[0].ConfigMapRef == nil || ti.EnvFrom[0].ConfigMapRef.Name != cm.Name ||
		flagValue(ti.Args, "exclude-srcport") != "" || flagValue(ti.Args, "exclude-dstip") != "" {
		t.Error("tcp-info must take its exclusions from the same environment block as packet-headers, and only from it")
	}
	if flagValue(ti.Args, "tcpinfo.eventsocket") != c.l.EventSocket {
		t.Errorf("tcp-info does not serve the eventsocket the daemon reads (%s)", c.l.EventSocket)
	}
	if flagValue(ti.Args, "uuid-prefix-file") != "/var/local/uuid/prefix" || c.l.PrefixFile != prefix {
		t.Error("tcp-info and packet-headers must read the same prefix file")
	}
	// M-Lab's port map, every listener on loopback.
	for name, port := range map[string]string{"tcp-info": "9991", "packet-headers": "9993", "pusher": "9995"} {
		if got := flagValue(containers[name].Args, "prometheusx.listen-address"); got != "127.0.0.1:"+port {
			t.Errorf("%s listens on %q, want 127.0.0.1:%s", name, got, port)
		}
	}
	for _, pr := range []*corev1.Probe{ph.LivenessProbe, ph.ReadinessProbe} {
		if pr == nil || pr.HTTPGet == nil || pr.HTTPGet.Host != "127.0.0.1" || pr.HTTPGet.Port.IntValue() != 9993 {
			t.Errorf("probe %+v: want an HTTP GET of 127.0.0.1:9993", pr)
		}
	}
	if ph.LivenessProbe.HTTPGet.Path != "/healthz" || ph.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Error("probes must be /healthz (liveness) and /readyz (readiness)")
	}
	sc := ph.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_RAW", "NET_ADMIN"}) {
		t.Errorf("packet-headers must run as non-root with exactly NET_RAW and NET_ADMIN: %+v", sc)
	}
	if psc := pod.Spec.SecurityContext; psc == nil || psc.RunAsUser == nil || *psc.RunAsUser != 65534 {
		t.Error("the pod must run as 65534, as M-Lab's")
	}
	// pusher: v1.20.3 takes -datatype=NAME only (NAME=ratio from v1.20.4),
	// uploads <directory>/<datatype> for the traces and tcp-info's output.
	if !strings.HasSuffix(pusher.Image, ":v1.20.3") {
		t.Errorf("pusher image %s: the test knows v1.20.3's flags", pusher.Image)
	}
	var datatypes []string
	for _, a := range pusher.Args {
		if v, ok := strings.CutPrefix(a, "-datatype="); ok {
			if strings.Contains(v, "=") {
				t.Errorf("-datatype=%s: pusher v1.20.3 exits at start on the NAME=ratio form", v)
			}
			datatypes = append(datatypes, v)
		}
	}
	dir := flagValue(pusher.Args, "directory")
	for _, want := range []string{c.p.Saver.Dir, flagValue(ti.Args, "output")} {
		if !slices.Contains(datatypes, strings.TrimPrefix(want, dir+"/")) || filepath.Dir(want) != dir {
			t.Errorf("pusher (%s, datatypes %v) does not upload %s", dir, datatypes, want)
		}
	}
	// The grace period outlasts pusher's SIGTERM wait and the daemon's.
	var pusherWait time.Duration
	if pusherWait, _ = time.ParseDuration(flagValue(pusher.Args, "sigterm_wait_time")); pusherWait == 0 {
		t.Error("pusher has no -sigterm_wait_time")
	}
	grace := time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	if grace <= pusherWait || grace <= c.l.SigtermWait+c.l.ShutdownTimeout {
		t.Errorf("grace period %v: pusher waits %v, packet-headers up to %v", grace, pusherWait, c.l.SigtermWait+c.l.ShutdownTimeout)
	}
	limit := ph.Resources.Limits.Memory().Value()
	if limit < int64(c.l.MaxHeap)*5/4 {
		t.Errorf("memory limit %d leaves less than 25%% above -maxheap %d", limit, int64(c.l.MaxHeap))
	}
	var uuidInit *corev1.Container
	for i, ic := range pod.Spec.InitContainers {
		if ic.Name == "set-up-uuid-prefix-file" {
			uuidInit = &pod.Spec.InitContainers[i]
		}
	}
	if uuidInit == nil || !strings.HasPrefix(uuidInit.Image, "measurementlab/uuid:") || !slices.Contains(uuidInit.Args, "-filename=/var/local/uuid/prefix") {
		t.Error("no M-Lab uuid init container writing /var/local/uuid/prefix")
	}
}

// TestSystemdUnit verifies the unit with systemd-analyze when it exists.
func TestSystemdUnit(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("no systemd-analyze here")
	}
	b, err := os.ReadFile("deploy/systemd/packet-headers.service")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte("CapabilityBoundingSet=CAP_NET_RAW CAP_NET_ADMIN")) || !bytes.Contains(b, []byte("NoNewPrivileges=yes")) {
		t.Error("the unit must bound capabilities to NET_RAW and NET_ADMIN, with no new privileges")
	}
	bin, _ := os.Executable() // any executable stands in for the installed binary
	unit := filepath.Join(t.TempDir(), "packet-headers.service")
	os.WriteFile(unit, bytes.ReplaceAll(b, []byte("/usr/local/bin/packet-headers"), []byte(bin)), 0o644)
	if out, err := exec.Command(sa, "verify", unit).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// dashboardMetrics returns the metric names the Grafana dashboard queries.
func dashboardMetrics(t *testing.T) []string {
	b, err := os.ReadFile("deploy/grafana/packet-headers.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	re := regexp.MustCompile(`\b(pcap|process)_[a-z0-9_]+`)
	seen := map[string]bool{}
	var out []string
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			for _, m := range re.FindAllString(tg.Expr, -1) {
				if !seen[m] {
					seen[m] = true
					out = append(out, m)
				}
			}
		}
	}
	return out
}

func TestDashboardQueriesKnownMetrics(t *testing.T) {
	readme, _ := os.ReadFile("docs/operations.md") // the metrics table
	for _, m := range dashboardMetrics(t) {
		base := strings.TrimSuffix(m, "_bucket")
		if strings.HasPrefix(m, "pcap_") && !bytes.Contains(readme, []byte("`"+base)) {
			t.Errorf("the dashboard queries %s, which docs/operations.md does not list", m)
		}
	}
}

// unitConfig reads what systemd would run for the unit: its Environment=
// assignments, overridden by those of its EnvironmentFile= (here envFile, as
// if installed as /etc/default/packet-headers), ExecStart's arguments with
// ${VAR} and $VAR expanded, and the unit's other settings by key.
func unitConfig(t *testing.T, unit []byte, envFile string) (env map[string]string, args []string, settings map[string]string) {
	t.Helper()
	env, settings = map[string]string{}, map[string]string{}
	var fileEnv map[string]string
	for _, line := range strings.Split(string(unit), "\n") {
		key, value, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || strings.HasPrefix(key, "#") {
			continue
		}
		switch key {
		case "Environment":
			k, v, _ := strings.Cut(value, "=")
			env[k] = v
		case "EnvironmentFile":
			if strings.TrimPrefix(value, "-") != "/etc/default/packet-headers" {
				t.Errorf("EnvironmentFile=%s, want /etc/default/packet-headers", value)
			}
			fileEnv = map[string]string{}
			for _, l := range strings.Split(envFile, "\n") {
				if k, v, ok := strings.Cut(strings.TrimSpace(l), "="); ok && !strings.HasPrefix(k, "#") {
					fileEnv[k] = v
				}
			}
		case "ExecStart":
			args = strings.Fields(value)
		default:
			settings[key] = value
		}
	}
	for k, v := range fileEnv { // EnvironmentFile= wins over Environment=
		env[k] = v
	}
	for i, a := range args {
		args[i] = os.Expand(a, func(k string) string { return env[k] })
	}
	return env, args, settings
}

// TestSystemdUnitSettings: the unit as installed honours DATADIR and
// MINFREESPACE from /etc/default/packet-headers (a command-line flag would
// win over them), and its MemoryMax leaves room above its -maxheap.
func TestSystemdUnitSettings(t *testing.T) {
	b, err := os.ReadFile("deploy/systemd/packet-headers.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		envFile      string
		datadir, min string
	}{
		{"", "/var/lib/packet-headers/pcap", "5%"},
		{"# settings\nDATADIR=/srv/pcap\nMINFREESPACE=10%\n", "/srv/pcap", "10%"},
	} {
		env, args, settings := unitConfig(t, b, tt.envFile)
		if len(args) == 0 || args[0] != "/usr/local/bin/packet-headers" {
			t.Fatalf("ExecStart %q", args)
		}
		for k, v := range env {
			t.Setenv(k, v)
		}
		var c config
		if err := parse(args[1:], &c, &bytes.Buffer{}); err != nil {
			t.Fatalf("env file %q: %v", tt.envFile, err)
		}
		for k := range env {
			os.Unsetenv(k)
		}
		if !strings.HasPrefix(c.l.ListenAddr, "127.0.0.1:") {
			t.Errorf("the unit serves metrics on %q, not on the loopback address", c.l.ListenAddr)
		}
		if c.p.Saver.Dir != tt.datadir || c.minFree.String() != tt.min {
			t.Errorf("env file %q: -datadir %s -minfreespace %s, want %s and %s", tt.envFile, c.p.Saver.Dir, c.minFree.String(), tt.datadir, tt.min)
		}
		var limit bytecount.ByteCount
		if err := limit.Set(strings.TrimSuffix(settings["MemoryMax"], "G") + "GB"); err != nil {
			t.Fatalf("MemoryMax=%s: %v", settings["MemoryMax"], err)
		}
		if int64(limit) < int64(c.l.MaxHeap)*5/4 {
			t.Errorf("MemoryMax=%s leaves less than 25%% above -maxheap %v: the cgroup would kill the daemon before its own guard acts", settings["MemoryMax"], c.l.MaxHeap)
		}
	}
}

// TestDockerfileLayout: the image's volume holds its data directory and,
// beside it, the partial directory the daemon makes there (on the same
// filesystem whatever is mounted); its files belong to the user it runs
// as; its binary is built with the version variables -version reads.
func TestDockerfileLayout(t *testing.T) {
	b, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	volume := regexp.MustCompile(`(?m)^VOLUME (\S+)$`).FindSubmatch(b)
	datadir := regexp.MustCompile(`(?m)^ENTRYPOINT \[.*"-datadir=([^"]+)"`).FindSubmatch(b)
	user := regexp.MustCompile(`(?m)^USER (\d+):`).FindSubmatch(b)
	if volume == nil || datadir == nil || user == nil {
		t.Fatal("the Dockerfile needs a VOLUME, a USER and an ENTRYPOINT with -datadir")
	}
	if filepath.Dir(string(datadir[1])) != string(volume[1]) {
		t.Errorf("the data directory %s is not directly in the volume %s: its partial directory would be on another filesystem", datadir[1], volume[1])
	}
	if !bytes.Contains(b, []byte("chown -R "+string(user[1])+":"+string(user[1])+" "+string(volume[1]))) {
		t.Errorf("the volume %s does not belong to user %s", volume[1], user[1])
	}
	for _, v := range []string{"main.version", "main.commit"} {
		if !bytes.Contains(b, []byte("-X "+v+"=")) {
			t.Errorf("the image's binary is built without %s", v)
		}
	}
}
