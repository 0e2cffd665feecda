#!/usr/bin/env bash
# Runs the Go benchmarks (per-packet capture read, decode, demux, header
# copy and anonymization; per-flow naming through the kernel; offline
# reads) and the lab measurements beside tcpdump, prints them, and writes
# them to docs/performance.md. Needs root (the kernel benchmark and the lab).
# Usage: scripts/bench.sh [go test -bench pattern for the Go benchmarks]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/go.sh
pattern="${1:-.}"
machine="$(nproc) cores of $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(. /etc/os-release && echo "$PRETTY_NAME"), $(go version | cut -d' ' -f3), libpcap $(dpkg-query -W -f '${Version}' libpcap0.8 2>/dev/null || echo unknown)"
echo "== $machine"
bench=$(go test -run '^$' -bench "$pattern" -benchmem -count 1 ./capture/ ./packet/ ./anonymize/ ./saver/ ./demuxer/ ./sockdiag/ ./offline/ ./index/ | grep -E '^(Benchmark|ok|FAIL)')
echo "$bench"
# field NAME UNIT: the value before UNIT on benchmark NAME's line.
field() { echo "$bench" | awk -v n="$1" -v u="$2" '$1 ~ "^"n"(-[0-9]+)?$" { for (i = 2; i < NF; i++) if ($(i+1) == u) { print $i; exit } }'; }
completeness="| per flow | cost |
|---|---|
| the comparison at the flow's end (\`BenchmarkVerdict\`) | $(field BenchmarkVerdict ns/op) ns, $(field BenchmarkVerdict allocs/op) allocations |
| the destroy broadcast's parse, with its \`tcp_info\` (\`BenchmarkParseDestroy\`) | $(field BenchmarkParseDestroy ns/op) ns, $(field BenchmarkParseDestroy B/op) bytes in $(field BenchmarkParseDestroy allocs/op) allocations |
| the index record with the kernel's counters (\`BenchmarkAppendJSON/kernel\`) | $(field BenchmarkAppendJSON/kernel ns/op) ns, $(field BenchmarkAppendJSON/kernel bytes/record) bytes |
| the index record verified by inference (\`BenchmarkAppendJSON/inference\`) | $(field BenchmarkAppendJSON/inference ns/op) ns, $(field BenchmarkAppendJSON/inference bytes/record) bytes |"
echo "$completeness"
echo "== lab measurements beside tcpdump (root, iperf3, tcpdump)"
lab=$(go test -run '^$' -bench Lab -benchtime 1x ./e2e/ | grep -E '^\|')
echo "$lab"
cat > docs/performance.md <<DOC
# Performance

Written by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d): $machine.

## Lab, side by side with tcpdump

Both processes capture the same traffic in one run, between network
namespaces; CPU times are the scheduler's accounting of every thread of
each process. On a machine of two cores shared with iperf3 and the kernel's
network work, a single run's CPU ratio moves by tens of percent: compare
medians, and runs of one hour.

$lab

## Completeness, per flow

What a trace's verdict (\`verified\` in the [flow index](flow-index.md))
costs beyond what the daemon did before: per packet, a few counters in
each end's tally, within \`BenchmarkPacket\`; per flow, the parse of the
kernel's destroy broadcast with its \`tcp_info\`, the comparison, and a
longer index record:

$completeness

## Go benchmarks

Per packet, the path from the kernel's ring to the flow's buffer allocates
nothing, takes no lock shared across goroutines and makes no system call:
\`BenchmarkNativeRead\` (a frame from the ring), \`BenchmarkDecode\`,
\`BenchmarkPacket\` (the demuxer's step, interleaved flows and runs of one
flow), \`BenchmarkApply\` (netblock masking). \`BenchmarkUnselected\` is the
demuxer's step when 90% of the packets belong to connections the selection
rejects (a local port not in \`-localport\`), against the same traffic all
selected: the rejected ones cost a map miss and a hash each, and no memory. \`BenchmarkNameFlows\` is the
kernel naming's cost per flow, \`BenchmarkSaveFlow\` a flow's file,
\`BenchmarkAppendJSON\` a flow's index record, \`BenchmarkRead\` an
offline record. The lab's memory rows include what a flow keeps for its
index record, and its offline row the index's bytes per flow.

\`\`\`
$bench
\`\`\`
DOC
echo "== wrote docs/performance.md"
