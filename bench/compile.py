"""torch.compile against eager on this machine: multi-user training steps and generation, same process.

Workload (defaults): the first `--users` demo LaMP_2M users. Training: `oppu.multilora.train_users_batched` on
their `--items` most recent history items (plain prompts), the run's per-user settings (`RunConfig().user_train`,
LoRA dropout included) for `--epochs`. Generation: `oppu.multilora.generate_ids` on every query, plain prompts,
each once without an adapter and once with its user's LoRA (`none` + `oppu`, a default run's plain batches).

Variants (`--variants`), each compiled in place on the same model with Inductor, then timed against eager in
alternating rounds:
- layers: every decoder layer compiled on its own (regional compilation: one graph serves the 30 identical layers);
  training through the project's switch (`OPPU_COMPILE=1`, `oppu.multilora.train.compiled_layers`), generation
  (which the switch leaves eager) with the same layers swapped in by this script;
- elementwise: only RMSNorm and the MLP (SiLU x up, the element-wise work the profile names), dynamic shapes;
- model: the whole decoder body (slow to compile: minutes on a 2-core CPU).

The compile cost is the first compiled run less the best compiled run (every distinct shape of the workload is
met in that first run). Inductor's on-disk cache starts empty (a temporary folder) unless `--warm-cache`, so the
cost is what a fresh machine pays. Not part of `python -m bench` (no target rides on it).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from bench.common import (
    add_device_argument,
    alternating,
    append_report,
    apply_device_argument,
    bench_dtype,
    demo_users,
    load_default_model,
    markdown_table,
    phase,
)

VARIANTS = ("layers", "elementwise", "model")


def compile_targets(model, variant: str) -> list[tuple[object, str, object]]:
    """(parent, attribute, module) of every module the variant compiles, to be swapped for its compiled copy."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    body = model.get_decoder()
    if variant == "layers":
        return [(body.layers, str(i), layer) for i, layer in enumerate(body.layers)]
    if variant == "model":
        return [(model, "model", body)]
    targets = [(layer, "mlp", layer.mlp) for layer in body.layers]
    for parent in [body, *body.layers]:
        for name, child in parent.named_children():
            if isinstance(child, LlamaRMSNorm):
                targets.append((parent, name, child))
    return targets


