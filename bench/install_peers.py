"""Installs the benchmark's optional dependencies (pyproject's ``bench`` group: the peer
libraries, matplotlib, tqdm) into the running Python, with torch held at the installed
version, so that no peer can replace it. Used by ``scripts/bench.sh``.

All at once first; if pip refuses the set, one by one, so that one peer that cannot install
here costs only its own rows (the benchmark reports it as "not installed"). Always exits 0:
a missing peer must not stop the benchmark.

    python bench/install_peers.py [--dry-run]
"""
from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def bench_requirements(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """The ``bench`` optional-dependency group of ``pyproject``."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one list we need, read with a pattern
        m = re.search(r"^bench\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []
    return list(tomllib.loads(text)["project"].get("optional-dependencies", {}).get("bench", []))


def _pip(python: str, args: list[str], run=subprocess.run) -> int:
    return run([python, "-m", "pip", "install", "-q", *args]).returncode


def install(requirements: list[str], python: str = sys.executable, run=subprocess.run,
            torch_version: str | None = None, log=print) -> dict:
    """``{requirement: "ok" | "failed"}``; never raises for a failed install."""
    if torch_version is None:
        import torch
        torch_version = torch.__version__
    if not requirements:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={torch_version}\n")
    constraint = ["-c", pin.name]
    try:
        if _pip(python, constraint + requirements, run) == 0:
            return {r: "ok" for r in requirements}
        log("bench: installing the bench extras together failed; trying one by one")
        status = {}
        for r in requirements:
            status[r] = "ok" if _pip(python, constraint + [r], run) == 0 else "failed"
            if status[r] == "failed":
                log(f"bench: could not install {r} (torch held at {torch_version}); "
                    "the benchmark runs without it and says so")
        return status
    finally:
        pathlib.Path(pin.name).unlink(missing_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the requirements and exit")
    args = ap.parse_args(argv)
    reqs = bench_requirements()
    if args.dry_run:
        print("\n".join(reqs))
        return 0
    status = install(reqs)
    failed = [r for r, s in status.items() if s != "ok"]
    print(f"bench extras: {len(status) - len(failed)} of {len(status)} installed"
          + (f"; not installed: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
