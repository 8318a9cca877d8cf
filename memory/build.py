"""``build_memory``: the Engram indexer and per-layer modules of a backbone config."""
from __future__ import annotations

import math
from torch import nn

from memory.compression import find_pad_id, identity_compression, load_compression
from memory.config import EngramConfig
from memory.engram import Engram
from memory.hashing import NgramHasher
from memory.indexer import EngramIndexer
from memory.sizing import resolve_base_sizes


def build_memory(cfg: EngramConfig, model_cfg) -> tuple[nn.Module, dict[int, nn.Module]]:
    """``(indexer, {layer_id: Engram})`` for ``model_cfg`` (a models.ModelConfig).

    The indexer maps raw ids [B, T] to ``{layer_id: hash ids}``; ``Engram(h, ids)`` returns the
    delta the backbone adds to its residual stream before attention.
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
    else:
        comp = load_compression(cfg.tokenizer)
        derived_pad = find_pad_id(cfg.tokenizer) or 0
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
