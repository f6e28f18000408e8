"""fusedopt benchmark suite: ``python -m fusedopt.bench`` (or ``fusedopt-bench``).

Modules: ``cases`` (shapes, optimizers, bytes models), ``contenders`` (fusedopt, torch.optim
variants, peer detection), ``timing`` (bandwidth probe, interleaved timing), ``suite`` (runs the
cases into one JSON document), ``report`` (table, JSON, PNG, README markdown).
"""
from .report import format_table, render_markdown
from .suite import Settings, run_suite


def main(argv=None) -> int:
    from .__main__ import main as _main
    return _main(argv)


__all__ = ["main", "render_markdown", "format_table", "run_suite", "Settings"]
