"""End to end: the project's OPPU run against a re-creation of the official per-user loop.

Workload (defaults): the 16 most active LaMP_2M demo test users, each user's history bounded to its most recent
`--items` items (the same `oppu.examples.user_examples` selection in both paths), the run's per-user training
settings (`RunConfig().user_train`: epochs, lr, batch size, max length, clipping, warmup and weight decay),
LoRA r=8 / alpha=8 / dropout 0.05 on q_proj/v_proj, every query of every user answered greedily with the task's
own budget of new tokens. Task adaptation is excluded from both paths (the plain embedded model is the base).

- official: the structure of the official `OPPU.py`, leak fixed. For each user: wrap the base with a fresh LoRA
  (`peft.get_peft_model`), build THAT user's training examples only (the official script built one list outside
  its user loop, so user i trained on users 0..i), train with a fresh `transformers.Trainer` (AdamW, linear
  schedule, `group_by_length` and `DataCollatorForSeq2Seq` as the official code; Hugging Face's loss over the
  full vocabulary), save the adapter, answer the user's queries one at a time (batch 1, `generate`), unwrap.
- project: `oppu.experiment.run_experiment(RunConfig(methods=("oppu",), user_ids=<same users>,
  task_adaptation=False, ...))` with the database and artifacts in a temporary folder: whatever training and
  generation path the project uses by default, plus its store writes and adapter manifests.

Each path runs in its own precision: the project in its `dtype="auto"` (`oppu.precision`: bf16 on a CPU measured
to compute it natively, else fp32; or `--dtype`), the official loop as `OPPU.py` trains (bf16 weights cast to fp32
by `prepare_model_for_kbit_training`, bf16 autocast, gradient checkpointing, fp32 norms). Both paths see the same
token ids for training (`oppu.train.encode_example`) and for queries (the chat-templated task prompt). Targets: project >= 3x the official loop in wall time, and a 16-user project run under
2 GB peak RSS. Answers are checked to be valid labels and compared (they need not be identical: the two paths
batch, shuffle and round differently).

Order: the project runs first, cold, with no model resident (so its peak RSS is its own, and any warm-up cost
falls on it); then the model is loaded once for the official loop, which unwraps it after every user.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DEMO_DATA,
    MODEL_CACHE,
    RANDOM_MODEL_ENV,
    ROOT,
    add_device_argument,
    append_report,
    apply_device_argument,
    bench_device,
    bench_dtype,
    load_default_model,
    markdown_table,
    phase,
    verdict,
)

TARGET_SPEEDUP = 3.0
TARGET_RSS_MIB = 2048


# -- inputs ----------------------------------------------------------------------------------------------------
def pick_users(task_id: str, n: int) -> list:
    """The `n` most active test users of the demo data (the order `RunConfig(users=n)` would pick)."""
    from oppu.data import load_task_data

    data = load_task_data(DEMO_DATA, task_id)
    users = list(data.most_active(n))
    if len(users) < n:
        raise SystemExit(f"the demo data of {task_id} has {len(users)} test users, fewer than the {n} asked for")
    return users


def query_prompt(task, query) -> str:
    """The OPPU (no retrieval, no profile) prompt of one query, built as the experiment builds it."""
    from oppu.examples import PromptStyle, build_prompt

    prompt, _ = build_prompt(task, query.input, PromptStyle(), (), None, None, before=query.date)
    return prompt


# -- the official per-user loop, leak fixed --------------------------------------------------------------------
def trainer_arguments(train_cfg, output_dir: Path):
    """The official `TrainingArguments` (bf16 autocast included) with the project's per-user settings (what both
    paths share)."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=train_cfg.batch_size, gradient_accumulation_steps=1,
        optim="adamw_torch", num_train_epochs=train_cfg.epochs, learning_rate=train_cfg.lr,
        weight_decay=train_cfg.weight_decay, warmup_steps=train_cfg.warmup_ratio, max_grad_norm=train_cfg.max_grad_norm,
        lr_scheduler_type="linear", train_sampling_strategy="group_by_length", save_strategy="no",
        logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=bench_device() == "cpu",
        seed=train_cfg.seed, bf16=True,  # OPPU.py: autocast to bf16 over its fp32 weights
        dataloader_pin_memory=False)


