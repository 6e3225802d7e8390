"""One run end to end: data -> task adaptation -> per-user adapters -> every method's predictions -> store.

Layers: resolve (task, data, users, run id) -> build (model, retriever, task-adapted base, adapter bank) -> loop
over chunks of users (train, generate, write) -> finish (run-level metrics from every stored prediction).

Adapters per user: one per distinct prompt STYLE the run's methods need, because an adapter should be trained
on prompts shaped like the ones it answers (the paper trains the OPPU+RAG adapter on retrieval-augmented
prompts). `oppu` -> plain, `oppu+rag` -> rag, `oppu+pag` -> rag+pag (the paper's PAG is the profile plus the
k retrieved items), `oppu+profile-only` -> pag; with k=0 the rag styles collapse into their non-rag twins.
Methods without an adapter (none, rag, pag, profile-only) use the task-adapted
base. Adapters are saved under `artifacts/adapters/<task>/<run id>/<user>/<style>/`.

Resumable: a user whose predictions and metrics are stored for every method (`Store.done_users`) and whose
adapter folders are complete is skipped, so a stopped or crashed job continues where it left off. Results are
written user chunk by user chunk, never only at the end. Gold answers are read only to score, never to prompt.

Engine: `oppu.banks` holds the adapters. With LoRA (the default) a chunk's users train together in shared
batches and every method's queries of the chunk are answered in shared batches, each row through its own
user's adapter (gathered multi-LoRA); IA3, prompt tuning and `batching="per_user"` use PEFT one user at a time.

Progress events are `progress(stage, step, total, loss)`: training stages (`adapt:<task>`,
`user:<id>:<style>`) report per-step losses; `users` reports users finished (loss None).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from oppu.config import METHODS, RunConfig
from oppu.examples import PromptStyle
from oppu.train import StopRequested

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float | None], None]
USERS_PER_CHUNK = 8
"""Users trained together and answered in one mixed-adapter generation pass (rows of several users share
batches). Larger chunks batch more; a killed job redoes at most one chunk."""
MODEL_CACHE = os.environ.get("OPPU_MODEL_CACHE", ".cache/models")
"""Where `oppu prepare` put the embedded model's safetensors cache (relative to the working folder)."""


# -- resolve -------------------------------------------------------------------------------------------------
def method_style(cfg: RunConfig, method: str) -> PromptStyle:
    """The prompt style of a method under this run's retrieval settings and history format."""
    m = METHODS[method]
    return PromptStyle(retrieval=m.retrieval and cfg.retrieval.k > 0, profile=m.profile,
                       k=cfg.retrieval.k if m.retrieval else 0, text_only=cfg.history_format == "text_only")


def run_styles(cfg: RunConfig) -> list[PromptStyle]:
    """Distinct prompt styles of all the run's methods, in method order (one task-adapted base each)."""
    return list(dict.fromkeys(method_style(cfg, m) for m in cfg.methods))


def adapter_styles(cfg: RunConfig) -> list[PromptStyle]:
    """Distinct prompt styles of the methods that use a personal adapter (one adapter each per user)."""
    styles = [method_style(cfg, m) for m in cfg.methods if METHODS[m].adapter]
    return list(dict.fromkeys(styles))


def select_users(data, cfg: RunConfig) -> list:
    """`cfg.user_ids` in the given order (unknown ids raise UnknownUserError), else the most active users."""
    if cfg.user_ids:
        return [data.user(uid) for uid in cfg.user_ids]
    return list(data.most_active(cfg.users or 1))


def visible_history(user, cutoff: str | None) -> list:
    """Behaviour shift: only items dated strictly before the cutoff (undated items stay)."""
    from oppu.retrieval import visible

    return visible(user.history, cutoff)


