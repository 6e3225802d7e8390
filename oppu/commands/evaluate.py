"""`oppu evaluate`: score a predictions file against a golds file as the LaMP evaluation does (the differences,
a plain ROUGE mean and non-finite ratings counted as unparsable, are listed in `oppu.metrics`)."""

from __future__ import annotations

import argparse
import json
import sys

from oppu.tasks import TASKS, UnknownTaskError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(TASKS))
    parser.add_argument("--golds", required=True, help='{"task", "golds": [{"id", "output"}]} or a bare list')
    parser.add_argument("--preds", required=True, help="predictions in the same shape as the golds")
    parser.add_argument("--normalize", action="store_true",
                        help="score the lenient reading (a label or digit recovered from free text, as "
                             "Task.normalize does); default: the official reading, the stripped output")


def evaluate_files(task_id: str, golds_path: str, preds_path: str, normalize: bool = False) -> dict[str, float]:
    """The LaMP metrics of a predictions file; ValueError/DataError say what does not match."""
    from oppu.data import read_json
    from oppu.metrics import lenient_output, match_by_id, score
    from oppu.tasks import get_task

    task = get_task(task_id)
    golds, _ = read_json(golds_path)
    preds, _ = read_json(preds_path)
    for path, data in ((golds_path, golds), (preds_path, preds)):
        declared = data.get("task") if isinstance(data, dict) else None
        if isinstance(declared, str) and declared != task.id:
            raise ValueError(f"{path} is for task {declared!r}, not {task.id}: pass the matching --task")
        if not isinstance(data, (dict, list)):
            # A wrong file content is reported like every other input error, hence ValueError.
            raise ValueError(f"{path}: expected a list of {{id, output}} or {{task, golds}}, got a JSON "  # noqa: TRY004
                             f"{type(data).__name__}; fix the file's top level")
    _, gold_outputs, pred_outputs = match_by_id(golds, preds)
    if normalize:
        pred_outputs = [lenient_output(task.id, p) for p in pred_outputs]
    return score(task.id, gold_outputs, pred_outputs)


def run(args: argparse.Namespace) -> int:
    from oppu.data import DataError

    try:
        result = evaluate_files(args.task, args.golds, args.preds, args.normalize)
    except (DataError, ValueError, UnknownTaskError, OSError) as exc:
        print(f"oppu evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0
