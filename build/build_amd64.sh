#!/bin/sh
# Portable release build for linux/amd64 into dist/linux-amd64/ (see native.sh).
set -eu
exec "$(dirname "$0")/native.sh" amd64 "$@"
