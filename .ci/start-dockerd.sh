#!/bin/sh
# Makes a Docker engine available for the end-to-end tests: installs Debian's
# docker.io if needed and starts dockerd in the background unless an engine
# already answers. Safe to run more than once.
set -eu

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q docker.io
fi

if docker info >/dev/null 2>&1; then
  echo "docker engine already running"
  exit 0
fi

log="${DOCKERD_LOG:-/tmp/dockerd.log}"
$sudo sh -c "setsid dockerd >'$log' 2>&1 </dev/null &"

i=0
while [ "$i" -lt 60 ]; do
  if docker info >/dev/null 2>&1; then
    echo "docker engine ready after ${i}s"
    exit 0
  fi
  i=$((i + 1))
  sleep 1
done
echo "dockerd did not answer within 60s; last lines of $log:" >&2
tail -n 40 "$log" >&2 || true
exit 1
