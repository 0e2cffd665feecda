package offline

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/m-lab/packet-headers/internal/synth"
)

// BenchmarkRun splits a 200k-packet, 2k-flow capture; it reports packets/s.
func BenchmarkRun(b *testing.B) {
	in := filepath.Join(b.TempDir(), "in.pcap")
	const n = 200000
	if err := synth.Write(in, n, 2000); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		out, _ := os.MkdirTemp("/dev/shm", "offline-bench")
		defer os.RemoveAll(out)
		o := options(out, in, "") // tmpfs: the pipeline, not the disk, is measured
		if _, err := Run(context.Background(), o); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "packets/s")
}
