"""Hash-id parity with the public Engram reference rule (always on: a port that drifts from it, e.g.
to int32, must fail here), plus the prime-size assignment and device handling. The reference is the
independent numpy implementation in memory/reference.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory.hashing import NgramHasher, multiplier_bound
from memory.primes import assign_table_primes, is_prime, next_prime_above
from memory.reference import reference_hash, slow_is_prime


CONFIGS = [
    # vocab, max_ngram, heads, bases, layer ids, pad, seed, B, T
    (1024, 3, 4, [3000, 3000], [1], 0, 0, 3, 40),
    (99092, 3, 8, [646400, 646400], [1, 15], 2, 0, 2, 64),  # the reference demo's shape
    (129280, 4, 2, [5003, 7001, 11003], [14, 1, 7], 7, 1234, 2, 33),  # unsorted layers keep their order
    (50, 2, 1, [17], [0], 49, 5, 4, 3),
    (7, 3, 3, [11, 13], [0, 2], 3, 99, 1, 2),  # T < max_ngram: all shifts padded
    (2 ** 31 + 11, 3, 2, [1000, 1000], [3], 5, 7, 2, 16),  # ids past int32: int64 products needed
]


@pytest.mark.parametrize("vocab,N,H,bases,layers,pad,seed,B,T", CONFIGS)
def test_hash_ids_match_reference_rule(vocab, N, H, bases, layers, pad, seed, B, T):
    rng = np.random.default_rng(vocab + seed)
    ids = rng.integers(0, vocab, size=(B, T), dtype=np.int64)
    ids[0, : min(T, 2)] = vocab - 1  # the extreme id: the largest products
    expected, primes = reference_hash(ids, vocab, N, H, bases, layers, pad, seed)
    hasher = NgramHasher(vocab, N, H, bases, layers, pad, seed)
    assert hasher.table_sizes == primes
    got = hasher(torch.from_numpy(ids))
    assert list(got) == layers
    for layer in layers:
        assert got[layer].dtype == torch.int64
        assert got[layer].shape == (B, T, (N - 1) * H)
        np.testing.assert_array_equal(got[layer].numpy(), expected[layer])
        # every id addresses its own head's table
        mods = np.array([p for order in primes[layer] for p in order])
        assert (got[layer].numpy() < mods).all() and (got[layer].numpy() >= 0).all()


def test_multiplier_bound_keeps_products_in_int64():
    for vocab in (2, 1000, 99092, 129280, 2 ** 40 + 3):
        half = multiplier_bound(vocab)
        largest = (2 * (half - 1) + 1) * (vocab - 1)
        assert largest <= np.iinfo(np.int64).max
        assert half == max(1, (np.iinfo(np.int64).max // vocab) // 2)


def test_int32_arithmetic_would_break_parity():
    """Guards the test itself: the parity check is sensitive to 32-bit truncation."""
    vocab = 99092
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, 32))
    hasher = NgramHasher(vocab, 3, 2, [1000, 1000], [1], 0, 0)
    good = hasher(torch.from_numpy(ids))[1].numpy()
    mult = hasher.multipliers[0].numpy()
    trunc = (ids * mult[0]).astype(np.int32).astype(np.int64)
    trunc ^= (np.pad(ids, ((0, 0), (1, 0)))[:, :32] * mult[1]).astype(np.int32).astype(np.int64)
    bad = np.abs(trunc) % hasher.table_sizes[1][0][0]
    assert (bad != good[..., 0]).any()


def test_hash_is_causal_and_local():
    hasher = NgramHasher(500, 3, 4, [101, 211], [0, 3], 1, 42)
    ids = torch.randint(0, 500, (2, 20))
    base = hasher(ids)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 500
    new = hasher(changed)
    for layer in (0, 3):
        assert torch.equal(new[layer][:, :10], base[layer][:, :10])  # nothing before t changes
        assert torch.equal(new[layer][:, 13:], base[layer][:, 13:])  # nothing past t + N - 1
        assert (new[layer][:, 10] != base[layer][:, 10]).any()


def test_primes_unique_in_reference_order():
    primes = assign_table_primes([100, 100], 3, [5, 2])
    flat = [p for layer in (5, 2) for order in primes[layer] for p in order]
    assert len(set(flat)) == len(flat)
    assert primes[5] == [[101, 103, 107], [109, 113, 127]]  # order 3 continues past order 2's primes
    assert primes[2] == [[131, 137, 139], [149, 151, 157]]
    assert assign_table_primes([7], 1, [0])[0] == [[7]]  # the base itself when prime


def test_is_prime_exact():
    sieve = [slow_is_prime(n) for n in range(20000)]
    assert [is_prime(n) for n in range(20000)] == sieve
    for n in (2 ** 61 - 1, 1_000_000_007, 67_280_421_310_721, 10 ** 18 + 9):
        assert is_prime(n)
    # strong pseudoprimes to several bases and Carmichael numbers
    for n in (3_215_031_751, 2_152_302_898_747, 3_474_749_660_383, 341_550_071_728_321,
              3_825_123_056_546_413_051, 561, 41041, (2 ** 31 - 1) * 1_000_000_007):
        assert not is_prime(n)
    with pytest.raises(ValueError, match="deterministic"):
        is_prime(2 ** 89 - 1)
    assert next_prime_above(100) == 101
    assert next_prime_above(100, {101, 103}) == 107


def test_bad_inputs_raise():
    h = NgramHasher(10, 2, 1, [5], [0], 0, 0)
    with pytest.raises(ValueError, match="int64"):
        h(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        h(torch.full((1, 3), 10))
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher(10, 2, 1, [5], [0], 10, 0)
    with pytest.raises(ValueError, match="base size per order"):
        NgramHasher(10, 3, 1, [5], [0], 0, 0)


def test_buffers_follow_module_and_ids_device():
    h = NgramHasher(300, 3, 2, [50, 60], [1], 0, 3)
    assert {n for n, _ in h.named_buffers()} == {"multipliers", "moduli"}
    assert h.state_dict() == {}  # derived from the config, not checkpointed
    ids = torch.randint(0, 300, (2, 8))
    ref = h(ids)[1]
    if torch.cuda.is_available():
        h_cuda = NgramHasher(300, 3, 2, [50, 60], [1], 0, 3).cuda()
        assert h_cuda.multipliers.is_cuda
        assert torch.equal(h_cuda(ids.cuda())[1].cpu(), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("vocab,N,H,bases,layers,pad,seed,B,T", CONFIGS)
def test_hash_ids_match_reference_rule_on_gpu(vocab, N, H, bases, layers, pad, seed, B, T):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(B, T), dtype=np.int64)
    ids[0, 0] = vocab - 1
    expected, _ = reference_hash(ids, vocab, N, H, bases, layers, pad, seed)
    got = NgramHasher(vocab, N, H, bases, layers, pad, seed).cuda()(torch.from_numpy(ids).cuda())
    for layer in layers:
        assert got[layer].is_cuda
        np.testing.assert_array_equal(got[layer].cpu().numpy(), expected[layer])
