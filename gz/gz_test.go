package gz

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"os"
	"testing"
)

// gunzip reads data as gzip, every member of it, checking each CRC and size.
func gunzip(t testing.TB, data []byte) []byte {
	t.Helper()
	r, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("gzip header: %v", err)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	return out
}

// headerBatches returns the records of testdata/bulk.pcap.gz (an iperf3
// transfer at MSS 88 between two namespaces, cut where each TCP header
// ends, as the daemon stores them) grouped by connection into batches of
// at most 256 KiB (demuxer.SpillBytes), each in chunks of 8 KiB
// (record.ChunkSize): what the saver compresses, one member a batch.
func headerBatches(t testing.TB) (batches [][][]byte, packets int) {
	t.Helper()
	f, err := os.Open("testdata/bulk.pcap.gz")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	d, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	const batch, chunk = 256 << 10, 8 << 10
	type flow struct {
		chunks [][]byte
		size   int
	}
	flows := map[[12]byte]*flow{}
	var order [][12]byte
	for d = d[24:]; len(d) >= 16; packets++ {
		incl := int(binary.LittleEndian.Uint32(d[8:]))
		rec := append([]byte{}, d[:16+incl]...)
		d = d[16+incl:]
		binary.LittleEndian.PutUint32(rec[4:], binary.LittleEndian.Uint32(rec[4:])*1000) // nanoseconds, as the saver writes
		var k [12]byte
		a, b := rec[16+26:16+30], rec[16+30:16+34]
		pa, pb := rec[16+34:16+36], rec[16+36:16+38]
		if bytes.Compare(a, b) > 0 {
			a, b, pa, pb = b, a, pb, pa
		}
		copy(k[:], a)
		copy(k[4:], b)
		copy(k[8:], pa)
		copy(k[10:], pb)
		fl := flows[k]
		if fl == nil {
			fl = &flow{}
			flows[k] = fl
			order = append(order, k)
		}
		if n := len(fl.chunks); n == 0 || len(fl.chunks[n-1])+len(rec) > chunk {
			if fl.size+len(rec) > batch {
				batches = append(batches, fl.chunks)
				fl.chunks, fl.size = nil, 0
			}
			fl.chunks = append(fl.chunks, make([]byte, 0, chunk))
		}
		n := len(fl.chunks) - 1
		fl.chunks[n] = append(fl.chunks[n], rec...)
		fl.size += len(rec)
	}
	for _, k := range order {
		if fl := flows[k]; len(fl.chunks) > 0 {
			batches = append(batches, fl.chunks)
		}
	}
	return batches, packets
}

func TestRoundTrip(t *testing.T) {
	random := make([]byte, 3<<20) // incompressible: the output buffer must grow
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	batches, _ := headerBatches(t)
	for _, tc := range []struct {
		name string
		bufs [][]byte
	}{
		{"nothing", nil},
		{"one empty buffer", [][]byte{{}}},
		{"empty buffers around data", [][]byte{{}, []byte("pcap"), {}, {}, []byte(" records"), {}}},
		{"one byte", [][]byte{{7}}},
		{"incompressible", [][]byte{random[:1<<20], random[1<<20:]}},
		{"incompressible, one buffer", [][]byte{random}},
		{"header records", batches[0]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New()
			z, err := c.Compress(tc.bufs)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := gunzip(t, z), bytes.Join(tc.bufs, nil); !bytes.Equal(got, want) {
				t.Fatalf("decompressed %d bytes, not the %d compressed", len(got), len(want))
			}
		})
	}
}

// TestMembers compresses every batch of a real capture with one reused
// Compressor and reads the concatenated members as one stream, as readers
// read the saver's files: the records come back whole and in order.
func TestMembers(t *testing.T) {
	batches, _ := headerBatches(t)
	c := New()
	var file, want []byte
	for _, b := range batches {
		z, err := c.Compress(b)
		if err != nil {
			t.Fatal(err)
		}
		file = append(file, z...)
		want = append(want, bytes.Join(b, nil)...)
	}
	if got := gunzip(t, file); !bytes.Equal(got, want) {
		t.Fatalf("decompressed %d bytes, not the %d compressed", len(got), len(want))
	}
	if ratio := float64(len(want)) / float64(len(file)); ratio < 4 {
		t.Errorf("header records compressed %.2f times, expected at least 4 (fast deflate levels make 5 of them)", ratio)
	}
}

// TestSteadyStateDoesNotAllocate: a pooled Compressor allocates nothing
// once its buffer has grown to its batches' size.
func TestSteadyStateDoesNotAllocate(t *testing.T) {
	batches, _ := headerBatches(t)
	c := New()
	if _, err := c.Compress(batches[0]); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(20, func() { c.Compress(batches[0]) }); n > 0 {
		t.Errorf("%.1f allocations per batch, want 0", n)
	}
}

func FuzzCompress(f *testing.F) {
	f.Add([]byte("pcap records"), uint16(3), uint16(5))
	f.Add([]byte{}, uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, cut1, cut2 uint16) {
		i := min(int(cut1), len(data))
		j := min(i+int(cut2), len(data))
		bufs := [][]byte{data[:i], data[i:j], data[j:]}
		z, err := New().Compress(bufs)
		if err != nil {
			t.Fatal(err)
		}
		if got := gunzip(t, z); !bytes.Equal(got, data) {
			t.Fatalf("decompressed %d bytes, not the %d compressed", len(got), len(data))
		}
	})
}
