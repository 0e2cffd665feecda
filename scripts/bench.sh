#!/usr/bin/env bash
# Runs the Go benchmarks (per-packet decode, demux, header copy and
# anonymization; per-flow naming through the kernel) and prints their
# numbers, allocations included. Needs root for the kernel benchmark.
# Usage: scripts/bench.sh [go test -bench pattern]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go.sh
pattern="${1:-.}"
echo "== $(nproc) cores, $(go version)"
go test -run '^$' -bench "$pattern" -benchmem -count 1 ./capture/ ./packet/ ./anonymize/ ./saver/ ./demuxer/ ./sockdiag/ ./offline/ | grep -E '^(Benchmark|ok|FAIL)'
echo "== lab measurements beside tcpdump (root, iperf3, tcpdump)"
go test -run "^$" -bench Lab -benchtime 1x ./e2e/ | grep -E "^\\|"
