"""Read a prepared data dir: the API the trainer uses.

``open_split(data_dir, "train")`` returns a ``TokenSplit`` whose ``read(start, length)`` gives the
token range ``[start, start + length)`` of the split's concatenated token stream as int64,
crossing shard boundaries as needed. Shards are memory-mapped once, at open. Every problem
with the data dir raises ``DataError`` with a one-line message naming the path.
"""
from __future__ import annotations

import json
from bisect import bisect_right
from operator import index
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.manifest import MANIFEST_NAME, schema_problem
from data_prep.verify import DataError, check_shard, check_size

PREPARE_HINT = "python -m data_prep.prepare --source stdlib --tokenizer bpe --out"


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist: run `make data` or "
                        f"{PREPARE_HINT} {data_dir}")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"manifest {path} is missing: {data_dir} is not a complete data dir "
                        f"(interrupted preparation?); rebuild it with {PREPARE_HINT} {data_dir} "
                        f"--force")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} is not valid JSON: {e}") from None
    problem = schema_problem(manifest)
    if problem:
        raise DataError(f"manifest {path} {problem}")
    return manifest


def load_tokenizer(data_dir: str | Path):
    """The ``tokenizers.Tokenizer`` the data dir was encoded with, set up as during encoding
    (``encode_special_tokens``: the literal text of a special token encodes as plain text)."""
    from tokenizers import Tokenizer

    data_dir = Path(data_dir)
    path = data_dir / load_manifest(data_dir)["tokenizer"]["file"]
    if not path.is_file():
        raise DataError(f"tokenizer file {path} is missing")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {path} cannot be loaded: {first_line}") from None
    tok.encode_special_tokens = True
    return tok


def data_tokenizer_id(data_dir: str | Path, manifest: Optional[dict] = None) -> str:
    """The tokenizer id (:func:`data_prep.tokenization.tokenizer_id`) the manifest records, or, for a
    data dir prepared before manifests recorded one, the id of its tokenizer.json."""
    recorded = (manifest or load_manifest(data_dir))["tokenizer"].get("id")
    if isinstance(recorded, str) and recorded:
        return recorded
    from data_prep.tokenization import tokenizer_id

    return tokenizer_id(load_tokenizer(data_dir))


class TokenSplit:
    """One split of a data dir as a random-access token stream.

    Attributes: ``n_tokens``, ``n_docs``, ``vocab_size``, ``eod_id``, ``dtype`` (numpy dtype of
    the shards), ``name``, ``data_dir``, ``shard_paths``."""

    def __init__(self, data_dir: str | Path, name: str, verify: bool = True, manifest: Optional[dict] = None):
        self.data_dir, self.name, self.verify = Path(data_dir), name, verify
        manifest = manifest if manifest is not None else load_manifest(self.data_dir)
        splits = manifest["splits"]
        if name not in splits:
            raise DataError(f"data dir {self.data_dir} has no split {name!r} "
                            f"(splits: {sorted(splits)})")
        entry, tok = splits[name], manifest["tokenizer"]
        self.vocab_size, self.eod_id = tok["vocab_size"], tok["eod_id"]
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.n_tokens, self.n_docs = entry["n_tokens"], entry.get("n_docs")
        self.shard_paths = [self.data_dir / s["file"] for s in entry["shards"]]
        self._check_shards(entry["shards"])
        self._open()

    def _check_shards(self, shards: list[dict]) -> None:
        """Sizes always (cheap); checksums and id ranges when ``verify`` (a full read of every shard)."""
        for path, shard in zip(self.shard_paths, shards):
            check_size(path, shard["n_tokens"], self.dtype)
        if self.verify:
            for path, shard in zip(self.shard_paths, shards):
                check_shard(path, shard["sha256"], self.dtype, self.vocab_size)

    def _open(self) -> None:
        self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.shard_paths]
        self._starts = [0]
        for m in self._maps:
            self._starts.append(self._starts[-1] + len(m))

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"TokenSplit({str(self.data_dir)!r}, {self.name!r}, n_tokens={self.n_tokens}, "
                f"shards={len(self._maps)}, dtype={self.dtype.name})")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split's stream, as a new int64 array."""
        start, length = index(start), index(length)
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise DataError(f"read [{start}, {start + length}) is out of range for split "
                            f"{self.name!r} of {self.data_dir} ({self.n_tokens} tokens)")
        out = np.empty(length, dtype=np.int64)
        i = bisect_right(self._starts, start) - 1
        pos, filled = start, 0
        while filled < length:
            offset = pos - self._starts[i]
            take = min(length - filled, len(self._maps[i]) - offset)
            out[filled:filled + take] = self._maps[i][offset:offset + take]
            filled += take
            pos += take
            i += 1
        return out

    # memmaps are not pickled (that would copy the data): reopen on unpickle
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_maps"], state["_starts"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()


def open_split(data_dir: str | Path, split: str, verify: bool = True, manifest: Optional[dict] = None) -> TokenSplit:
    """Open ``split`` of ``data_dir``. ``verify`` checks each shard's SHA-256 and id range (a full read; the
    trainer verifies once per manifest with :func:`data_prep.verify.verify_data_dir` and opens with
    ``verify=False``); ``manifest`` is the already loaded manifest (read once per start)."""
    return TokenSplit(data_dir, split, verify=verify, manifest=manifest)
