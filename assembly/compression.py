"""``python -m assembly.compression deepseek|<tokenizer.json>``: print the vocabulary reduction of
Engram's tokenizer compression. Here, not in memory/, because it resolves tokenizer names."""
from __future__ import annotations

import argparse

from assembly.model import engram_tokenizer_file
from memory.compression import load_compression


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print the vocabulary reduction of tokenizer compression.")
    p.add_argument("tokenizer", help="'deepseek' or a path to a HF tokenizer.json (or its folder)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    a = p.parse_args(argv)
    comp = load_compression(engram_tokenizer_file(a.tokenizer), a.cache_dir, use_cache=not a.no_cache)
    print(comp.summary())


if __name__ == "__main__":
    main()
