#!/usr/bin/env bash
# Installs what the tests need (Debian packages; Go modules come through the
# module proxy), checks formatting and static analysis, and runs every test,
# end-to-end tests included (they need root: network namespaces and libpcap).
# Usage, as root on Debian: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libpcap-dev libisal-dev libdeflate-dev tcpdump tshark iproute2 iperf3 ethtool gcc inotify-tools python3-scapy util-linux e2fsprogs jq libcap2-bin prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
source scripts/go.sh
export PATH="$PATH:$(go env GOPATH)/bin"

echo "== stage 1: static checks and unit tests"
echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "not gofmt'ed: $unformatted"; exit 1; fi
echo "== go vet"
go vet ./...
echo "== staticcheck"
go tool staticcheck ./...
# The core (everything but the capture, the command and the end-to-end
# tests) builds and passes its tests without cgo.
core=$(go list ./... | grep -v -e '/e2e$' -e '/capture$' -e '/live$' -e '^github.com/m-lab/packet-headers$')
echo "== CGO_ENABLED=0 go test (the core, without cgo)"
CGO_ENABLED=0 go test -count=1 $core
echo "== go test -race (unit)"
go test -race -count=1 -timeout 15m $(go list ./... | grep -v '/e2e$')

# The README's commands on a bare Debian machine: with no Go on the PATH,
# scripts/go.sh brings the toolchain go.mod names (into a scratch directory
# here), and it builds the daemon.
echo "== Go bootstrap on a machine without Go"
scratch=$(mktemp -d)
env -i HOME="$HOME" PATH=/usr/sbin:/usr/bin:/sbin:/bin GO_INSTALL_DIR="$scratch/go" GOMODCACHE="$(go env GOMODCACHE)" \
  bash -c 'set -euo pipefail
    if command -v go >/dev/null; then echo "a Go on the bare PATH"; exit 1; fi
    source scripts/go.sh
    [ "$(command -v go)" = "$GO_INSTALL_DIR/bin/go" ] || { echo "go.sh did not install Go"; exit 1; }
    go build -o /dev/null .'
rm -rf "$scratch"

echo "== stage 2: end-to-end tests (root: network namespaces, capture, tcp-info)"
go test -race -count=1 -timeout 30m ./e2e

# A count, not a duration: with a duration, Go 1.26's fuzzing coordinator
# may report its own deadline as a failure ("context deadline exceeded",
# go.dev/issue/75804, fixed in Go 1.27). 100000 inputs take 5 to 15 s a
# target on this project's machine kind.
fuzztime="${FUZZTIME:-100000x}"
echo "== fuzzing each target for $fuzztime"
for target in gz:FuzzCompress saver:FuzzCheckUUID packet:FuzzDecode anonymize:FuzzApply anonymize:FuzzCryptoPAn tcpeventsocket:FuzzParseLine sockdiag:FuzzParseMessages offline:FuzzPcapFile offline:FuzzNgFile; do
  go test -run '^$' -fuzz "^${target#*:}\$" -fuzztime "$fuzztime" "./${target%%:*}/"
done
echo "== all tests passed"
