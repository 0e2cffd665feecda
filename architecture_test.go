package main

import (
	"bufio"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// mod is the module's path.
const mod = "github.com/m-lab/packet-headers"

// short returns a package's path within the module ("main" for its root).
func short(p string) string {
	if p == mod {
		return "main"
	}
	return strings.TrimPrefix(p, mod+"/")
}

// goList returns go list's lines for every package, in format.
func goList(t *testing.T, format string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", format, "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// TestArchitectureImports checks docs/architecture.md's list of imports
// between the module's packages against go list's: the document is the
// map a newcomer reads first, and must not drift from the code.
func TestArchitectureImports(t *testing.T) {
	real := map[string][]string{}
	for _, line := range goList(t, "{{.ImportPath}} {{join .Imports \" \"}}") {
		f := strings.Fields(line)
		deps := []string{}
		for _, imp := range f[1:] {
			if imp == mod || strings.HasPrefix(imp, mod+"/") {
				deps = append(deps, short(imp))
			}
		}
		slices.Sort(deps)
		real[short(f[0])] = deps
	}

	doc, err := os.Open("docs/architecture.md")
	if err != nil {
		t.Fatal(err)
	}
	defer doc.Close()
	documented := map[string][]string{}
	in := false
	for s := bufio.NewScanner(doc); s.Scan(); {
		line := s.Text()
		switch {
		case line == "```imports":
			in = true
		case in && line == "```":
			in = false
		case in:
			pkg, deps, ok := strings.Cut(line, " ->")
			if !ok {
				t.Errorf("docs/architecture.md: %q is not \"package -> imports\"", line)
				continue
			}
			list := []string{}
			for _, d := range strings.Split(deps, ",") {
				if d = strings.TrimSpace(d); d != "" {
					list = append(list, d)
				}
			}
			slices.Sort(list)
			documented[pkg] = list
		}
	}
	if len(documented) == 0 {
		t.Fatal("docs/architecture.md has no ```imports block")
	}
	for pkg, deps := range real {
		doc, ok := documented[pkg]
		switch {
		case !ok:
			t.Errorf("package %s (imports %v) is not in docs/architecture.md", pkg, deps)
		case !slices.Equal(doc, deps):
			t.Errorf("docs/architecture.md: %s -> %v, but it imports %v", pkg, doc, deps)
		}
	}
	for pkg := range documented {
		if _, ok := real[pkg]; !ok {
			t.Errorf("docs/architecture.md lists package %s, which does not exist", pkg)
		}
	}
}

// TestArchitectureRules checks the rules block of docs/architecture.md
// against go list: which packages have cgo files of their own, which
// import gopacket's libpcap binding, which import Prometheus's client (in
// their code or their tests), and what of the module the end-to-end tests
// import. Prose that states a rule must not drift from the code either.
func TestArchitectureRules(t *testing.T) {
	real := map[string][]string{}
	add := func(rule, pkg string) {
		if !slices.Contains(real[rule], pkg) {
			real[rule] = append(real[rule], pkg)
		}
	}
	for _, line := range goList(t, "{{.ImportPath}}|{{len .CgoFiles}}|{{join .Imports \" \"}}|{{join .TestImports \" \"}} {{join .XTestImports \" \"}}") {
		f := strings.Split(line, "|")
		pkg := short(f[0])
		if f[1] != "0" {
			add("cgo", pkg)
		}
		code, tests := strings.Fields(f[2]), strings.Fields(f[3])
		for _, imp := range append(code, tests...) {
			if strings.HasPrefix(imp, "github.com/prometheus/") {
				add("prometheus", pkg)
			}
		}
		if slices.Contains(code, "github.com/google/gopacket/pcap") {
			add("libpcap", pkg)
		}
		if pkg == "e2e" {
			for _, imp := range tests {
				if imp == mod || strings.HasPrefix(imp, mod+"/") {
					add("e2e tests import", short(imp))
				}
			}
		}
	}
	b, err := os.ReadFile("docs/architecture.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(b), "```rules\n")
	block, _, _ = strings.Cut(block, "```")
	if !ok {
		t.Fatal("docs/architecture.md has no rules block")
	}
	documented := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(block), "\n") {
		rule, list, ok := strings.Cut(line, ": ")
		if !ok {
			t.Errorf("docs/architecture.md: %q is not \"rule: packages\"", line)
			continue
		}
		documented[rule] = true
		want := strings.Split(list, ", ")
		slices.Sort(want)
		got := real[rule]
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("docs/architecture.md: %s: %v, but the code says %v", rule, want, got)
		}
	}
	for rule := range real {
		if !documented[rule] {
			t.Errorf("docs/architecture.md's rules block does not state %q: %v", rule, real[rule])
		}
	}
}
