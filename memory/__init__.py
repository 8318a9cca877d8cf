"""Engram conditional memory: tokenizer compression, multi-head n-gram hashing (bit-compatible with
the public reference), hashed tables with context-aware gating, and table sizing."""
from memory.build import build_memory, shard_tables
from memory.config import EngramConfig
from memory.engram import Engram
from memory.hashing import NgramHasher
from memory.indexer import EngramIndexer
from memory.sizing import solve_table_sizes, table_params_for

__all__ = ["EngramConfig", "build_memory", "Engram", "EngramIndexer", "NgramHasher",
           "solve_table_sizes", "table_params_for", "shard_tables"]
