"""`oppu run`: one experiment end to end, with a progress bar and the metric table at the end.

Layers: arguments -> `RunConfig` (defaults < `--preset` < flags) -> `run_experiment` -> table. Bad inputs
(unknown task, method, user, preset, a missing data folder) end with one line on stderr and exit status 2.
`config_from_args` and `add_run_arguments` are shared with `oppu sweep`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (reported in one line), as opposed to bugs (which keep their traceback):
    every user-facing error derives from `OppuError`."""
    from oppu.errors import OppuError

    return (OppuError,)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that build a RunConfig; every default is None so only flags actually given override the preset."""
    add = parser.add_argument
    add("--task", help="LaMP task id (LaMP_1, LaMP_2N, LaMP_2M, LaMP_3, LaMP_4, LaMP_5, LaMP_7)")
    add("--methods", help="comma list of the paper's rows: none, rag, pag, oppu, oppu+rag, oppu+pag "
                          "(pag = profile + retrieved items, as the official code; profile-only and "
                          "oppu+profile-only drop the retrieved items)")
    add("--users", type=int, help="number of most active test users")
    add("--user-ids", help="comma list of user ids (instead of --users)")
    add("--k", type=int, help="retrieved items for retrieval methods")
    add("--retriever", help="bm25, dense or recency")
    add("--peft", help="personal module: lora, ia3 or prompt")
    add("--rank", type=int, help="LoRA rank of the personal adapters (alpha follows it unless --alpha is given)")
    add("--alpha", type=int, help="LoRA alpha of the personal adapters")
    add("--epochs", type=int, help="epochs of per-user training")
    add("--lr", type=float, help="learning rate of per-user training")
    add("--model", help="embedded:SmolLM2-135M-Instruct (default), a hub id or a local model folder")
    add("--device", help="auto, cpu or cuda")
    add("--dtype", help="auto (bfloat16 on a GPU, and on a CPU whose measured bf16 speed pays: see oppu prepare; "
                        "else float32), float32, bfloat16 or float16")
    add("--data", help="data folder holding <task id>/ in the OPPU layout (default data/demo)")
    add("--db", help="results store (default runs/oppu.duckdb)")
    add("--artifacts", help="adapters and caches (default runs/artifacts)")
    add("--preset", help="a preset in oppu/presets (e.g. quick, paper) or a .json preset file (oppu tune writes "
                         "one); flags override it")
    add("--cutoff", help="behaviour shift: only history dated before this ISO date")
    add("--history-format", help="full or text_only")
    add("--no-adapt", action="store_true", default=None, help="skip task adaptation of the base model")
    add("--split", help="test (the users' real queries, default) or validation (each user's most recent history "
                        "items held out as queries: where settings are chosen, see oppu tune)")
    add("--validation-items", type=int, help="history items held out per user by --split validation (default 4)")
    add("--tag", help="free text grouping runs")
    add("--batching", help="multi_lora (default: a chunk of LoRA users trains and answers in shared batches) or "
                           "per_user (PEFT, one user at a time: the reference path)")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def config_from_args(args: argparse.Namespace):
    """The RunConfig these flags describe (raises ConfigError / ValueError with a fix-it message)."""
    from oppu.config import build_config

    flags: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is not None:
            flags[path] = value

    put("task", args.task)
    put("methods", _csv(args.methods) if args.methods else None)
    put("users", args.users)
    if args.user_ids:
        put("user_ids", _csv(args.user_ids))
    elif args.users is not None:
        flags["user_ids"] = None
    put("retrieval.k", args.k)
    put("retrieval.retriever", args.retriever)
    put("user_peft.kind", args.peft)
    # A rank alone keeps alpha = r (the paper's r = alpha = 8: LoRA scaling 1), as the Train form does.
    put("user_peft.r", args.rank)
    put("user_peft.alpha", args.alpha if args.alpha is not None else args.rank)
    put("user_train.epochs", args.epochs)
    put("user_train.lr", args.lr)
    put("model.name", args.model)
    put("model.device", args.device)
    put("model.dtype", args.dtype)
    put("data_dir", args.data)
    put("db", args.db)
    put("artifacts_dir", args.artifacts)
    put("history_cutoff", args.cutoff)
    put("history_format", args.history_format)
    put("task_adaptation", False if args.no_adapt else None)
    put("split", args.split)
    put("validation_items", args.validation_items)
    put("tag", args.tag)
    put("batching", args.batching)
    return build_config(getattr(args, "preset", None), flags)


def configure(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--run-id", help="resume this run (users already complete are skipped)")
    parser.add_argument("--seeds", help="replicates: comma list of seeds (e.g. 0,1,2), one run per seed in one "
                                        "group; each seed sets the adapters' initialisation, dropout, example "
                                        "order and sampling, the task-adapted base stays shared")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class ProgressBar:
    """tqdm over users; training steps show as the bar's postfix."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def __call__(self, stage: str, step: int, total: int, loss: float | None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total if stage == "users" else None, unit="user", file=sys.stderr, dynamic_ncols=True)
        if stage == "users":
            self.bar.total = total
            self.bar.n = step
            self.bar.refresh()
        else:
            self.bar.set_postfix_str(f"{stage} {step}/{total} loss {loss:.3f}" if loss is not None else stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def metric_table(frame) -> str:
    """method x metric table of a run's metrics (a `Store.run_metrics` frame)."""
    if frame.empty:
        return "(no metrics: no scored predictions)"
    wide = frame.pivot(index="method", columns="metric", values="value")
    return wide.to_string(float_format=lambda v: f"{v:.4f}")


def typed_command(name: str, fallback: str) -> str:
    """The `oppu NAME ...` command line as typed (recorded with what it produced), or `fallback` when the command
    was called from Python rather than from the shell."""
    if sys.argv[1:2] == [name]:
        return "oppu " + shlex.join(sys.argv[1:])
    return fallback


def fail(command: str, exc: BaseException) -> int:
    """One line on stderr, exit status 2: how every command reports bad input."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"oppu {command}: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from oppu.experiment import run_experiment
    from oppu.store import Store

    try:
        cfg = config_from_args(args)
    except ValueError as exc:  # ConfigError and unknown presets
        return fail("run", exc)
    if getattr(args, "seeds", None):
        return _run_seeds(cfg, args)
    bar = ProgressBar(not args.quiet)
    try:
        run_id = run_experiment(cfg, progress=bar, run_id=args.run_id)
    except usage_errors() as exc:
        return fail("run", exc)
    finally:
        bar.close()
    store = Store(cfg.db)
    status = store.runs().set_index("run_id").loc[run_id, "status"]
    print(f"run {run_id} ({cfg.task}, {status})")
    print(metric_table(store.run_metrics(run_id)))
    return 0


def _run_seeds(cfg, args: argparse.Namespace) -> int:
    """`--seeds`: one run per seed, each printed as it finishes, then the group's intervals over users and seeds."""
    from oppu.replicates import parse_seeds, run_seeds
    from oppu.store import Store
    from oppu.uncertainty import uncertainty_lines

    if args.run_id:
        return fail("run", ValueError("--run-id resumes one run and --seeds starts new ones: pass one of them"))
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        return fail("run", exc)
    store = Store(cfg.db)

    def finished(seed: int, run_id: str) -> None:
        status = store.runs().set_index("run_id").loc[run_id, "status"]
        print(f"seed {seed}: run {run_id} ({cfg.task}, {status})")
        print(metric_table(store.run_metrics(run_id)))

    bar = ProgressBar(not args.quiet)
    try:
        group, run_ids = run_seeds(cfg, seeds, progress=bar, on_run=finished)
    except usage_errors() as exc:
        return fail("run", exc)
    finally:
        bar.close()
    print(f"seed group {group}: {len(run_ids)} runs (seeds {', '.join(map(str, seeds))}); "
          f"`oppu results --group {group} --db {cfg.db}` prints this again")
    for line in uncertainty_lines(store, run_ids):
        print(line)
    return 0
