"""Writing a split's token stream as fixed-size raw little-endian binary shards.

Shard ``i`` of split ``s`` is ``{s}_{i:05d}.bin``: exactly ``shard_tokens`` tokens (the last one
fewer), no header. Each shard is written to ``<name>.tmp``, fsynced, then renamed, so a shard
file under its final name is always complete; its SHA-256 is computed while writing.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.bin(\.tmp)?$")


def shard_file_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


class ShardWriter:
    """Accumulates tokens of one split and writes full shards as they fill.

    ``add`` takes arrays of the writer's dtype; ``close`` writes the remainder and returns the
    manifest entries ``[{file, n_tokens, sha256}]`` in stream order."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir, self.split = Path(out_dir), split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self.n_tokens = 0
        self._closed = False

    def add(self, tokens: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError(f"shard writer for {self.split} is closed")
        if tokens.dtype.kind != "u" or tokens.dtype.itemsize != self.dtype.itemsize:
            raise ValueError(f"expected {self.dtype} tokens, got {tokens.dtype}")
        if tokens.size == 0:
            return
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._n_pending += tokens.size
        self.n_tokens += tokens.size
        while self._n_pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if not self._closed:
            if self._n_pending:
                self._flush(self._n_pending)
            self._closed = True
        return list(self.shards)

    def _flush(self, n: int) -> None:
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = buf[:n], buf[n:]
        self._pending = [rest] if rest.size else []
        self._n_pending = int(rest.size)
        name = shard_file_name(self.split, len(self.shards))
        data = np.ascontiguousarray(shard).tobytes()
        write_atomic(self.out_dir / name, data)
        self.shards.append({"file": name, "n_tokens": int(shard.size),
                            "sha256": hashlib.sha256(data).hexdigest()})


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name, fsync, and rename (all or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
