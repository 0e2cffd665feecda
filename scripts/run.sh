#!/usr/bin/env bash
# Builds packet-headers and runs it until Ctrl-C, naming every flow from the
# kernel's socket cookies (no tcp-info needed). Extra arguments go to the
# daemon; without -datadir it writes to ./data.
# Usage, as root on Debian: scripts/run.sh [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s libpcap-dev libisal-dev >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libpcap-dev libisal-dev gcc
fi
source scripts/go.sh

mkdir -p bin
go build -ldflags "-X main.commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" -o bin/packet-headers .
case " $* " in
  *" -datadir"* | *" --datadir"*) ;;
  *) set -- -datadir ./data "$@" ;;
esac
case " $* " in
  *" -prometheusx.listen-address"* | *" --prometheusx.listen-address"*) ;;
  *) set -- -prometheusx.listen-address 127.0.0.1:9990 "$@" ;; # metrics on loopback only
esac
echo "packet-headers $*"
exec bin/packet-headers "$@"
