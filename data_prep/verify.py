"""Verify a data dir's shards once per manifest, not once per rank per start.

A full check reads every shard once: its SHA-256 against the manifest and its largest token id against
the vocabulary (one pass per shard, in chunks). A 400 GB corpus takes minutes per reader, so the result
is recorded next to the data in ``.verified.json``::

    {"manifest": <sha256 of the manifest's canonical JSON>,
     "shards": {"train_00000.bin": [size, mtime_ns, ctime_ns, inode], ...}}

A shard whose file still has the recorded size, mtime, ctime and inode under the same manifest is not
read again. Any write to a shard changes its mtime and ctime (ctime cannot be set back by ``touch``),
a truncation changes its size and a replacement its inode, so a changed shard is hashed again; a
rebuilt data dir has a new manifest and nothing of the old record applies. Sizes are checked at every
open regardless (:class:`data_prep.reader.TokenSplit`). A data dir that cannot be written (a read-only
corpus) is simply verified in full each time.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

VERIFIED_NAME = ".verified.json"
CHUNK_BYTES = 64 << 20


class DataError(Exception):
    """A data dir that is missing, incomplete, corrupt, or asked for something it lacks (re-exported by
    :mod:`data_prep.reader`)."""


@dataclass
class VerifyReport:
    """What one verification did: shards hashed vs taken from the record, bytes read, seconds."""
    hashed: int
    cached: int
    bytes_read: int
    seconds: float
    record_written: bool

    def line(self) -> str:
        if not self.hashed:
            return f"shards verified in {self.seconds:.2f} s: all {self.cached} unchanged since {VERIFIED_NAME}"
        note = "" if self.record_written else f" ({VERIFIED_NAME} not written)"
        return (f"shards verified in {self.seconds:.2f} s: {self.hashed} hashed ({self.bytes_read / 1e9:.3g} GB), "
                f"{self.cached} unchanged since {VERIFIED_NAME}{note}")


def manifest_key(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()


def file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_shard(path: Path, sha256: str, dtype: np.dtype, vocab_size: int) -> int:
    """Hash ``path`` and find its largest id in one pass; raises :class:`DataError`. Returns bytes read."""
    h, top, n = hashlib.sha256(), -1, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize):
            h.update(chunk)
            n += len(chunk)
            ids = np.frombuffer(chunk, dtype=dtype)
            if ids.size:
                top = max(top, int(ids.max()))
    if h.hexdigest() != sha256:
        raise DataError(f"shard {path} fails its checksum: sha256 differs from the manifest "
                           f"(corrupt or modified file)")
    if top >= vocab_size:
        raise DataError(f"shard {path} holds token id {top} >= vocab_size {vocab_size}")
    return n


def check_size(path: Path, n_tokens: int, dtype: np.dtype) -> None:
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    expected, size = n_tokens * dtype.itemsize, path.stat().st_size
    if size != expected:
        raise DataError(f"shard {path} is truncated or corrupt: {size} bytes, expected "
                           f"{expected} ({n_tokens} x {dtype.name})")


def _read_record(path: Path, key: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(record, dict) and record.get("manifest") == key and isinstance(record.get("shards"), dict)
    return record["shards"] if ok else {}


def _write_record(path: Path, key: str, stamps: dict) -> bool:
    """Atomic (a unique temp name, then rename): concurrent trainers on one data dir never mix records."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"manifest": key, "shards": stamps}))
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def verify_data_dir(data_dir: Path, manifest: dict, splits: Optional[list[str]] = None,
                    use_record: bool = True) -> VerifyReport:
    """Size, checksum and id range of every shard of ``splits`` (default: all), skipping those the record
    vouches for; raises :class:`DataError` naming the first bad shard."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    vocab, key = manifest["tokenizer"]["vocab_size"], manifest_key(manifest)
    record_path = data_dir / VERIFIED_NAME
    known = _read_record(record_path, key) if use_record else {}
    stamps, hashed, cached, read = dict(known), 0, 0, 0
    for name in splits or sorted(manifest["splits"]):
        for shard in manifest["splits"][name]["shards"]:
            path = data_dir / shard["file"]
            check_size(path, shard["n_tokens"], dtype)
            stamp = file_stamp(path)
            if known.get(shard["file"]) == stamp:
                cached += 1
                continue
            read += check_shard(path, shard["sha256"], dtype, vocab)
            stamps[shard["file"]] = stamp
            hashed += 1
    written = bool(use_record and hashed and _write_record(record_path, key, stamps))
    return VerifyReport(hashed, cached, read, time.perf_counter() - t0, written)
