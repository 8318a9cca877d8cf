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