def new_run_id(cfg: RunConfig) -> str:
    return f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def code_version() -> str:
    from oppu import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def portable_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config with absolute paths made relative (or reduced to a name): manifests travel."""
    from oppu.model import compute_dtype_name, model_key

    def rel(path: str) -> str:
        p = Path(path)
        if not p.is_absolute():
            return path
        try:
            return os.path.relpath(p, Path.cwd()) if p.is_relative_to(Path.cwd()) else p.name
        except ValueError:
            return p.name

    d = cfg.to_dict()
    for key in ("data_dir", "db", "artifacts_dir"):
        d[key] = rel(d[key])
    d["model"] = {**d["model"], "name": model_key(cfg.model),
                  "compute_dtype": compute_dtype_name(cfg.model, MODEL_CACHE)}
    return d


def adapter_folder(cfg: RunConfig, run_id: str, user_id: str, style: PromptStyle) -> Path:
    from oppu.paths import user_adapter_dir

    return Path(user_adapter_dir(Path(cfg.artifacts_dir) / "adapters", cfg.task, run_id, user_id)) / style.key


def checkpoint_folder(cfg: RunConfig, run_id: str, users: Sequence | None = None) -> Path:
    """Where a run's per-user training checkpoints live (`oppu.checkpoint`); with `users`, one chunk's folder
    (named by a hash of the chunk's user ids: a resumed run redoes the same chunks)."""
    import hashlib

    from oppu.paths import safe_component

    root = Path(cfg.artifacts_dir) / "checkpoints" / safe_component(cfg.task) / safe_component(run_id)
    if users is None:
        return root
    return root / hashlib.sha256("\n".join(str(u.id) for u in users).encode()).hexdigest()[:16]


def _adapter_key(user_id: str, style: PromptStyle) -> str:
    return f"{user_id}|{style.key}"


@dataclass
class _Context:
    """What every chunk of users needs, built once per run."""

    cfg: RunConfig
    run_id: str
    task: Any
    store: Any
    tokenizer: Any
    bank: Any
    """`oppu.banks.AdapterBank`: where the chunk's adapters train, answer and are saved from."""
    retriever: Any
    styles: list[PromptStyle]
    fingerprint: str
    progress: Progress | None
    should_stop: Callable[[], bool] | None
    bases: Any = None
    """`oppu.adaptation.TaskBases`: one task-adapted base per prompt style, switched in place; None without
    task adaptation."""


# -- the run -------------------------------------------------------------------------------------------------
def run_experiment(cfg: RunConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                   store=None, run_id: str | None = None, job_id: str | None = None,
                   finalize: bool = True) -> str:
    """Run (or resume, with the same `run_id`) one experiment; returns the run id.

    `finalize=False` leaves the run's status and run-level metrics to the caller (a Ray share of a larger run).

    Raises `oppu.data.DataError` / `UnknownUserError` / `UnknownTaskError` for bad inputs before any model loads.
    A `should_stop()` that turns True ends the run early with status `cancelled` (resume it with the same id).
    """
    from oppu.model import model_key
    from oppu.splits import run_data
    from oppu.store import Store
    from oppu.tasks import get_task

    task = get_task(cfg.task)
    data = run_data(cfg, task)
    users = select_users(data, cfg)
    run_id = run_id or new_run_id(cfg)
    store = store if store is not None else Store(cfg.db)
    # Portable: the stored config and model name carry no absolute (home) paths; runs stay comparable anyway.
    store.create_run(run_id, portable_config(cfg), task.id, model_key(cfg.model), data.fingerprint, code_version(),
                     cfg.tag, job_id)
    try:
        pending = _pending_users(cfg, run_id, users, store)
        if pending:
            ctx = _build(cfg, run_id, task, data, store, progress, should_stop)
            done = len(users) - len(pending)
            for start in range(0, len(pending), USERS_PER_CHUNK):
                if should_stop is not None and should_stop():
                    raise StopRequested("stopped between users")
                chunk = pending[start:start + USERS_PER_CHUNK]
                _run_chunk(ctx, chunk)
                done += len(chunk)
                if progress is not None:
                    progress("users", done, len(users), None)
        if finalize:
            store.finish_run(run_id, store.compute_run_metrics(run_id), status="done")
            import shutil

            shutil.rmtree(checkpoint_folder(cfg, run_id), ignore_errors=True)
    except StopRequested as stop:
        log.info("run %s stopped: %s", run_id, stop)
        store.set_status(run_id, "cancelled")
    except Exception:
        store.set_status(run_id, "failed")
        raise
    except BaseException:  # KeyboardInterrupt, a worker's SIGTERM: resumable, not a failure of the run
        store.set_status(run_id, "interrupted")
        raise
    return run_id


def _pending_users(cfg: RunConfig, run_id: str, users: Sequence, store) -> list:
    from oppu.model import adapter_complete

    done = store.done_users(run_id)
    styles = adapter_styles(cfg)

    def complete(user) -> bool:
        return user.id in done and all(adapter_complete(adapter_folder(cfg, run_id, user.id, s)) for s in styles)

    return [u for u in users if not complete(u)]


def _build(cfg: RunConfig, run_id: str, task, data, store, progress, should_stop) -> _Context:
    from oppu.adaptation import TaskBases
    from oppu.banks import make_bank
    from oppu.model import load_model

    model, tokenizer = load_model(cfg.model, MODEL_CACHE)
    retriever = run_retriever(cfg, task)
    bases = None
    if cfg.task_adaptation and data.train_users:
        results = adapt_styles(cfg, task, data, model, tokenizer, retriever, progress, should_stop)
        for style, result in results.items():
            store.add_train_curve(run_id, "__task__", f"adapt:{style.key}", result.curve)
        # Captured before the engine wraps the model: the bases switch the same weight tensors in place.
        bases = TaskBases(model, {style: result.folder for style, result in results.items()})
    elif cfg.task_adaptation:
        log.warning("no other users in %s: task adaptation skipped", data.source)
    return _Context(cfg, run_id, task, store, tokenizer, make_bank(model, cfg.user_peft, cfg.batching), retriever,
                    adapter_styles(cfg), data.fingerprint, progress, should_stop, bases)


def run_retriever(cfg: RunConfig, task):
    """The retriever a run searches histories with (items rendered as the run's history format renders them)."""
    from oppu.retrieval import get_retriever

    return get_retriever(cfg.retrieval.retriever,
                         partial(task.format_item, text_only=cfg.history_format == "text_only"))


def adapt_styles(cfg: RunConfig, task, data, model, tokenizer, retriever, progress=None, should_stop=None) -> dict:
    """The task-adapted base of every prompt style the run asks in ({style: AdaptResult}): task_LoRA.py trains
    k=0, k=1 and k=1 + profile separately. Each is cached by task, style and settings, so runs that share a style
    share its base, and a base built ahead of time (`oppu prepare`) is found here."""
    from oppu.adaptation import adapt_task
    from oppu.model import model_key

    return {style: adapt_task(model, tokenizer, task, data.train_users, style, cfg.adaptation_peft,
                              cfg.adaptation_train, cfg.artifacts_dir, model_name=model_key(cfg.model),
                              data_fingerprint=data.fingerprint, retriever=retriever,
                              retriever_name=cfg.retrieval.retriever, progress=progress, should_stop=should_stop)
            for style in run_styles(cfg)}


def prepare_bases(cfg: RunConfig, progress=None) -> dict:
    """Build (or find cached) the task-adapted bases a run with `cfg` will use, without running it: what
    `oppu prepare` does for the dashboard's quick demo, so its first click trains only the personal adapters."""
    from oppu.model import load_model
    from oppu.splits import run_data
    from oppu.tasks import get_task

    task = get_task(cfg.task)
    data = run_data(cfg, task)
    if not (cfg.task_adaptation and data.train_users):
        return {}
    model, tokenizer = load_model(cfg.model, MODEL_CACHE)
    return adapt_styles(cfg, task, data, model, tokenizer, run_retriever(cfg, task), progress)


def _use_base(ctx: _Context, style: PromptStyle | None) -> None:
    """Put the task-adapted base of this prompt style in place (None: the original model)."""
    if ctx.bases is not None:
        ctx.bases.use(style)


def _run_chunk(ctx: _Context, users: Sequence) -> None:
    """Per prompt style: put that style's task-adapted base in place, train the chunk's adapters of that style,
    answer the style's methods in shared batches. Then store everything and free the adapters."""
    from oppu.generate import prompt_budget
    from oppu.metrics import prediction_fields
    from oppu.model import model_key
    from oppu.profiles import build_profiles

    cfg, task = ctx.cfg, ctx.task
    histories = {u.id: visible_history(u, cfg.history_cutoff) for u in users}
    profiles: dict[str, str] = {}
    if any(METHODS[m].profile for m in cfg.methods):
        # Profiles are written by the untuned model, as gen_profile.py writes them with a general LLM.
        _use_base(ctx, None)
        profiles = build_profiles(users, task, ctx.bank.base, ctx.tokenizer, Path(cfg.artifacts_dir),
                                  model_name=model_key(cfg.model), histories=histories, gen_cfg=cfg.generation)
    max_new = cfg.generation.max_new_tokens or task.max_new_tokens
    rows, raws = [], []
    for style in run_styles(cfg):
        _use_base(ctx, style)
        if style in ctx.styles:
            _train_adapters(ctx, users, style, histories, profiles)
        prompts, adapters = [], []
        for user in users:
            for method in (m for m in cfg.methods if method_style(cfg, m) == style):
                for query in user.queries:
                    row, prompt, adapter = _query_row(ctx, user, method, query, histories[user.id],
                                                      profiles.get(user.id))
                    rows.append(row)
                    prompts.append(prompt)
                    adapters.append(adapter)
        # Answers see the training cutoff: an adapter meets prompts cut the way its training prompts were.
        if ctx.progress is not None:
            ctx.progress(f"generate:{style.key}", 0, len(prompts), None)
        raws += ctx.bank.generate(ctx.tokenizer, prompts, adapters, cfg.generation, max_new,
                                  prompt_budget(cfg.user_train.max_length, max_new))
        if ctx.progress is not None:
            ctx.progress(f"generate:{style.key}", len(prompts), len(prompts), None)
    for row, raw in zip(rows, raws, strict=True):
        # the official reading (stripped raw text) and the lenient one (Task.normalize), each with its score
        row.update(prediction_fields(task.id, row["gold"], raw))
    ctx.store.add_predictions(rows)
    _store_user_metrics(ctx, users, rows, histories)
    from oppu.checkpoint import Checkpoint

    Checkpoint(checkpoint_folder(cfg, ctx.run_id, users)).clear()  # the chunk's adapters and answers are saved
    for user in users:
        for style in ctx.styles:
            ctx.bank.delete(_adapter_key(user.id, style))


def _train_adapters(ctx: _Context, users: Sequence, style: PromptStyle, histories: dict,
                    profiles: dict[str, str]) -> None:
    """One adapter per user of the chunk for this prompt style (each on its own user's data), saved."""
    from oppu.checkpoint import Checkpoint

    cfg = ctx.cfg
    keys = {str(u.id): _adapter_key(u.id, style) for u in users}
    results = ctx.bank.train(ctx.tokenizer, ctx.task, users, style, cfg.user_peft, cfg.user_train,
                             histories={str(u.id): histories[u.id] for u in users}, retriever=ctx.retriever,
                             profiles={str(u.id): profiles.get(u.id) for u in users}, adapter_keys=keys,
                             progress=ctx.progress, should_stop=ctx.should_stop,
                             checkpoint=Checkpoint(checkpoint_folder(cfg, ctx.run_id, users) / style.key))
    for user in users:
        result = results[str(user.id)]
        ctx.store.add_train_curve(ctx.run_id, user.id, f"oppu:{style.key}", result.curve)
        manifest = {"user_id": user.id, "run_id": ctx.run_id, "task": cfg.task, "style": style.key,
                    "methods": [m for m in cfg.methods if METHODS[m].adapter and method_style(cfg, m) == style],
                    "config": portable_config(cfg), "data_fingerprint": ctx.fingerprint,
                    "data_hash": result.data_hash, "item_ids": result.item_ids, "item_count": len(result.item_ids),
                    "examples": result.examples, "final_loss": result.final_loss, "train_curve": result.curve,
                    "peft": asdict(cfg.user_peft), "train": asdict(cfg.user_train), "engine": ctx.bank.engine}
        ctx.bank.save(keys[str(user.id)], adapter_folder(cfg, ctx.run_id, user.id, style), manifest)


def _query_row(ctx: _Context, user, method: str, query, history: Sequence, profile: str | None
               ) -> tuple[dict[str, Any], str, str | None]:
    """(prediction row without outputs, prompt, adapter name) for one query under one method."""
    from oppu.examples import build_prompt

    cfg = ctx.cfg
    style = method_style(cfg, method)
    # The query's gold is not passed: build_prompt only sees the input, the history and the profile.
    prompt, retrieved = build_prompt(ctx.task, query.input, style, history if style.retrieval else (),
                                     ctx.retriever, profile, before=query.date)
    uses_adapter = METHODS[method].adapter
    adapter = _adapter_key(user.id, style) if uses_adapter else None
    row = {"run_id": ctx.run_id, "task": cfg.task, "user_id": user.id, "query_id": query.id, "method": method,
           "k": style.k, "peft": cfg.user_peft.kind if uses_adapter else "",
           "retriever": cfg.retrieval.retriever if style.retrieval else "", "prompt": prompt,
           "gold": query.gold, "retrieved_ids": [str(item.id) for item, _ in retrieved],
           "retrieved_scores": [float(score) for _, score in retrieved], "history_size": len(history)}
    return row, prompt, adapter


def _store_user_metrics(ctx: _Context, users: Sequence, rows: Sequence[dict], histories: dict) -> None:
    from oppu.metrics import score_both

    for user in users:
        for method in ctx.cfg.methods:
            scored = [r for r in rows if r["user_id"] == user.id and r["method"] == method and r["gold"] is not None]
            if not scored:
                continue  # nothing to score (unlabelled queries): predictions are stored, metrics are not
            metrics = score_both(ctx.cfg.task, [r["gold"] for r in scored], [r["output"] for r in scored],
                                 [r["lenient_output"] for r in scored])
            ctx.store.add_user_metrics(ctx.run_id, user.id, method, {k: float(v) for k, v in metrics.items()},
                                       len(histories[user.id]))
