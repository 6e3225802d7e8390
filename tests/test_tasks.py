"""The task registry: labels, query extraction, prompts, history examples and normalisation for all seven tasks."""

from __future__ import annotations

import pytest

from oppu.data import Item
from oppu.tasks import TASKS, CitationTask, UnknownTaskError, get_task

ALL_FIELDS = {"description": "A heist on a train.", "tag": "action", "text": "Body text here.", "title": "A Title",
              "category": "sports", "score": "4", "abstract": "We study things.", "citation": "A cited paper"}


def test_registry_has_the_seven_tasks_in_order():
    assert list(TASKS) == ["LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"]
    assert {t.kind for t in TASKS.values()} == {"classification", "rating", "generation"}


def test_label_lists_match_the_official_evaluation_order():
    assert get_task("LaMP_1").labels == ("[1]", "[2]")
    assert get_task("LaMP_2M").labels[:3] == ("sci-fi", "based on a book", "comedy")
    assert get_task("LaMP_2N").labels[-1] == "healthy living" and len(get_task("LaMP_2N").labels) == 15
    assert get_task("LaMP_3").labels == ("1", "2", "3", "4", "5")
    assert all(not TASKS[t].labels for t in ("LaMP_4", "LaMP_5", "LaMP_7"))


def test_unknown_task_names_valid_ids_and_closest():
    with pytest.raises(UnknownTaskError) as err:
        get_task("lamp_2m")
    assert "LaMP_2M" in str(err.value) and "LaMP_7" in str(err.value)
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize("task_id", [t for t in TASKS if t != "LaMP_1"])
def test_query_text_recovers_the_text_from_the_official_input(task_id):
    task = get_task(task_id)
    text = "Zoë's naïve café — 東京 story."
    assert task.query_text(task.make_input(text)) == text


def test_query_text_falls_back_to_whole_input_on_dirty_record():
    # LaMP_2M dev question "110" has a truncated input without the description marker.
    dirty = "Which tag does this movie relate to among the following tags? tags: [sci-fi, based on a book"
    assert get_task("LaMP_2M").query_text(dirty) == dirty


def test_citation_input_parses_and_query_uses_both_references():
    task = get_task("LaMP_1")
    assert isinstance(task, CitationTask)
    inp = task.make_choice_input("Deep Graphs", "Spectral methods", "Protein folding")
    assert task.parse(inp) == ("Deep Graphs", "Spectral methods", "Protein folding")
    assert task.query_text(inp) == "Spectral methods Protein folding"
    prompt = task.prompt(inp)
    assert "[1]" in prompt and "Protein folding" in prompt and "Answer with only [1] or [2]" in prompt


@pytest.mark.parametrize("task_id", list(TASKS))
def test_prompt_states_answer_format_and_includes_profile_and_items(task_id):
    task = get_task(task_id)
    inp = task.make_choice_input("T", "A", "B") if task_id == "LaMP_1" else task.make_input("query body words")
    item = Item("i1", {k: v for k, v in ALL_FIELDS.items()})
    prompt = task.prompt(inp, retrieved=[item], profile="likes heists")
    assert "Answer with only" in prompt
    assert prompt.index("likes heists") < prompt.index(task.format_item(item)) < prompt.rindex("Answer with only")
    bare = task.prompt(inp)
    assert "Past items" not in bare and "profile" not in bare.lower()


@pytest.mark.parametrize("task_id", list(TASKS))
def test_text_only_drops_only_the_label_and_never_renders_empty(task_id):
    task = get_task(task_id)
    prompt_label = {name: label for label, name in task.item_format}
    for fields in (ALL_FIELDS, {name: ALL_FIELDS[name] for name in task.profile_fields}):
        text_only = task.format_item(Item("i1", fields), text_only=True)
        assert text_only, "a retrieved item must not vanish from a text-only prompt"
        assert ALL_FIELDS[task.source_field] in text_only
        if task.label_field is not None:
            assert ALL_FIELDS[task.label_field] not in text_only
            assert f"{prompt_label[task.label_field]}:" not in text_only
    assert (task.label_field is None) == (task_id == "LaMP_7")  # a tweet is both the text and the answer
    prompt = task.prompt(task.make_choice_input("T", "A", "B") if task_id == "LaMP_1" else task.make_input("q"),
                         retrieved=[Item("i1", ALL_FIELDS)], text_only=True)
    assert "Past items of this user" in prompt


