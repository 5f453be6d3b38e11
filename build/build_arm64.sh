#!/bin/sh
# Portable release build for linux/arm64 into dist/linux-arm64/ (see native.sh).
set -eu
exec "$(dirname "$0")/native.sh" arm64 "$@"
