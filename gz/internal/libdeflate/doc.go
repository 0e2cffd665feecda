// Package libdeflate is libdeflate's one-shot gzip compressor, a candidate
// that gz's BenchmarkCompress measures beside the one gz uses; nothing else
// imports it. Without cgo it is empty.
package libdeflate
