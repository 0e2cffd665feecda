// Package gz compresses a batch of buffers into one gzip member (RFC 1952):
// the saver's -compress, one member per batch of a flow's records.
//
// A pcap of headers is small records that differ from the previous ones in
// a few bytes, which deflate's fast levels find as well as its slow ones:
// on real header records (BenchmarkCompress) ISA-L's igzip at level 1
// compresses at about 530 MB/s to 1/5.2 of the input, where compress/gzip's
// default level takes 33 MB/s for 1/6.1, and its level 1 130 MB/s for
// 1/5.2. Built with cgo (the daemon always is: it links libpcap), a
// Compressor is igzip's; built without, it is compress/gzip at BestSpeed,
// so that the packages above build and test without cgo. Both write
// standard gzip that any reader takes (TestRoundTrip); only the compressed
// bytes differ.
//
// A Compressor is used by one goroutine at a time and is meant to be
// pooled: it holds about 170 KB (igzip's state and hash tables, freed when
// the Compressor is collected) and its output buffer, which grows to the
// largest member it made.
package gz

import "errors"

// ErrCompress is what a failed compression wraps: igzip refused its
// parameters or state, which cannot happen for valid input and is a bug.
var ErrCompress = errors.New("gzip compression failed")

// total returns the number of bytes in bufs.
func total(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// initialOut is the first size of a Compressor's output buffer for n bytes
// of input: header records compress five to six times, so a quarter is
// enough but for incompressible input, where the buffer grows.
func initialOut(n int) int { return n/4 + 1024 }
