"""DuckDB results store: the schema and every SQL statement of the project.

DuckDB lets one process open a database file read-write at a time, and a read-only open fails while a writer holds
the file. So no connection here lives longer than one operation: each call takes an `fcntl.flock` on `<db>.lock`
(shared for reads, which open `read_only=True`; exclusive for writes), opens a connection, runs, and closes. Any
DuckDB IO/lock error that still slips through (e.g. someone opened the file with the DuckDB CLI) is retried with
bounded backoff. Training workers in several processes and the dashboard therefore never see lock errors, and
no row is lost.

Writes are idempotent, so a resumed job never duplicates rows: predictions are keyed by
(run_id, user_id, query_id, method), user metrics by (run_id, user_id, method, metric), training curves by
(run_id, user_id, stage, step); each batch is delete-then-insert in one transaction.

Every prediction row carries `correct`, a per-row score (1/0 for classification, absolute error for rating,
ROUGE-L F for generation), so the dashboard's aggregations are plain SQL averages over that column.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:  # pandas is imported lazily: the CLI must start fast
    import pandas as pd

SCHEMA_VERSION = 1

# Per-row score stored in `predictions.correct`, by task kind: (name shown to people, lower is better).
ROW_SCORE: dict[str, tuple[str, bool]] = {
    "classification": ("accuracy", False),
    "rating": ("absolute error", True),
    "generation": ("ROUGE-L", False),
}

PREDICTION_COLUMNS: tuple[str, ...] = (
    "run_id", "task", "user_id", "query_id", "method", "k", "peft", "retriever", "prompt", "raw_output", "output",
    "gold", "retrieved_ids", "retrieved_scores", "history_size", "correct", "created")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, created TIMESTAMP, finished TIMESTAMP, status VARCHAR, task VARCHAR,
        model VARCHAR, tag VARCHAR, job_id VARCHAR, config JSON, data_fingerprint VARCHAR, code_version VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id VARCHAR, task VARCHAR, user_id VARCHAR, query_id VARCHAR, method VARCHAR, k INTEGER, peft VARCHAR,
        retriever VARCHAR, prompt VARCHAR, raw_output VARCHAR, output VARCHAR, gold VARCHAR,
        retrieved_ids VARCHAR[], retrieved_scores DOUBLE[], history_size INTEGER, correct DOUBLE,
        created TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS user_metrics (
        run_id VARCHAR, user_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE, history_size INTEGER,
        created TIMESTAMP)""",
    "CREATE TABLE IF NOT EXISTS run_metrics (run_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE)",
    """CREATE TABLE IF NOT EXISTS train_curves (
        run_id VARCHAR, user_id VARCHAR, stage VARCHAR, step INTEGER, loss DOUBLE, created TIMESTAMP)""",
)

_LOCK_TIMEOUT_S = 120.0
_RETRIES = 8


class StoreError(RuntimeError):
    """The results store could not be used; the message says why and what to do."""


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _is_transient(err: Exception) -> bool:
    """DuckDB errors worth retrying: another process (outside our lock) holds the file."""
    text = str(err).lower()
    return "lock" in text or "conflict" in text


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def row_score_name(task_id: str) -> tuple[str, bool]:
    """(name, lower_is_better) of the per-row score stored in `predictions.correct` for this task."""
    from oppu.tasks import get_task

    return ROW_SCORE[get_task(task_id).kind]


def row_score(task_id: str, gold: str | None, output: str) -> float | None:
    """Per-row score of one prediction, exactly as the LaMP metric scores a one-example list (None without gold).

    Classification gives 1/0 (accuracy), rating the absolute error (MAE), generation ROUGE-L F.
    """
    if gold is None:
        return None
    return _row_score_cached(task_id, str(gold), str(output))


# Classification rows repeat few (gold, output) pairs, and scikit-learn's macro-F1 (computed alongside the
# accuracy) costs milliseconds per call: caching keeps a few hundred rows per write well under a second.
@functools.lru_cache(maxsize=65536)
def _row_score_cached(task_id: str, gold: str, output: str) -> float:
    from oppu.metrics import score
    from oppu.tasks import get_task

    kind = get_task(task_id).kind
    scores = score(task_id, [gold], [output])
    for key in _ROW_SCORE_KEYS[kind]:
        if key in scores:
            return float(scores[key])
    raise StoreError(f"oppu.metrics.score({task_id!r}) returned {sorted(scores)}; expected one of "
                     f"{_ROW_SCORE_KEYS[kind]} for a {kind} task")


