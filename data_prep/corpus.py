"""From a source's documents to the deduplicated, capped, split corpus.

Applied in source order, one pass, the same way every time (so the pipeline can stream the
corpus twice: once to train a tokenizer, once to encode):

1. documents whose text is only whitespace are dropped;
2. exact duplicates are dropped: a document is kept only the first time its SHA-256 (of the
   UTF-8 text) is seen;
3. the optional byte cap stops the stream before the first kept document that would take the
   kept UTF-8 bytes past ``max_bytes`` (the corpus is a prefix of the deduplicated stream);
4. each kept document goes to "val" when ``u(seed, sha256(text)) < val_fraction``, where ``u`` is
   a uniform number in [0, 1) derived from a hash of the seed and the document digest, else
   to "train". The split is a function of the text alone: identical texts can never straddle
   the splits, and the assignment does not depend on document order or corpus size.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

SPLITS = ("train", "val")


def text_digest(text: str) -> bytes:
    """SHA-256 of the UTF-8 text: the identity used for deduplication and the split."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(digest: bytes, seed: int, val_fraction: float) -> str:
    """Deterministic document-level split from the text digest and the seed."""
    h = hashlib.sha256(b"isoflop-engram/split/" + int(seed).to_bytes(8, "little", signed=True)
                       + digest).digest()
    u = int.from_bytes(h[:8], "little") / 2.0 ** 64
    return "val" if u < val_fraction else "train"


@dataclass
class CorpusStats:
    n_read: int = 0  # documents yielded by the source (before any filtering)
    n_empty: int = 0  # dropped: empty or whitespace-only
    n_duplicates: int = 0  # dropped: exact duplicate of an earlier document
    n_kept: int = 0
    capped: bool = False  # True when max_bytes stopped the stream early
    docs: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    bytes: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})  # UTF-8 text bytes

    def as_dict(self) -> dict:
        return asdict(self)


class Corpus:
    """Iterable view of a source after filtering, dedup, the cap and the split.

    ``documents()`` yields ``(split, text, digest)`` and refreshes ``stats`` on every pass."""

    def __init__(self, source, val_fraction: float = 0.02, seed: int = 0,
                 max_bytes: Optional[int] = None):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.source, self.val_fraction = source, val_fraction
        self.seed, self.max_bytes = seed, max_bytes
        self.stats = CorpusStats()

    def documents(self) -> Iterator[tuple[str, str, bytes]]:
        stats = self.stats = CorpusStats()
        seen: set[bytes] = set()
        total = 0
        for doc in self.source.documents():
            stats.n_read += 1
            if not doc.text.strip():
                stats.n_empty += 1
                continue
            digest = text_digest(doc.text)
            if digest in seen:
                stats.n_duplicates += 1
                continue
            n_bytes = len(doc.text.encode("utf-8"))
            if self.max_bytes is not None and total + n_bytes > self.max_bytes:
                stats.capped = True
                stats.n_read -= 1  # not consumed: the stream ends here
                return
            seen.add(digest)
            total += n_bytes
            split = split_of(digest, self.seed, self.val_fraction)
            stats.n_kept += 1
            stats.docs[split] += 1
            stats.bytes[split] += n_bytes
            yield split, doc.text, digest
