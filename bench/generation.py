"""Generation for many users at once: multi-LoRA batches against a per-user loop and PEFT `adapter_names`.

Workload (defaults): 32 users x 2 queries of the demo LaMP_7 (tweet paraphrase, the task's own 48-token budget),
the OPPU prompt (no retrieval), greedy decoding, each user with its own LoRA (r=8 on q_proj/v_proj, random
non-zero weights, so users answer differently). Three paths on the same token ids:

- sequential: the per-user loop (activate the user's PEFT adapter, `generate` that user's queries, next user);
- adapter_names: the project's `oppu.generate.generate` (one PEFT model, mixed `adapter_names` batches);
- multilora: `oppu.multilora.generate_ids` (gathered multi-LoRA, rows leave the batch when they end).

Targets: multilora >= 8x the sequential loop and >= 1.5x adapter_names, in generated tokens/s.

`--shared-prefix` measures instead the shared-prefix prefill of `oppu.multilora.decode` on a run's own prompts
(every query of the first `--users` demo users, plain and RAG k=1 BM25 prompts built as `run_experiment` builds
them, cut to the run's prompt budget, batches of `GenerationConfig().batch_size`): the base model alone (the
`none` and `rag` methods), and a plain-style batch as a default run answers it (each prompt once without an
adapter and once with its user's random LoRA: `none` + `oppu`). Each against `share_prefix=False` (every prompt
prefilled whole, the path before), in the same process, with the answers compared.
"""

from __future__ import annotations

import argparse
import copy

from bench.common import (
    add_device_argument,
    append_report,
    apply_device_argument,
    bench_dtype,
    demo_users,
    load_default_model,
    markdown_table,
    random_lora_state,
    run_rounds,
    verdict,
)

TARGET_VS_SEQUENTIAL = 8.0
TARGET_VS_ADAPTER_NAMES = 1.5


def sequential_loop(pool, tokenizer, rows_by_user, max_new_tokens, eos) -> dict[int, list[int]]:
    """The per-user loop: one user's adapter active at a time, that user's queries in one left-padded batch."""
    import torch

    out: dict[int, list[int]] = {}
    pad = tokenizer.pad_token_id
    for user, items in rows_by_user.items():
        pool.set(user)
        width = max(len(ids) for _, ids in items)
        device = pool.model.device
        ids = torch.tensor([[pad] * (width - len(r)) + r for _, r in items], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for _, r in items], device=device)
        with torch.no_grad():
            gen = pool.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for (index, _), new in zip(items, gen[:, width:].tolist(), strict=True):  # .tolist() waits for the GPU
            out[index] = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    return out