@pytest.mark.parametrize("task_id", ["LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5"])
def test_text_only_drops_the_answer_field(task_id):
    task = get_task(task_id)
    item = Item("i1", ALL_FIELDS)
    full, text_only = task.format_item(item), task.format_item(item, text_only=True)
    assert ALL_FIELDS[task.target_field] in full.split(": ")[-1]
    source_label = next(label for label, name in task.item_format if name == task.source_field)
    assert f"{source_label}: " in text_only and ALL_FIELDS[task.target_field] not in text_only.split(": ")[-1]
    assert len(text_only) < len(full)


# OPPU's `prompt.json` `retrieval_query_wokey` templates, word for word.
OFFICIAL_QUERIES = {
    "LaMP_1": "Identify the most relevant reference for the listed publication by the researcher. Select the "
              "reference paper that is most closely related to the researcher's work. Please respond with only the "
              "number that corresponds to the reference.\npaper title: {}",
    "LaMP_2N": "Which category does this article relate to among the following categories? arcicle: {}",
    "LaMP_2M": "Which tag does this movie relate to among the following tags? Just answer with the tag name "
               "without further explanation.\n description: {}",
    "LaMP_3": "What is the score of the following review on a scale of 1 to 5? review: {}",
    "LaMP_4": "Generate a headline for the following article: {}",
    "LaMP_5": "Generate a title for the following abstract of a paper: {}",
    "LaMP_7": "Paraphrase the following text into tweet without any explanation before or after it: {}",
}


@pytest.mark.parametrize("task_id", list(TASKS))
def test_retrieval_query_is_the_official_instruction_plus_the_query_text(task_id):
    task = get_task(task_id)
    if task_id == "LaMP_1":  # OPPU retrieves with the author's paper title, not the candidate references
        inp, text = task.make_choice_input("Deep Graphs", "Spectral methods", "Protein folding"), "Deep Graphs"
    else:
        text = "Zoë's naïve café story."
        inp = task.make_input(text)
    assert task.retrieval_query(inp) == OFFICIAL_QUERIES[task_id].format(text)
    assert task.retrieval_query(inp, instruction=False) == text


@pytest.mark.parametrize("task_id", list(TASKS))
def test_history_query_is_the_official_training_query_of_the_item(task_id):
    # OPPU.py: `retrieval_query.format(**item)`, the item's own source text (LaMP_7: the tweet itself).
    task = get_task(task_id)
    item = Item("i", ALL_FIELDS)
    assert task.history_query(item) == OFFICIAL_QUERIES[task_id].format(ALL_FIELDS[task.source_field])
    assert task.history_query(item, instruction=False) == ALL_FIELDS[task.source_field]
    long = {**ALL_FIELDS, task.source_field: " ".join(["w"] * 2000)}
    assert len(task.history_query(long, instruction=False).split()) == 768


def test_lamp7_history_query_is_the_tweet_although_the_example_input_is_empty():
    task = get_task("LaMP_7")
    inp, target = task.history_example({"text": "fixed the sink today"})
    assert task.query_text(inp) == ""
    assert task.history_query({"text": "fixed the sink today"}, instruction=False) == target


def test_format_item_accepts_dicts_and_truncates_long_fields():
    task = get_task("LaMP_2M")
    long = " ".join(["word"] * 5000)
    line = task.format_item({"description": long, "tag": "comedy"})
    assert len(line.split()) < 500 and line.endswith("tag: comedy")


