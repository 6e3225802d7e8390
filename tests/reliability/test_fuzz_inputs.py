"""Fuzzing: any bytes given to the readers end as data or DataError/Problems; metrics never crash oddly."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oppu.data import DataError, TaskData, load_task_data, read_golds
from oppu.lamp_import import read_lamp, validate_path
from oppu.metrics import match_by_id, score
from oppu.paths import safe_component, within
from oppu.tasks import TASKS, get_task

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "user_id", "profile", "query", "input", "gold", "output", "golds", "task", "tag",
                         "description", "text", "score", "title", "date", "abstract", "category"]) | st.text(max_size=5),
        inner, max_size=6),
    max_leaves=30)


_SCRATCH = tempfile.TemporaryDirectory(prefix="oppu-fuzz-")  # removed at interpreter exit


def _in_tmp(content: bytes, name: str = "user_top_100_history.json", task: str = "LaMP_2M") -> Path:
    root = Path(tempfile.mkdtemp(dir=_SCRATCH.name))
    (root / task).mkdir()
    (root / task / name).write_bytes(content)
    return root


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(sorted(TASKS)))
def test_load_task_data_any_bytes(content, task_id):
    root = _in_tmp(content, task=task_id)
    try:
        data = load_task_data(root, task_id)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(data, TaskData)
    for user in data.test_users:
        assert isinstance(user.id, str) and all(isinstance(v, str) for i in user.history for v in i.fields.values())


@FUZZ
@given(json_values, st.sampled_from(sorted(TASKS)))
def test_read_lamp_and_golds_any_json(value, task_id):
    root = _in_tmp(json.dumps(value).encode(), name="q.json", task=task_id)
    path = root / task_id / "q.json"
    for reader in (lambda: read_lamp(task_id, path), lambda: read_golds(path, task_id)):
        try:
            _, problems = reader()[:2]
        except DataError:
            continue
        assert all(isinstance(p.message, str) for p in problems)
    assert all(isinstance(p.message, str) for p in validate_path(path))


texts = st.text(max_size=30)


@FUZZ
@given(st.sampled_from(sorted(TASKS)), st.lists(st.tuples(texts, texts), min_size=1, max_size=8))
def test_metrics_any_strings(task_id, pairs):
    golds, preds = [g for g, _ in pairs], [p for _, p in pairs]
    if get_task(task_id).kind == "rating":
        golds = [str(1 + len(g) % 5) for g in golds]  # golds of LaMP_3 are always ratings
    result = score(task_id, golds, preds)
    # Errors of a parsed rating are unbounded (a prediction "11" for gold "1" is 10 off, as officially scored);
    # every other metric is a fraction.
    upper = math.inf if get_task(task_id).kind == "rating" else 1.0
    assert result and all(math.isfinite(v) and 0.0 <= v <= upper for v in result.values())


@FUZZ
@given(st.sampled_from(sorted(TASKS)), texts)
def test_normalize_and_prompts_any_text(task_id, raw):
    task = get_task(task_id)
    assert isinstance(task.normalize(raw), str)
    assert isinstance(task.prompt(raw, retrieved=[{"text": raw}], profile=raw), str)
    assert isinstance(task.query_text(raw), str)


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=4), texts), max_size=5),
       st.lists(st.tuples(st.text(max_size=4), texts), max_size=5))
def test_match_by_id_is_exact_or_a_value_error(gold_pairs, pred_pairs):
    golds = [{"id": i, "output": o} for i, o in gold_pairs]
    preds = [{"id": i, "output": o} for i, o in pred_pairs]
    try:
        ids, _, _ = match_by_id(golds, preds)
    except ValueError:
        return
    assert sorted(ids) == sorted({i for i, _ in gold_pairs}) == sorted({i for i, _ in pred_pairs})


@FUZZ
@given(st.text(max_size=60))
def test_safe_component_is_one_harmless_component(value):
    component = safe_component(value)
    assert component not in ("", ".", "..") and "/" not in component and "\0" not in component
    assert not component.startswith(".")
    root = Path(tempfile.gettempdir()) / "oppu-fuzz-root"
    assert within(root, component).parent == root.resolve()
