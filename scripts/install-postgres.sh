#!/usr/bin/env bash
# PostgreSQL for the store's tests (tests/postgres_server.py starts a throwaway cluster from these binaries).
# Debian's package: the server production feedback stores run, from the distribution's registry; the machine
# image usually has it already, so this installs only what is missing.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "postgresql server: $(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | head -1 || command -v postgres)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "postgresql server missing and not root: install Debian's postgresql package" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# the package starts a system cluster; the tests run their own
(command -v pg_ctlcluster >/dev/null && pg_ctlcluster --force "$(ls /etc/postgresql | head -1)" main stop) 2>/dev/null || true
ls /usr/lib/postgresql/*/bin/postgres
