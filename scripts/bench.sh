#!/usr/bin/env bash
# Sets up everything on a fresh machine, installs the benchmark's peers (pyproject's `bench`
# extras, torch held at the installed version; one that cannot install is reported and the
# run goes on without it), then runs the benchmark (quick by default; pass your own options,
# e.g. `bash scripts/bench.sh --device cuda`; with --no-peers nothing extra is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- --quick; fi
case " $* " in
  *" --no-peers "*) ;;
  *) "$PY" "$ROOT/bench/install_peers.py" || echo "bench.sh: peer install step failed; running without the missing peers" ;;
esac
exec "$PY" -m fusedopt.bench "$@"
