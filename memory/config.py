"""Engram configuration, re-exported: the dataclass lives in :mod:`core.engram_config` so that the
backbone's ModelConfig (models, a sibling of memory) can type its ``engram`` section without importing
memory. The memory package builds and sizes from this object."""
from core.engram_config import EngramConfig

__all__ = ["EngramConfig"]
