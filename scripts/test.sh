#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
# The AArch64 check (tests/test_aarch64.py) needs a cross-compiler and qemu-user: installed on a
# Debian-like machine we are root on (about 20 s); elsewhere that one test is skipped.
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1; } \
      || echo "note: the AArch64 cross toolchain could not be installed; tests/test_aarch64.py is skipped"
  fi
fi
cd "$ROOT"
"$PY" -m fusedopt
exec "$PY" -m pytest -q "$@"