def profile_top(run, n: int = 6) -> str:
    """`op share, ...` of the `n` operators with the most self CPU time in one call of `run`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in events[:n])


def prefix_tokens(rows: list[list[int]], slots: list[int], batch_size: int) -> int:
    """Prompt tokens the shared-prefix prefill does not run, batch by batch as generate_ids forms them (rows
    sorted by length): the shared prefix of every row but one per distinct adapter, where it is used."""
    from oppu.multilora.decode import MIN_SHARED_PREFIX, shared_prefix

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    saved = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        n, distinct = shared_prefix([rows[i] for i in batch]), len({slots[i] for i in batch})
        saved += n * (len(batch) - distinct) if n >= MIN_SHARED_PREFIX else 0
    return saved


def shared_prefix_bench(args) -> int:
    """--shared-prefix: the full prefill against the shared-prefix prefill on a run's own prompts."""
    from oppu.config import GenerationConfig, PeftConfig, RunConfig
    from oppu.examples import PromptStyle, build_prompt
    from oppu.experiment import run_retriever
    from oppu.generate import encode_prompt, prompt_budget
    from oppu.model import eos_token_ids
    from oppu.multilora import MultiLora, generate_ids
    from oppu.tasks import get_task

    task = get_task(args.task)
    cfg = RunConfig(task=task.id)
    budget = args.max_new_tokens or task.max_new_tokens
    batch_size = args.batch_size or GenerationConfig().batch_size
    max_prompt = prompt_budget(cfg.user_train.max_length, budget)
    base, tokenizer = load_default_model()
    eos, pad = eos_token_ids(tokenizer, base), tokenizer.pad_token_id
    users = demo_users(task.id, args.users)
    peft_cfg = PeftConfig(dropout=0.0)
    ml = MultiLora.from_peft_config(base, peft_cfg, capacity=len(users))
    for i, user in enumerate(users):
        state = random_lora_state(base, peft_cfg.r, seed=1000 + i, targets=peft_cfg.target_modules)
        ml.load_state_dict(str(user.id), state, alpha=peft_cfg.alpha, r=peft_cfg.r)
    retriever = run_retriever(cfg, task)

    def encoded(style: PromptStyle) -> tuple[list[list[int]], list[str]]:
        rows, owners = [], []
        for user in users:
            for q in user.queries:
                prompt, _ = build_prompt(task, q.input, style, user.history if style.retrieval else (), retriever,
                                         None, before=q.date)
                rows.append(encode_prompt(tokenizer, prompt, max_prompt))
                owners.append(str(user.id))
        return rows, owners

    plain, owners = encoded(PromptStyle())
    rag, _ = encoded(PromptStyle(retrieval=True, k=cfg.retrieval.k))
    workloads = {"none (plain, base)": (plain, [None] * len(plain)),
                 "rag (k=1, base)": (rag, [None] * len(rag)),
                 "none + oppu (plain, half the rows with a LoRA)": (plain + plain, [None] * len(plain) + owners)}
    table, notes = [], []
    for label, (rows, adapters) in workloads.items():
        def run(new_tokens: int, share: bool, rows=rows, adapters=adapters):
            return generate_ids(ml, rows, adapters, new_tokens, eos, pad, batch_size, share_prefix=share)

        print(f"{label}: {len(rows)} prompts", flush=True)
        best, results = run_rounds({"full": lambda: run(budget, False), "shared": lambda: run(budget, True),
                                    "full, prefill": lambda: run(1, False),
                                    "shared, prefill": lambda: run(1, True)}, args.rounds)
        tokens = sum(map(len, rows))
        saved = prefix_tokens(rows, ml.slots_of(adapters), batch_size)
        same = sum(a == b for a, b in zip(results["full"], results["shared"], strict=True))
        # What rounding alone changes: the full prefill in batches of another size (bf16 flips near-ties).
        halves = generate_ids(ml, rows, adapters, budget, eos, pad, max(batch_size // 2, 1), share_prefix=False)
        floor = sum(a == b for a, b in zip(results["full"], halves, strict=True))
        table.append({"workload": label, "prompts": len(rows), "prompt tokens": tokens,
                      "prompt tokens not prefilled": f"{saved / tokens:.0%}",
                      "prefill full s": best["full, prefill"].seconds,
                      "prefill shared s": best["shared, prefill"].seconds,
                      "prefill speed-up": best["full, prefill"].seconds / best["shared, prefill"].seconds,
                      "answer full s": best["full"].seconds, "answer shared s": best["shared"].seconds,
                      "answer speed-up (wall)": best["full"].seconds / best["shared"].seconds,
                      "answer speed-up (CPU)": best["full"].cpu_seconds / best["shared"].cpu_seconds,
                      "identical answers": f"{same}/{len(rows)}",
                      f"identical, full at batch {max(batch_size // 2, 1)}": f"{floor}/{len(rows)}"})
    notes.append(f"workload: {task.id}, the first {len(users)} demo users, every query, prompts cut to "
                 f"{max_prompt} tokens, batch {batch_size}, up to {budget} new tokens, greedy {bench_dtype()}; "
                 f"'prefill' = 1 new token; LoRA r={peft_cfg.r} on {'/'.join(peft_cfg.target_modules)} with random "
                 "non-zero weights for the oppu rows")
    notes.append("prompt tokens not prefilled: per batch, the shared prefix of every row but one per distinct "
                 "adapter in the batch (the prefix is prefilled once for each)")
    notes.append("identical answers: shared against full prefill; the last column is the full prefill against "
                 "itself in batches of half the size, untimed: the answers rounding alone changes in this dtype")
    notes.append(f"each path ran {args.rounds} time(s), order alternating between rounds; the fastest wall time "
                 "(and its CPU time) is reported")
    append_report("Generation: shared-prefix prefill", markdown_table(table), notes, write=not args.no_report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="LaMP_7")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own budget")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch for both batched paths (default 64; with --shared-prefix a run's 16)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every path, order alternating; the fastest run of each is reported")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    parser.add_argument("--profile", action="store_true",
                        help="also run the multi-LoRA path once under torch.profiler and report its top operators")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="measure the shared-prefix prefill on a run's prompts instead (see the docstring)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    if args.shared_prefix:
        return shared_prefix_bench(args)
    args.batch_size = args.batch_size or 64

    from peft.utils import set_peft_model_state_dict

    from oppu.config import GenerationConfig, PeftConfig
    from oppu.generate import DEFAULT_MAX_PROMPT_TOKENS, encode_prompt, generate
    from oppu.model import AdapterPool, eos_token_ids
    from oppu.multilora import MultiLora, generate_ids
    from oppu.tasks import get_task

    task = get_task(args.task)
    budget = args.max_new_tokens or task.max_new_tokens
    base, tokenizer = load_default_model()
    users = demo_users(task.id, args.users)
    prompts, owners = [], []
    for user in users:
        queries = user.queries[: args.queries]
        if len(queries) < args.queries:
            raise SystemExit(f"user {user.id} has {len(queries)} queries, fewer than --queries {args.queries}")
        prompts += [task.prompt(q.input) for q in queries]
        owners += [str(user.id)] * len(queries)
    encoded = [encode_prompt(tokenizer, p, DEFAULT_MAX_PROMPT_TOKENS) for p in prompts]
    eos = eos_token_ids(tokenizer, base)
    peft_cfg = PeftConfig(dropout=0.0)

    ml = MultiLora.from_peft_config(copy.deepcopy(base), peft_cfg, capacity=len(users))
    pool = AdapterPool(base)
    names = {}
    for i, user in enumerate(users):
        uid = str(user.id)
        state = random_lora_state(base, peft_cfg.r, seed=1000 + i, targets=peft_cfg.target_modules)
        names[uid] = pool.add(uid, peft_cfg)
        set_peft_model_state_dict(pool.model, state, adapter_name=names[uid])
        ml.load_state_dict(uid, state, alpha=peft_cfg.alpha, r=peft_cfg.r)
    pool.model.eval()
    print(f"{len(prompts)} prompts ({min(map(len, encoded))}-{max(map(len, encoded))} tokens), "
          f"{len(users)} users, up to {budget} new tokens", flush=True)

    rows_by_user: dict[str, list[tuple[int, list[int]]]] = {}
    for index, (owner, ids) in enumerate(zip(owners, encoded, strict=True)):
        rows_by_user.setdefault(owner, []).append((index, ids))
    paths = {
        "multilora": lambda: generate_ids(ml, encoded, owners, budget, eos, tokenizer.pad_token_id,
                                          args.batch_size),
        "adapter_names": lambda: generate(pool, tokenizer, prompts, [names[o] for o in owners],
                                          GenerationConfig(batch_size=args.batch_size), max_new_tokens=budget),
        "sequential": lambda: sequential_loop(pool, tokenizer, rows_by_user, budget, eos),
    }
    best, results = run_rounds(paths, args.rounds)
    # The profile that bounds every ratio: the prompts' prefill is the same work on every path (each prompt
    # token goes once through the whole model) and batching cannot remove it; one new token = prefill only.
    prefill, _ = run_rounds({"prefill only (multilora, 1 new token)": lambda: generate_ids(
        ml, encoded, owners, 1, eos, tokenizer.pad_token_id, args.batch_size)}, args.rounds)
    prefill_s = next(iter(prefill.values())).seconds
    top_ops = profile_top(lambda: generate_ids(ml, encoded, owners, budget, eos, tokenizer.pad_token_id,
                                               args.batch_size)) if args.profile else ""
    ours, mixed, seq = best["multilora"], best["adapter_names"], best["sequential"]
    ours_ids, mixed_text, seq_ids = results["multilora"], results["adapter_names"], results["sequential"]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    ours_text = [decode(ids) for ids in ours_ids]
    seq_text = [decode(seq_ids[i]) for i in range(len(prompts))]
    tokens = sum(len(ids) for ids in ours_ids)
    rows = []
    for p, label in ((seq, "sequential per-user loop (PEFT set_adapter + generate)"),
                     (mixed, "PEFT adapter_names mixed batches (oppu.generate)"),
                     (ours, "multi-LoRA gathered batches (oppu.multilora)")):
        rows.append({"path": label, "wall s": p.seconds, "CPU s": p.cpu_seconds, "tokens/s": tokens / p.seconds,
                     "speed-up (wall)": seq.seconds / p.seconds, "speed-up (CPU)": seq.cpu_seconds / p.cpu_seconds,
                     "peak RSS MiB": p.peak_mib})
    vs_seq, vs_mixed = seq.seconds / ours.seconds, mixed.seconds / ours.seconds
    same_seq = sum(a == b for a, b in zip(ours_text, seq_text, strict=True))
    same_mixed = sum(a == b for a, b in zip(ours_text, mixed_text, strict=True))
    notes = [(f"workload: {task.id}, {len(users)} users x {args.queries} queries, prompts "
              f"{min(map(len, encoded))}-{max(map(len, encoded))} tokens, budget {budget} new tokens, "
              f"{tokens} tokens generated, batch {args.batch_size}, greedy {bench_dtype()}, LoRA r={peft_cfg.r} on "
              f"{'/'.join(peft_cfg.target_modules)} with random non-zero weights"),
             (f"multilora vs sequential: {vs_seq:.2f}x wall, {seq.cpu_seconds / ours.cpu_seconds:.2f}x CPU: "
              + verdict(vs_seq, TARGET_VS_SEQUENTIAL)),
             (f"multilora vs adapter_names: {vs_mixed:.2f}x wall, {mixed.cpu_seconds / ours.cpu_seconds:.2f}x CPU: "
              + verdict(vs_mixed, TARGET_VS_ADAPTER_NAMES)),
             (f"profile: the prefill of the {sum(map(len, encoded))} prompt tokens alone takes {prefill_s:.2f} s "
              f"({prefill_s / ours.seconds:.0%} of the multi-LoRA run; the same work in every path), so no batching "
              f"of the decode steps can beat the sequential loop by more than {seq.seconds / prefill_s:.1f}x here"),
             *([f"torch.profiler of one multi-LoRA run, share of self CPU time: {top_ops}"] if top_ops else []),
             (f"identical answers: {same_seq}/{len(prompts)} with the sequential loop, {same_mixed}/{len(prompts)} "
              "with adapter_names (greedy; a difference means a near-tie flipped by batched rounding)"),
             (f"each path ran {args.rounds} time(s), order alternating between rounds; the fastest wall time (and "
              "its CPU time) is reported, since other work on a shared CPU only ever adds time")]
    append_report("Generation: many users in one batch", markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
