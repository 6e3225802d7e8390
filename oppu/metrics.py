"""LaMP evaluation, re-implemented exactly as the official code scores (no hub download).

- Classification (LaMP_1, LaMP_2N, LaMP_2M): strip both strings, map each to its index in the task's label list
  (anything else -> -1), accuracy over indices and scikit-learn macro-F1 over `labels=range(len(labels))`.
- Rating (LaMP_3): a prediction that does not parse as a finite float becomes 1.0 or 5.0, whichever is farther
  from the gold; MAE and RMSE. (The official code would keep "nan"/"inf"; we count them as unparsable so a score
  is always finite.)
- Generation (LaMP_4, LaMP_5, LaMP_7): ROUGE-1 and ROUGE-L F-measure from `rouge-score` (default tokenizer, no
  stemmer) averaged over examples. The official code reports the middle of a bootstrap aggregate, which is close
  to this plain mean; we use the plain mean so a score is deterministic.

scikit-learn and rouge-score are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from oppu.tasks import get_task


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
    index = {label: i for i, label in enumerate(labels)}
    gold_idx = [index.get(str(g).strip(), -1) for g in golds]
    pred_idx = [index.get(str(p).strip(), -1) for p in preds]
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
    errors = []
    for gold_text, pred_text in zip(golds, preds):
        gold = _rating_value(gold_text)
        if gold is None:
            raise ValueError(f"gold rating {gold_text!r} is not a number: LaMP_3 golds are '1'..'5'")
        pred = _rating_value(pred_text)
        if pred is None:
            pred = 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0
        errors.append(pred - gold)
    mae = sum(abs(e) for e in errors) / len(errors)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    return {"MAE": mae, "RMSE": rmse}


def rouge_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """{"rouge-1", "rouge-L"}: mean F-measure over examples (rouge-score, default tokenizer, no stemmer)."""
    from rouge_score import rouge_scorer

    _check_lengths(golds, preds)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
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
