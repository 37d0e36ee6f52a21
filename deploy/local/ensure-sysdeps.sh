#!/usr/bin/env bash
# Installs the system tools forgerpc uses when they are missing (Debian, as root):
#   bwrap (bubblewrap)  - the sandbox service's strongest isolation tier
#   redis-server        - the embedded stack's private Redis (make run) and make test
set -euo pipefail
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v redis-server >/dev/null || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "sysdeps: please install: ${need[*]} (the sandbox falls back to weaker isolation without bwrap)" >&2
  exit 0
fi
echo "sysdeps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