@pytest.mark.parametrize("task_id", ["LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5"])
def test_history_example_asks_the_task_question_with_the_item_label(task_id):
    task = get_task(task_id)
    inp, target = task.history_example(Item("i", ALL_FIELDS))
    assert target == ALL_FIELDS[task.target_field]
    assert task.query_text(inp) == ALL_FIELDS[task.source_field]


def test_history_example_lamp2m_is_the_tagging_question():
    task = get_task("LaMP_2M")
    inp, target = task.history_example({"description": "Two robots fall in love.", "tag": "romance"})
    assert target == "romance" and inp.startswith("Which tag does this movie relate to")
    assert "Two robots fall in love." in task.prompt(inp)


def test_history_example_lamp1_follows_oppu_and_falls_back_without_citation():
    task = get_task("LaMP_1")
    inp, target = task.history_example({"title": "Graph Nets", "abstract": "abs", "citation": "Spectral"})
    assert (inp, target) == ("paper title: Graph Nets reference:", "Spectral")
    assert "Answer with only the reference title" in task.prompt(inp)
    inp, target = task.history_example({"title": "Graph Nets", "abstract": "We study graphs."})
    assert target == "Graph Nets" and "We study graphs." in task.prompt(inp)
    assert task.history_example({"title": "", "abstract": ""}) is None


def test_history_example_lamp7_is_language_modelling_of_own_tweets():
    task = get_task("LaMP_7")
    inp, target = task.history_example({"text": "omg FIXED THE SINK 🎉"})
    assert target == "omg FIXED THE SINK 🎉" and target not in inp


def test_history_example_skips_items_missing_the_answer():
    assert get_task("LaMP_2M").history_example({"description": "x", "tag": ""}) is None


@pytest.mark.parametrize("raw, expected", [
    ("comedy", "comedy"), ("  Comedy.\n", "comedy"), ("tag: dark comedy", "dark comedy"),
    ("Dark comedy, because it is grim", "dark comedy"), ('"sci-fi"', "sci-fi"),
    ("I think this is a true story film", "true story"), ("banana", "banana"), ("", ""),
    ("comedy or romance", "comedy or romance"),
])
def test_normalize_classification(raw, expected):
    assert get_task("LaMP_2M").normalize(raw) == expected


@pytest.mark.parametrize("raw, expected", [("[1]", "[1]"), ("2", "[2]"), ("reference: [2]", "[2]"),
                                           ("The answer is [1].", "[1]"), ("[1] or [2]", "[1] or [2]")])
def test_normalize_citation(raw, expected):
    assert get_task("LaMP_1").normalize(raw) == expected


@pytest.mark.parametrize("raw, expected", [("4", "4"), (" score: 5", "5"), ("I'd say 3 stars", "3"),
                                           ("4.5", "4.5"), ("great", "great"), ("10/10", "10/10")])
def test_normalize_rating(raw, expected):
    assert get_task("LaMP_3").normalize(raw) == expected


def test_normalize_generation_strips_and_keeps_first_line():
    assert get_task("LaMP_4").normalize('  headline: "Mayor Backs Plan"\nExplanation: ...') == "Mayor Backs Plan"
    assert get_task("LaMP_7").normalize("\n\n lol hi 🎉 \n") == "lol hi 🎉"


@pytest.mark.parametrize("task_id", list(TASKS))
def test_profile_prompt_lists_items(task_id):
    task = get_task(task_id)
    prompt = task.profile_prompt([Item("a", ALL_FIELDS)])
    assert task.format_item(Item("a", ALL_FIELDS)) in prompt and prompt.rstrip().endswith("Answer:")
    assert "(no history)" in task.profile_prompt([])


def test_tasks_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, oppu.tasks, oppu.data, oppu.metrics; print(sorted(m for m in ('torch', 'transformers', " \
           "'sklearn', 'rouge_score', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
