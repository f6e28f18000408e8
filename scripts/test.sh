#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$PY" -m fusedopt
exec "$PY" -m pytest -q "$@"
