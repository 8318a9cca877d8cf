"""Tokenizer compression: canonical keys, surjectivity, invalid UTF-8 fallback, the disk cache, the
reduction on the DeepSeek tokenizer, and parity id for id with the public reference's rule."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers

import assembly.compression as compression_cli
import memory.compression as compression
from assembly import engram_tokenizer_file
from memory.compression import Compression, find_pad_id, identity_compression, load_compression


def _byte_char(b: int) -> str:
    """GPT-2 byte-to-unicode spelling of one byte (written out here, independent of the library)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    return chr(b) if b in keep else chr(256 + sum(1 for x in range(b) if x not in keep))


def _byte_level(raw: bytes) -> str:
    return "".join(_byte_char(b) for b in raw)


TOKENS = ["Hello", "hello", " Hello", "HELLO", "e", "é", "È", "fi", "\ufb01", "\n", "  ", " ", " \t\n ",
          "world", "Straße", "strasse", "①", "1"]
MERGED = 3 + 2 + 1 + 3 + 1  # tokens that share a canonical id with an earlier one (groups below)
LONE_BYTES = [b"\xc3", b"\xa9"]  # halves of 'é': not valid UTF-8 on their own


def _tokenizer() -> Tokenizer:
    vocab = {_byte_level(t.encode()): i for i, t in enumerate(TOKENS)}
    for raw in LONE_BYTES:
        vocab[_byte_level(raw)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|eos|>"])
    return tok


def test_canonical_ids_merge_case_accents_width_and_whitespace():
    tok = _tokenizer()
    comp = load_compression(tok, use_cache=False)
    lk = comp.lookup
    n_tokens = len(TOKENS) + len(LONE_BYTES) + 2
    assert comp.vocab_size == n_tokens
    idx = {t: i for i, t in enumerate(TOKENS)}
    same = lambda *ts: len({int(lk[idx[t]]) for t in ts}) == 1  # noqa: E731
    assert same("Hello", "hello", " Hello", "HELLO")  # case and surrounding spaces
    assert same("e", "é", "È")  # accents stripped after NFD
    assert same("fi", "\ufb01")  # NFKC compatibility ligature
    assert same("\n", "  ", " ", " \t\n ")  # whitespace-only tokens collapse to one space
    assert same("①", "1")  # NFKC
    assert not same("Straße", "strasse")  # no case folding beyond lowercase
    assert not same("hello", "world") and not same("e", " ")
    # lone bytes decode to U+FFFD and keep their own raw token strings: distinct ids
    lone = [len(TOKENS), len(TOKENS) + 1]
    assert len({int(lk[i]) for i in lone}) == 2
    assert not set(lk[lone].tolist()) & set(lk[: len(TOKENS)].tolist())
    # surjective onto 0..K-1, numbered by first appearance
    assert sorted(set(lk.tolist())) == list(range(comp.num_canonical))
    firsts = [lk[: i + 1].max() for i in range(len(lk))]
    assert all(b - a in (0, 1) for a, b in zip(firsts, firsts[1:]))
    assert comp.num_canonical == n_tokens - MERGED
    assert comp.reduction == pytest.approx(1 - comp.num_canonical / n_tokens)
    assert find_pad_id(tok) == len(TOKENS) + len(LONE_BYTES)


def test_cache_roundtrip_keyed_by_content(tmp_path, monkeypatch):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    _tokenizer().save(str(path))
    cache = tmp_path / "cache"
    first = load_compression(str(path.parent), cache)  # a folder resolves to its tokenizer.json
    files = list(cache.glob("compression-*.npz"))
    assert len(files) == 1

    def fail(*a, **k):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(compression, "compression_from_tokenizer", fail)
    again = load_compression(str(path), cache)
    np.testing.assert_array_equal(again.lookup, first.lookup)
    assert again.num_canonical == first.num_canonical
    monkeypatch.undo()

    # different content -> different key; a corrupt cache file is rebuilt, not trusted
    data = json.loads(path.read_text())
    data["model"]["vocab"]["zzz"] = len(data["model"]["vocab"]) + 2
    path.write_text(json.dumps(data))
    load_compression(str(path), cache)
    assert len(list(cache.glob("compression-*.npz"))) == 2
    files[0].write_bytes(b"garbage")
    monkeypatch.setenv(compression.CACHE_ENV, str(cache))
    path.write_text(_tokenizer().to_str())
    rebuilt = load_compression(str(path))  # cache dir from the environment
    np.testing.assert_array_equal(rebuilt.lookup, first.lookup)


def test_identity_and_model_vocab_padding():
    ident = identity_compression(10)
    assert ident.reduction == 0.0 and ident.lookup.tolist() == list(range(10))
    comp = Compression(np.array([0, 1, 1, 2]), 3, "x")
    assert comp.lookup_for(6).tolist() == [0, 1, 1, 2, 2, 2]  # ids past the tokenizer clamp to its last
    with pytest.raises(ValueError, match="smaller"):
        comp.lookup_for(3)
    with pytest.raises(ValueError, match="not found"):
        load_compression("/nonexistent/tokenizer.json", use_cache=False)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Compression, Tokenizer, object]:
    cache = tmp_path_factory.mktemp("cache")
    comp = load_compression(engram_tokenizer_file("deepseek"), cache)
    return comp, Tokenizer.from_file(str(engram_tokenizer_file("deepseek"))), cache


