"""Optimizer state containers that count their own mutations.

The step reuses a pointer table while it is provably valid; replacing or deleting a state
tensor (``opt.state[p]["exp_avg"] = t``, ``opt.state.clear()``, ``opt.state = ...``) must
invalidate it. These dict subclasses bump a shared counter on every mutation, at no cost to
reads. State dicts are exported as plain dicts (see FusedOptimizer.state_dict hooks), so
``torch.load(weights_only=True)`` never meets these classes.
"""
from __future__ import annotations

from collections import defaultdict


class Generation:
    """A counter shared by an optimizer and its state containers."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def bump(self):
        self.value += 1

    def __getstate__(self):
        return self.value

    def __setstate__(self, value):
        self.value = value


def _tracked(base):
    def mutating(name):
        original = getattr(base, name)

        def method(self, *args, **kwargs):
            self._generation.bump()
            return original(self, *args, **kwargs)

        method.__name__ = name
        return method

    names = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "update", "setdefault", "__ior__")
    return {n: mutating(n) for n in names if hasattr(base, n)}


class TrackedDict(dict):
    """One param's state."""

    __slots__ = ("_generation",)
    locals().update(_tracked(dict))

    def __init__(self, generation: Generation, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self._generation = generation

    def __reduce__(self):
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    """``optimizer.state``: param -> TrackedDict."""

    locals().update(_tracked(defaultdict))

    def __init__(self, generation: Generation, items=()):
        defaultdict.__init__(self, None)
        self._generation = generation
        for key, value in dict(items).items():
            # A non-dict value (a counter someone keeps here) is kept as it is, as torch does.
            defaultdict.__setitem__(self, key, TrackedDict(generation, value) if isinstance(value, dict) else value)

    def __missing__(self, key):
        value = TrackedDict(self._generation)
        self[key] = value
        return value

    def __setitem__(self, key, value):
        self._generation.bump()
        if isinstance(value, dict) and not isinstance(value, TrackedDict):
            value = TrackedDict(self._generation, value)
        defaultdict.__setitem__(self, key, value)

    def __reduce__(self):
        return (_plain_state, (dict(self),))


def _plain_state(items):
    out = defaultdict(dict)
    out.update({k: dict(v) if isinstance(v, dict) else v for k, v in items.items()})
    return out
