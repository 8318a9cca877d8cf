"""Prepare a tokenized data dir: source -> dedup/cap/split -> tokenizer -> shards -> manifest.

    python -m data_prep.prepare --source stdlib --tokenizer bpe --vocab-size 8192 \\
        --max-bytes 12000000 --out data/stdlib_bpe8k

Streaming in two passes over the (deterministic) source when a BPE is trained on the train
split, one pass otherwise. Train documents are written in source order (the trainer samples
windows at random). Validation documents are buffered and written in the pseudo-random order
of their hash, so any prefix of the validation stream (the trainer evaluates on the first
``eval_tokens``) is a uniform sample of validation documents.

Safety: nothing is overwritten without ``--force``: ``--out`` must be absent or empty. With
``--force`` an existing manifest is removed first (the dir turns incomplete before any other
file changes), then this tool's own files (shards, tokenizer.json, temporaries) are replaced;
files of other names in the output dir are never touched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep.corpus import SPLITS, Corpus
from data_prep.manifest import MANIFEST_NAME, MANIFEST_VERSION, TOKENIZER_NAME, write_manifest
from data_prep.shards import SHARD_NAME, ShardWriter, write_atomic
from data_prep.sources import SOURCE_KINDS, build_source
from data_prep.tokenization import (TOKENIZER_KINDS, build_tokenizer, dtype_for_vocab, tokenizer_id,
                                    encode_documents)

DEFAULT_SHARD_TOKENS = 50_000_000  # 100 MB per shard at uint16
BATCH_BYTES = 4 << 20  # text handed to one parallel encode_batch call
BATCH_DOCS = 4096


def _is_ours(name: str) -> bool:
    return bool(SHARD_NAME.match(name)) or name in (
        TOKENIZER_NAME, TOKENIZER_NAME + ".tmp", MANIFEST_NAME, MANIFEST_NAME + ".tmp")


def _prepare_out_dir(out: Path, force: bool) -> None:
    """Create ``out``, or make an existing one ready for a rebuild. Without ``force`` only an
    absent or empty folder is used; with ``force`` the manifest goes first (the dir turns
    incomplete before anything else changes), then this tool's own files; others stay."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    manifest = out / MANIFEST_NAME
    if out.is_dir() and not force:
        if manifest.exists():
            raise FileExistsError(f"{out} already holds a complete data dir ({manifest}); "
                                  f"pass --force to rebuild it")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty but has no {MANIFEST_NAME} (an interrupted "
                                  f"build?); pass --force to build there (only this tool's files "
                                  f"are replaced)")
    if manifest.exists():
        manifest.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file() and _is_ours(f.name):
            f.unlink()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prepare(source_kind: str, tokenizer_kind: str, out: str | Path, *, inputs=(),
            text_field: str = "text", split_paragraphs: bool = False, hf_split: str = "train",
            wiki_langs=("en-us",), vocab_size: Optional[int] = None, min_frequency: int = 2,
            val_fraction: float = 0.02, max_bytes: Optional[int] = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0, force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Build the data dir ``out`` and return its manifest (see ``data_prep.manifest``)."""
    t0 = time.perf_counter()
    out = Path(out)
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer {tokenizer_kind!r} "
                         f"(expected one of {', '.join(TOKENIZER_KINDS)})")
    if tokenizer_kind == "deepseek" and vocab_size is not None:
        raise ValueError("--vocab-size applies to --tokenizer bpe only (DeepSeek's is fixed)")
    vocab_size = 8192 if vocab_size is None else vocab_size
    if shard_tokens <= 0:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    source = build_source(source_kind, inputs, text_field=text_field,
                          split_paragraphs=split_paragraphs, hf_split=hf_split,
                          wiki_langs=wiki_langs)
    corpus = Corpus(source, val_fraction=val_fraction, seed=seed, max_bytes=max_bytes)
    created = not out.exists()
    _prepare_out_dir(out, force)
    try:
        manifest = _build(out, source, corpus, tokenizer_kind, vocab_size, min_frequency,
                          shard_tokens, log)
    except BaseException:  # leave no half-built dir behind: remove what this run wrote
        for f in out.iterdir():
            if f.is_file() and _is_ours(f.name):
                f.unlink()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    manifest["params"] = {
        "source": source_kind, "inputs": [str(p) for p in inputs], "text_field": text_field,
        "split_paragraphs": split_paragraphs, "tokenizer": tokenizer_kind,
        "vocab_size_requested": vocab_size if tokenizer_kind == "bpe" else None,
        "min_frequency": min_frequency if tokenizer_kind == "bpe" else None,
        "val_fraction": val_fraction, "max_bytes": max_bytes, "capped": corpus.stats.capped,
        "shard_tokens": shard_tokens, "seed": seed,
        "tokenizer_trained_on": "train split" if tokenizer_kind == "bpe" else None}
    manifest["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest["prepare_time_s"] = round(time.perf_counter() - t0, 3)
    write_manifest(out, manifest)  # last: from here on the dir is complete
    log(summary(out, manifest))
    return manifest


def _too_few_documents_hint(source: dict) -> str:
    """The fix for a corpus of few documents: a few big text files are split at blank lines with
    --split-paragraphs (a book as one file is one document, so it cannot be split into train and val)."""
    if source.get("kind") == "files" and not source.get("split_paragraphs"):
        return (": each input file is one document; pass --split-paragraphs to make each paragraph a "
                "document (or raise --val-fraction, or add files)")
    return ": raise --val-fraction or the corpus size"


def _check_stats(stats, val_fraction: float, source: dict) -> None:
    source_kind = source.get("kind")
    if stats.n_kept == 0:
        raise ValueError(f"source {source_kind} yielded no usable documents "
                         f"({stats.n_read} read, {stats.n_empty} empty, "
                         f"{stats.n_duplicates} duplicates)")
    if val_fraction > 0 and stats.docs["val"] == 0:
        raise ValueError(f"no document fell in the validation split ({stats.n_kept} documents, "
                         f"val_fraction={val_fraction}){_too_few_documents_hint(source)}")
    if stats.docs["train"] == 0:
        raise ValueError(f"no document fell in the train split ({stats.n_kept} documents, "
                         f"val_fraction={val_fraction}){_too_few_documents_hint(source)}")


def _build(out: Path, source, corpus: Corpus, tokenizer_kind: str, vocab_size: int,
           min_frequency: int, shard_tokens: int, log: Callable[[str], None]) -> dict:
    """Tokenizer, shards and tokenizer.json in ``out``; returns the manifest without params."""
    described = source.describe()
    t0 = time.perf_counter()
    spec, first_pass = _tokenizer(out, corpus, tokenizer_kind, vocab_size, min_frequency, described, log)
    t_tok, t0 = time.perf_counter() - t0, time.perf_counter()
    writers, shards = _encode(out, corpus, spec, shard_tokens, first_pass, described)
    t_enc = time.perf_counter() - t0
    stats, tok_path = corpus.stats, out / TOKENIZER_NAME
    return {  # the manifest, written last by the caller
        "version": MANIFEST_VERSION,
        "source": source.describe(),
        "tokenizer": {"kind": spec.kind, "file": TOKENIZER_NAME, "vocab_size": spec.vocab_size,
                      "eod_id": spec.eod_id, "eod_token": spec.eod_token,
                      "sha256": _sha256(tok_path), "id": tokenizer_id(spec.tokenizer)},
        "dtype": dtype_for_vocab(spec.vocab_size).name,
        "byte_order": "little",
        "splits": {s: {"n_docs": stats.docs[s], "n_tokens": writers[s].n_tokens,
                       "n_bytes": stats.bytes[s], "shards": shards[s]} for s in SPLITS},
        "dedup": {"method": "sha256 of the UTF-8 text; first occurrence kept",
                  "n_read": stats.n_read, "n_empty": stats.n_empty,
                  "n_duplicates": stats.n_duplicates, "n_kept": stats.n_kept},
        "timings_s": {"tokenizer": round(t_tok, 3), "encode_and_write": round(t_enc, 3)},
    }


def _tokenizer(out: Path, corpus: Corpus, tokenizer_kind: str, vocab_size: int, min_frequency: int,
               described: dict, log: Callable[[str], None]):
    """Train (BPE, on the train split) or load the tokenizer and write tokenizer.json. Returns the spec and,
    for BPE, the corpus statistics of that first pass (checked before anything is written)."""
    train_texts = (text for split, text, _ in corpus.documents() if split == "train")
    spec = build_tokenizer(tokenizer_kind, train_texts if tokenizer_kind == "bpe" else None,
                           vocab_size=vocab_size, min_frequency=min_frequency)
    first_pass = corpus.stats.as_dict() if tokenizer_kind == "bpe" else None
    if first_pass:  # the corpus is known already: fail before writing anything
        _check_stats(corpus.stats, corpus.val_fraction, described)
    if tokenizer_kind == "bpe" and spec.vocab_size < vocab_size:
        log(f"note: the corpus supports only {spec.vocab_size} of the {vocab_size} requested "
            f"BPE ids (min_frequency={min_frequency})")
    tok_path = out / TOKENIZER_NAME
    if spec.origin is not None:
        shutil.copyfile(spec.origin, tok_path.with_name(TOKENIZER_NAME + ".tmp"))
        tok_path.with_name(TOKENIZER_NAME + ".tmp").replace(tok_path)
    else:
        write_atomic(tok_path, spec.tokenizer.to_str(pretty=True).encode("utf-8"))
    return spec, first_pass


def _encode(out: Path, corpus: Corpus, spec, shard_tokens: int, first_pass: Optional[dict], described: dict):
    """Encode every document into the train shards (stream order) and the val shards (hash order).
    Returns the split writers and their shard records."""
    dtype = dtype_for_vocab(spec.vocab_size)
    train_writer = ShardWriter(out, "train", dtype, shard_tokens)
    val_docs: list[tuple[bytes, np.ndarray]] = []  # (text digest, tokens)
    batch: dict[str, list] = {s: [] for s in SPLITS}
    batch_bytes = {s: 0 for s in SPLITS}

    def flush(split: str) -> None:
        texts = [t for t, _ in batch[split]]
        tokens, lengths = encode_documents(spec, texts, dtype)
        if split == "train":
            train_writer.add(tokens)
        else:  # keep per-document arrays to reorder them by hash
            pieces = np.split(tokens, np.cumsum(lengths)[:-1])
            val_docs.extend((digest, piece) for (_, digest), piece in zip(batch[split], pieces))
        batch[split], batch_bytes[split] = [], 0

    for split, text, digest in corpus.documents():
        batch[split].append((text, digest))
        batch_bytes[split] += len(text)
        if batch_bytes[split] >= BATCH_BYTES or len(batch[split]) >= BATCH_DOCS:
            flush(split)
    for split in SPLITS:
        if batch[split]:
            flush(split)
    _check_stats(corpus.stats, corpus.val_fraction, described)
    if first_pass and first_pass != corpus.stats.as_dict():
        raise ValueError(f"source {described['kind']} changed between the tokenizer pass and the "
                         f"encoding pass ({first_pass} vs {corpus.stats.as_dict()})")
    val_writer = ShardWriter(out, "val", dtype, shard_tokens)
    val_docs.sort(key=lambda kd: _val_order_key(kd[0], corpus.seed))
    for _, piece in val_docs:
        val_writer.add(piece)
    writers = {"train": train_writer, "val": val_writer}
    return writers, {s: w.close() for s, w in writers.items()}


def _val_order_key(digest: bytes, seed: int) -> bytes:
    """Pseudo-random but deterministic position of a validation document in its stream."""
    seed_bytes = int(seed).to_bytes(8, "little", signed=True)
    return hashlib.sha256(b"isoflop-engram/val-order/" + seed_bytes + digest).digest()


def summary(out: Path, manifest: dict) -> str:
    d, tok = manifest["dedup"], manifest["tokenizer"]
    params = manifest["params"]
    cap = f", capped at {params['max_bytes']:,} bytes" if params["capped"] else ""
    lines = [f"prepared {out} in {manifest['prepare_time_s']:.1f}s: source "
             f"{manifest['source']['kind']}, {d['n_kept']:,} docs kept of {d['n_read']:,} read "
             f"({d['n_duplicates']:,} duplicates, {d['n_empty']:,} empty removed{cap}); "
             f"tokenizer {tok['kind']} vocab {tok['vocab_size']:,} eod {tok['eod_id']}, "
             f"{manifest['dtype']}"]
    for name, s in manifest["splits"].items():
        bpt = s["n_bytes"] / s["n_tokens"] if s["n_tokens"] else float("nan")
        lines.append(f"  {name:5s} {s['n_docs']:>9,} docs {s['n_tokens']:>13,} tokens "
                     f"{bpt:6.3f} bytes/token  {len(s['shards'])} shard(s)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.prepare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=SOURCE_KINDS)
    p.add_argument("--inputs", nargs="+", default=[], metavar="PATH",
                   help="files/folders (--source files) or one dataset path (--source hf)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet or hf column")
    p.add_argument("--split-paragraphs", action="store_true",
                   help="txt files: one document per blank-line-separated paragraph")
    p.add_argument("--hf-split", default="train", help="split of a local HF dataset")
    p.add_argument("--wiki-langs", nargs="+", default=["en-us"],
                   help="languages of --source wiki (en-us es-es fr-fr, or all)")
    p.add_argument("--tokenizer", required=True, choices=TOKENIZER_KINDS)
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on kept UTF-8 text bytes")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="rebuild an existing complete data dir")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = _parser().parse_args(argv)
    try:
        prepare(a.source, a.tokenizer, a.out, inputs=a.inputs, text_field=a.text_field,
                split_paragraphs=a.split_paragraphs, hf_split=a.hf_split,
                wiki_langs=a.wiki_langs, vocab_size=a.vocab_size,
                min_frequency=a.min_frequency, val_fraction=a.val_fraction,
                max_bytes=a.max_bytes, shard_tokens=a.shard_tokens, seed=a.seed, force=a.force)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
