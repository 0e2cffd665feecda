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
bench=$(go test -run '^$' -bench "$pattern" -benchmem -count 1 ./capture/ ./packet/ ./anonymize/ ./gz/ ./saver/ ./demuxer/ ./sockdiag/ ./offline/ ./index/ | grep -E '^(Benchmark|ok|FAIL)')
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
compressors="| compressor (\`BenchmarkCompress\`) | speed | ratio | bytes a packet |
|---|---|---|---|"
for c in gz isal-0 isal-2 isal-3 stdlib-1 stdlib-6 klauspost-1 klauspost-4 klauspost-6 libdeflate-1 libdeflate-6; do
  case $c in
    gz) what="**ISA-L igzip level 1 (\`gz\`, the saver's)**" ;;
    isal-*) what="ISA-L igzip level ${c#isal-}" ;;
    stdlib-6) what="compress/gzip level 6 (the default before, what gzip -6 makes)" ;;
    stdlib-*) what="compress/gzip level ${c#stdlib-}" ;;
    klauspost-*) what="github.com/klauspost/compress/gzip level ${c#klauspost-}" ;;
    libdeflate-*) what="libdeflate level ${c#libdeflate-} (one-shot: the batch copied into one buffer first)" ;;
  esac
  compressors="$compressors
| $what | $(field BenchmarkCompress/$c MB/s) MB/s | $(field BenchmarkCompress/$c ratio) | $(field BenchmarkCompress/$c bytes/packet) |"
done
echo "$compressors"
echo "== lab measurements beside tcpdump (root, iperf3, tcpdump)"
lab=$(go test -run '^$' -bench Lab -benchtime 1x -timeout 60m ./e2e/ | grep -E '^\|')
echo "$lab"
soakSeconds="${PH_SOAK_SECONDS:-600}"
echo "== soak: ~210 short connections a second for $soakSeconds s"
soakOut=$(PH_SOAK_SECONDS=$soakSeconds go test -run '^$' -bench Soak -benchtime 1x -timeout 30m ./e2e/ 2>&1 | grep -E '^(soak:|BenchmarkSoak)')
echo "$soakOut"
soak="| time | RSS | flows tracked | connections announced, held |
|---|---|---|---|
$(echo "$soakOut" | awk '/^soak:/ && (NR % 6 == 1) { sub(",", "", $5); printf "| %s s | %s MB | %s | %s |\n", $2, $5, $7, $10 }')"
soakLine=$(echo "$soakOut" | grep '^BenchmarkSoak' || true)
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

## Memory over time

\`BenchmarkSoak\`: the default flags beside tcp-info, while clients open
about 210 short connections a second, for $soakSeconds s (every minute's reading):

$soak

\`$soakLine\`

The daemon's memory grows over the first minute, while the names table
fills to its steady size (an announcement is held for the longer of
\`-captureduration\` and \`-flowtimeout\`, plus \`-uuidwaitduration\`, after
its last change: 35 s by default, about 6,300 at this rate) and the Go heap to its
garbage-collection goal (twice what is live), then stays within a few
percent.

## Compression

\`-compress\` (the default) compresses each batch of a flow's records (up to
256 KiB) into one gzip member on the flow's writer goroutine. The
candidates, on the records of a real iperf3 transfer at MSS 88
(\`gz/testdata/bulk.pcap.gz\`), batch by batch as the saver does, one core:

$compressors

ISA-L's igzip at level 1 is the fastest that keeps the ratio within 1.25
of gzip -6's: twice libdeflate's and klauspost's level 1, 15 times
compress/gzip's default. Its level 0 is faster still but 1.4 times larger
than gzip -6; its level 3 and the other libraries' slow levels buy 5 to 25%
fewer bytes for 4 to 15 times the CPU, which is why there is no level flag:
whoever wants the smallest files can recompress them where CPU is cheap.
Built without cgo, \`gz\` is compress/gzip level 1.

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
