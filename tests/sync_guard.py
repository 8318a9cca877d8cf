"""A guard that makes every Tensor -> host conversion raise: on a GPU each one stalls the host until the
device catches up, so code that must queue work ahead (a training step) is run under it in tests."""
from __future__ import annotations

import contextlib

import torch

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


_ORIGINAL = {name: getattr(torch.Tensor, name) for name in SYNCS}


def _refuse(self, *a, **k):
    raise AssertionError("host sync in a region that must not sync")


@contextlib.contextmanager
def _methods(fn_of):
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}
    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, fn_of(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def no_host_sync():
    """Inside: any Tensor -> host conversion raises AssertionError."""
    return _methods(lambda name: _refuse)


def allow_sync():
    """Inside a ``no_host_sync`` region: conversions work again (for code outside the test's judgement)."""
    return _methods(lambda name: _ORIGINAL[name])


def package_of(filename: str) -> str:
    """``deepspeed``, ``torch`` or ``project``: whose code a source file is."""
    path = filename.replace("\\", "/")
    for package in ("deepspeed", "torch"):
        if f"/{package}/" in path:
            return package
    return "project"


def _caller_package() -> str:
    """The top-level package of the code that asked for the conversion (``torch``, ``deepspeed``, ...)."""
    import sys

    return package_of(sys._getframe(2).f_code.co_filename)


@contextlib.contextmanager
def count_host_syncs(counts: dict):
    """Inside: every Tensor -> host conversion works and is counted in ``counts`` by the package that
    asked for it (``{"deepspeed": 12, "torch": 120}``: torch's optimizers read their step counters,
    host tensors unless capturable; DeepSpeed's reads are of device tensors: norms and overflow flags)."""
    def counting(name):
        def fn(self, *a, **k):
            who = _caller_package()
            counts[who] = counts.get(who, 0) + 1
            return _ORIGINAL[name](self, *a, **k)
        return fn
    with _methods(counting):
        yield counts
