"""Engram conditional memory: tokenizer compression, multi-head n-gram hashing (bit-compatible with
the public reference), hashed tables with context-aware gating, table sizing and sharding. Names
are imported lazily: :mod:`memory.config` stays torch-free."""
from core.lazy import lazy_exports

_EXPORTS = {"EngramConfig": "core.engram_config", "build_memory": "memory.build", "shard_tables": "memory.build",
            "Engram": "memory.engram", "EngramIndexer": "memory.indexer", "NgramHasher": "memory.hashing",
            "solve_table_sizes": "memory.sizing", "table_params_for": "memory.sizing"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
