package main

import (
	"bufio"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestArchitectureImports checks docs/architecture.md's list of imports
// between the module's packages against go list's: the document is the
// map a newcomer reads first, and must not drift from the code.
func TestArchitectureImports(t *testing.T) {
	const mod = "github.com/m-lab/packet-headers"
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	short := func(p string) string {
		if p == mod {
			return "main"
		}
		return strings.TrimPrefix(p, mod+"/")
	}
	real := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
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