class Swap:
    """Each target module or its compiled copy in place (`use(True, work)`), the copies made once; the layers
    variant's training goes through the project's switch (`OPPU_COMPILE`) instead."""

    def __init__(self, model, variant: str):
        import torch

        # As oppu.multilora.train.compiled_layers does: each MultiLoraLinear's `offset` (its columns in the dropout
        # keep-mask) is an int attribute, which Dynamo would otherwise specialise on, once per decoder layer.
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        self.variant = variant
        self.targets = compile_targets(model, variant)
        dynamic = True if variant == "elementwise" else None
        self.compiled = [torch.compile(module, dynamic=dynamic) for _, _, module in self.targets]

    def use(self, compiled: bool, work: str) -> None:
        from oppu.multilora.train import COMPILE_ENV

        if self.variant == "layers" and work == "training":  # what the project ships, behind its switch
            os.environ[COMPILE_ENV] = "1" if compiled else "0"
            return
        for (parent, name, module), fast in zip(self.targets, self.compiled, strict=True):
            setattr(parent, name, fast if compiled else module)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class LimitWarnings(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings: past the limit a function runs eager."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "recompile_limit" in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="LaMP_2M")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--items", type=int, default=8, help="history items per user")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--variants", default="layers,elementwise", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--work", default="training,generation", help="comma-separated: training, generation")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each path after the first compiled run")
    parser.add_argument("--recompile-limit", type=int, default=None,
                        help="Dynamo's recompiles per function before it runs that function eager (default: its own)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's usual on-disk cache (default: an empty temporary one)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}: use {', '.join(VARIANTS)}")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="oppu-inductor-")

    import dataclasses

    from oppu.config import PeftConfig, RunConfig
    from oppu.examples import PromptStyle, user_examples
    from oppu.generate import encode_prompt, prompt_budget
    from oppu.model import eos_token_ids
    from oppu.multilora import MultiLora, TrainExample, generate_ids, make_batches, train_users_batched
    from oppu.tasks import get_task
    from oppu.train import answer_end_ids, encode_example, training_pad_id

    task = get_task(args.task)
    run = RunConfig(task=task.id)
    train_cfg = dataclasses.replace(run.user_train, epochs=args.epochs)
    peft_cfg = PeftConfig()
    model, tokenizer = load_default_model()
    users = demo_users(task.id, args.users)
    ml = MultiLora.from_peft_config(model, peft_cfg, capacity=len(users))
    end_ids, pad_id = answer_end_ids(tokenizer), training_pad_id(tokenizer)
    batches = {}
    for user in users:
        examples = user_examples(task, user.history, PromptStyle(), max_examples=args.items)
        rows = [encode_example(tokenizer, ex, train_cfg.max_length, end_ids) for ex in examples]
        batches[str(user.id)] = [[TrainExample(tuple(rows[i][0]), tuple(rows[i][1])) for i in batch]
                                 for batch in make_batches(len(rows), train_cfg.batch_size, train_cfg.epochs,
                                                           train_cfg.seed)]
    budget = task.max_new_tokens
    prompts = [encode_prompt(tokenizer, task.prompt(q.input), prompt_budget(train_cfg.max_length, budget))
               for user in users for q in user.queries]
    owners = [str(user.id) for user in users for _ in user.queries]
    rows, adapters = prompts + prompts, [None] * len(prompts) + owners
    eos = eos_token_ids(tokenizer, model)

    def train() -> None:
        for uid in batches:
            ml.add(uid, seed=train_cfg.seed)  # (re)initialised each run: every run does the same work
        train_users_batched(ml, batches, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            warmup_ratio=train_cfg.warmup_ratio, max_grad_norm=train_cfg.max_grad_norm,
                            pad_id=pad_id, seed=train_cfg.seed)

    def generate() -> list[list[int]]:
        return generate_ids(ml, rows, adapters, budget, eos, tokenizer.pad_token_id,
                            batch_size=run.generation.batch_size)

    import torch

    if args.recompile_limit:
        torch._dynamo.config.recompile_limit = args.recompile_limit
    limit_hits = LimitWarnings()
    logging.getLogger("torch._dynamo.convert_frame").addHandler(limit_hits)
    work = {name: fn for name, fn in (("training", train), ("generation", generate)) if name in args.work.split(",")}
    eager = {name: [] for name in work}
    answers = {}
    table = []
    for variant in variants:
        swap = Swap(model, variant)
        for name, fn in work.items():
            graphs_before, hits_before = graphs_compiled(), limit_hits.count
            swap.use(True, name)
            with phase(f"{variant} {name}, first compiled run") as first:
                fn()
            compiled = []
            for r, use in alternating((False, True), args.rounds):
                swap.use(use, name)
                with phase(f"{variant if use else 'eager'} {name} (round {r + 1})") as p:
                    result = fn()
                (compiled if use else eager[name]).append(p)
                if name == "generation":
                    answers[use] = result
            swap.use(False, name)
            best_eager = min(eager[name], key=lambda p: p.seconds)
            best = min(compiled, key=lambda p: p.seconds)
            same = (f"{sum(a == b for a, b in zip(answers[False], answers[True], strict=True))}/{len(rows)}"
                    if name == "generation" else "")
            table.append({"variant": variant, "work": name, "eager s": best_eager.seconds,
                          "compiled s": best.seconds, "speed-up (wall)": best_eager.seconds / best.seconds,
                          "speed-up (CPU)": best_eager.cpu_seconds / best.cpu_seconds,
                          "compile s": first.seconds - best.seconds,
                          "runs to repay the compile": ((first.seconds - best.seconds)
                                                        / max(best_eager.seconds - best.seconds, 1e-9)
                                                        if best_eager.seconds > best.seconds else "never"),
                          "identical answers": same, "graphs compiled": graphs_compiled() - graphs_before,
                          "recompile limit hit": "yes" if limit_hits.count > hits_before else "no"})
    n_examples = sum(len(b) for user_batches in batches.values() for b in user_batches)
    notes = [(f"workload: {task.id}, {len(users)} demo users; training: {n_examples} examples over "
              f"{train_cfg.epochs} epoch(s), batch {train_cfg.batch_size} per user, LoRA r={peft_cfg.r} on "
              f"{'/'.join(peft_cfg.target_modules)}, dropout {peft_cfg.dropout}; generation: {len(rows)} prompts "
              f"(none + oppu), up to {budget} new tokens, batch {run.generation.batch_size}, greedy; "
              f"{bench_dtype()}, Inductor cache {'warm' if args.warm_cache else 'empty at the start'}"),
             ("compile s: the first compiled run less the best compiled one; eager and compiled runs alternate, "
              f"{args.rounds} of each, the fastest reported; graphs compiled: Dynamo's count for that work (each "
              "recompile for a new shape or guard adds one)"),
             (f"recompile limit ({torch._dynamo.config.recompile_limit}) hit: Dynamo gave up compiling a function "
              "there and ran it eager from then on (for generation: transformers' DynamicCache state is guarded per "
              "layer index, so each decoder layer needs its own graph)")]
    append_report("torch.compile against eager", markdown_table(table), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
