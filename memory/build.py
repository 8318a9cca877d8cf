"""``build_memory``: the Engram indexer and per-layer modules of a backbone config."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn

from memory.compression import find_pad_id, identity_compression, load_compression
from memory.config import EngramConfig
from memory.engram import Engram
from memory.hashing import NgramHasher
from memory.indexer import EngramIndexer
from memory.layers import MultiHeadTable
from memory.sharded import TableShard
from memory.sizing import resolve_base_sizes

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def build_memory(cfg: EngramConfig, model_cfg, tokenizer: Union[Tokenizer, str, os.PathLike, None] = None
                 ) -> tuple[nn.Module, dict[int, nn.Module]]:
    """``(indexer, {layer_id: Engram})`` for ``model_cfg`` (a models.ModelConfig, read by field name:
    memory does not import models).

    The indexer maps raw ids [B, T] to ``{layer_id: hash ids}``; ``Engram(h, ids)`` returns the
    delta the backbone adds to its residual stream before attention. ``tokenizer``: what
    ``engram.tokenizer`` names, resolved by the caller (a ``tokenizers.Tokenizer`` or a tokenizer.json
    path; assembly.build_model resolves names like 'deepseek'); unused when ``engram.tokenizer`` is
    None (identity compression).
    """
    n_branches = getattr(model_cfg, "n_branches", 1)
    if cfg.n_branches not in (None, n_branches):
        raise ValueError(f"engram.n_branches={cfg.n_branches} disagrees with model.n_branches={n_branches}")
    bad = [l for l in cfg.layer_ids if l >= model_cfg.n_layers]
    if bad:
        raise ValueError(f"engram.layer_ids {bad} outside the model's layers 0..{model_cfg.n_layers - 1}")
    if cfg.tokenizer is None:
        comp = identity_compression(model_cfg.vocab_size)
        derived_pad = 0
    elif tokenizer is None:
        raise ValueError(f"engram.tokenizer={cfg.tokenizer!r} but no tokenizer was handed to build_memory "
                         f"(build the model with assembly.build_model, which resolves it)")
    else:
        comp = load_compression(tokenizer)
        derived_pad = find_pad_id(tokenizer) or 0
    lookup = comp.lookup_for(model_cfg.vocab_size)
    raw_pad = cfg.pad_id if cfg.pad_id is not None else derived_pad
    if raw_pad >= len(lookup):
        raise ValueError(f"engram.pad_id={raw_pad} outside the vocabulary [0, {len(lookup)})")
    hasher = NgramHasher(comp.num_canonical, cfg.max_ngram, cfg.heads_per_ngram, resolve_base_sizes(cfg),
                         cfg.layer_ids, int(lookup[raw_pad]), cfg.seed)
    indexer = EngramIndexer(lookup, hasher)
    out_std = model_cfg.init_std / math.sqrt(2 * model_cfg.n_layers)
    layers = {
        l: Engram(l, hasher.table_sizes[l], cfg.embed_dim_per_ngram, model_cfg.d_model,
                  n_branches=n_branches, kernel_size=cfg.kernel_size, norm_eps=model_cfg.norm_eps,
                  init_std=model_cfg.init_std, out_std=out_std)
        for l in cfg.layer_ids
    }
    return indexer, layers


def shard_tables(model: nn.Module, rank: int, world: int, group=None,
                 device: Optional[torch.device] = None) -> dict[str, TableShard]:
    """Shard every Engram table of ``model`` over ``world`` ranks (memory/sharded.py); returns this rank's
    shards by the parameter name the table had (``layers.1.memory.tables.weight``), in module order."""
    return {f"{name}.weight": m.shard_(rank, world, group, device)
            for name, m in model.named_modules() if isinstance(m, MultiHeadTable)}
