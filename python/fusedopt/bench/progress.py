"""Progress on stderr: a tqdm bar when tqdm is installed, plain lines otherwise."""
from __future__ import annotations

import sys
import time


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """``total`` units (timing rounds); ``phase`` names what runs now; ``note`` prints a line."""

    def __init__(self, total: int, enabled: bool = True, use_tqdm: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total, self.done = total, 0
        self._t0 = time.perf_counter()
        tqdm = _tqdm() if (enabled and use_tqdm) else None
        self.bar = tqdm(total=total, file=self.stream, unit="round", dynamic_ncols=True,
                        leave=False) if tqdm else None
        self.label = ""

    def phase(self, label: str, text: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.set_postfix_str(text)
        elif self.enabled:
            self._line(f"{label}: {text}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            self._line(text)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def _line(self, text: str) -> None:
        print(f"[fusedopt-bench {time.perf_counter() - self._t0:6.1f}s "
              f"{self.done}/{self.total}] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
