#!/bin/sh
# Release build for linux/arm64 into dist/linux-arm64/ (in a container on macOS).
set -eu
exec "$(dirname "$0")/native.sh" arm64 "$@"
