#!/usr/bin/env bash
# Builds packet-headers and tcp-info (from the module version pinned in
# go.mod), starts tcp-info with its eventsocket, and runs packet-headers
# beside it until Ctrl-C. Extra arguments go to packet-headers.
# Usage, as root on Debian: scripts/run.sh [-datadir DIR] [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

if ! dpkg -s libpcap-dev >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libpcap-dev gcc
fi
command -v go >/dev/null || { echo "Go 1.26 or newer is required (https://go.dev/dl/)"; exit 1; }

mkdir -p bin
go build -o bin/packet-headers .
go build -o bin/tcp-info github.com/m-lab/tcp-info

run=$(mktemp -d /tmp/packet-headers-run.XXXXXX)
sock="$run/tcpevents.sock"
bin/tcp-info -tcpinfo.eventsocket "$sock" -output "$run/tcpinfo" -prometheusx.listen-address 127.0.0.1:9991 \
  >"$run/tcp-info.log" 2>&1 &
tcpinfo=$!
trap 'kill $tcpinfo 2>/dev/null; wait $tcpinfo 2>/dev/null; rm -rf "$run"' EXIT
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
case " $* " in
  *" -datadir"* | *" --datadir"*) ;;
  *) set -- -datadir ./data "$@" ;;
esac
echo "tcp-info runs (log: $run/tcp-info.log); packet-headers starts with: $*"
bin/packet-headers -tcpinfo.eventsocket "$sock" "$@"
