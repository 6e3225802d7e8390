"""Examples and prompts: the retrieval query of a history example, task-adaptation data as in task_LoRA.py."""

from __future__ import annotations

from oppu.data import Item, Query, User
from oppu.examples import PromptStyle, adaptation_examples, build_prompt, user_examples
from oppu.retrieval import get_retriever
from oppu.tasks import get_task

RAG = PromptStyle(retrieval=True, k=1)
TWEETS = Item("t0", {"text": "good morning coffee first"}, "2020-01-01"), \
    Item("t1", {"text": "the river trail at dawn was glorious"}, "2020-01-02"), \
    Item("t2", {"text": "monday again and the printer jammed"}, "2020-01-03"), \
    Item("t3", {"text": "walked the river trail again at dawn"}, "2020-01-04")


def test_lamp7_history_example_retrieves_the_lexically_matching_earlier_tweet():
    # The example's input holds no text (the tweet is the target), so the query must be the tweet itself, as
    # OPPU's `retrieval_query.format(**item)` is; an empty query returned the oldest tweet instead.
    task = get_task("LaMP_7")
    retriever = get_retriever("bm25", task.format_item)
    examples = user_examples(task, TWEETS, RAG, retriever)
    last = next(ex for ex in examples if ex.source_id == "t3")
    assert last.context_ids == ("t1",)
    assert "the river trail at dawn was glorious" in last.prompt


def test_lamp7_text_only_keeps_the_retrieved_tweet_in_the_prompt():
    task = get_task("LaMP_7")
    retriever = get_retriever("bm25", task.format_item)
    style = PromptStyle(retrieval=True, k=1, text_only=True)
    last = user_examples(task, TWEETS, style, retriever)[-1]
    assert last.context_ids == ("t1",) and "the river trail at dawn was glorious" in last.prompt


class _Recorder:
    """A retriever that records the queries it is asked."""

    name = "recorder"

    def __init__(self, query_instruction: bool):
        self.query_instruction = query_instruction
        self.queries: list[str] = []

    def retrieve(self, query_text, items, k, before=None):
        self.queries.append(query_text)
        return [(items[0], 1.0)]


def test_queries_carry_the_instruction_only_for_retrievers_that_take_it():
    task = get_task("LaMP_2M")
    inp = task.make_input("a dragon in space")
    for with_instruction in (True, False):
        rec = _Recorder(with_instruction)
        build_prompt(task, inp, RAG, [Item("a", {"description": "x", "tag": "comedy"})], rec, None)
        assert rec.queries == [task.retrieval_query(inp, with_instruction)]
    rec = _Recorder(True)
    build_prompt(task, inp, RAG, [Item("a", {"description": "x", "tag": "comedy"})], rec, None, query="own")
    assert rec.queries == ["own"]


def _other_user(uid: str, profile: str | None = None) -> User:
    task = get_task("LaMP_2M")
    history = (Item(f"{uid}-h0", {"description": "a dragon guards a castle", "tag": "fantasy"}, "2020-01-01"),
               Item(f"{uid}-h1", {"description": "cops chase robbers downtown", "tag": "action"}, "2020-01-02"),
               Item(f"{uid}-h2", {"description": "friends laugh on a road trip", "tag": "comedy"}, "2020-01-03"))
    queries = (Query(f"{uid}-q0", task.make_input("robbers flee the cops"), "action", "2021-01-01"),
               Query(f"{uid}-q1", task.make_input("a dragon and a knight"), "fantasy", "2021-01-02"),
               Query(f"{uid}-q2", task.make_input("no gold here"), None, "2021-01-03"))
    return User(uid, history, queries, profile)


def test_adaptation_trains_on_other_users_gold_queries_only():
    task = get_task("LaMP_2M")
    users = (_other_user("u1"), _other_user("u2", profile="tags action films"))
    examples = adaptation_examples(task, users, PromptStyle(), None, seed=0, max_examples=None)
    assert [ex.source_id for ex in examples] == ["u1/u1-q0", "u1/u1-q1", "u2/u2-q0", "u2/u2-q1"]
    assert [ex.target for ex in examples] == ["action", "fantasy", "action", "fantasy"]
    assert all("Past items" not in ex.prompt and "User profile" not in ex.prompt for ex in examples)


def test_adaptation_retrieves_from_that_users_history_and_adds_its_profile():
    task = get_task("LaMP_2M")
    users = (_other_user("u1"), _other_user("u2", profile="tags action films"))
    retriever = get_retriever("bm25", task.format_item)
    pag = PromptStyle(retrieval=True, profile=True, k=1)
    examples = adaptation_examples(task, users, pag, retriever, seed=0, max_examples=None)
    assert [ex.context_ids for ex in examples] == [("u1/u1-h1",), ("u1/u1-h0",), ("u2/u2-h1",), ("u2/u2-h0",)]
    assert ["User profile: tags action films" in ex.prompt for ex in examples] == [False, False, True, True]


def test_adaptation_sample_is_seeded_and_bounded():
    task = get_task("LaMP_2M")
    users = tuple(_other_user(f"u{i}") for i in range(5))
    a = adaptation_examples(task, users, RAG, get_retriever("bm25", task.format_item), seed=3, max_examples=4)
    b = adaptation_examples(task, users, RAG, get_retriever("bm25", task.format_item), seed=3, max_examples=4)
    assert a == b and len(a) == 4
