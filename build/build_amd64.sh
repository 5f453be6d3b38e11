#!/bin/sh
# Release build for linux/amd64 into dist/linux-amd64/ (in a container on macOS).
set -eu
exec "$(dirname "$0")/native.sh" amd64 "$@"
