package live

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// cgroupMount returns where the cgroup v2 hierarchy is mounted, from
// /proc/self/mountinfo, or an error if it is not.
func cgroupMount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// id parent major:minor root mount-point options ... - type source ...
		left, right, ok := strings.Cut(s.Text(), " - ")
		fields := strings.Fields(left)
		if ok && len(fields) >= 5 && strings.HasPrefix(right, "cgroup2 ") {
			return fields[4], nil
		}
	}
	return "", errors.New("cgroup v2 is not mounted: -cgroup needs it (the kernel reports each socket's cgroup v2)")
}

// cgroupDirs resolves -cgroup's paths: absolute ones under the cgroup v2
// mount, or relative to it (system.slice/ndt.service,
// kubepods/pod<uid>/<container>). Each must exist.
func cgroupDirs(paths []string) ([]string, error) {
	if len(paths) == 0 {
		return nil, nil
	}
	mount, err := cgroupMount()
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, p := range paths {
		d := p
		if !filepath.IsAbs(p) {
			d = filepath.Join(mount, p)
		}
		if !under(mount, d) {
			return nil, fmt.Errorf("-cgroup %s: not under the cgroup v2 mount %s", p, mount)
		}
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("-cgroup %s: no such cgroup (%s)", p, d)
		}
		dirs = append(dirs, d)
	}
	return dirs, nil
}

// under reports whether d is mount or a directory below it: a cgroup may
// be named "..svc", and only ".." itself climbs (TestUnder).
func under(mount, d string) bool {
	rel, err := filepath.Rel(mount, d)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// cgroupIDs returns the cgroup v2 ids (inode numbers) of dirs and of every
// cgroup below them: a service's sockets belong to the cgroups of its
// processes, which may be below the one named.
func cgroupIDs(dirs []string) map[uint64]bool {
	ids := map[uint64]bool{}
	for _, d := range dirs {
		filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			if info, err := e.Info(); err == nil {
				if st, ok := info.Sys().(*syscall.Stat_t); ok {
					ids[st.Ino] = true
				}
			}
			return nil
		})
	}
	return ids
}
