#!/usr/bin/env bash
# Installs what the sandbox needs to build and run, then builds it.
#   ./install.sh          system packages, Rust if missing, then `cargo build --release`
#   ./install.sh --test   also Docker's engine (for the xtask tests), started; no release build
#   ./install.sh --dist [DIR]  no build: the runtimes (Python, Node.js, nftables) and the
#                         portable binary from `cargo xtask build-linux` (DIR, default dist),
#                         checked against its SHA256SUMS, as /usr/local/bin/sandbox
# Debian/Ubuntu, Fedora/RHEL, Alpine and Arch. Idempotent: safe to run again.
set -euo pipefail

cd "$(dirname "$0")"
mode=build
dist=dist
case "${1:-}" in
  --test) mode=test ;;
  --dist) mode=dist; dist="${2:-dist}" ;;
  "" ) ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "install.sh: unknown option $1 (use --test, --dist [DIR] or nothing)" >&2; exit 2 ;;
esac

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "install.sh: run as root or install sudo: system packages are needed" >&2
  exit 1
fi

if [ "$mode" = dist ]; then
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64|arm64) arch=arm64 ;;
    *) echo "install.sh: no portable binary for $(uname -m)" >&2; exit 1 ;;
  esac
  binary_dir="$dist/linux-$arch"
  if [ ! -f "$binary_dir/sandbox" ] || [ ! -f "$binary_dir/SHA256SUMS" ]; then
    echo "install.sh: $binary_dir/sandbox or its SHA256SUMS is missing: run \`cargo xtask build-linux --arch $arch\` (on any machine with Docker) and copy $dist/ here" >&2
    exit 1
  fi
  (cd "$binary_dir" && sha256sum -c SHA256SUMS >/dev/null) || {
    echo "install.sh: $binary_dir/sandbox does not match its SHA256SUMS: copy it again" >&2
    exit 1
  }
fi

. /etc/os-release 2>/dev/null || { echo "install.sh: /etc/os-release missing: unknown distribution" >&2; exit 1; }
family="${ID:-} ${ID_LIKE:-}"

case "$family" in
  *debian*|*ubuntu*)
    log "apt: build and runtime packages"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    build_deps="libseccomp-dev libseccomp2 pkg-config gcc libc6-dev make curl"
    [ "$mode" = dist ] && build_deps=""
    $SUDO apt-get install -y -qq $build_deps ca-certificates \
      python3 python3-pip python3-jinja2 python3-requests python3-httpx nodejs nftables >/dev/null
    # npm installs the Node packages of dependencies/package.json; a Node.js from elsewhere
    # (NodeSource, a tarball) brings its own.
    command -v npm >/dev/null || $SUDO apt-get install -y -qq npm >/dev/null
    [ "$mode" = test ] && $SUDO apt-get install -y -qq debootstrap clang >/dev/null
    [ "$mode" = test ] && $SUDO apt-get install -y -qq docker.io iproute2 conntrack >/dev/null
    ;;
  *fedora*|*rhel*|*centos*)
    log "dnf: build and runtime packages"
    pm=$(command -v dnf || command -v yum)
    build_deps="libseccomp-devel pkgconf-pkg-config gcc make curl"
    [ "$mode" = dist ] && build_deps=""
    $SUDO "$pm" install -y $build_deps ca-certificates \
      python3 python3-pip python3-jinja2 python3-requests python3-httpx nodejs nftables
    [ "$mode" = test ] && $SUDO "$pm" install -y moby-engine || true
    ;;
  *alpine*)
    log "apk: build and runtime packages"
    build_deps="libseccomp-dev pkgconf gcc musl-dev make curl"
    [ "$mode" = dist ] && build_deps=""
    $SUDO apk add --no-cache $build_deps ca-certificates bash \
      python3 py3-pip py3-jinja2 py3-requests py3-httpx nodejs npm nftables
    [ "$mode" = test ] && $SUDO apk add --no-cache docker
    ;;
  *arch*)
    log "pacman: build and runtime packages"
    build_deps="libseccomp pkgconf gcc make curl"
    [ "$mode" = dist ] && build_deps=""
    $SUDO pacman -Sy --needed --noconfirm $build_deps ca-certificates \
      python python-pip python-jinja python-requests python-httpx nodejs npm nftables
    [ "$mode" = test ] && $SUDO pacman -S --needed --noconfirm docker
    ;;
  *)
    echo "install.sh: unsupported distribution '$family': install libseccomp (dev), pkg-config, gcc, python3 with jinja2/requests/httpx, nodejs and nftables by hand" >&2
    exit 1
    ;;
esac

# The python3 first on PATH is the one `sandbox serve` uses by default; it may not be
# the distribution's (pyenv, a venv), so make sure *it* has Dify's modules.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import jinja2, requests, httpx' 2>/dev/null; then
  log "pip: jinja2, requests, httpx for $(command -v python3)"
  flags=""
  python3 -m pip help install 2>/dev/null | grep -q -- --break-system-packages && flags="--break-system-packages"
  if [ -w "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ]; then
    python3 -m pip install --quiet $flags jinja2 requests httpx
  else
    $SUDO python3 -m pip install --quiet $flags jinja2 requests httpx
  fi
fi

if [ "$mode" = dist ]; then
  log "install: $binary_dir/sandbox (static, sha256 checked) as /usr/local/bin/sandbox"
  $SUDO install -m 0755 "$binary_dir/sandbox" /usr/local/bin/sandbox
  /usr/local/bin/sandbox --version
  log "done: sandbox doctor checks this host; sandbox serve (as root) starts the server on port 8194"
  exit 0
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  log "rustup: Rust toolchain"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$mode" = test ]; then
  # The portable build's test (xtask/tests/build_linux.rs) gives this toolchain to its
  # builder image, which compiles for musl on both architectures.
  log "rustup: musl standard libraries"
  rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl >/dev/null
  # .ci/check-macos type-checks the workspace for both Macs (clang compiles ring's C).
  log "rustup: macOS standard libraries"
  rustup target add x86_64-apple-darwin aarch64-apple-darwin >/dev/null
  log "docker: engine for the xtask tests"
  python3 -m pip install --quiet $(python3 -m pip help install 2>/dev/null | grep -- --break-system-packages >/dev/null && echo --break-system-packages) kubernetes-validate  # Kubernetes schemas for tests/deploy.rs
  bash .ci/start-dockerd.sh
else
  log "cargo: release build"
  cargo build --release --bin sandbox
  log "done: ./target/release/sandbox serve (as root) starts the server on port 8194"
fi
