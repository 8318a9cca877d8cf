"""Tests of data_prep: dedup/split, shards, manifest, reader, CLI (sources and tokenizers:
test_data_sources.py).

Small real corpora only (a few hundred KB of this machine's stdlib, BPE with 300-512 ids).
``make_data`` is a reusable fixture factory: ``make_data(source, tokenizer, **prepare_kwargs)``.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_utils import SMALL, make_data, quiet, split_docs  # noqa: F401  (make_data: a fixture)
from data_prep.corpus import Corpus, split_of, text_digest
from data_prep.prepare import prepare
from data_prep.reader import DataError, load_manifest, load_tokenizer, open_split
from data_prep.sources import StdlibSource
from data_prep.tokenization import BPE_EOD

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(make_data) -> Path:
    """Stdlib, 400 KB, BPE-512, 10k-token shards (so both splits span several shards)."""
    return make_data()


@pytest.fixture
def small_copy(small, tmp_path) -> Path:
    """A private copy of ``small`` that a test may damage."""
    return Path(shutil.copytree(small, tmp_path / "copy"))


# ---- preparation -----------------------------------------------------------------------------
def test_manifest_counts_equal_shard_sizes_and_checksums(small):
    m = load_manifest(small)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 512
    assert m["splits"]["train"]["n_docs"] + m["splits"]["val"]["n_docs"] == m["dedup"]["n_kept"]
    for name, entry in m["splits"].items():
        assert len(entry["shards"]) >= 2, name  # the fixture is meant to span shards
        assert sum(s["n_tokens"] for s in entry["shards"]) == entry["n_tokens"]
        for s in entry["shards"][:-1]:
            assert s["n_tokens"] == SMALL["shard_tokens"]
        raw = []
        for s in entry["shards"]:
            path = small / s["file"]
            assert path.stat().st_size == 2 * s["n_tokens"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
            raw.append(np.fromfile(path, dtype="<u2"))
        stream = np.concatenate(raw)
        assert int((stream == m["tokenizer"]["eod_id"]).sum()) == entry["n_docs"]
        assert stream[-1] == m["tokenizer"]["eod_id"]
        assert stream.max() < m["tokenizer"]["vocab_size"]
    assert not list(small.glob("*.tmp"))
    total_bytes = sum(e["n_bytes"] for e in m["splits"].values())
    assert total_bytes <= SMALL["max_bytes"] and m["params"]["capped"]


def test_splits_disjoint_and_equal_to_the_source_documents(small):
    tok = load_tokenizer(small)
    assert tok.encode(f"a{BPE_EOD}b", add_special_tokens=False).ids.count(0) == 0  # as encoded
    train, val = split_docs(small, "train"), split_docs(small, "val")
    h_train, h_val = {text_digest(t) for t in train}, {text_digest(t) for t in val}
    assert not h_train & h_val
    assert len(h_train) == len(train) and len(h_val) == len(val)  # no duplicates inside either
    expected = {"train": [], "val": []}
    for split, text, _ in Corpus(StdlibSource(), SMALL["val_fraction"], SMALL["seed"],
                                 SMALL["max_bytes"]).documents():
        expected[split].append(text)
    assert train == expected["train"]  # exact text, source order
    assert sorted(val) == sorted(expected["val"])  # exact text, hash order
    assert all(split_of(text_digest(t), SMALL["seed"], SMALL["val_fraction"]) == "val" for t in val)


def test_duplicates_and_empty_documents_removed(make_data, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    unique = [f"document number {i} with some words " * 3 for i in range(40)]
    (inp / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in unique), "utf-8")
    dupes = unique[:7] + [unique[3], "", "   \n"]
    (inp / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in dupes), "utf-8")
    d = make_data("files", inputs=[inp], vocab_size=300, val_fraction=0.25)
    m = load_manifest(d)
    assert m["dedup"] == {**m["dedup"], "n_read": 50, "n_empty": 2, "n_duplicates": 8, "n_kept": 40}
    got = split_docs(d, "train") + split_docs(d, "val")
    assert sorted(got) == sorted(unique)


def test_parquet_and_jsonl_end_to_end(make_data, tmp_path):
    a = [f"jsonl line {i}: the quick brown fox" for i in range(30)]
    b = [f"parquet row {i}: jumps over the lazy dog" for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"t": x}) + "\n" for x in a), "utf-8")
    pq.write_table(pa.table({"t": b}), tmp_path / "b.parquet")
    d = make_data("files", inputs=[tmp_path / "a.jsonl", tmp_path / "b.parquet"], text_field="t",
                  vocab_size=300, val_fraction=0.2)
    assert sorted(split_docs(d, "train") + split_docs(d, "val")) == sorted(a + b)
    assert load_manifest(d)["source"]["n_files"] == 2


def test_preparation_is_deterministic(make_data, small):
    again = make_data()
    m1, m2 = load_manifest(small), load_manifest(again)
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    assert m1["splits"] == m2["splits"]


def test_split_assignment_is_a_seeded_function_of_the_text():
    digests = [text_digest(f"doc {i}") for i in range(20_000)]
    a = [split_of(h, 0, 0.05) for h in digests]
    frac = a.count("val") / len(a)
    assert abs(frac - 0.05) < 4 * (0.05 * 0.95 / len(a)) ** 0.5
    assert a == [split_of(h, 0, 0.05) for h in digests]
    assert a != [split_of(h, 1, 0.05) for h in digests]
    assert all(split_of(h, 0, 0.0) == "train" for h in digests[:100])


def test_too_small_for_a_validation_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("only one document", "utf-8")
    with pytest.raises(ValueError, match="no document fell in the validation split"):
        prepare("files", "bpe", tmp_path / "out", inputs=[tmp_path / "one.txt"], vocab_size=300,
                val_fraction=0.01, log=quiet)
    assert not (tmp_path / "out").exists()  # a failed build leaves nothing behind


# ---- reader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_read_across_shard_boundaries_equals_concatenation(small, split):
    s = open_split(small, split)
    stream = np.concatenate([np.fromfile(p, dtype="<u2") for p in s.shard_paths]).astype(np.int64)
    assert s.n_tokens == len(s) == stream.size and s.dtype == np.uint16
    b = SMALL["shard_tokens"]
    for start, length in [(b - 5, 10), (b - 1, 2), (b, 3), (0, s.n_tokens), (b - 3, b + 7),
                          (s.n_tokens - 4, 4), (s.n_tokens, 0)]:
        got = s.read(start, length)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, stream[start:start + length])
    rng = np.random.default_rng(0)
    for start in rng.integers(0, s.n_tokens - 300, size=200):
        np.testing.assert_array_equal(s.read(int(start), 257), stream[start:start + 257])
    for start, length in [(-1, 2), (s.n_tokens - 1, 2), (0, s.n_tokens + 1)]:
        with pytest.raises(DataError, match=f"out of range .*{small}"):
            s.read(start, length)


def test_token_split_pickles_without_copying_and_reads_the_same(small):
    s = open_split(small, "train")
    blob = pickle.dumps(s)
    assert len(blob) < 10_000
    t = pickle.loads(blob)
    np.testing.assert_array_equal(t.read(5, 30_000), s.read(5, 30_000))


def _one_line_error(fn, *needles) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


def test_errors_name_the_problem_and_path(small_copy, tmp_path):
    d = small_copy
    m = load_manifest(d)
    shard0 = d / m["splits"]["train"]["shards"][0]["file"]
    val1 = d / m["splits"]["val"]["shards"][1]["file"]

    missing = tmp_path / "no_such_dir"
    msg = _one_line_error(lambda: open_split(missing, "train"), missing, "make data")
    assert "python -m data_prep.prepare" in msg
    _one_line_error(lambda: open_split(d, "test"), d, "no split 'test'")

    # flipped byte: same size, caught by the checksum only when verifying
    raw = bytearray(shard0.read_bytes())
    raw[101] ^= 0x01
    shard0.write_bytes(bytes(raw))
    _one_line_error(lambda: open_split(d, "train"), shard0, "checksum")
    assert open_split(d, "train", verify=False).n_tokens == m["splits"]["train"]["n_tokens"]

    # truncated shard: caught with or without verification
    val1.write_bytes(val1.read_bytes()[:-2])
    for verify in (True, False):
        _one_line_error(lambda: open_split(d, "val", verify=verify), val1, "truncated")

    val1.unlink()
    _one_line_error(lambda: open_split(d, "val"), val1, "missing")

    (d / "tokenizer.json").unlink()
    _one_line_error(lambda: load_tokenizer(d), d / "tokenizer.json", "missing")

    (d / "manifest.json").write_text("{not json", "utf-8")
    _one_line_error(lambda: load_manifest(d), d / "manifest.json", "not valid JSON")
    (d / "manifest.json").unlink()
    _one_line_error(lambda: open_split(d, "train"), d / "manifest.json", "missing")


def test_inconsistent_manifest_is_rejected(small_copy):
    path = small_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["splits"]["train"]["n_tokens"] += 1
    path.write_text(json.dumps(m))
    _one_line_error(lambda: open_split(small_copy, "train"), path, "shards sum to")


# ---- CLI -------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.prepare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_summary_refuses_overwrite_and_force_rebuilds(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"text number {i} " * 5}) + "\n" for i in range(60)),
                   "utf-8")
    out = tmp_path / "out"
    args = ["--source", "files", "--inputs", str(src), "--tokenizer", "bpe", "--vocab-size", "300",
            "--val-fraction", "0.2", "--out", str(out)]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert "60 docs kept" in r.stdout and "bytes/token" in r.stdout
    (out / "notes.txt").write_text("mine", "utf-8")
    before = (out / "manifest.json").read_bytes()

    r = _cli(*args)
    assert r.returncode == 2 and "--force" in r.stderr and str(out) in r.stderr
    assert (out / "manifest.json").read_bytes() == before

    r = _cli(*args, "--seed", "3", "--force")
    assert r.returncode == 0, r.stderr
    assert load_manifest(out)["params"]["seed"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # foreign files are never touched

    # an interrupted build (no manifest) is not reused silently either
    (out / "manifest.json").unlink()
    (out / "train_00007.bin").write_bytes(b"stale")
    r = _cli(*args)
    assert r.returncode == 2 and "not empty" in r.stderr and str(out) in r.stderr
    r = _cli(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "train_00007.bin").exists() and (out / "notes.txt").exists()
    assert open_split(out, "train").n_tokens > 0

    r = _cli("--source", "stdlib", "--inputs", str(src), "--tokenizer", "bpe", "--out",
             str(tmp_path / "o2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--inputs is not used" in r.stderr
