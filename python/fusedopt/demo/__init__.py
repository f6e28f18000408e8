"""The training-dynamics demo: ``python -m fusedopt.demo``.

A small character-level GPT trained on the Python standard library's own source, once in fp32
and once per bf16 precision path (naive ``torch.optim.AdamW``, stochastic rounding, Kahan
summation, fp32 master weights), each with and without weight decay, under a
warmup-stable-decay schedule with a (1 - sqrt) cooldown. Writes ``loss_curves.png`` and
``demo.json`` and prints a final-loss table.

Modules: ``data`` (corpus, split, batches), ``model`` (the GPT and size presets), ``schedule``
(WSD), ``runs`` (run specs and the training loop), ``report`` (table, JSON, plot),
``progress`` (tqdm bar).
"""


def main(argv=None) -> int:
    from .__main__ import main as _main
    return _main(argv)


__all__ = ["main"]
