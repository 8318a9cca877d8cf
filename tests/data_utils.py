"""Shared by the data_prep tests: ``make_data(source, tokenizer, **prepare_kwargs)``, a fixture factory that
builds a fresh small data dir (defaults ``SMALL``: 400 KB of this machine's stdlib, BPE-512), and
``split_docs``, which decodes a split back into its documents."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.prepare import prepare
from data_prep.reader import load_tokenizer, open_split


SMALL = dict(vocab_size=512, max_bytes=400_000, val_fraction=0.1, shard_tokens=10_000, seed=0)


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def make_data(tmp_path_factory):
    """Factory building a fresh data dir: ``make_data(source="stdlib", tokenizer="bpe", **kw)``
    with ``kw`` passed to ``data_prep.prepare.prepare`` (defaults: a 400 KB BPE-512 dataset)."""
    def _make(source: str = "stdlib", tokenizer: str = "bpe", **kw) -> Path:
        if tokenizer == "bpe":
            kw = {**SMALL, **kw}
        out = tmp_path_factory.mktemp("data") / f"{source}_{tokenizer}"
        prepare(source, tokenizer, out, log=quiet, **kw)
        return out
    return _make


def split_docs(data_dir: Path, split: str) -> list[str]:
    """Decode a split's stream back into documents (cut at end-of-document ids)."""
    s = open_split(data_dir, split)
    tok = load_tokenizer(data_dir)
    ids = s.read(0, s.n_tokens)
    assert ids[-1] == s.eod_id
    ends = np.flatnonzero(ids == s.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)]