def _reference_lookup(tok: Tokenizer) -> tuple[np.ndarray, int]:
    """The rule of the public reference (deepseek-ai/Engram, engram_demo_v1.py, CompressedTokenizer),
    written out here from its description, independently of memory.compression: for every id of
    len(tokenizer), decode it alone; text containing U+FFFD keys on the raw token string, else on the
    text under NFKC, NFD, strip accents, lowercase, whitespace runs -> one space, strip (a lone space
    kept), or on the text itself when that is empty; new ids in order of first appearance."""
    keep_space = "\ue000"
    norm = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), keep_space),
        normalizers.Strip(), normalizers.Replace(keep_space, " ")])
    n = tok.get_vocab_size(with_added_tokens=True)  # len(PreTrainedTokenizerFast)
    key_to_new: dict[str, int] = {}
    lookup = np.empty(n, dtype=np.int64)
    for tid in range(n):
        text = tok.decode([tid], skip_special_tokens=False)
        key = tok.id_to_token(tid) if "\ufffd" in text else (norm.normalize_str(text) or text)
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


def test_deepseek_compression_equals_the_reference_rule_id_for_id(deepseek):
    comp, tok, _ = deepseek
    # The reference decodes with transformers' PreTrainedTokenizerFast, which is tokenizers' decode
    # unless the config asks for clean_up_tokenization_spaces (it would then rewrite " ." etc.).
    cfg = json.loads((engram_tokenizer_file("deepseek").parent / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["clean_up_tokenization_spaces"] is False
    ref, num = _reference_lookup(tok)
    assert ref.shape == comp.lookup.shape == (129280,)
    mismatched = np.flatnonzero(ref != comp.lookup)
    assert mismatched.size == 0, f"{mismatched.size} ids differ, first {mismatched[:5].tolist()}"
    assert comp.num_canonical == num


def test_deepseek_reduction(deepseek, capsys):
    comp, tok, cache = deepseek
    assert comp.vocab_size == 129280
    # the paper reports 23.43% for its 128k vocabulary
    assert 0.22 < comp.reduction < 0.25
    for group in (("The", "the", "ĠThe", "Ġthe", "ĠTHE", "THE"), ("Ġcafe", "Ġcaf\u00c3\u00a9")):  # café
        ids = [tok.token_to_id(t) for t in group]
        assert None not in ids and len({int(comp.lookup[i]) for i in ids}) == 1
    assert comp.lookup[tok.token_to_id("the")] != comp.lookup[tok.token_to_id("then")]
    assert find_pad_id(engram_tokenizer_file("deepseek")) == 2 and comp.lookup[2] == 2
    compression_cli.main(["deepseek", "--cache-dir", str(cache)])
    print_out = capsys.readouterr().out
    assert "129280 ->" in print_out and "% reduction" in print_out
