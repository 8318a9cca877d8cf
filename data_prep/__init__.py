"""Data preparation: documents -> dedup/split -> tokenizer -> sharded uint16/uint32 token streams.

Build a data dir with ``python -m data_prep.prepare`` (see ``data_prep.prepare``); read it with
``data_prep.reader`` (``open_split``, ``load_manifest``, ``load_tokenizer``, ``DataError``).
"""
from data_prep.reader import DataError, TokenSplit, load_manifest, load_tokenizer, open_split

__all__ = ["DataError", "TokenSplit", "load_manifest", "load_tokenizer", "open_split"]
