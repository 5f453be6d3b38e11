#!/bin/sh
# Builds the production image from dist/linux-<arch>/sandbox.
# Usage: docker/build-image.sh [--arch amd64|arm64|all] [--tag NAME] [...]
# Same as `cargo xtask image`, runnable from any directory.
set -eu
cd "$(dirname "$0")/.."
exec cargo xtask image "$@"
