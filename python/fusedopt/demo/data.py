"""The demo's corpus: the Python standard library's own source, read from this install.

Nothing is downloaded. A fixed list of stdlib modules is read in a fixed order; missing files
are skipped, and if too little text is found the remaining top-level ``*.py`` files are added in
sorted order, and as a last resort the docstrings of the builtins (present in every install,
even one shipped without ``.py`` sources). Characters are mapped to a fixed 128-symbol ASCII
vocabulary (anything else becomes ``?``), so the vocabulary does not depend on the corpus.
"""
from __future__ import annotations

import builtins
import os
import sysconfig
from dataclasses import dataclass

import torch

VOCAB_SIZE = 128

# Plain, long, stable modules (paths relative to the stdlib directory), in reading order.
STDLIB_FILES = (
    "os.py", "argparse.py", "typing.py", "inspect.py", "dataclasses.py", "functools.py",
    "subprocess.py", "collections/__init__.py", "enum.py", "textwrap.py", "random.py",
    "contextlib.py", "shutil.py", "threading.py", "ast.py", "difflib.py", "pickle.py",
    "tarfile.py", "logging/__init__.py", "json/encoder.py", "json/decoder.py", "string.py",
    "tempfile.py", "heapq.py", "fractions.py", "statistics.py", "csv.py",
)
MIN_CHARS = 400_000


@dataclass(frozen=True)
class Corpus:
    text: str                 # the whole corpus, ASCII only
    sources: tuple[str, ...]  # where each piece came from, in order
    train: torch.Tensor       # uint8 token ids: the first (1 - val_fraction) of every source
    val: torch.Tensor         # uint8 token ids: the last val_fraction of every source

    @property
    def chars(self) -> int:
        return len(self.text)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _builtin_docs() -> list[tuple[str, str]]:
    out = []
    for name in sorted(dir(builtins)):
        doc = getattr(getattr(builtins, name), "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            out.append((f"builtins.{name}.__doc__", f"{name}\n{doc}\n\n"))
    return out


def read_sources(min_chars: int = MIN_CHARS, stdlib: str | None = None) -> list[tuple[str, str]]:
    """(source name, text) pairs in a deterministic order, at least ``min_chars`` in all
    when the install has that much stdlib source (else whatever there is)."""
    stdlib = stdlib if stdlib is not None else sysconfig.get_paths().get("stdlib", "")
    pieces: list[tuple[str, str]] = []
    for rel in STDLIB_FILES:
        text = _read(os.path.join(stdlib, rel)) if stdlib else None
        if text:
            pieces.append((rel, text))
    total = sum(len(t) for _, t in pieces)
    if total < min_chars and stdlib and os.path.isdir(stdlib):
        taken = {rel for rel, _ in pieces}
        for name in sorted(os.listdir(stdlib)):
            if total >= min_chars:
                break
            if not name.endswith(".py") or name in taken:
                continue
            text = _read(os.path.join(stdlib, name))
            if text:
                pieces.append((name, text))
                total += len(text)
    if total < min_chars:
        for name, text in _builtin_docs():
            pieces.append((name, text))
            total += len(text)
    return pieces


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(_ascii(text).encode("ascii")), dtype=torch.uint8)


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("ascii")


def load_corpus(val_fraction: float = 0.1, min_chars: int = MIN_CHARS,
                stdlib: str | None = None) -> Corpus:
    """The corpus and its split: the tail of every source goes to validation, so both halves
    see every module's style."""
    pieces = read_sources(min_chars, stdlib)
    train, val, texts = [], [], []
    for _, text in pieces:
        text = _ascii(text)
        texts.append(text)
        cut = int(len(text) * (1.0 - val_fraction))
        train.append(text[:cut])
        val.append(text[cut:])
    return Corpus(text="".join(texts), sources=tuple(n for n, _ in pieces),
                  train=encode("".join(train)), val=encode("".join(val)))


class Batches:
    """Random windows of ``ctx + 1`` tokens, drawn once from ``seed``: every run gets the same
    training batches in the same order, and the validation set is a fixed list of windows."""

    def __init__(self, corpus: Corpus, batch_size: int, ctx: int, steps: int, seed: int,
                 val_batches: int):
        if len(corpus.train) <= ctx + 1 or len(corpus.val) <= ctx + 1:
            raise ValueError(f"corpus too small for a context of {ctx}")
        self.corpus, self.batch_size, self.ctx = corpus, batch_size, ctx
        gen = torch.Generator().manual_seed(seed)
        self.train_offsets = torch.randint(0, len(corpus.train) - ctx - 1, (steps, batch_size),
                                           generator=gen)
        self.val_offsets = torch.randint(0, len(corpus.val) - ctx - 1, (val_batches, batch_size),
                                         generator=gen)

    def _windows(self, data: torch.Tensor, offsets: torch.Tensor):
        idx = offsets[:, None] + torch.arange(self.ctx + 1)
        w = data[idx].long()
        return w[:, :-1], w[:, 1:]

    def train(self, step: int):
        return self._windows(self.corpus.train, self.train_offsets[step])

    def val(self):
        for offsets in self.val_offsets:
            yield self._windows(self.corpus.val, offsets)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.ctx
