"""Synthetic results for benchmarks and load tests: runs of every LaMP task with many prediction rows.

Rows are made inside DuckDB (INSERT ... SELECT over range()), so a million take seconds; their contents are
meaningless but shaped like real ones (both readings and both per-row scores, the lenient one never below the
official one), with run configs varying k, PEFT kind, history format and cut-off so every dashboard query has work.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb

from oppu.store import Store


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def seed_synthetic(store: Store, n_rows: int, runs: int = 40, users_per_run: int = 100, seed: int = 0) -> None:
    """Add `n_rows` synthetic predictions spread over `runs` runs (tag `synthetic`) and their training curves."""
    from oppu.config import METHODS
    from oppu.tasks import TASKS

    tasks = list(TASKS)
    methods = list(METHODS)
    peft_kinds = ["lora", "ia3", "prompt"]
    run_rows = []
    for i in range(runs):
        task = tasks[i % len(tasks)]
        config = {"task": task, "methods": methods, "retrieval": {"k": [0, 1, 2, 4][i % 4]},
                  "user_peft": {"kind": peft_kinds[i % 3]},
                  "history_format": "text_only" if i % 5 == 0 else "full",
                  "history_cutoff": "2020-01-01" if i % 7 == 0 else None, "seed": seed}
        run_rows.append((f"synthetic-{seed}-{i:04d}", _now(), _now(), "done", task, "synthetic",
                         "synthetic", None, json.dumps(config), "synthetic", "synthetic"))
    per_run = max(1, n_rows // runs)

    def write(con: duckdb.DuckDBPyConnection) -> None:
        con.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", run_rows)
        con.execute(
            """INSERT INTO predictions (run_id, task, user_id, query_id, method, k, peft, retriever, prompt,
                                        raw_output, output, gold, retrieved_ids, retrieved_scores,
                                        history_size, correct, created, lenient_output, lenient_correct)
               SELECT r.run_id, r.task, 'u' || (i % ?) AS user_id, 'q' || (i // ?) AS query_id,
                      (?)[1 + i % ?] AS method,
                      CAST(json_extract(r.config, '$.retrieval.k') AS INTEGER),
                      json_extract_string(r.config, '$.user_peft.kind'), 'bm25',
                      'synthetic prompt ' || i, 'raw ' || (i % 15), 'raw ' || (i % 15), 'label ' || (i % 13),
                      ['p' || (i % 97)], [1.0 / (1 + i % 7)], 5 + (hash(r.run_id, i % ?) % 500)::INTEGER,
                      CASE WHEN hash(i, r.run_id) % 3 = 0 THEN 1.0 ELSE 0.0 END, ?, 'label ' || (i % 15),
                      CASE WHEN hash(i, r.run_id) % 3 < 2 THEN 1.0 ELSE 0.0 END
               FROM (SELECT run_id, task, config FROM runs WHERE tag = 'synthetic' AND run_id LIKE ?) r,
                    range(?) t(i)""",
            [users_per_run, users_per_run * len(methods), methods, len(methods), users_per_run, _now(),
             f"synthetic-{seed}-%", per_run])
        con.execute(
            """INSERT INTO train_curves
               SELECT r.run_id, 'u' || (i // 20), 'oppu:plain', 1 + i % 20, 3.0 / (1 + i % 20), ?
               FROM (SELECT run_id FROM runs WHERE run_id LIKE ?) r, range(?) t(i)""",
            [_now(), f"synthetic-{seed}-%", users_per_run * 20])

    store._write(write)
