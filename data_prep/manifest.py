"""The data-dir manifest: its name, format version, atomic write, and schema check.

``manifest.json`` is written last, atomically: a data dir is complete exactly when it has one.
Layout (version 1)::

    {"version": 1,
     "source": {"kind": ..., ...},                      # what the text came from
     "tokenizer": {"kind": "bpe"|"deepseek", "file": "tokenizer.json", "vocab_size": int,
                   "eod_id": int, "eod_token": str, "sha256": str,
                   "id": "sha256-..."},                 # tokenization.tokenizer_id: what the ids mean
     "dtype": "uint16"|"uint32", "byte_order": "little",
     "splits": {"train"|"val": {"n_docs", "n_tokens", "n_bytes",
                                "shards": [{"file", "n_tokens", "sha256"}]}},
     "dedup": {"method", "n_read", "n_empty", "n_duplicates", "n_kept"},
     "params": {...creation parameters...}, "created_at": ISO-8601 UTC, "prepare_time_s": float}

``n_tokens`` counts every token including one end-of-document id per document; ``n_bytes`` is
the UTF-8 size of the split's text (bytes per token = n_bytes / n_tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.shards import write_atomic

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_VERSION = 1
DTYPES = ("uint16", "uint32")


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    return path


def schema_problem(manifest: dict) -> str | None:
    """A one-line description of the first structural problem, or None if well formed."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"has version {manifest.get('version')!r}, expected {MANIFEST_VERSION}"
    for key in ("tokenizer", "dtype", "splits"):
        if key not in manifest:
            return f"has no {key!r} entry"
    tok = manifest["tokenizer"]
    for key, typ in (("kind", str), ("file", str), ("vocab_size", int), ("eod_id", int)):
        if not isinstance(tok.get(key), typ):
            return f"tokenizer entry has no valid {key!r}"
    if "id" in tok and not (isinstance(tok["id"], str) and tok["id"]):  # optional: older manifests lack it
        return "tokenizer entry has an invalid 'id'"
    if not 0 <= tok["eod_id"] < tok["vocab_size"]:
        return f"tokenizer eod_id {tok['eod_id']} is outside the vocabulary of {tok['vocab_size']}"
    if manifest["dtype"] not in DTYPES:
        return f"has unsupported dtype {manifest['dtype']!r} (expected one of {DTYPES})"
    if not isinstance(manifest["splits"], dict):
        return "has a malformed 'splits' entry"
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"split {name!r} has no shard list"
        if not isinstance(split.get("n_tokens"), int):
            return f"split {name!r} has no valid 'n_tokens'"
        total = 0
        for shard in split["shards"]:
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                    and isinstance(shard.get("n_tokens"), int) and shard["n_tokens"] > 0
                    and isinstance(shard.get("sha256"), str)):
                return f"split {name!r} has a malformed shard entry {shard!r}"
            if Path(shard["file"]).name != shard["file"]:
                return f"split {name!r} names a shard outside the data dir: {shard['file']!r}"
            total += shard["n_tokens"]
        if total != split["n_tokens"]:
            return f"split {name!r} has n_tokens {split['n_tokens']} but its shards sum to {total}"
    return None
