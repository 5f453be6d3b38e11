#!/bin/sh
# Release build of the sandbox for one Linux architecture.
# Usage: build/native.sh amd64|arm64 [extra `cargo xtask build-linux` options]
#
# By default this is `cargo xtask build-linux --arch <arch>`, on Linux as on macOS:
# the portable binary (musl, libseccomp linked in, no dynamic dependency) built in a
# container of the local Docker engine, into dist/linux-<arch>/ with its SHA256SUMS,
# the same file the production image and `install.sh --dist` take.
#
# SANDBOX_BUILD=local builds on this Linux host instead, without Docker: a plain
# cargo build against this host's glibc and libseccomp.so.2, into
# dist/linux-<arch>-gnu/ (for the host's own architecture only).
set -eu

arch="${1:-}"
case "$arch" in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "usage: $0 amd64|arm64" >&2; exit 2 ;;
esac
shift

# Work from the repository root whatever the caller's directory.
cd "$(dirname "$0")/.."

if [ "${SANDBOX_BUILD:-}" != local ]; then
  exec cargo xtask build-linux --arch "$arch" "$@"
fi

host="$(uname -m)"
if [ "$(uname -s)" != Linux ] || { [ "$host" != "$machine" ] && ! { [ "$machine" = aarch64 ] && [ "$host" = arm64 ]; }; }; then
  echo "SANDBOX_BUILD=local builds for this Linux host's own architecture only; use: cargo xtask build-linux --arch $arch" >&2
  exit 2
fi
cargo build --release --package sandbox --bins
built="${CARGO_TARGET_DIR:-target}/release/sandbox"

out="dist/linux-$arch-gnu"
mkdir -p "$out"
cp "$built" "$out/sandbox.partial"
mv "$out/sandbox.partial" "$out/sandbox"
(cd "$out" && sha256sum sandbox > SHA256SUMS)
# Under sudo, hand the results to the invoking user.
if [ "$(id -u)" = 0 ] && [ -n "${SUDO_UID:-}" ] && [ -n "${SUDO_GID:-}" ]; then
  chown -R "$SUDO_UID:$SUDO_GID" dist
fi
echo "$out/sandbox ($(wc -c < "$out/sandbox") bytes) sha256 $(cut -d' ' -f1 "$out/SHA256SUMS")"
