#!/bin/sh
# Release build of the sandbox for one Linux architecture, into dist/linux-<arch>/.
# Usage: build/native.sh amd64|arm64 [extra cargo xtask build-linux options on macOS]
#
# On Linux this is a plain cargo build (with --target when the host has the
# other architecture; that needs `rustup target add`, a cross linker and
# libseccomp for the target). On macOS the build runs in a Linux container
# through `cargo xtask build-linux`.
set -eu

arch="${1:-}"
case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu; machine=x86_64 ;;
  arm64) triple=aarch64-unknown-linux-gnu; machine=aarch64 ;;
  *) echo "usage: $0 amd64|arm64" >&2; exit 2 ;;
esac
shift

# Work from the repository root whatever the caller's directory.
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = Darwin ]; then
  exec cargo xtask build-linux --arch "$arch" "$@"
fi

target_dir="${CARGO_TARGET_DIR:-target}"
host="$(uname -m)"
if [ "$host" = "$machine" ] || { [ "$machine" = aarch64 ] && [ "$host" = arm64 ]; }; then
  cargo build --release --package sandbox --bins
  built="$target_dir/release/sandbox"
else
  echo "cross-compiling for $triple on $host; if this fails, use: cargo xtask build-linux --arch $arch" >&2
  cargo build --release --package sandbox --bins --target "$triple"
  built="$target_dir/$triple/release/sandbox"
fi

out="dist/linux-$arch"
mkdir -p "$out"
cp "$built" "$out/sandbox.partial"
mv "$out/sandbox.partial" "$out/sandbox"
(cd "$out" && sha256sum sandbox > SHA256SUMS)
# Under sudo, hand the results to the invoking user.
if [ "$(id -u)" = 0 ] && [ -n "${SUDO_UID:-}" ] && [ -n "${SUDO_GID:-}" ]; then
  chown -R "$SUDO_UID:$SUDO_GID" dist
fi
echo "$out/sandbox ($(wc -c < "$out/sandbox") bytes) sha256 $(cut -d' ' -f1 "$out/SHA256SUMS")"
