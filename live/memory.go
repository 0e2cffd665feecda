package live

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/m-lab/go/bytecount"
)

// DefaultMaxHeap is -maxheap's default: 8GB, or two thirds of the memory
// limit of the daemon's cgroup if that is lower, so that under a pod's
// 3G limit the daemon refuses new flows (and the runtime collects
// harder) well before the kernel's OOM killer acts, with room above the
// Go heap for the capture rings and the runtime (TestDefaultMaxHeap).
func DefaultMaxHeap(root string) bytecount.ByteCount {
	heap := 8 * bytecount.Gigabyte
	if limit := cgroupMemoryLimit(root); limit > 0 {
		heap = min(heap, bytecount.ByteCount(limit/3*2))
	}
	return heap
}

// cgroupMemoryLimit returns the lowest memory limit of this process's
// cgroup and its ancestors (cgroup v2's memory.max, or v1's
// memory.limit_in_bytes), under root (/sys/fs/cgroup, and /proc/self/cgroup
// for the process's place), or 0 if there is none.
func cgroupMemoryLimit(root string) int64 {
	f, err := os.Open(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		return 0
	}
	defer f.Close()
	var lowest int64
	consider := func(dir, file string) {
		for d := dir; ; d = filepath.Dir(d) {
			b, err := os.ReadFile(filepath.Join(d, file))
			if err == nil {
				v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
				// "max", or v1's "no limit" near 2^63: none.
				if err == nil && v > 0 && v < 1<<60 && (lowest == 0 || v < lowest) {
					lowest = v
				}
			}
			if d == filepath.Join(root, "sys/fs/cgroup") || d == filepath.Join(root, "sys/fs/cgroup/memory") || d == "/" || d == "." {
				return
			}
		}
	}
	s := bufio.NewScanner(f)
	for s.Scan() {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(s.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			consider(filepath.Join(root, "sys/fs/cgroup", parts[2]), "memory.max")
		case strings.Contains(","+parts[1]+",", ",memory,"):
			consider(filepath.Join(root, "sys/fs/cgroup/memory", parts[2]), "memory.limit_in_bytes")
		}
	}
	return lowest
}