# Key of `oppu.metrics.score(...)` that gives the per-row score, by task kind (spellings tolerated).
_ROW_SCORE_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "acc"),
    "rating": ("mae", "MAE"),
    "generation": ("rouge-L", "rougeL", "rouge_l", "rouge-l", "ROUGE-L"),
}


class Store:
    """The results database at `path` (a DuckDB file); every method opens and closes its own connection."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            raise StoreError("the results store needs a file path (e.g. runs/oppu.duckdb), not an in-memory db")
        self.lock_path = self.path + ".lock"
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    # -- connection plumbing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"waited {_LOCK_TIMEOUT_S:.0f} s for {self.lock_path}: a process holds the results "
                            "store and does not release it; stop it (or remove a stale lock holder) and retry")
                    # jitter keeps polling readers and writers from marching in step
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @contextlib.contextmanager
    def _connect(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._locked(exclusive=write):
            attempt = 0
            while True:
                try:
                    con = duckdb.connect(self.path, read_only=not write)
                    break
                except (duckdb.IOException, duckdb.ConnectionException) as err:
                    attempt += 1
                    if attempt >= _RETRIES or not _is_transient(err):
                        raise StoreError(f"cannot open results store {self.path}: {err}") from err
                    time.sleep(0.02 * 2 ** attempt * (0.5 + random.random()))
            try:
                yield con
            finally:
                con.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._connect(write=False) as con:
            return con.execute(sql, list(params)).df()

    def _write(self, fn: Any) -> Any:
        """Run `fn(con)` inside one transaction under the exclusive lock, retrying transient errors."""
        attempt = 0
        while True:
            try:
                with self._connect(write=True) as con:
                    con.execute("BEGIN TRANSACTION")
                    try:
                        result = fn(con)
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                    return result
            except (duckdb.IOException, duckdb.TransactionException) as err:
                attempt += 1
                if attempt >= _RETRIES or not _is_transient(err):
                    raise
                time.sleep(0.02 * 2 ** attempt * (0.5 + random.random()))

    def _ensure_schema(self) -> None:
        if os.path.exists(self.path):
            with contextlib.suppress(duckdb.Error):
                with self._connect(write=False) as con:
                    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None:
                    self._check_version(int(row[0]))
                    return

        def create(con: duckdb.DuckDBPyConnection) -> None:
            for statement in _SCHEMA:
                con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            else:
                self._check_version(int(row[0]))

        self._write(create)

    def _check_version(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {found}, newer than this code ({SCHEMA_VERSION}): "
                             "upgrade oppu or point --db at another file")

    # -- writes ----------------------------------------------------------------------------------------------
    def create_run(self, run_id: str, config: dict[str, Any], task: str, model: str, data_fingerprint: str,
                   code_version: str, tag: str = "", job_id: str | None = None) -> None:
        """Record a run as `running`. Calling it again for the same run_id (a resume, or one Ray share of a job)
        keeps the first config and creation time, fills fields that were empty, and marks the run running."""
        config_json = json.dumps(config, sort_keys=True, default=str)

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                """INSERT INTO runs VALUES (?, ?, NULL, 'running', ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET
                     status = 'running', finished = NULL,
                     model = coalesce(nullif(runs.model, ''), excluded.model),
                     tag = coalesce(nullif(runs.tag, ''), excluded.tag),
                     job_id = coalesce(runs.job_id, excluded.job_id),
                     data_fingerprint = coalesce(nullif(runs.data_fingerprint, ''), excluded.data_fingerprint),
                     code_version = coalesce(nullif(runs.code_version, ''), excluded.code_version)""",
                [run_id, _utcnow(), task, model, tag, job_id, config_json, data_fingerprint, code_version])

        self._write(write)

    def add_predictions(self, rows: list[dict[str, Any]]) -> int:
        """Insert prediction rows, replacing any stored row with the same (run_id, user_id, query_id, method).

        `correct` is computed with `row_score` when a row lacks it. Returns the number of rows written.
        """
        if not rows:
            return 0
        table = _predictions_table(rows)

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.register("incoming", table)
            con.execute("""DELETE FROM predictions USING incoming i
                           WHERE predictions.run_id = i.run_id AND predictions.user_id = i.user_id
                             AND predictions.query_id = i.query_id AND predictions.method = i.method""")
            columns = ", ".join(PREDICTION_COLUMNS)
            con.execute(f"INSERT INTO predictions ({columns}) SELECT {columns} FROM incoming")
            con.unregister("incoming")

        self._write(write)
        return len(rows)

    def add_train_curve(self, run_id: str, user_id: str, stage: str, rows: list[tuple[int, float]]) -> None:
        """Store (step, loss) points of one training loop; a step written again replaces the old point."""
        if not rows:
            return
        now = _utcnow()
        values = [(run_id, user_id, stage, int(step), float(loss), now) for step, loss in rows]

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM train_curves WHERE run_id = ? AND user_id = ? AND stage = ? "
                        "AND list_contains(?, step)", [run_id, user_id, stage, [v[3] for v in values]])
            con.executemany("INSERT INTO train_curves VALUES (?, ?, ?, ?, ?, ?)", values)

        self._write(write)

    def add_user_metrics(self, run_id: str, user_id: str, method: str, metrics: dict[str, float],
                         history_size: int) -> None:
        """Replace the metrics of one user under one method (written last for a user: it marks the user done)."""
        now = _utcnow()
        values = [(run_id, user_id, method, name, float(value), int(history_size), now)
                  for name, value in metrics.items()]

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM user_metrics WHERE run_id = ? AND user_id = ? AND method = ?",
                        [run_id, user_id, method])
            if values:
                con.executemany("INSERT INTO user_metrics VALUES (?, ?, ?, ?, ?, ?, ?)", values)

        self._write(write)

    def finish_run(self, run_id: str, metrics_by_method: dict[str, dict[str, float]], status: str = "done") -> None:
        """Replace the run-level metrics and set the final status (done, failed, cancelled, interrupted)."""
        values = [(run_id, method, name, float(value))
                  for method, metrics in metrics_by_method.items() for name, value in metrics.items()]

        def write(con: duckdb.DuckDBPyConnection) -> None:
            found = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if not found:
                raise StoreError(f"finish_run: no run {run_id!r} in {self.path}; call create_run first")
            con.execute("DELETE FROM run_metrics WHERE run_id = ?", [run_id])
            if values:
                con.executemany("INSERT INTO run_metrics VALUES (?, ?, ?, ?)", values)
            con.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?", [status, _utcnow(), run_id])

        self._write(write)

    def set_status(self, run_id: str, status: str) -> None:
        """Change a run's status without touching its metrics (e.g. `cancelled` when a job stops early)."""
        self._write(lambda con: con.execute(
            "UPDATE runs SET status = ?, finished = CASE WHEN ? = 'running' THEN NULL ELSE ? END WHERE run_id = ?",
            [status, status, _utcnow(), run_id]))

    def compute_run_metrics(self, run_id: str) -> dict[str, dict[str, float]]:
        """Run-level LaMP metrics per method, recomputed from every stored prediction of the run with
        `oppu.metrics.score` (used when several processes wrote parts of one run, e.g. Ray shares)."""
        from oppu.metrics import score

        rows = self._read("SELECT task, method, gold, output FROM predictions "
                          "WHERE run_id = ? AND gold IS NOT NULL ORDER BY method, user_id, query_id", [run_id])
        result: dict[str, dict[str, float]] = {}
        for (task, method), group in rows.groupby(["task", "method"], sort=True):
            result[method] = {k: float(v) for k, v in score(task, list(group["gold"]), list(group["output"])).items()}
        return result

    # -- reads used by the core ------------------------------------------------------------------------------
    def done_users(self, run_id: str) -> set[str]:
        """Users with metrics stored for every method of the run's config (for a resumed run: users to skip)."""
        df = self._read(
            """WITH wanted AS (
                   SELECT unnest(CAST(json_extract(config, '$.methods') AS VARCHAR[])) AS method
                   FROM runs WHERE run_id = ?)
               SELECT user_id FROM user_metrics WHERE run_id = ?
               GROUP BY user_id
               HAVING count(DISTINCT method) FILTER (WHERE method IN (SELECT method FROM wanted))
                      >= greatest((SELECT count(DISTINCT method) FROM wanted), 1)""", [run_id, run_id])
        return set(df["user_id"])

    def runs(self) -> pd.DataFrame:
        """Every run, newest first, with its config as a JSON string."""
        return self._read("SELECT * FROM runs ORDER BY created DESC, run_id")

    def run_metrics(self, run_id: str) -> pd.DataFrame:
        """Columns: method, metric, value."""
        return self._read("SELECT method, metric, value FROM run_metrics WHERE run_id = ? ORDER BY method, metric",
                          [run_id])

    def user_metrics(self, run_id: str) -> pd.DataFrame:
        """Columns: user_id, method, metric, value, history_size."""
        return self._read("SELECT user_id, method, metric, value, history_size FROM user_metrics "
                          "WHERE run_id = ? ORDER BY user_id, method, metric", [run_id])

    def prediction_count(self, run_id: str | None = None) -> int:
        sql = "SELECT count(*) AS n FROM predictions" + (" WHERE run_id = ?" if run_id is not None else "")
        return int(self._read(sql, [run_id] if run_id is not None else [])["n"].iloc[0])

    # -- dashboard queries (each ≤ 300 ms on 1M predictions; see bench/bench_store.py) -----------------------
    def latest_runs(self, limit: int = 20) -> pd.DataFrame:
        """Newest runs first. Columns: run_id, created, finished, status, task, model, tag, job_id,
        data_fingerprint, users, predictions, methods (sorted list)."""
        return self._read(
            """WITH recent AS (SELECT * FROM runs ORDER BY created DESC, run_id LIMIT ?),
               counts AS (SELECT run_id, count(DISTINCT user_id) AS users, count(*) AS predictions,
                                 list_sort(list(DISTINCT method)) AS methods
                          FROM predictions WHERE run_id IN (SELECT run_id FROM recent) GROUP BY run_id)
               SELECT r.run_id, r.created, r.finished, r.status, r.task, r.model, r.tag, r.job_id,
                      r.data_fingerprint, coalesce(c.users, 0) AS users, coalesce(c.predictions, 0) AS predictions,
                      coalesce(c.methods, []) AS methods
               FROM recent r LEFT JOIN counts c USING (run_id) ORDER BY r.created DESC, r.run_id""", [int(limit)])

    def run_users(self, run_id: str) -> pd.DataFrame:
        """One row per user and method of a run. Columns: user_id, method, history_size, n (predictions),
        score (mean per-row score, see `row_score_name`)."""
        return self._read(
            """SELECT user_id, method, max(history_size) AS history_size, count(*) AS n, avg(correct) AS score
               FROM predictions WHERE run_id = ? GROUP BY user_id, method ORDER BY user_id, method""", [run_id])

    def predictions_for(self, run_id: str, user_id: str) -> pd.DataFrame:
        """Every stored prediction of one user in one run, all methods, ordered for a side-by-side view."""
        return self._read(
            """SELECT query_id, method, output, gold, correct, raw_output, prompt, retrieved_ids, retrieved_scores,
                      k, peft, retriever, history_size
               FROM predictions WHERE run_id = ? AND user_id = ? ORDER BY query_id, method""", [run_id, user_id])

    def methods_disagree(self, run_id: str, user_id: str) -> pd.DataFrame:
        """Queries of one user where the methods' outputs differ. Columns: query_id, gold, n_distinct, then one
        output column per method (named by the method) and one `<method> score` column per method."""
        with self._connect(write=False) as con:
            methods = [r[0] for r in con.execute(
                "SELECT DISTINCT method FROM predictions WHERE run_id = ? AND user_id = ? ORDER BY method",
                [run_id, user_id]).fetchall()]
            pivot_cols, params = [], []
            for m in methods:
                pivot_cols.append(f"max(output) FILTER (WHERE method = ?) AS {_quote_ident(m)}")
                pivot_cols.append(f"max(correct) FILTER (WHERE method = ?) AS {_quote_ident(m + ' score')}")
                params += [m, m]
            extra = "".join(", " + c for c in pivot_cols)
            return con.execute(
                f"""SELECT query_id, max(gold) AS gold, count(DISTINCT output) AS n_distinct{extra}
                    FROM predictions WHERE run_id = ? AND user_id = ?
                    GROUP BY query_id HAVING count(DISTINCT output) > 1 ORDER BY query_id""",
                params + [run_id, user_id]).df()

    def activity_curve(self, task: str, bins: int = 4, run_id: str | None = None) -> pd.DataFrame:
        """Per-row score per user-activity bin and method (the paper's analysis by history length). Users are
        split into `bins` equal-count bins by history size, over every run of the task or one run.
        Columns: bin (1 = least active), history_min, history_max, method, score, users, n."""
        if bins < 1:
            raise StoreError(f"activity_curve: bins must be >= 1 (got {bins})")
        run_filter = " AND run_id = ?" if run_id is not None else ""
        params: list[Any] = [task] + ([run_id] if run_id is not None else []) + [int(bins)]
        return self._read(
            f"""WITH per_user AS (
                    SELECT run_id, user_id, method, max(history_size) AS h, sum(correct) AS s, count(*) AS n
                    FROM predictions WHERE task = ? AND correct IS NOT NULL{run_filter}
                    GROUP BY run_id, user_id, method),
                users AS (SELECT run_id, user_id, max(h) AS h FROM per_user GROUP BY run_id, user_id),
                binned AS (SELECT run_id, user_id, h, ntile(?) OVER (ORDER BY h, run_id, user_id) AS bin FROM users)
                SELECT b.bin, min(b.h) AS history_min, max(b.h) AS history_max, p.method,
                       sum(p.s) / sum(p.n) AS score, count(*) AS users, sum(p.n) AS n
                FROM per_user p JOIN binned b USING (run_id, user_id)
                GROUP BY b.bin, p.method ORDER BY b.bin, p.method""", params)

    def k_sweep(self, task: str) -> pd.DataFrame:
        """Score against the number of retrieved items, for the methods that retrieve.
        Columns: method, personal (adapter or not), k, score, n, runs."""
        from oppu.config import METHODS

        retrieving = [m for m, method in METHODS.items() if method.retrieval]
        personal = [m for m, method in METHODS.items() if method.adapter]
        return self._read(
            """SELECT method, list_contains(?, method) AS personal, k, avg(correct) AS score, count(*) AS n,
                      count(DISTINCT run_id) AS runs
               FROM predictions WHERE task = ? AND list_contains(?, method) AND correct IS NOT NULL
               GROUP BY method, k ORDER BY method, k""", [personal, task, retrieving])

    def peft_comparison(self, task: str) -> pd.DataFrame:
        """Score per PEFT kind (LoRA, IA3, prompt tuning) for the methods with a personal adapter.
        Columns: peft, method, score, n, runs."""
        from oppu.config import METHODS

        personal = [m for m, method in METHODS.items() if method.adapter]
        return self._read(
            """SELECT peft, method, avg(correct) AS score, count(*) AS n, count(DISTINCT run_id) AS runs
               FROM predictions WHERE task = ? AND list_contains(?, method) AND correct IS NOT NULL
               GROUP BY peft, method ORDER BY peft, method""", [task, personal])

    def behaviour_shift(self, task: str) -> pd.DataFrame:
        """Score per history cut-off date (the run config's `history_cutoff`; '' = full history) and method.
        Columns: history_cutoff, method, score, n, runs."""
        return self._by_config_field(task, "$.history_cutoff", "history_cutoff")

    def history_format(self, task: str) -> pd.DataFrame:
        """Score per history format of retrieved items (`full` or `text_only`) and method.
        Columns: history_format, method, score, n, runs."""
        return self._by_config_field(task, "$.history_format", "history_format")

    def _by_config_field(self, task: str, json_path: str, column: str) -> pd.DataFrame:
        # aggregate the big table per run first, then join the few runs for their config field
        return self._read(
            f"""WITH per_run AS (
                    SELECT run_id, method, sum(correct) AS s, count(*) AS n
                    FROM predictions WHERE task = ? AND correct IS NOT NULL GROUP BY run_id, method)
                SELECT coalesce(json_extract_string(r.config, ?), '') AS {_quote_ident(column)}, p.method,
                       sum(p.s) / sum(p.n) AS score, sum(p.n) AS n, count(DISTINCT p.run_id) AS runs
                FROM per_run p JOIN runs r USING (run_id)
                GROUP BY ALL ORDER BY 1, 2""", [task, json_path])

    def train_curve(self, run_id: str, user_id: str | None = None) -> pd.DataFrame:
        """Loss points of a run (one user, or all). Columns: user_id, stage, step, loss."""
        user_filter = " AND user_id = ?" if user_id is not None else ""
        return self._read(
            f"SELECT user_id, stage, step, loss FROM train_curves WHERE run_id = ?{user_filter} "
            "ORDER BY user_id, stage, step", [run_id] + ([user_id] if user_id is not None else []))

    def counts(self) -> dict[str, int]:
        """Headline numbers: runs, predictions, users (distinct run/user pairs), tasks, train_points."""
        df = self._read(
            """SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM predictions) AS predictions,
                      (SELECT count(*) FROM (SELECT DISTINCT run_id, user_id FROM predictions)) AS users,
                      (SELECT count(DISTINCT task) FROM runs) AS tasks,
                      (SELECT count(*) FROM train_curves) AS train_points""")
        return {k: int(v) for k, v in df.iloc[0].items()}

    # -- synthetic data for benchmarks -----------------------------------------------------------------------
    def seed_synthetic(self, n_rows: int, runs: int = 40, users_per_run: int = 100, seed: int = 0) -> None:
        """Fill the store with `n_rows` synthetic predictions spread over `runs` runs of all LaMP tasks, with
        configs varying k, PEFT kind, history format and cut-off, so every dashboard query has work to do.
        Built with INSERT ... SELECT over range(): a million rows take seconds."""
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
            run_rows.append((f"synthetic-{seed}-{i:04d}", _utcnow(), _utcnow(), "done", task, "synthetic",
                             "synthetic", None, json.dumps(config), "synthetic", "synthetic"))
        per_run = max(1, n_rows // runs)

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", run_rows)
            con.execute(
                """INSERT INTO predictions (run_id, task, user_id, query_id, method, k, peft, retriever, prompt,
                                            raw_output, output, gold, retrieved_ids, retrieved_scores,
                                            history_size, correct, created)
                   SELECT r.run_id, r.task, 'u' || (i % ?) AS user_id, 'q' || (i // ?) AS query_id,
                          (?)[1 + i % ?] AS method,
                          CAST(json_extract(r.config, '$.retrieval.k') AS INTEGER),
                          json_extract_string(r.config, '$.user_peft.kind'), 'bm25',
                          'synthetic prompt ' || i, 'raw ' || (i % 15), 'label ' || (i % 15), 'label ' || (i % 13),
                          ['p' || (i % 97)], [1.0 / (1 + i % 7)], 5 + (hash(r.run_id, i % ?) % 500)::INTEGER,
                          CASE WHEN hash(i, r.run_id) % 3 = 0 THEN 1.0 ELSE 0.0 END, ?
                   FROM (SELECT run_id, task, config FROM runs WHERE tag = 'synthetic' AND run_id LIKE ?) r,
                        range(?) t(i)""",
                [users_per_run, users_per_run * len(methods), methods, len(methods), users_per_run, _utcnow(),
                 f"synthetic-{seed}-%", per_run])
            con.execute(
                """INSERT INTO train_curves
                   SELECT r.run_id, 'u' || (i // 20), 'oppu:plain', 1 + i % 20, 3.0 / (1 + i % 20), ?
                   FROM (SELECT run_id FROM runs WHERE run_id LIKE ?) r, range(?) t(i)""",
                [_utcnow(), f"synthetic-{seed}-%", users_per_run * 20])

        self._write(write)


def _predictions_table(rows: list[dict[str, Any]]) -> Any:
    """Prediction dicts -> a typed Arrow table (explicit list types: lists of ids and scores may be empty)."""
    import pyarrow as pa

    missing = [c for c in PREDICTION_COLUMNS if c not in ("correct", "created") and c not in rows[0]]
    if missing:
        raise StoreError(f"add_predictions: rows lack keys {missing}; each row needs {list(PREDICTION_COLUMNS[:-2])}")
    now = _utcnow()
    columns: dict[str, list[Any]] = {c: [] for c in PREDICTION_COLUMNS}
    for row in rows:
        correct = row.get("correct")
        if correct is None:
            correct = row_score(row["task"], row["gold"], row["output"])
        for c in PREDICTION_COLUMNS:
            if c == "correct":
                columns[c].append(None if correct is None else float(correct))
            elif c == "created":
                columns[c].append(now)
            elif c in ("retrieved_ids",):
                columns[c].append([str(x) for x in (row[c] or [])])
            elif c in ("retrieved_scores",):
                columns[c].append([float(x) for x in (row[c] or [])])
            elif c in ("k", "history_size"):
                columns[c].append(None if row[c] is None else int(row[c]))
            else:
                columns[c].append(None if row[c] is None else str(row[c]))
    types = {"k": pa.int32(), "history_size": pa.int32(), "correct": pa.float64(), "created": pa.timestamp("us"),
             "retrieved_ids": pa.list_(pa.string()), "retrieved_scores": pa.list_(pa.float64())}
    return pa.table({c: pa.array(columns[c], type=types.get(c, pa.string())) for c in PREDICTION_COLUMNS})
