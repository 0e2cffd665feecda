package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version and commit are set at build time (scripts/build.sh, the
// Dockerfile: -ldflags "-X main.version=... -X main.commit=..."); without
// them, the module's version and VCS revision that Go recorded are used.
var version, commit string

// buildInfo returns the version, the short commit and the Go version.
func buildInfo() (v, c, goVersion string) {
	v, c = version, commit
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && c == "" {
				c = s.Value
			}
		}
	}
	if v == "" {
		v = "devel"
	}
	if len(c) > 7 {
		c = c[:7]
	}
	if c == "" {
		c = "unknown"
	}
	return v, c, runtime.Version()
}

// buildVersion is -version's line.
func buildVersion() string {
	v, c, g := buildInfo()
	return fmt.Sprintf("%s (commit %s, %s)", v, c, g)
}
