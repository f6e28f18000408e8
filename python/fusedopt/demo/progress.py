"""Progress on stderr: one tqdm bar over all training steps when tqdm is installed and stderr
is a terminal, plus one line per finished run."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        self._t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, file=self.stream, unit="step",
                                dynamic_ncols=True, leave=False,
                                disable=None)  # None: off when not a terminal

    def start_run(self, run_id: str) -> None:
        if self.bar is not None:
            self.bar.set_description(run_id)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(f"[fusedopt.demo {time.perf_counter() - self._t0:6.1f}s] {text}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
