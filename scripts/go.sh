# Sourced by run.sh, test.sh and bench.sh: puts a Go of the version go.mod
# names (or newer) first on the PATH, bringing it if the machine has none.
# Debian bookworm's own Go is 1.19, too old to build this module, but it can
# fetch the pinned toolchain from the Go module proxy as a module
# (golang.org/toolchain), which is then made executable and installed in
# $GO_INSTALL_DIR (default /usr/local/go, where the official archive goes).
GO_INSTALL_DIR="${GO_INSTALL_DIR:-/usr/local/go}"
go_want=$(awk '$1 == "go" {print $2; exit}' "$(dirname "${BASH_SOURCE[0]}")/../go.mod")

# go_ok DIR: the Go in DIR/bin is at least go_want.
go_ok() {
  local v
  v=$("$1/bin/go" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  [ "$(printf '%s\n%s\n' "$go_want" "$v" | sort -V | head -1)" = "$go_want" ]
}

if command -v go >/dev/null 2>&1 && go_ok "$(go env GOROOT 2>/dev/null)"; then
  :
elif go_ok "$GO_INSTALL_DIR"; then
  export PATH="$GO_INSTALL_DIR/bin:$PATH"
else
  echo "== Go $go_want not found: bringing it through Debian's Go and the module proxy"
  if [ ! -x /usr/lib/go-1.19/bin/go ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-1.19-go ca-certificates
  fi
  arch=$(dpkg --print-architecture)
  cache="${GO_BOOTSTRAP_CACHE:-/var/cache/packet-headers-go}" # the module zip, kept for the next install
  tmp=$(mktemp -d)
  (cd "$tmp" && GOMODCACHE="$cache" GOPATH="$tmp/gopath" GOFLAGS=-modcacherw GOTOOLCHAIN=local \
    /usr/lib/go-1.19/bin/go mod download "golang.org/toolchain@v0.0.1-go${go_want}.linux-${arch}")
  rm -rf "$tmp" "$GO_INSTALL_DIR"
  mkdir -p "$(dirname "$GO_INSTALL_DIR")"
  cp -R "$cache/golang.org/toolchain@v0.0.1-go${go_want}.linux-${arch}" "$GO_INSTALL_DIR"
  # Module files are not executable: the toolchain's commands must be.
  chmod -R u+w "$GO_INSTALL_DIR"
  chmod +x "$GO_INSTALL_DIR"/bin/* "$GO_INSTALL_DIR"/pkg/tool/*/*
  go_ok "$GO_INSTALL_DIR" || { echo "the Go brought to $GO_INSTALL_DIR does not run"; exit 1; }
  export PATH="$GO_INSTALL_DIR/bin:$PATH"
  echo "== installed $("$GO_INSTALL_DIR/bin/go" version) in $GO_INSTALL_DIR"
fi
export GOTOOLCHAIN=local