def official_model(model_name: str | None = None):
    """The base as `OPPU.py` prepares it: loaded in bf16, `gradient_checkpointing_enable()`, then
    `prepare_model_for_kbit_training`, which on a model that is not quantized freezes every weight and casts it to
    fp32. So it trains fp32 weights (holding bf16 values) under bf16 autocast, recomputing each layer's activations
    in the backward; it answers in fp32 (its `torch.autocast(device_type="cuda")` leaves CPU work alone; on a GPU
    it is float16 autocast, kept here)."""
    import peft

    from oppu.config import ModelConfig
    from oppu.model import load_model

    model, tokenizer = load_model(ModelConfig(name=model_name or ModelConfig().name, device=bench_device(),
                                              dtype="bfloat16"), MODEL_CACHE)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    return peft.prepare_model_for_kbit_training(model), tokenizer


def _check_gradients_flow(wrapped, trainer) -> None:
    """Gradient checkpointing over frozen embeddings can silently cut every LoRA gradient: check one batch."""
    import torch

    batch = next(iter(trainer.get_train_dataloader()))
    with torch.autocast(wrapped.device.type, dtype=torch.bfloat16):
        loss = wrapped(**{k: v.to(wrapped.device) for k, v in batch.items()}).loss
    loss.backward()
    moved = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in wrapped.named_parameters()
                if "lora_B" in n)  # lora_A gets none while B is still zero
    wrapped.zero_grad(set_to_none=True)
    if not moved:
        raise SystemExit("the official loop's LoRA gets no gradient: gradient checkpointing cut it")


def official_loop(model, tokenizer, task, users: Sequence, peft_cfg, train_cfg, max_new_tokens: int,
                  workdir: Path) -> tuple[dict[tuple[str, str], str], dict[str, float]]:
    """Per user: fresh LoRA, fresh Trainer on that user's examples only, save, batch-1 greedy answers, unwrap.

    Returns ({(user id, query id): normalised answer}, timing and token counts of the two halves).
    """
    import peft
    import torch
    import transformers

    from oppu.examples import PromptStyle, user_examples
    from oppu.generate import DEFAULT_MAX_PROMPT_TOKENS, encode_prompt
    from oppu.model import eos_token_ids, to_peft_config
    from oppu.train import answer_end_ids, encode_example

    end_ids = answer_end_ids(tokenizer)
    eos = eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    answers: dict[tuple[str, str], str] = {}
    stats = {"train_s": 0.0, "generate_s": 0.0, "train_tokens": 0, "generated_tokens": 0, "queries": 0}
    for user in users:
        uid = str(user.id)
        started = time.perf_counter()
        # Built inside the loop from this user alone: the fix of the official script's cross-user leak.
        examples = user_examples(task, user.history, PromptStyle(), None, None, train_cfg.max_examples,
                                 train_cfg.seed)
        rows = []
        for ex in examples:
            ids, labels = encode_example(tokenizer, ex, train_cfg.max_length, end_ids)
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        stats["train_tokens"] += sum(len(r["input_ids"]) for r in rows) * train_cfg.epochs
        torch.manual_seed(train_cfg.seed)
        wrapped = peft.get_peft_model(model, to_peft_config(peft_cfg))
        trainer = transformers.Trainer(
            model=wrapped, args=trainer_arguments(train_cfg, workdir / "trainer"), train_dataset=rows,
            data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, padding=True,
                                                              return_tensors="pt"))
        for name, module in trainer.model.named_modules():  # OPPU.py keeps the norms in fp32
            if "norm" in name:
                module.to(torch.float32)
        wrapped.config.use_cache = False
        if user is users[0]:
            _check_gradients_flow(wrapped, trainer)
        trainer.train()
        wrapped.save_pretrained(str(workdir / "adapters" / uid))
        wrapped.eval()
        wrapped.config.use_cache = True
        trained = time.perf_counter()
        stats["train_s"] += trained - started
        with torch.no_grad():
            for query in user.queries:  # one at a time, as the official split_batch(..., 1)
                ids = encode_prompt(tokenizer, query_prompt(task, query), DEFAULT_MAX_PROMPT_TOKENS)
                with torch.autocast(device_type="cuda", enabled=wrapped.device.type == "cuda"):
                    out = wrapped.generate(input_ids=torch.tensor([ids], device=wrapped.device),
                                           attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                     device=wrapped.device),
                                           max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                           pad_token_id=pad_id, use_cache=True)
                new = out[0, len(ids):].tolist()
                new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
                stats["generated_tokens"] += len(new)
                stats["queries"] += 1
                answers[(uid, str(query.id))] = task.normalize(tokenizer.decode(new, skip_special_tokens=True))
        stats["generate_s"] += time.perf_counter() - trained
        del trainer
        model = wrapped.unload()  # the plain base again: the next user gets a fresh LoRA, not this one's
    return answers, stats


