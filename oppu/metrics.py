"""LaMP evaluation re-implemented without a hub download, and the two readings of a raw generation it scores.

Official scoring (the default everywhere) is the LaMP / OPPU `eval/evaluation.py` applied to the stripped raw
generation. Lenient scoring applies the same metrics to `Task.normalize(raw)`, which recovers a label or a digit
from free text ("Comedy." -> "comedy", "4 stars" -> "4"); the gap between the two is how much of a score is
answer extraction. Aggregate metrics of the lenient reading carry the `lenient_` prefix (`lenient_accuracy`).

What the official code does, and what we do the same:
- Every prediction and gold goes through `str(x).strip()`; nothing else (no lower-casing, no first line, no
  prefix removal). `official_output` is exactly that.
- Classification (LaMP_1, LaMP_2N, LaMP_2M): each string maps to its index in the task's label list, anything else
  to -1 (so a gold outside the labels equals every unknown prediction, as there); accuracy over the indices and
  scikit-learn macro-F1 with `labels=range(len(labels))`.
- Rating (LaMP_3): `float(x)` of the stripped string; a prediction that raises becomes 1.0 or 5.0, whichever is
  farther from the gold (5.0 on the tie of gold 3); MAE and RMSE over the examples. A gold
  that does not parse raises (the official code raises too).
- Generation (LaMP_4, LaMP_5, LaMP_7): ROUGE-1 and ROUGE-L F-measure of `rouge-score` with its default tokenizer
  and no stemmer, one reference per example.

Where we differ, and why:
- ROUGE is the plain mean over examples. The official `evaluate.load("rouge")` reports the middle of a bootstrap
  aggregate (1000 resamples, unseeded), which is close to the mean but changes from call to call; a stored score
  must be reproducible.
- LaMP_3 predictions "nan", "inf" and "-inf" parse as floats there, and scikit-learn's MAE/MSE then raise
  ("Input contains NaN"), so one such answer stops the whole evaluation. We count a non-finite value as
  unparsable (the far-end rule): it costs one bad example and every score stays finite.
- Macro-F1 passes `zero_division=0`: the same value scikit-learn gives by default, without its warning.
- Empty or mismatched golds/predictions raise ValueError naming the fix (the official code asserts on ids).
- The official `LaMP_2` label list is the movie one (`LaMP_2M`); the news labels come from OPPU's `LaMP_2N`.

Per-row scores (one number per prediction, for the dashboard's SQL averages) are the metric of a one-example
list: 1/0 accuracy, the absolute error (MAE), ROUGE-L F. Averaging them gives accuracy, MAE and ROUGE-L exactly;
F1 and RMSE are not row averages and come from `score` only.

scikit-learn and rouge-score are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from oppu.tasks import get_task

SCORINGS: tuple[str, ...] = ("official", "lenient")
"""How a raw generation is read before scoring: as the official evaluation reads it, or through `Task.normalize`."""
LENIENT_PREFIX = "lenient_"

# Per-row score by task kind: the key of `score(...)` it equals on a one-example list, and how people see it.
ROW_SCORE_KEY: dict[str, str] = {"classification": "accuracy", "rating": "MAE", "generation": "rouge-L"}
ROW_SCORE: dict[str, tuple[str, bool]] = {
    "classification": ("accuracy", False),
    "rating": ("absolute error", True),
    "generation": ("ROUGE-L", False),
}
"""(name shown to people, lower is better) of the per-row score, by task kind."""


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORINGS)}")
    return scoring


def metric_name(metric: str, scoring: str = "official") -> str:
    """The stored name of a metric under a scoring: `accuracy` (official) or `lenient_accuracy`."""
    return metric if check_scoring(scoring) == "official" else LENIENT_PREFIX + metric


def scoring_of(name: str) -> str:
    """Which scoring a stored metric name belongs to."""
    return "lenient" if name.startswith(LENIENT_PREFIX) else "official"


def official_output(raw: str) -> str:
    """The answer exactly as the official evaluation reads a generation: the raw text, stripped."""
    return str(raw).strip()


def lenient_output(task_id: str, raw: str) -> str:
    """The answer after `Task.normalize` (a label or digit recovered from free text when one is recognisable)."""
    return get_task(task_id).normalize(str(raw))


def row_score_name(task_id: str, scoring: str = "official") -> tuple[str, bool]:
    """(name, lower_is_better) of the per-row score of this task under a scoring."""
    name, lower = ROW_SCORE[get_task(task_id).kind]
    return (name if check_scoring(scoring) == "official" else f"lenient {name}"), lower


def _check_lengths(golds: Sequence[str], preds: Sequence[str]) -> None:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions: pass one prediction per gold "
                         "(match them with match_by_id first)")
    if not golds:
        raise ValueError("nothing to score: golds and predictions are empty")


def classification_scores(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """{"accuracy", "f1"} with the official label-index mapping (unknown strings -> -1)."""
    from sklearn.metrics import f1_score

    _check_lengths(golds, preds)
    gold_idx = [_label_index(g, labels) for g in golds]
    pred_idx = [_label_index(p, labels) for p in preds]
    accuracy = sum(g == p for g, p in zip(gold_idx, pred_idx)) / len(gold_idx)
    f1 = f1_score(gold_idx, pred_idx, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1)}


def _rating_value(text: str) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def rating_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """{"MAE", "RMSE"}; an unparsable prediction counts as the farther of 1 and 5 from its gold."""
    _check_lengths(golds, preds)
    errors = [_rating_error(g, p) for g, p in zip(golds, preds)]
    mae = sum(abs(e) for e in errors) / len(errors)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    return {"MAE": mae, "RMSE": rmse}


def rouge_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """{"rouge-1", "rouge-L"}: mean F-measure over examples (rouge-score, default tokenizer, no stemmer)."""
    _check_lengths(golds, preds)
    scorer = _rouge_scorer()
    r1 = rl = 0.0
    for gold, pred in zip(golds, preds):
        scores = scorer.score(str(gold).strip(), str(pred).strip())
        r1 += scores["rouge1"].fmeasure
        rl += scores["rougeL"].fmeasure
    return {"rouge-1": r1 / len(golds), "rouge-L": rl / len(golds)}


def score(task_id: str, golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """The LaMP metrics of one task for aligned gold and prediction strings."""
    task = get_task(task_id)
    golds, preds = [str(g) for g in golds], [str(p) for p in preds]
    if task.kind == "classification":
        return classification_scores(golds, preds, task.labels)
    if task.kind == "rating":
        return rating_scores(golds, preds)
    return rouge_scores(golds, preds)


# -- one prediction ------------------------------------------------------------------------------------------
def _label_index(text: str, labels: Sequence[str]) -> int:
    try:
        return list(labels).index(str(text).strip())
    except ValueError:
        return -1


def _rating_error(gold_text: str, pred_text: str) -> float:
    gold = _rating_value(gold_text)
    if gold is None:
        raise ValueError(f"gold rating {gold_text!r} is not a number: LaMP_3 golds are '1'..'5'")
    pred = _rating_value(pred_text)
    if pred is None:
        pred = 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0
    return pred - gold


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def row_score(task_id: str, gold: str | None, output: str) -> float | None:
    """The metric `ROW_SCORE_KEY[kind]` of the one-example list [(gold, output)]; None without a gold.

    Classification gives 1/0, rating the absolute error, generation ROUGE-L F. `output` is scored as given: pass
    `official_output(raw)` or `lenient_output(task, raw)`.
    """
    if gold is None:
        return None
    task = get_task(task_id)
    if task.kind == "classification":
        return float(_label_index(gold, task.labels) == _label_index(output, task.labels))
    if task.kind == "rating":
        return abs(_rating_error(str(gold), str(output)))
    return _rouge_scorer().score(str(gold).strip(), str(output).strip())["rougeL"].fmeasure


def prediction_fields(task_id: str, gold: str | None, raw: str) -> dict[str, Any]:
    """A raw generation's stored fields: both readings and both per-row scores.

    {"raw_output", "output" (official), "correct" (its per-row score), "lenient_output", "lenient_correct"}.
    """
    official, lenient = official_output(raw), lenient_output(task_id, raw)
    return {"raw_output": str(raw), "output": official, "correct": row_score(task_id, gold, official),
            "lenient_output": lenient, "lenient_correct": row_score(task_id, gold, lenient)}


def score_both(task_id: str, golds: Sequence[str], outputs: Sequence[str],
               lenient_outputs: Sequence[str]) -> dict[str, float]:
    """The official metrics of `outputs` and, under `lenient_` names, those of `lenient_outputs`."""
    official = score(task_id, golds, outputs)
    lenient = score(task_id, golds, lenient_outputs)
    return {**official, **{metric_name(k, "lenient"): v for k, v in lenient.items()}}


def _as_mapping(records: Mapping[Any, Any] | Iterable[Mapping[str, Any]], what: str) -> dict[str, str]:
    if isinstance(records, Mapping):
        if "golds" in records and not isinstance(records.get("golds"), str):
            return _as_mapping(records["golds"], what)  # an official {"task", "golds": [...]} object
        return {str(k): str(v) for k, v in records.items()}
    out: dict[str, str] = {}
    for record in records:
        if not isinstance(record, Mapping) or "id" not in record or "output" not in record:
            raise ValueError(f'{what}: every record needs "id" and "output" (got {record!r:.80})')
        key = str(record["id"])
        if key in out:
            raise ValueError(f"{what}: id {key!r} appears twice; keep one {what[:-1]} per id")
        out[key] = str(record["output"])
    return out


def match_by_id(golds: Mapping[Any, Any] | Iterable[Mapping[str, Any]],
                preds: Mapping[Any, Any] | Iterable[Mapping[str, Any]],
                ) -> tuple[list[str], list[str], list[str]]:
    """(ids, gold outputs, predicted outputs) aligned by id, in the golds' order; ids compare as strings.

    Golds and predictions may be lists of {"id", "output"}, an official {"task", "golds": [...]} object, or a
    mapping id -> output. Missing or extra prediction ids raise ValueError naming them.
    """
    gold_map, pred_map = _as_mapping(golds, "golds"), _as_mapping(preds, "predictions")
    missing = [i for i in gold_map if i not in pred_map]
    extra = [i for i in pred_map if i not in gold_map]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold id(s) without a prediction: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"{len(extra)} prediction id(s) without a gold: {', '.join(extra[:5])}"
                         + (" ..." if len(extra) > 5 else ""))
        raise ValueError("; ".join(parts) + ": predictions must cover exactly the gold ids")
    ids = list(gold_map)
    return ids, [gold_map[i] for i in ids], [pred_map[i] for i in ids]
