#!/usr/bin/env bash
# Make Debian's redis-server available for the GCS fault-tolerance test (tests/faults/test_gcs_ft.py).
#
#   bash .ci/redis.sh            # installs redis-server if it is missing, then prints its version
#
# Only installs: the test starts its own throwaway server (its own port, folder and password) and stops it by
# PID, as KubeRay's redis-gcs-ft component runs one beside the head. Debian's package also enables a system
# service; in a container without systemd nothing starts it, and the test never uses it. Progress goes to
# stderr. Runs as root (CI).
set -euo pipefail

log() { echo "redis.sh: $*" >&2; }

if ! command -v redis-server >/dev/null 2>&1; then
  log "redis-server not found; installing Debian's redis-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends redis-server >&2
fi

log "$(redis-server --version)"
