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

Every prediction row carries both readings of its raw generation (`oppu.metrics`): `output`, the stripped raw
text the official LaMP evaluation scores, and `lenient_output`, the answer `Task.normalize` recovers from free text;
and the per-row score of each, `correct` and `lenient_correct` (1/0 for classification, absolute error for
rating, ROUGE-L F for generation), so the dashboard's aggregations are plain SQL averages over one column. User
and run metrics keep both sets in one `metric` column: official names (`accuracy`, `MAE`, `rouge-L`) and
`lenient_`-prefixed ones, so a name alone says how it was scored. Every query defaults to the official scoring.

Replicates: every prediction, user-metric and run-metric row carries the `seed` of its run (the run config's
`user_train.seed`, filled in from the stored config on insert), and runs that repeat one config under several
seeds share the config's `seed_group`. A run has one seed, so the keys above stay unique with the seed in them;
`scores` and `group_runs` read replicates back for `oppu.stats`.

Older files are upgraded in place on first open, in one transaction: schema 1 (scores of the lenient reading
only) and schema 2 (no seed column; each row gets its run's seed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

from oppu.errors import OppuError

if TYPE_CHECKING:  # pandas is imported lazily: the CLI must start fast
    import pandas as pd

SCHEMA_VERSION = 3
"""1: one reading (`output` = `Task.normalize(raw)`). 2: the official and the lenient reading side by side.
3: a `seed` column on predictions, user metrics and run metrics."""

PREDICTION_COLUMNS: tuple[str, ...] = (
    "run_id", "task", "user_id", "query_id", "method", "k", "peft", "retriever", "prompt", "raw_output", "output",
    "gold", "retrieved_ids", "retrieved_scores", "history_size", "correct", "created", "lenient_output",
    "lenient_correct")
_DERIVED_COLUMNS = ("correct", "created", "lenient_output", "lenient_correct")
"""Columns `add_predictions` fills itself when a row lacks them."""

# Per-row columns read under each scoring.
_SCORE_COLUMN = {"official": "correct", "lenient": "lenient_correct"}
_OUTPUT_COLUMN = {"official": "output", "lenient": "lenient_output"}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, created TIMESTAMP, finished TIMESTAMP, status VARCHAR, task VARCHAR,
        model VARCHAR, tag VARCHAR, job_id VARCHAR, config JSON, data_fingerprint VARCHAR, code_version VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id VARCHAR, task VARCHAR, user_id VARCHAR, query_id VARCHAR, method VARCHAR, k INTEGER, peft VARCHAR,
        retriever VARCHAR, prompt VARCHAR, raw_output VARCHAR, output VARCHAR, gold VARCHAR,
        retrieved_ids VARCHAR[], retrieved_scores DOUBLE[], history_size INTEGER, correct DOUBLE,
        created TIMESTAMP, lenient_output VARCHAR, lenient_correct DOUBLE, seed INTEGER)""",
    """CREATE TABLE IF NOT EXISTS user_metrics (
        run_id VARCHAR, user_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE, history_size INTEGER,
        created TIMESTAMP, seed INTEGER)""",
    """CREATE TABLE IF NOT EXISTS run_metrics (run_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE,
        seed INTEGER)""",
    """CREATE TABLE IF NOT EXISTS train_curves (
        run_id VARCHAR, user_id VARCHAR, stage VARCHAR, step INTEGER, loss DOUBLE, created TIMESTAMP)""",
)

_RUN_SEED = "coalesce(TRY_CAST(json_extract_string(config, '$.user_train.seed') AS INTEGER), 0)"
"""SQL over `runs`: a run's seed, from its stored config (0, `TrainConfig.seed`'s default, when it names none)."""
_RUN_GROUP = "coalesce(json_extract_string(config, '$.seed_group'), '')"
"""SQL over `runs`: the replicate group of a run ('' for a run that is not a replicate)."""
_SEED_OF = f"coalesce((SELECT {_RUN_SEED} FROM runs WHERE runs.run_id = ?), 0)"
"""SQL: the seed of the run whose id is the parameter (0 when the run is not recorded)."""

_LOCK_TIMEOUT_S = 120.0
_RETRIES = 8


class StoreError(OppuError, RuntimeError):
    """The results store could not be used; the message says why and what to do."""


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _is_transient(err: Exception) -> bool:
    """DuckDB errors worth retrying: another process (outside our lock) holds the file."""
    text = str(err).lower()
    return "lock" in text or "conflict" in text


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _score_column(scoring: str) -> str:
    from oppu.metrics import check_scoring

    return _SCORE_COLUMN[check_scoring(scoring)]


def _metric_filter(scoring: str | None) -> str:
    """SQL condition on `metric` selecting one scoring's names (None: every metric)."""
    from oppu.metrics import LENIENT_PREFIX, check_scoring

    if scoring is None:
        return "TRUE"
    like = f"starts_with(metric, '{LENIENT_PREFIX}')"
    return like if check_scoring(scoring) == "lenient" else f"NOT {like}"


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
                    if int(row[0]) == SCHEMA_VERSION:
                        return

        def create(con: duckdb.DuckDBPyConnection) -> None:
            for statement in _SCHEMA:
                con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
                return
            found = int(row[0])
            self._check_version(found)
            if found < SCHEMA_VERSION:
                self._upgrade(con, found)

        self._write(create)

    def _check_version(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {found}, newer than this code ({SCHEMA_VERSION}): "
                             "upgrade oppu or point --db at another file")

    def _upgrade(self, con: duckdb.DuckDBPyConnection, found: int) -> None:
        """Bring a file of an older schema to SCHEMA_VERSION inside the caller's transaction."""
        try:
            if found < 2:
                _upgrade_1_to_2(con)
            if found < 3:
                _upgrade_2_to_3(con)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        except (duckdb.Error, ValueError, KeyError) as err:
            raise StoreError(
                f"could not upgrade {self.path} from schema {found} to {SCHEMA_VERSION} "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); the file is "
                "unchanged. Keep a copy of it and point --db (or OPPU_DB) at a new file; the old file still opens "
                "with the oppu version that wrote it") from err

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

        A row without `lenient_output` gets `oppu.metrics.lenient_output(task, raw_output)`; a missing `correct` /
        `lenient_correct` is computed with `oppu.metrics.row_score` from `output` / `lenient_output`. Rows from
        the experiment carry all four (`oppu.metrics.prediction_fields`). Returns the number of rows written.
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
            con.execute(f"""INSERT INTO predictions ({columns}, seed)
                            SELECT {", ".join("i." + c for c in PREDICTION_COLUMNS)}, coalesce(r.seed, 0)
                            FROM incoming i LEFT JOIN (SELECT run_id, {_RUN_SEED} AS seed FROM runs) r
                              ON r.run_id = i.run_id""")
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
        """Replace the metrics of one user under one method (written last for a user: it marks the user done).
        `metrics` holds official and `lenient_` names alike (`oppu.metrics.score_both`)."""
        now = _utcnow()
        values = [(run_id, user_id, method, name, float(value), int(history_size), now)
                  for name, value in metrics.items()]

        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("DELETE FROM user_metrics WHERE run_id = ? AND user_id = ? AND method = ?",
                        [run_id, user_id, method])
            if values:
                seed = con.execute(f"SELECT {_SEED_OF}", [run_id]).fetchone()[0]
                con.executemany("INSERT INTO user_metrics (run_id, user_id, method, metric, value, history_size, "
                                "created, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(*v, seed) for v in values])

        self._write(write)

    def finish_run(self, run_id: str, metrics_by_method: dict[str, dict[str, float]], status: str = "done") -> None:
        """Replace the run-level metrics and set the final status (done, failed, cancelled, interrupted).

        `metrics_by_method` maps method -> metric name -> value, official and `lenient_` names alike (the shape
        `compute_run_metrics` returns)."""
        values = [(run_id, method, name, float(value))
                  for method, metrics in metrics_by_method.items() for name, value in metrics.items()]

        def write(con: duckdb.DuckDBPyConnection) -> None:
            found = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if not found:
                raise StoreError(f"finish_run: no run {run_id!r} in {self.path}; call create_run first")
            con.execute("DELETE FROM run_metrics WHERE run_id = ?", [run_id])
            if values:
                seed = con.execute(f"SELECT {_SEED_OF}", [run_id]).fetchone()[0]
                con.executemany("INSERT INTO run_metrics (run_id, method, metric, value, seed) VALUES (?, ?, ?, ?, ?)",
                                [(*v, seed) for v in values])
            con.execute("UPDATE runs SET status = ?, finished = ? WHERE run_id = ?", [status, _utcnow(), run_id])

        self._write(write)

    def set_status(self, run_id: str, status: str) -> None:
        """Change a run's status without touching its metrics (e.g. `cancelled` when a job stops early)."""
        self._write(lambda con: con.execute(
            "UPDATE runs SET status = ?, finished = CASE WHEN ? = 'running' THEN NULL ELSE ? END WHERE run_id = ?",
            [status, status, _utcnow(), run_id]))

    def delete_run(self, run_id: str) -> int:
        """Remove a run and every row stored under it (predictions, user and run metrics, training curves), in
        one transaction; returns how many predictions went."""
        def delete(con: duckdb.DuckDBPyConnection) -> int:
            n = con.execute("SELECT count(*) FROM predictions WHERE run_id = ?", [run_id]).fetchone()[0]
            for table in ("predictions", "user_metrics", "run_metrics", "train_curves", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            return int(n)

        return self._write(delete)

    def set_tag(self, run_id: str, tag: str) -> None:
        """Change a run's tag (its config keeps the tag it was submitted with)."""
        self._write(lambda con: con.execute("UPDATE runs SET tag = ? WHERE run_id = ?", [tag, run_id]))

    def compute_run_metrics(self, run_id: str) -> dict[str, dict[str, float]]:
        """Run-level LaMP metrics per method, official and `lenient_` ones, recomputed from every stored
        prediction of the run with `oppu.metrics.score_both` (also when several processes wrote parts of one run,
        e.g. Ray shares)."""
        from oppu.metrics import score_both

        rows = self._read("SELECT task, method, gold, output, lenient_output FROM predictions "
                          "WHERE run_id = ? AND gold IS NOT NULL ORDER BY method, user_id, query_id", [run_id])
        result: dict[str, dict[str, float]] = {}
        for (task, method), group in rows.groupby(["task", "method"], sort=True):
            metrics = score_both(task, list(group["gold"]), list(group["output"]), list(group["lenient_output"]))
            result[method] = {k: float(v) for k, v in metrics.items()}
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

    def run_metrics(self, run_id: str, scoring: str | None = "official") -> pd.DataFrame:
        """Columns: method, metric, value. One scoring's metrics (`lenient` ones keep their `lenient_` names), or
        every metric with `scoring=None`."""
        return self._read(f"SELECT method, metric, value FROM run_metrics WHERE run_id = ? "
                          f"AND {_metric_filter(scoring)} ORDER BY method, metric", [run_id])

    def user_metrics(self, run_id: str, scoring: str | None = "official") -> pd.DataFrame:
        """Columns: user_id, method, metric, value, history_size; `scoring` as in `run_metrics`."""
        return self._read(f"SELECT user_id, method, metric, value, history_size FROM user_metrics "
                          f"WHERE run_id = ? AND {_metric_filter(scoring)} ORDER BY user_id, method, metric",
                          [run_id])

    def prediction_count(self, run_id: str | None = None) -> int:
        sql = "SELECT count(*) AS n FROM predictions" + (" WHERE run_id = ?" if run_id is not None else "")
        return int(self._read(sql, [run_id] if run_id is not None else [])["n"].iloc[0])

    # -- replicates and per-query scores (read by oppu.stats) -------------------------------------------------
    def run_group(self, run_id: str) -> str:
        """The replicate group of a run ('' when it is a single run); StoreError for an unknown run id."""
        df = self._read(f"SELECT {_RUN_GROUP} AS g FROM runs WHERE run_id = ?", [run_id])
        if df.empty:
            raise StoreError(f"no run {run_id!r} in {self.path}: `oppu results --db {self.path}` lists the run ids")
        return str(df["g"].iloc[0])

    def group_runs(self, seed_group: str) -> pd.DataFrame:
        """The runs of one replicate group, by seed. Columns: run_id, seed, status, task, tag, created."""
        return self._read(
            f"""SELECT run_id, {_RUN_SEED} AS seed, status, task, tag, created FROM runs
                WHERE {_RUN_GROUP} = ? ORDER BY seed, created, run_id""", [seed_group])

    def seed_groups(self, limit: int = 20) -> pd.DataFrame:
        """Replicate groups, newest first. Columns: seed_group, task, tag, runs, seeds (sorted list), created,
        statuses (sorted list of the runs' statuses)."""
        return self._read(
            f"""SELECT {_RUN_GROUP} AS seed_group, any_value(task) AS task, any_value(tag) AS tag,
                       count(*) AS runs, list_sort(list(DISTINCT {_RUN_SEED})) AS seeds, min(created) AS created,
                       list_sort(list(DISTINCT status)) AS statuses
                FROM runs WHERE {_RUN_GROUP} <> '' GROUP BY 1 ORDER BY created DESC, seed_group LIMIT ?""",
            [int(limit)])

    def scores(self, run_ids: Sequence[str], scoring: str = "official") -> pd.DataFrame:
        """One row per scored prediction of the given runs: the input of `oppu.stats` (`score` is the per-row
        score under `scoring`; rows without one, e.g. queries without a gold, are left out). Columns: run_id,
        seed, task, user_id, query_id, method, k, peft, history_size, score."""
        correct = _score_column(scoring)
        run_ids = [str(r) for r in run_ids] or [""]
        marks = ", ".join("?" * len(run_ids))  # an IN list (not list_contains) lets DuckDB skip other runs' rows
        return self._read(
            f"""SELECT p.run_id, coalesce(p.seed, r.seed, 0) AS seed, p.task, p.user_id, p.query_id, p.method,
                       p.k, p.peft, p.history_size, p.{correct} AS score
                FROM predictions p LEFT JOIN (SELECT run_id, {_RUN_SEED} AS seed FROM runs) r USING (run_id)
                WHERE p.run_id IN ({marks}) AND p.{correct} IS NOT NULL
                ORDER BY p.run_id, p.user_id, p.query_id, p.method""", run_ids)

    def answer_spread(self, run_ids: Sequence[str]) -> pd.DataFrame:
        """Per method of the given runs: how varied its answers are (a base that answers every query alike has
        learnt the format, not the task). Columns: method, answers, distinct, top_answer, top_share."""
        run_ids = [str(r) for r in run_ids] or [""]
        marks = ", ".join("?" * len(run_ids))
        return self._read(
            f"""WITH counted AS (
                    SELECT method, output, count(*) AS c FROM predictions WHERE run_id IN ({marks})
                    GROUP BY method, output)
                SELECT method, sum(c)::BIGINT AS answers, count(*)::BIGINT AS distinct,
                       arg_max(output, c) AS top_answer, max(c) / sum(c) AS top_share
                FROM counted GROUP BY method ORDER BY method""", run_ids)

    def analysis_cells(self, task: str, scoring: str = "official") -> pd.DataFrame:
        """Per run, user and method of a task: the sum `s` and count `n` of the per-row scores under `scoring`,
        with every setting an analysis varies (`k`, `peft`, the config's `history_cutoff` and `history_format`,
        '' when unset) and the user's `history_size` (the largest stored). What intervals beside
        `activity_curve`, `k_sweep`, `peft_comparison`, `behaviour_shift` and `history_format` resample (users,
        and runs as replicates): one scan, thousands of rows from a million-row store.
        Columns: run_id, user_id, method, k, peft, history_cutoff, history_format, history_size, s, n."""
        correct = _score_column(scoring)
        return self._read(
            f"""WITH cells AS (
                    SELECT run_id, user_id, method, k, peft, max(history_size) AS history_size,
                           sum({correct}) AS s, count(*) AS n
                    FROM predictions WHERE task = ? AND {correct} IS NOT NULL GROUP BY ALL)
                SELECT c.run_id, c.user_id, c.method, c.k, c.peft,
                       coalesce(json_extract_string(r.config, '$.history_cutoff'), '') AS history_cutoff,
                       coalesce(json_extract_string(r.config, '$.history_format'), '') AS history_format,
                       c.history_size, c.s, c.n
                FROM cells c LEFT JOIN runs r USING (run_id) ORDER BY c.run_id, c.user_id, c.method, c.k""",
            [task])

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

    def run_users(self, run_id: str, scoring: str = "official") -> pd.DataFrame:
        """One row per user and method of a run. Columns: user_id, method, history_size, n (predictions),
        score (mean per-row score under `scoring`, see `oppu.metrics.row_score_name`)."""
        return self._read(
            f"""SELECT user_id, method, max(history_size) AS history_size, count(*) AS n,
                       avg({_score_column(scoring)}) AS score
                FROM predictions WHERE run_id = ? GROUP BY user_id, method ORDER BY user_id, method""", [run_id])

    def predictions_for(self, run_id: str, user_id: str) -> pd.DataFrame:
        """Every stored prediction of one user in one run, all methods, ordered for a side-by-side view."""
        return self._read(
            """SELECT query_id, method, output, gold, correct, lenient_output, lenient_correct, raw_output, prompt,
                      retrieved_ids, retrieved_scores, k, peft, retriever, history_size
               FROM predictions WHERE run_id = ? AND user_id = ? ORDER BY query_id, method""", [run_id, user_id])

    def run_predictions(self, run_id: str) -> pd.DataFrame:
        """Every scored prediction of a run (user_id, query_id, method, both scores): what `oppu.stats` resamples."""
        return self._read(
            """SELECT user_id, query_id, method, correct, lenient_correct FROM predictions
               WHERE run_id = ? AND gold IS NOT NULL ORDER BY user_id, query_id, method""", [run_id])

    def methods_disagree(self, run_id: str, user_id: str, scoring: str = "official") -> pd.DataFrame:
        """Queries of one user where the methods' answers (under `scoring`) differ. Columns: query_id, gold,
        n_distinct, then one answer column per method (named by the method) and one `<method> score` column."""
        correct, output = _score_column(scoring), _OUTPUT_COLUMN[scoring]
        with self._connect(write=False) as con:
            methods = [r[0] for r in con.execute(
                "SELECT DISTINCT method FROM predictions WHERE run_id = ? AND user_id = ? ORDER BY method",
                [run_id, user_id]).fetchall()]
            pivot_cols, params = [], []
            for m in methods:
                pivot_cols.append(f"max({output}) FILTER (WHERE method = ?) AS {_quote_ident(m)}")
                pivot_cols.append(f"max({correct}) FILTER (WHERE method = ?) AS {_quote_ident(m + ' score')}")
                params += [m, m]
            extra = "".join(", " + c for c in pivot_cols)
            return con.execute(
                f"""SELECT query_id, max(gold) AS gold, count(DISTINCT {output}) AS n_distinct{extra}
                    FROM predictions WHERE run_id = ? AND user_id = ?
                    GROUP BY query_id HAVING count(DISTINCT {output}) > 1 ORDER BY query_id""",
                params + [run_id, user_id]).df()

    def activity_curve(self, task: str, scoring: str = "official", bins: int = 4,
                       run_id: str | None = None) -> pd.DataFrame:
        """Per-row score per user-activity bin and method (the paper's analysis by history length). Users are
        split into `bins` equal-count bins by history size, over every run of the task or one run.
        Columns: bin (1 = least active), history_min, history_max, method, score, users, n."""
        if bins < 1:
            raise StoreError(f"activity_curve: bins must be >= 1 (got {bins})")
        run_filter = " AND run_id = ?" if run_id is not None else ""
        params: list[Any] = [task] + ([run_id] if run_id is not None else []) + [int(bins)]
        correct = _score_column(scoring)
        return self._read(
            f"""WITH per_user AS (
                    SELECT run_id, user_id, method, max(history_size) AS h, sum({correct}) AS s, count(*) AS n
                    FROM predictions WHERE task = ? AND {correct} IS NOT NULL{run_filter}
                    GROUP BY run_id, user_id, method),
                users AS (SELECT run_id, user_id, max(h) AS h FROM per_user GROUP BY run_id, user_id),
                binned AS (SELECT run_id, user_id, h, ntile(?) OVER (ORDER BY h, run_id, user_id) AS bin FROM users)
                SELECT b.bin, min(b.h) AS history_min, max(b.h) AS history_max, p.method,
                       sum(p.s) / sum(p.n) AS score, count(*) AS users, sum(p.n) AS n
                FROM per_user p JOIN binned b USING (run_id, user_id)
                GROUP BY b.bin, p.method ORDER BY b.bin, p.method""", params)

    def k_sweep(self, task: str, scoring: str = "official") -> pd.DataFrame:
        """Score against the number of retrieved items, for the methods that retrieve.
        Columns: method, personal (adapter or not), k, score, n, runs."""
        from oppu.config import METHODS

        retrieving = [m for m, method in METHODS.items() if method.retrieval]
        personal = [m for m, method in METHODS.items() if method.adapter]
        correct = _score_column(scoring)
        return self._read(
            f"""SELECT method, list_contains(?, method) AS personal, k, avg({correct}) AS score, count(*) AS n,
                       count(DISTINCT run_id) AS runs
                FROM predictions WHERE task = ? AND list_contains(?, method) AND {correct} IS NOT NULL
                GROUP BY method, k ORDER BY method, k""", [personal, task, retrieving])

    def peft_comparison(self, task: str, scoring: str = "official") -> pd.DataFrame:
        """Score per PEFT kind (LoRA, IA3, prompt tuning) for the methods with a personal adapter.
        Columns: peft, method, score, n, runs."""
        from oppu.config import METHODS

        personal = [m for m, method in METHODS.items() if method.adapter]
        correct = _score_column(scoring)
        return self._read(
            f"""SELECT peft, method, avg({correct}) AS score, count(*) AS n, count(DISTINCT run_id) AS runs
                FROM predictions WHERE task = ? AND list_contains(?, method) AND {correct} IS NOT NULL
                GROUP BY peft, method ORDER BY peft, method""", [task, personal])

    def behaviour_shift(self, task: str, scoring: str = "official") -> pd.DataFrame:
        """Score per history cut-off date (the run config's `history_cutoff`; '' = full history) and method.
        Columns: history_cutoff, method, score, n, runs."""
        return self._by_config_field(task, "$.history_cutoff", "history_cutoff", scoring)

    def history_format(self, task: str, scoring: str = "official") -> pd.DataFrame:
        """Score per history format of retrieved items (`full` or `text_only`) and method.
        Columns: history_format, method, score, n, runs."""
        return self._by_config_field(task, "$.history_format", "history_format", scoring)

    def _by_config_field(self, task: str, json_path: str, column: str, scoring: str) -> pd.DataFrame:
        # aggregate the big table per run first, then join the few runs for their config field
        correct = _score_column(scoring)
        return self._read(
            f"""WITH per_run AS (
                    SELECT run_id, method, sum({correct}) AS s, count(*) AS n
                    FROM predictions WHERE task = ? AND {correct} IS NOT NULL GROUP BY run_id, method)
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


def _upgrade_1_to_2(con: duckdb.DuckDBPyConnection) -> None:
    """Schema 1 stored `output = Task.normalize(raw)` and scored that: it becomes the lenient reading, and the
    official one is recomputed from `raw_output`. Stored user and run metrics were lenient too: they are renamed
    `lenient_*`, and their official twins are recomputed from the upgraded predictions."""
    import pyarrow as pa

    from oppu.metrics import LENIENT_PREFIX, official_output, row_score, score

    con.execute("ALTER TABLE predictions ADD COLUMN lenient_output VARCHAR")
    con.execute("ALTER TABLE predictions ADD COLUMN lenient_correct DOUBLE")
    con.execute("UPDATE predictions SET lenient_output = output, lenient_correct = correct")
    # Scored once per distinct (task, gold, raw output): synthetic stores repeat few of them.
    distinct = con.execute("SELECT DISTINCT task, gold, raw_output FROM predictions "
                           "WHERE raw_output IS NOT NULL").fetchall()
    official: dict[str, list[Any]] = {"task": [], "gold": [], "raw_output": [], "output": [], "correct": []}
    for task, gold, raw in distinct:
        output = official_output(raw)
        try:
            correct = row_score(task, gold, output)
        except ValueError:  # an unscorable gold (e.g. a LaMP_3 gold that is not a number): no score
            correct = None
        for key, value in zip(official, (task, gold, raw, output, correct)):
            official[key].append(value)
    con.register("official_readings", pa.table(official, schema=pa.schema(
        [(c, pa.float64() if c == "correct" else pa.string()) for c in official])))
    con.execute("""UPDATE predictions SET output = o.output, correct = o.correct FROM official_readings o
                   WHERE predictions.task = o.task AND predictions.gold IS NOT DISTINCT FROM o.gold
                     AND predictions.raw_output = o.raw_output""")
    con.unregister("official_readings")

    for table in ("user_metrics", "run_metrics"):
        con.execute(f"UPDATE {table} SET metric = ? || metric WHERE NOT starts_with(metric, ?)",
                    [LENIENT_PREFIX, LENIENT_PREFIX])
    now = _utcnow()
    users = con.execute("SELECT DISTINCT run_id, user_id, method, max(history_size) FROM user_metrics "
                        "GROUP BY ALL").fetchall()
    for run_id, user_id, method, history_size in users:
        for name, value in _official_metrics(con, "run_id = ? AND user_id = ? AND method = ?",
                                             [run_id, user_id, method], score).items():
            con.execute("INSERT INTO user_metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [run_id, user_id, method, name, value, history_size, now])
    for run_id, method in con.execute("SELECT DISTINCT run_id, method FROM run_metrics").fetchall():
        for name, value in _official_metrics(con, "run_id = ? AND method = ?", [run_id, method], score).items():
            con.execute("INSERT INTO run_metrics VALUES (?, ?, ?, ?)", [run_id, method, name, value])


def _upgrade_2_to_3(con: duckdb.DuckDBPyConnection) -> None:
    """Schema 2 had no seed column: each prediction and metric row gets the seed of its run's stored config."""
    for table in ("predictions", "user_metrics", "run_metrics"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN seed INTEGER")
        con.execute(f"""UPDATE {table} SET seed = r.seed FROM (SELECT run_id, {_RUN_SEED} AS seed FROM runs) r
                        WHERE {table}.run_id = r.run_id""")
        con.execute(f"UPDATE {table} SET seed = 0 WHERE seed IS NULL")


def _official_metrics(con: duckdb.DuckDBPyConnection, where: str, params: list[Any], score: Any
                      ) -> dict[str, float]:
    rows = con.execute(f"SELECT task, gold, output FROM predictions WHERE {where} AND gold IS NOT NULL",
                       params).fetchall()
    if not rows:
        return {}
    try:
        return {k: float(v) for k, v in score(rows[0][0], [r[1] for r in rows], [r[2] for r in rows]).items()}
    except ValueError:
        return {}


def _predictions_table(rows: list[dict[str, Any]]) -> Any:
    """Prediction dicts -> a typed Arrow table (explicit list types: lists of ids and scores may be empty)."""
    import pyarrow as pa

    from oppu.metrics import lenient_output, row_score

    missing = [c for c in PREDICTION_COLUMNS if c not in _DERIVED_COLUMNS and c not in rows[0]]
    if missing:
        required = [c for c in PREDICTION_COLUMNS if c not in _DERIVED_COLUMNS]
        raise StoreError(f"add_predictions: rows lack keys {missing}; each row needs {required}")
    now = _utcnow()
    columns: dict[str, list[Any]] = {c: [] for c in PREDICTION_COLUMNS}
    for row in rows:
        row = dict(row)
        if row.get("lenient_output") is None:
            row["lenient_output"] = (None if row["raw_output"] is None
                                     else lenient_output(row["task"], row["raw_output"]))
        for score_col, output_col in (("correct", "output"), ("lenient_correct", "lenient_output")):
            if row.get(score_col) is None and row[output_col] is not None:
                row[score_col] = row_score(row["task"], row["gold"], row[output_col])
        row["created"] = now
        for c in PREDICTION_COLUMNS:
            value = row.get(c)
            if c in ("correct", "lenient_correct"):
                columns[c].append(None if value is None else float(value))
            elif c == "created":
                columns[c].append(value)
            elif c == "retrieved_ids":
                columns[c].append([str(x) for x in (value or [])])
            elif c == "retrieved_scores":
                columns[c].append([float(x) for x in (value or [])])
            elif c in ("k", "history_size"):
                columns[c].append(None if value is None else int(value))
            else:
                columns[c].append(None if value is None else str(value))
    types = {"k": pa.int32(), "history_size": pa.int32(), "correct": pa.float64(), "lenient_correct": pa.float64(),
             "created": pa.timestamp("us"), "retrieved_ids": pa.list_(pa.string()),
             "retrieved_scores": pa.list_(pa.float64())}
    return pa.table({c: pa.array(columns[c], type=types.get(c, pa.string())) for c in PREDICTION_COLUMNS})