# -- the project's path ----------------------------------------------------------------------------------------
class StageClock:
    """Progress callback that splits a run's wall time into answering (from each `generate:<style>` start event
    to its end event: batched generation) and the rest, counted as training (it also holds the model load, the
    store writes and the metrics, which are small)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.answer_started: float | None = None
        self.rest_s = 0.0
        self.end = self.start

    def __call__(self, stage: str, step: int, total: int, loss: float | None) -> None:
        now = time.perf_counter()
        self.end = now
        if stage.startswith("generate:"):
            if step == 0:
                self.answer_started = now
            elif step == total and self.answer_started is not None:
                self.rest_s += now - self.answer_started
                self.answer_started = None

    @property
    def train_s(self) -> float:
        return self.end - self.start - self.rest_s


def project_run(task_id: str, user_ids: Sequence[str], user_train, workdir: Path,
                model_name: str | None = None) -> tuple[str, Any, StageClock]:
    """`run_experiment` on the same users with task adaptation off; returns (run id, store, stage clock)."""
    from oppu.config import ModelConfig, RunConfig
    from oppu.experiment import run_experiment
    from oppu.store import Store

    model = ModelConfig(device=bench_device(), dtype=bench_dtype())
    if model_name:
        model = ModelConfig(name=model_name, device=bench_device(), dtype=bench_dtype())
    cfg = RunConfig(task=task_id, methods=("oppu",), user_ids=tuple(user_ids), data_dir=str(DEMO_DATA),
                    db=str(workdir / "e2e.duckdb"), artifacts_dir=str(workdir / "artifacts"),
                    model=model, task_adaptation=False, user_train=user_train, tag="bench-e2e")
    store = Store(cfg.db)
    clock = StageClock()
    run_id = run_experiment(cfg, progress=clock, store=store)
    return run_id, store, clock


def project_answers(store, run_id: str, user_ids: Sequence[str]) -> dict[tuple[str, str], str]:
    answers = {}
    for uid in user_ids:
        frame = store.predictions_for(run_id, uid)
        for row in frame[frame["method"] == "oppu"].itertuples():
            answers[(uid, str(row.query_id))] = row.output
    return answers


def code_state() -> str:
    """The commit measured, and whether oppu/ had uncommitted edits (others work in the same tree)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--", "oppu")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted edits in oppu/" if dirty else "")


