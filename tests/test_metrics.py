"""LaMP metrics against scikit-learn / rouge-score computed here, and small hand cases."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from oppu.metrics import (
    ROW_SCORE_KEY,
    match_by_id,
    metric_name,
    official_output,
    prediction_fields,
    rating_scores,
    row_score,
    row_score_name,
    score,
    score_both,
    scoring_of,
)
from oppu.tasks import get_task


def test_classification_matches_sklearn_with_unknown_as_minus_one():
    labels = get_task("LaMP_2M").labels
    golds = ["comedy", "action", "romance", "comedy ", "sci-fi"]
    preds = [" comedy", "romance", "banana", "comedy", "Sci-Fi"]  # case matters, as in the official code
    index = {label: i for i, label in enumerate(labels)}
    g = [index.get(x.strip(), -1) for x in golds]
    p = [index.get(x.strip(), -1) for x in preds]
    expected_f1 = f1_score(g, p, labels=list(range(len(labels))), average="macro", zero_division=0)
    result = score("LaMP_2M", golds, preds)
    assert result == {"accuracy": pytest.approx(2 / 5), "f1": pytest.approx(expected_f1)}


def test_citation_hand_case():
    # Indices: golds [0, 1, 0, 1], preds [0, 0, 0, -1] ("2" is not a label). Class [1]: P 2/3, R 1 -> F1 0.8;
    # class [2]: no true positive -> 0. Macro-F1 0.4, accuracy 0.5.
    assert score("LaMP_1", ["[1]", "[2]", "[1]", "[2]"], ["[1]", "[1]", "[1]", "2"]) == {
        "accuracy": pytest.approx(0.5), "f1": pytest.approx(0.4)}


def test_rating_far_end_rule_and_values():
    # "x" against gold 2 -> 5.0 (farther), against gold 4 -> 1.0; "nan" is unparsable too.
    result = rating_scores(["2", "4", "3", "5"], ["x", "x", "3", "nan"])
    errors = [3.0, 3.0, 0.0, 4.0]
    assert result["MAE"] == pytest.approx(sum(errors) / 4)
    assert result["RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))
    assert score("LaMP_3", ["3"], ["3.5"]) == {"MAE": 0.5, "RMSE": 0.5}


def test_rating_gold_must_be_a_number():
    with pytest.raises(ValueError, match="gold rating"):
        score("LaMP_3", ["five"], ["5"])


@pytest.mark.parametrize("task_id", ["LaMP_4", "LaMP_5", "LaMP_7"])
def test_rouge_is_the_mean_of_rouge_score_fmeasures(task_id):
    golds = ["City Council Approves Bike Lane Plan", "lol fixed the sink 🎉", "Towards Robust Parsing"]
    preds = ["council approves the bike plan", "", "  Towards Robust Parsing  "]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    each = [scorer.score(g.strip(), p.strip()) for g, p in zip(golds, preds)]
    result = score(task_id, golds, preds)
    assert result["rouge-1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in each) / 3)
    assert result["rouge-L"] == pytest.approx(sum(s["rougeL"].fmeasure for s in each) / 3)
    assert score(task_id, ["a b c"], ["a b c"]) == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_no_stemming():
    assert score("LaMP_4", ["running"], ["runs"])["rouge-1"] == 0.0


@pytest.mark.parametrize("golds, preds", [([], []), (["a"], []), (["a", "b"], ["a"])])
def test_lengths_must_match_and_be_non_empty(golds, preds):
    with pytest.raises(ValueError):
        score("LaMP_2M", golds, preds)


def test_unknown_task_in_score():
    with pytest.raises(KeyError, match="LaMP_2M"):
        score("LaMP_9", ["a"], ["a"])


def test_match_by_id_any_order_and_shapes():
    golds = {"task": "LaMP_2M", "golds": [{"id": "2", "output": "b"}, {"id": "1", "output": "a"}]}
    preds = [{"id": 1, "output": "x"}, {"id": "2", "output": "y"}]
    assert match_by_id(golds, preds) == (["2", "1"], ["b", "a"], ["y", "x"])
    assert match_by_id({"1": "a"}, {"1": "z"}) == (["1"], ["a"], ["z"])


def test_match_by_id_names_missing_extra_and_duplicates():
    with pytest.raises(ValueError, match=r"without a prediction: 2.*without a gold: 9"):
        match_by_id([{"id": "1", "output": "a"}, {"id": "2", "output": "b"}], [{"id": "1", "output": "a"},
                                                                               {"id": "9", "output": "c"}])
    with pytest.raises(ValueError, match="appears twice"):
        match_by_id([{"id": "1", "output": "a"}, {"id": "1", "output": "b"}], [])
    with pytest.raises(ValueError, match='"id" and "output"'):
        match_by_id([{"id": "1"}], [])


# -- the two readings of a raw generation ------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["comedy.", "tag: comedy", "Comedy", " comedy, because it is funny\n"])
def test_a_label_with_extra_text_is_wrong_officially_and_right_leniently(raw):
    fields = prediction_fields("LaMP_2M", "comedy", raw)
    assert fields["output"] == raw.strip() and fields["correct"] == 0.0
    assert fields["lenient_output"] == "comedy" and fields["lenient_correct"] == 1.0
    both = score_both("LaMP_2M", ["comedy"], [fields["output"]], [fields["lenient_output"]])
    assert both["accuracy"] == 0.0 and both["lenient_accuracy"] == 1.0


def test_official_reading_only_strips():
    assert official_output("  comedy \n") == "comedy"
    assert official_output("comedy\nand more") == "comedy\nand more"  # no first-line cut, unlike normalize
    assert prediction_fields("LaMP_2M", "comedy", " comedy\n")["correct"] == 1.0


@pytest.mark.parametrize(("gold", "far_end"), [("4", 1.0), ("2", 5.0), ("3", 5.0)])
def test_a_rating_with_words_is_the_farther_end_officially(gold, far_end):
    fields = prediction_fields("LaMP_3", gold, "4 stars")
    assert fields["output"] == "4 stars" and fields["correct"] == abs(far_end - float(gold))
    assert fields["lenient_output"] == "4" and fields["lenient_correct"] == abs(4 - float(gold))
    both = score_both("LaMP_3", [gold], ["4 stars"], ["4"])
    assert both["MAE"] == abs(far_end - float(gold)) and both["lenient_MAE"] == abs(4 - float(gold))


@pytest.mark.parametrize(("task", "gold", "output"), [
    ("LaMP_2M", "comedy", " comedy "), ("LaMP_2M", "comedy", "drama"), ("LaMP_1", "[2]", "[2]"),
    ("LaMP_3", "4", "2"), ("LaMP_3", "1", "not a number"), ("LaMP_3", "5", "inf"),
    ("LaMP_4", "a b c d", "a b x y"), ("LaMP_7", "lol fixed the sink", "")])
def test_row_score_is_the_metric_of_a_one_example_list(task, gold, output):
    key = ROW_SCORE_KEY[get_task(task).kind]
    assert row_score(task, gold, output) == pytest.approx(score(task, [gold], [output])[key])


def test_row_score_without_gold_and_known_values():
    assert row_score("LaMP_2M", None, "comedy") is None
    assert row_score("LaMP_3", "1", "not a number") == 4.0  # unparsable: the farther of 1 and 5
    assert row_score("LaMP_4", "a b c d", "a b x y") == pytest.approx(0.5)


def test_row_score_names_follow_the_task_kind_and_scoring():
    assert row_score_name("LaMP_1") == ("accuracy", False)
    assert row_score_name("LaMP_3") == ("absolute error", True)
    assert row_score_name("LaMP_7") == ("ROUGE-L", False)
    assert row_score_name("LaMP_2M", "lenient") == ("lenient accuracy", False)
    with pytest.raises(ValueError, match="official, lenient"):
        row_score_name("LaMP_2M", "strict")


def test_metric_names_of_each_scoring():
    assert metric_name("rouge-L") == "rouge-L" and metric_name("rouge-L", "lenient") == "lenient_rouge-L"
    assert scoring_of("lenient_MAE") == "lenient" and scoring_of("MAE") == "official"
