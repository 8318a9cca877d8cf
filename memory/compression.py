"""Tokenizer compression: a surjective map from tokenizer ids to canonical ids.

Two tokens share a canonical id when their decoded text normalises to the same string under
NFKC -> NFD -> strip accents -> lowercase -> collapse whitespace runs to one space -> strip
(a token that is only whitespace keeps a single space). A token whose decoded text contains
U+FFFD (a byte-level piece that is not valid UTF-8 on its own) keys on its raw token string
instead; a token whose normalised text is empty keys on its decoded text. Canonical ids are
numbered in order of first appearance by tokenizer id, exactly as the public reference does
(deepseek-ai/Engram, engram_demo_v1.py): on the DeepSeek vocabulary the map equals the reference
rule id for id over all 129,280 ids (129,280 -> 99,092 canonical ids, 23.35% reduction), checked
by tests/unit/test_engram_compression.py in every default test run.

Building the map costs one decode and one normalisation per vocabulary entry (about 0.5 s for a
128k vocabulary); the result is cached on disk, keyed by a hash of the tokenizer.json content.

Run ``python -m assembly.compression deepseek`` (or a tokenizer.json path) to print the reduction.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

log = logging.getLogger(__name__)

# Bump when the canonicalisation rule changes: it is part of every cache key.
RULE_VERSION = 1
CACHE_ENV = "ISOFLOP_ENGRAM_CACHE"
_SENTINEL = "\ue000"  # private-use char protecting a lone-space token from Strip()
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Compression:
    """``lookup[raw_id] = canonical_id`` over the tokenizer's ids (int64), onto 0..num_canonical-1."""

    lookup: np.ndarray
    num_canonical: int
    source: str  # 'identity' or the tokenizer's content hash

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def reduction(self) -> float:
        """Share of the vocabulary removed by compression (the paper: 23.43% for its 128k vocab)."""
        return 1.0 - self.num_canonical / self.vocab_size

    def lookup_for(self, model_vocab_size: int) -> np.ndarray:
        """The lookup extended to a model vocabulary that may be padded past the tokenizer's ids.

        Ids the tokenizer never produces (the padding rows of a larger embedding) are clamped to the
        tokenizer's last id, as the reference clamps out-of-range ids.
        """
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"model vocab_size={model_vocab_size} is smaller than the tokenizer's "
                             f"{self.vocab_size} ids")
        if model_vocab_size == self.vocab_size:
            return self.lookup
        pad = np.full(model_vocab_size - self.vocab_size, self.lookup[-1], dtype=np.int64)
        return np.concatenate([self.lookup, pad])

    def summary(self) -> str:
        return (f"tokenizer compression: {self.vocab_size} -> {self.num_canonical} ids "
                f"({100 * self.reduction:.2f}% reduction)")


def identity_compression(vocab_size: int) -> Compression:
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return Compression(np.arange(vocab_size, dtype=np.int64), vocab_size, "identity")


def canonical_normalizer():
    """The ``tokenizers`` normaliser that defines canonical token text."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def _vocab_size(tok) -> int:
    vocab = tok.get_vocab(with_added_tokens=True)
    top = max(vocab.values()) + 1 if vocab else 0
    return max(tok.get_vocab_size(with_added_tokens=True), top)


def compression_from_tokenizer(tok, source: str = "") -> Compression:
    """Build the canonical-id map of a ``tokenizers.Tokenizer`` (no caching)."""
    normalizer = canonical_normalizer()
    n = _vocab_size(tok)
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    key_to_id: dict[str, int] = {}
    lookup = np.empty(n, dtype=np.int64)
    for tid, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:
            key = tok.id_to_token(tid)
            key = text if key is None else key
        else:
            key = normalizer.normalize_str(text) or text
        lookup[tid] = key_to_id.setdefault(key, len(key_to_id))
    return Compression(lookup, len(key_to_id), source)


# ---- tokenizer sources, cache ------------------------------------------------------------------
def resolve_tokenizer_file(spec: Union[str, os.PathLike]) -> Path:
    """A folder -> its tokenizer.json; a file path -> itself. Names such as 'deepseek' are resolved
    above this package (assembly.engram_tokenizer_file): memory knows no tokenizer packages."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer file not found: {path}")
    return path


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "isoflop-engram"


def _cache_key(content: bytes) -> str:
    import tokenizers

    h = hashlib.sha256(content)
    h.update(f"|rule={RULE_VERSION}|tokenizers={tokenizers.__version__}".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path) -> Optional[tuple[np.ndarray, int]]:
    try:
        with np.load(path) as z:
            lookup, num = z["lookup"].astype(np.int64), int(z["num_canonical"])
    except (OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable compression cache %s (%s)", path, e)
        return None
    # A valid map is onto 0..num-1.
    if lookup.ndim != 1 or lookup.size == 0 or lookup.min() != 0 or len(np.unique(lookup)) != num \
            or lookup.max() != num - 1:
        log.warning("ignoring inconsistent compression cache %s", path)
        return None
    return lookup, num


def _write_cache(path: Path, comp: Compression) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic publish: ranks that build concurrently each write a temp file and rename it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lookup=comp.lookup, num_canonical=np.int64(comp.num_canonical))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_compression(tokenizer, cache_dir: Optional[Union[str, os.PathLike]] = None,
                     use_cache: bool = True) -> Compression:
    """Canonical-id map for a tokenizer given as a tokenizer.json path (or folder) or a
    ``tokenizers.Tokenizer``; cached under ``cache_dir`` (default $ISOFLOP_ENGRAM_CACHE or
    ~/.cache/isoflop-engram), keyed by the tokenizer.json content."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        tok, content = tokenizer, tokenizer.to_str().encode()
    else:
        path = resolve_tokenizer_file(tokenizer)
        content = path.read_bytes()
        tok = None
    key = _cache_key(content)
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_path / f"compression-{key}.npz"
    if use_cache and cache_path.is_file():
        hit = _read_cache(cache_path)
        if hit is not None:
            return Compression(hit[0], hit[1], key)
    if tok is None:
        tok = Tokenizer.from_str(content.decode("utf-8"))
    comp = compression_from_tokenizer(tok, key)
    log.info("%s [%s]", comp.summary(), key)
    if use_cache:
        try:
            _write_cache(cache_path, comp)
        except OSError as e:  # a read-only home must not stop training
            log.warning("could not write compression cache %s (%s)", cache_path, e)
    return comp


def find_pad_id(tokenizer) -> Optional[int]:
    """The tokenizer's padding id: its configured padding, else the lowest-id special added token
    whose text contains 'pad' (DeepSeek: '<｜▁pad▁｜>' = 2), else None."""
    from tokenizers import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(
        str(resolve_tokenizer_file(tokenizer)))
    if tok.padding is not None and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    pads = [i for i, t in tok.get_added_tokens_decoder().items() if t.special and "pad" in t.content.lower()]
    return min(pads) if pads else None
