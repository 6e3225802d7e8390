"""Retrievers over one user's history: ranking, k, the `before` date filter, the registry."""

from __future__ import annotations

import pytest

from oppu.data import Item
from oppu.retrieval import RETRIEVERS, get_retriever, is_before, tokenize

ITEMS = [
    Item("1", {"description": "a dragon and a knight in a fantasy kingdom", "tag": "fantasy"}, "2020-01-01"),
    Item("2", {"description": "two friends laugh through a road trip", "tag": "comedy"}, "2020-03-01"),
    Item("3", {"description": "a space ship at war with aliens", "tag": "sci-fi"}, "2020-02-01"),
    Item("4", {"description": "space pirates and a dragon", "tag": "action"}, None),
]


def test_tokenize_is_lowercase_words():
    assert tokenize("Space-Ship, WAR!") == ["space", "ship", "war"]


def test_whitespace_tokens_reproduce_the_official_split():
    # OPPU splits on single spaces: case and punctuation stay, so "Space," and "space" are different terms.
    items = [Item("a", {"text": "space ship"}), Item("b", {"text": "a Space, ship."}),
             Item("c", {"text": "river city"}), Item("d", {"text": "old film"}), Item("e", {"text": "war hero"})]
    official = get_retriever("bm25", tokens="whitespace")
    assert official.retrieve("Space, ship.", items, k=1)[0][0].id == "b"
    assert official.retrieve("SPACE", items, k=1)[0][1] == 0.0
    assert get_retriever("bm25").retrieve("SPACE", items, k=1)[0][1] > 0.0
    with pytest.raises(ValueError, match="words, whitespace"):
        get_retriever("bm25", tokens="nltk")


def test_which_retrievers_take_the_instruction_in_their_query():
    assert get_retriever("bm25").query_instruction  # OPPU's BM25 query: instruction + text
    assert not get_retriever("dense").query_instruction  # LaMP's dense ranking: the text alone
    assert not get_retriever("recency").query_instruction
    assert not get_retriever("bm25", query_instruction=False).query_instruction  # the text alone, as LaMP does


def test_bm25_ranks_the_matching_item_first_and_respects_k():
    got = get_retriever("bm25").retrieve("space ship war", ITEMS, k=2)
    assert got[0][0].id == "3"
    assert len(got) == 2 and got[0][1] >= got[1][1]
    assert get_retriever("bm25").retrieve("space", ITEMS, k=0) == []
    assert get_retriever("bm25").retrieve("space", [], k=3) == []


def test_before_keeps_only_strictly_earlier_dated_items_and_undated_ones():
    got = get_retriever("bm25").retrieve("space ship war dragon", ITEMS, k=10, before="2020-02-01")
    assert {item.id for item, _ in got} == {"1", "4"}  # "3" is dated exactly on the cutoff: excluded
    assert is_before(None, "2020-01-01") and is_before("2020-01-01", None)
    assert not is_before("2020-01-02", "2020-01-01")


def test_recency_orders_by_date_then_history_position():
    got = get_retriever("recency").retrieve("anything", ITEMS, k=3)
    assert [item.id for item, _ in got] == ["2", "3", "1"]
    undated = [Item(str(i), {"text": "x"}) for i in range(4)]
    assert [i.id for i, _ in get_retriever("recency").retrieve("", undated, k=2)] == ["3", "2"]


def test_text_of_decides_what_is_matched():
    only_tags = get_retriever("bm25", text_of=lambda item: item.fields["tag"])
    assert only_tags.retrieve("comedy", ITEMS, k=1)[0][0].id == "2"


def test_registry_and_unknown_name():
    assert set(RETRIEVERS) == {"bm25", "dense", "recency"}
    for name in RETRIEVERS:
        assert get_retriever(name).name == name
    with pytest.raises(ValueError, match="bm25, dense, recency"):
        get_retriever("tfidf")


def test_dense_uses_the_packaged_minilm_offline():  # ~5 s: loads the real packaged MiniLM
    dense = get_retriever("dense")
    got = dense.retrieve("a film about a spaceship battle", ITEMS, k=2)
    assert got[0][0].id in {"3", "4"}
    assert -1.0 <= got[1][1] <= got[0][1] <= 1.0
    again = dense.retrieve("a wizard and a dragon", ITEMS, k=1, before="2020-02-15")
    assert again[0][0].id in {"1", "4"}
    assert len(dense._cache) == 1  # one user's history is embedded once, then reused across queries
