"""Start-up that scales: shards verified once per manifest (a changed shard still caught), a window order
computed per sample (a bijection, keyed by seed and epoch, no per-epoch index), rank 0's reads broadcast."""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import write_manifest
from data_prep.reader import DataError, load_manifest, open_split
from data_prep.shards import ShardWriter
from data_prep.verify import VERIFIED_NAME, verify_data_dir
from train.data import TrainBatches, WindowOrder

VOCAB = 300


def make_data_dir(out: Path, shards: int = 3, shard_tokens: int = 5000, seed: int = 0) -> Path:
    """A data dir in the real writer's format (ShardWriter shards, write_manifest), random uint16 ids."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", shards * shard_tokens), ("val", shard_tokens + 17)):
        w = ShardWriter(out, name, np.uint16, shard_tokens)
        w.add(rng.integers(0, VOCAB, n).astype(np.uint16))
        splits[name] = {"n_docs": 1, "n_tokens": n, "n_bytes": n, "shards": w.close()}
    write_manifest(out, {"version": 1, "source": {"kind": "synthetic"},
                         "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "vocab_size": VOCAB, "eod_id": 0},
                         "dtype": "uint16", "byte_order": "little", "splits": splits})
    return out


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_data_dir(tmp_path / "d")


def _verify(d: Path):
    return verify_data_dir(d, load_manifest(d))


def test_second_verification_reads_nothing_and_the_record_is_manifest_keyed(data):
    first = _verify(data)
    assert (first.hashed, first.cached, first.record_written) == (5, 0, True)
    assert first.bytes_read == sum(p.stat().st_size for p in data.glob("*.bin"))
    again = _verify(data)
    assert (again.hashed, again.cached, again.bytes_read) == (0, 5, 0)
    assert "all 5 unchanged" in again.line()
    m = load_manifest(data)  # a rebuilt data dir (new manifest): the old record vouches for nothing
    m["created_at"] = "later"
    write_manifest(data, m)
    assert _verify(data).hashed == 5


def test_changed_truncated_or_missing_shards_are_caught_despite_the_record(data):
    _verify(data)
    shard = data / "train_00001.bin"
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[11] ^= 0x01  # same size; the mtime put back as it was: the ctime still moved
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match=f"{shard}.*checksum"):
        _verify(data)
    raw[11] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert _verify(data).hashed == 1  # only the rewritten shard is read again
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match=f"{shard} is truncated"):
        _verify(data)
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard} is missing"):
        _verify(data)


def test_out_of_vocabulary_ids_and_a_damaged_record(data):
    m = load_manifest(data)
    m["tokenizer"]["vocab_size"] = 10  # the shards hold ids up to VOCAB - 1
    write_manifest(data, m)
    with pytest.raises(DataError, match="token id .* >= vocab_size 10"):
        _verify(data)
    (data / VERIFIED_NAME).write_text("{not json")
    m["tokenizer"]["vocab_size"] = VOCAB
    write_manifest(data, m)
    assert _verify(data).hashed == 5  # an unreadable record is ignored, then rewritten
    assert json.loads((data / VERIFIED_NAME).read_text())["shards"].keys() == {p.name for p in data.glob("*.bin")}


def test_open_without_verify_still_checks_sizes(data):
    manifest = load_manifest(data)
    s = open_split(data, "train", verify=False, manifest=manifest)
    assert s.n_tokens == manifest["splits"]["train"]["n_tokens"]
    (data / "train_00002.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="truncated"):
        open_split(data, "train", verify=False, manifest=manifest)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 1000, 4099, 65536, 100_003])
def test_window_order_is_a_bijection(n):
    ids = WindowOrder(n, seed=7, epoch=2)(np.arange(n))
    assert ids.dtype == np.int64 and np.array_equal(np.sort(ids), np.arange(n))


def test_window_order_is_keyed_and_shuffles():
    n = 100_000
    base = WindowOrder(n, 0, 0)(np.arange(n))
    assert np.array_equal(base, WindowOrder(n, 0, 0)(np.arange(n)))  # pure
    for other in (WindowOrder(n, 1, 0), WindowOrder(n, 0, 1)):
        assert np.mean(other(np.arange(n)) == base) < 1e-3
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.02  # no trace of the file order
    assert np.mean(np.diff(base) == 1) < 1e-3
    assert np.array_equal(WindowOrder(n, 0, 0)(np.array([5, 99_999, 0])), base[[5, 99_999, 0]])


def test_window_order_needs_no_index_over_the_epoch():
    """10**12 windows (a 4-PB corpus at seq 4096): a step's ids cost microseconds and no memory per window."""
    tracemalloc.start()
    ids = WindowOrder(10**12, 3, 0)(np.arange(10**12 - 256, 10**12))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20 and len(np.unique(ids)) == 256 and ids.max() < 10**12


class HugeSplit:
    n_tokens = 10**13


def test_batches_over_a_huge_split_and_across_an_epoch_boundary():
    b = TrainBatches(HugeSplit(), 4096, 4, 64, rank=3, world_size=8, seed=1)
    w = b.window_ids(10**6, 1)
    assert w.shape == (4,) and np.array_equal(w, TrainBatches(HugeSplit(), 4096, 4, 64, 3, 8, 1).window_ids(10**6, 1))

    class Small:
        n_tokens = 10 * 16 + 1  # 10 windows of 16: the step of 8 sequences at sample 8 spans epochs 0 and 1

    s = TrainBatches(Small(), 16, 8, 8, 0, 1, seed=5)
    ids = s.window_ids(1, 0)
    assert np.array_equal(ids[:2], WindowOrder(10, 5, 0)(np.arange(8, 10)))
    assert np.array_equal(ids[2:], WindowOrder(10, 5, 1)(np.arange(0, 6)))
