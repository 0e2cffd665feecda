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

	"github.com/m-lab/go/bytecount"
	apps "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestKubernetesManifest validates the DaemonSet against the Kubernetes API
// types (strict: an unknown or misspelt field is an error) and checks what
// matters here: the daemon's arguments are valid flags, it runs as non-root
// with exactly NET_RAW and NET_ADMIN, its probes and scrape annotations
// point at the metrics port, and its memory limit leaves room above -maxheap.
func TestKubernetesManifest(t *testing.T) {
	b, err := os.ReadFile("deploy/kubernetes/packet-headers.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds apps.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatalf("not a valid DaemonSet: %v", err)
	}
	pod := ds.Spec.Template
	if ds.Spec.Selector == nil || pod.Labels["app"] != ds.Spec.Selector.MatchLabels["app"] {
		t.Error("the selector does not match the pod's labels")
	}
	if pod.Annotations["prometheus.io/scrape"] != "true" || pod.Annotations["prometheus.io/port"] != "9990" {
		t.Errorf("scrape annotations: %v", pod.Annotations)
	}
	var ph, ti *corev1.Container
	for i, c := range pod.Spec.Containers {
		switch c.Name {
		case "packet-headers":
			ph = &pod.Spec.Containers[i]
		case "tcp-info":
			ti = &pod.Spec.Containers[i]
		}
	}
	if ph == nil || ti == nil {
		t.Fatal("the pod needs a packet-headers and a tcp-info container")
	}
	// The arguments must parse as the daemon's flags (the prefix file is
	// written by the init container at run time: a stand-in here).
	prefix := filepath.Join(t.TempDir(), "prefix")
	os.WriteFile(prefix, []byte("node_1"), 0o644)
	var args []string
	for _, a := range ph.Args {
		args = append(args, strings.Replace(a, "/var/local/uuid/prefix", prefix, 1))
	}
	var c config
	if err := parse(args, &c, &bytes.Buffer{}); err != nil {
		t.Errorf("packet-headers arguments: %v", err)
	}
	if !slices.Contains(ti.Args, "-tcpinfo.eventsocket="+c.eventSocket) {
		t.Errorf("tcp-info does not serve the eventsocket the daemon reads (%s)", c.eventSocket)
	}
	sc := ph.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_RAW", "NET_ADMIN"}) {
		t.Errorf("packet-headers must run as non-root with exactly NET_RAW and NET_ADMIN: %+v", sc)
	}
	if ph.LivenessProbe == nil || ph.LivenessProbe.HTTPGet == nil || ph.LivenessProbe.HTTPGet.Path != "/healthz" ||
		ph.ReadinessProbe == nil || ph.ReadinessProbe.HTTPGet == nil || ph.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Error("probes must be /healthz (liveness) and /readyz (readiness)")
	}
	limit := ph.Resources.Limits.Memory().Value()
	if limit < int64(c.maxHeap)*5/4 {
		t.Errorf("memory limit %d leaves less than 25%% above -maxheap %d", limit, int64(c.maxHeap))
	}
	for _, name := range []string{"uuid-prefix"} {
		found := false
		for _, ic := range pod.Spec.InitContainers {
			found = found || ic.Name == name
		}
		if !found {
			t.Errorf("no %s init container", name)
		}
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
		if c.dataDir != tt.datadir || c.minFree.text != tt.min {
			t.Errorf("env file %q: -datadir %s -minfreespace %s, want %s and %s", tt.envFile, c.dataDir, c.minFree.text, tt.datadir, tt.min)
		}
		var limit bytecount.ByteCount
		if err := limit.Set(strings.TrimSuffix(settings["MemoryMax"], "G") + "GB"); err != nil {
			t.Fatalf("MemoryMax=%s: %v", settings["MemoryMax"], err)
		}
		if int64(limit) < int64(c.maxHeap)*5/4 {
			t.Errorf("MemoryMax=%s leaves less than 25%% above -maxheap %v: the cgroup would kill the daemon before its own guard acts", settings["MemoryMax"], c.maxHeap)
		}
	}
}
