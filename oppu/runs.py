"""Stored runs as things to work with: a table of the knobs that differ between runs, side-by-side parameters,
notes, deletion of a run with everything it produced, and the CLI command that reruns it.

- `runs_table(runs)`: one row per run (a `Store.runs()` frame) with a column per knob (k, epochs, lr, users,
  PEFT, rank, seed, model, ...), keeping only knobs whose value differs between the runs listed.
- `compare_params(configs, only_differences)`: flattened config keys as rows, one column per run.
- `cli_command(config)`: `oppu run ...` with every setting a flag can express, plus the settings that have no
  flag (they differ from the defaults and must be set through a preset).
- notes: free text per run in `<db>.notes.json` beside the store (written atomically).
- `delete_run(db, artifacts_dir, run_id)`: the store's rows, the run's adapters and checkpoints, its note.

No Streamlit here: `pages/runs.py` draws what these return.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

KNOBS: dict[str, str] = {
    "k": "retrieval.k", "retriever": "retrieval.retriever", "epochs": "user_train.epochs", "lr": "user_train.lr",
    "users": "users", "user ids": "user_ids", "PEFT": "user_peft.kind", "rank": "user_peft.r",
    "seed": "user_train.seed", "model": "model.name", "methods": "methods", "adaptation": "task_adaptation",
    "batching": "batching", "history format": "history_format", "cutoff": "history_cutoff",
    "max examples": "user_train.max_examples", "batch size": "user_train.batch_size",
}
"""Column label -> dotted config key of the knobs the runs table can show."""
ALWAYS = ("run_id", "created", "status", "task", "tag", "note")


def _config(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return dict(value or {})


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"retrieval": {"k": 1}}` -> `{"retrieval.k": 1}` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value


def runs_table(runs: Any, notes: Mapping[str, str] | None = None) -> Any:
    """The runs with a column per knob whose value differs between them (see the module docstring)."""
    import pandas as pd

    rows = []
    for run in runs.to_dict("records") if hasattr(runs, "to_dict") else runs:
        flat = flatten(_config(run.get("config")))
        row = {"run_id": run["run_id"], "created": run.get("created"), "status": run.get("status"),
               "task": run.get("task"), "tag": run.get("tag") or "", "note": (notes or {}).get(run["run_id"], "")}
        for label, key in KNOBS.items():
            row[label] = _cell(flat.get(key))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*ALWAYS, *KNOBS])
    varying = [label for label in KNOBS if frame[label].astype(str).nunique(dropna=False) > 1]
    return frame[[*ALWAYS, *varying]]


def compare_params(configs: Mapping[str, Any], only_differences: bool = True) -> Any:
    """Rows: every flattened config key; columns: one per run id. With `only_differences`, the keys whose
    values are not all equal."""
    import pandas as pd

    flat = {run_id: {k: _cell(v) for k, v in flatten(_config(c)).items()} for run_id, c in configs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values()))) if flat else []
    frame = pd.DataFrame({run_id: [str(f.get(k, "")) for k in keys] for run_id, f in flat.items()}, index=keys)
    frame.index.name = "setting"
    if only_differences and len(frame.columns) > 1:
        frame = frame[frame.nunique(axis=1) > 1]
    return frame


def compare_metrics(metrics: Mapping[str, Any]) -> Any:
    """`{run id: run_metrics frame (method, metric, value)}` -> rows (method, metric), one column per run."""
    import pandas as pd

    parts = [m.assign(run=run_id) for run_id, m in metrics.items() if m is not None and not m.empty]
    if not parts:
        return pd.DataFrame()
    wide = pd.concat(parts).pivot_table(index=["method", "metric"], columns="run", values="value")
    return wide[[r for r in metrics if r in wide.columns]]


_FLAGS: tuple[tuple[str, str], ...] = (
    ("task", "--task"), ("methods", "--methods"), ("users", "--users"), ("user_ids", "--user-ids"),
    ("retrieval.k", "--k"), ("retrieval.retriever", "--retriever"), ("user_peft.kind", "--peft"),
    ("user_peft.r", "--rank"), ("user_peft.alpha", "--alpha"), ("user_train.epochs", "--epochs"),
    ("user_train.lr", "--lr"), ("model.name", "--model"), ("model.device", "--device"),
    ("model.dtype", "--dtype"), ("data_dir", "--data"), ("db", "--db"), ("artifacts_dir", "--artifacts"),
    ("history_cutoff", "--cutoff"), ("history_format", "--history-format"), ("tag", "--tag"),
    ("batching", "--batching"))
_NO_FLAG_NEEDED = ("task_adaptation", "model.compute_dtype")


def cli_command(config: Any) -> tuple[str, list[str]]:
    """(`oppu run ...` that reruns this config, `key=value` of its settings that no flag expresses and that
    differ from the defaults)."""
    from oppu.config import RunConfig

    flat = flatten(_config(config))
    defaults = flatten(RunConfig().to_dict())
    parts = ["oppu", "run"]
    for key, flag in _FLAGS:
        value = flat.get(key)
        if value is None or value == "" or (key == "users" and flat.get("user_ids")):
            continue
        parts += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    if flat.get("task_adaptation") is False:
        parts.append("--no-adapt")
    covered = {k for k, _ in _FLAGS} | set(_NO_FLAG_NEEDED)
    missing = [f"{k}={json.dumps(v)}" for k, v in sorted(flat.items())
               if k not in covered and k in defaults and v != defaults[k]]
    return " ".join(shlex.quote(p) for p in parts), missing


# -- notes -------------------------------------------------------------------------------------------------------
def notes_path(db: str | os.PathLike[str]) -> Path:
    return Path(f"{db}.notes.json")


def read_notes(db: str | os.PathLike[str]) -> dict[str, str]:
    try:
        data = json.loads(notes_path(db).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def set_note(db: str | os.PathLike[str], run_id: str, text: str) -> None:
    """Keep (or, with empty text, drop) a run's note."""
    from oppu.paths import file_lock, write_json_atomic

    with file_lock(Path(f"{db}.notes.lock")):
        notes = read_notes(db)
        if text.strip():
            notes[run_id] = text.strip()
        else:
            notes.pop(run_id, None)
        write_json_atomic(notes_path(db), notes)


# -- deletion ----------------------------------------------------------------------------------------------------
def delete_run(db: str | os.PathLike[str], artifacts_dir: str | os.PathLike[str], run_id: str,
               task: str | None = None) -> dict[str, Any]:
    """Delete a run: its stored predictions, metrics and curves, its adapters and checkpoints, its note.
    Returns what went (`predictions`, `folders`)."""
    from oppu.paths import safe_component
    from oppu.store import Store

    store = Store(db)
    runs = store.runs()
    row = runs[runs["run_id"] == run_id]
    task = task or (str(row["task"].iloc[0]) if not row.empty else None)
    removed = store.delete_run(run_id)
    folders = []
    if task:
        for kind in ("adapters", "checkpoints"):
            folder = Path(artifacts_dir) / kind / safe_component(task) / safe_component(run_id)
            if folder.exists():
                shutil.rmtree(folder)
                folders.append(str(folder))
    set_note(db, run_id, "")
    return {"predictions": removed, "folders": folders}


def selected(frame: Any, run_ids: Sequence[str]) -> Any:
    return frame[frame["run_id"].isin(run_ids)]