# -- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="LaMP_2M")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--items", type=int, default=None,
                        help="history items per user (default: RunConfig().user_train.max_examples)")
    parser.add_argument("--epochs", type=int, default=None, help="default: RunConfig().user_train.epochs")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OPPU_MODEL_CACHE", str(MODEL_CACHE))  # read by oppu.experiment at import

    from oppu.config import RunConfig
    from oppu.metrics import score
    from oppu.tasks import get_task

    task = get_task(args.task)
    defaults = RunConfig()
    changes = {k: v for k, v in (("max_examples", args.items), ("epochs", args.epochs)) if v is not None}
    train_cfg = dataclasses.replace(defaults.user_train, **changes)
    peft_cfg = defaults.user_peft
    budget = defaults.generation.max_new_tokens or task.max_new_tokens
    users = pick_users(task.id, args.users)
    user_ids = [str(u.id) for u in users]
    n_queries = sum(len(u.queries) for u in users)
    print(f"{len(users)} users ({', '.join(user_ids)}), {n_queries} queries, at most {train_cfg.max_examples} "
          f"items each, {train_cfg.epochs} epochs, batch {train_cfg.batch_size}, budget {budget} new tokens",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="oppu-bench-e2e-") as tmp:
        workdir = Path(tmp)
        model_name = None
        if os.environ.get(RANDOM_MODEL_ENV):  # both paths get the same seeded random weights, via a folder
            random_model, random_tokenizer = load_default_model()
            model_name = str(workdir / "random-model")
            random_model.save_pretrained(model_name)
            random_tokenizer.save_pretrained(model_name)
            del random_model
        with phase("project (run_experiment)") as ours:
            run_id, store, clock = project_run(task.id, user_ids, train_cfg, workdir / "project", model_name)
        ours_answers = project_answers(store, run_id, user_ids)
        del store

        model, tokenizer = official_model(model_name)
        with phase("official per-user loop (leak fixed)") as theirs:
            their_answers, stats = official_loop(model, tokenizer, task, users, peft_cfg, train_cfg, budget,
                                                 workdir / "official")

    golds = {(str(u.id), str(q.id)): q.gold for u in users for q in u.queries}
    keys = sorted(golds)
    missing = [k for k in keys if k not in ours_answers or k not in their_answers]
    if missing:
        raise SystemExit(f"{len(missing)} queries have no answer in one of the paths (e.g. {missing[:3]}): "
                         "the project's run did not store every prediction")
    labels = set(task.labels)
    valid_ours = sum(ours_answers[k] in labels for k in keys)
    valid_theirs = sum(their_answers[k] in labels for k in keys)
    agree = sum(ours_answers[k] == their_answers[k] for k in keys)
    scored = [k for k in keys if golds[k] is not None]
    acc = {name: score(task.id, [golds[k] for k in scored], [ans[k] for k in scored]).get("accuracy")
           for name, ans in (("project", ours_answers), ("official", their_answers))}

    speedup = theirs.seconds / ours.seconds
    tokens = stats["train_tokens"]
    rows = [
        {"path": "official per-user loop, leak fixed (PEFT + fresh Trainer, batch-1 generate)",
         "wall s": theirs.seconds, "CPU s": theirs.cpu_seconds, "train s": stats["train_s"],
         "answer s": stats["generate_s"], "train tokens/s": tokens / stats["train_s"],
         "speed-up (wall)": 1.0, "speed-up (CPU)": 1.0, "peak RSS MiB": theirs.peak_mib,
         "valid labels": f"{valid_theirs}/{len(keys)}", "accuracy": acc["official"]},
        {"path": "project: run_experiment(methods=('oppu',), task_adaptation=False)",
         "wall s": ours.seconds, "CPU s": ours.cpu_seconds, "train s": clock.train_s, "answer s": clock.rest_s,
         "train tokens/s": tokens / clock.train_s if clock.train_s else None,
         "speed-up (wall)": speedup, "speed-up (CPU)": theirs.cpu_seconds / ours.cpu_seconds,
         "peak RSS MiB": ours.peak_mib, "valid labels": f"{valid_ours}/{len(keys)}", "accuracy": acc["project"]},
    ]
    notes = [
        (f"workload: {task.id}, {len(users)} most active demo test users, each user's {train_cfg.max_examples} most "
         f"recent history items -> {tokens // train_cfg.epochs} training tokens per epoch, {train_cfg.epochs} "
         f"epochs, batch {train_cfg.batch_size}, lr {train_cfg.lr:g}, max_length {train_cfg.max_length}, clip {train_cfg.max_grad_norm:g}; "
         f"LoRA r={peft_cfg.r}/alpha={peft_cfg.alpha}/dropout {peft_cfg.dropout:g} on "
         f"{'/'.join(peft_cfg.target_modules)}; {len(keys)} queries, greedy, {budget} new tokens at most; the project in "
         f"its own dtype ({bench_dtype()}, `auto` unless --dtype), the official loop in its own (below); "
         "task adaptation excluded from both"),
        f"project vs official loop: {speedup:.2f}x wall, {theirs.cpu_seconds / ours.cpu_seconds:.2f}x CPU: "
        + verdict(speedup, TARGET_SPEEDUP),
        f"peak RSS of the {len(users)}-user project run: {ours.peak_mib or 0:.0f} MiB: "
        + verdict(ours.peak_mib or 0, TARGET_RSS_MIB, higher_is_better=False),
        (f"answers: {valid_ours}/{len(keys)} (project) and {valid_theirs}/{len(keys)} (official) are valid labels; "
         f"the two agree on {agree}/{len(keys)} ({agree / len(keys):.0%}); they need not be identical (different "
         "shuffling, batching and dropout masks in training)"),
        (f"official loop: {stats['queries']} batch-1 generate calls, {stats['generated_tokens']} tokens generated "
         f"in {stats['generate_s']:.1f} s; in OPPU.py's own precision: weights loaded in bf16 and cast to fp32 "
         "(prepare_model_for_kbit_training), bf16 autocast and gradient checkpointing in training, norms in fp32, "
         "fp32 answers; its loss is Hugging Face's over the full vocabulary at every position, as in the official "
         "code"),
        ("project split: answer s = batched generation (between each style's generate events), train s = the rest "
         "of the run (training, loading the model from the cache, store writes)"),
        (f"order: project first (cold, no model resident), then the official loop on a model loaded once; "
         f"code measured: {code_state()}"),
    ]
    append_report(f"End to end: {len(users)} users of {task.id}, OPPU vs the official per-user loop",
                  markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
