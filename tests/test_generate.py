"""Batched generation: left padding, new tokens only, per-row adapters (mixed LoRA batch, grouped prompt tuning)."""

from __future__ import annotations

import pytest

from oppu.config import GenerationConfig, PeftConfig
from oppu.generate import _cut_at_eos, chat_prompt, generate
from oppu.model import AdapterPool

PROMPTS = ["description: space ship war\ntag:", "Which tag? comedy or action\ndescription: a laugh", "hi",
           "description: old river night film hero dragon love city\ntag:"]


def _randomize(pool, user_id, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pool.trainable_parameters(user_id):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        for param in pool.trainable_parameters(user_id):
            param.requires_grad_(False)


def test_greedy_batched_equals_one_by_one(tiny_model):
    model, tok = tiny_model
    cfg = GenerationConfig(batch_size=4)
    batched = generate(model, tok, PROMPTS, None, cfg, max_new_tokens=6)
    single = [generate(model, tok, [p], None, cfg, max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert generate(model, tok, PROMPTS, None, cfg, max_new_tokens=6) == batched  # reproducible


def test_only_new_tokens_are_decoded(tiny_model):
    import torch

    model, tok = tiny_model
    prompt = "description: space ship war\ntag:"
    out = generate(model, tok, [prompt], None, GenerationConfig(), max_new_tokens=5)[0]
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              do_sample=False, eos_token_id=[-1], pad_token_id=tok.pad_token_id)
    new = full[0, ids.shape[1]:].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    new = new[: new.index(end)] if end in new else new
    assert out == tok.decode(new, skip_special_tokens=True)
    assert "<|im_start|>" not in out and "description: space ship war" not in out


def test_seeded_sampling_is_reproducible(tiny_model):
    model, tok = tiny_model
    cfg = GenerationConfig(greedy=False, temperature=1.5, top_k=50, top_p=1.0, seed=3)
    assert generate(model, tok, PROMPTS, None, cfg, max_new_tokens=6) == \
        generate(model, tok, PROMPTS, None, cfg, max_new_tokens=6)


def test_cut_at_eos_stops_each_row_at_its_first_end_token():
    assert _cut_at_eos([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert _cut_at_eos([5, 6], {2}) == [5, 6]
    assert _cut_at_eos([0, 5], {2, 0}) == []


def test_chat_template_wraps_the_prompt(tiny_model):
    _, tok = tiny_model
    text = chat_prompt(tok, "hello")
    assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["lora", "prompt", "ia3"])
def test_mixed_adapter_batch_matches_each_adapter_alone(tiny_model, kind):
    model, tok = tiny_model
    pool = AdapterPool(model)
    peft_cfg = PeftConfig(kind=kind, num_virtual_tokens=4)
    for seed, user in enumerate(("alice", "bob")):
        pool.add(user, peft_cfg)
        _randomize(pool, user, seed + 1)
    a, b = pool.name_of("alice"), pool.name_of("bob")
    names = [a, b, None, a]
    cfg = GenerationConfig(batch_size=4)
    mixed = generate(pool, tok, PROMPTS, names, cfg, max_new_tokens=5)
    alone = []
    for prompt, name in zip(PROMPTS, names):
        alone.append(generate(pool, tok, [prompt], [name], cfg, max_new_tokens=5)[0])
    assert mixed == alone
    base = generate(pool, tok, PROMPTS, None, cfg, max_new_tokens=5)
    assert mixed[2] == base[2]  # `None` rows run on the bare base model
    assert mixed[0] != base[0] and mixed[1] != base[1]  # the adapters actually change the answers


def test_misuse_is_reported(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="one adapter name"):
        generate(model, tok, ["a", "b"], [None], GenerationConfig())
    with pytest.raises(ValueError, match="AdapterPool"):
        generate(model, tok, ["a"], ["u_alice"], GenerationConfig())
    assert generate(model, tok, [], None, GenerationConfig()) == []


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
def test_an_emptied_pool_generates_like_the_base(tiny_model, kind):
    model, tok = tiny_model
    before = generate(model, tok, PROMPTS, None, GenerationConfig(), max_new_tokens=4)
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig(kind=kind, num_virtual_tokens=4))
    _randomize(pool, "alice", 1)
    pool.delete("alice")
    assert generate(pool, tok, PROMPTS, None, GenerationConfig(), max_new_tokens=4) == before
    pool.add("bob", PeftConfig(kind=kind, num_virtual_tokens=4))  # the same wrapper takes new adapters
    assert generate(pool, tok, PROMPTS, [pool.name_of("bob")] * 4, GenerationConfig(), max_new_tokens=4)


def test_answers_keep_the_prompt_budget_of_the_training_cutoff():
    from oppu.generate import prompt_budget

    # Training keeps cutoff - len(target) prompt tokens with a target of at most half the cutoff: answering keeps
    # cutoff - max_new_tokens, never less than half the cutoff.
    assert prompt_budget(2048, 200) == 1848
    assert prompt_budget(256, 8) == 248
    assert prompt_budget(256, 200) == 128
