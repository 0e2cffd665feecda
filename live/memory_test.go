package live

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/m-lab/go/bytecount"
)

// TestDefaultMaxHeap: -maxheap's default is two thirds of the lowest
// memory limit of the process's cgroup and its ancestors, v2 or v1, and
// 8GB without one (or with a larger one).
func TestDefaultMaxHeap(t *testing.T) {
	for _, tt := range []struct {
		name   string
		cgroup string
		files  map[string]string
		want   bytecount.ByteCount
	}{
		{"v2 pod limit", "0::/kubepods/pod1/ctr\n", map[string]string{
			"sys/fs/cgroup/kubepods/pod1/ctr/memory.max": "max\n",
			"sys/fs/cgroup/kubepods/pod1/memory.max":     "3000000000\n",
			"sys/fs/cgroup/kubepods/memory.max":          "max\n",
		}, 2000000000},
		{"v2 unit", "0::/system.slice/packet-headers.service\n", map[string]string{
			"sys/fs/cgroup/system.slice/packet-headers.service/memory.max": "3221225472\n",
		}, 2147483648},
		{"v1", "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n", map[string]string{
			"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "1500000000\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes":            "9223372036854771712\n",
		}, 1000000000},
		{"no limit", "0::/\n", map[string]string{"sys/fs/cgroup/memory.max": "max\n"}, 8 * bytecount.Gigabyte},
		{"above 12GB", "0::/big\n", map[string]string{"sys/fs/cgroup/big/memory.max": "64000000000\n"}, 8 * bytecount.Gigabyte},
		{"no cgroup file", "", nil, 8 * bytecount.Gigabyte},
	} {
		root := t.TempDir()
		if tt.cgroup != "" {
			os.MkdirAll(filepath.Join(root, "proc/self"), 0o755)
			os.WriteFile(filepath.Join(root, "proc/self/cgroup"), []byte(tt.cgroup), 0o644)
		}
		for p, v := range tt.files {
			os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755)
			os.WriteFile(filepath.Join(root, p), []byte(v), 0o644)
		}
		if got := DefaultMaxHeap(root); got != tt.want {
			t.Errorf("%s: %d, want %d", tt.name, got, tt.want)
		}
	}
}
