"""Multi-LoRA batching (oppu/multilora/) against PEFT, the reference it must be interchangeable with.

Each test builds a 2-layer Llama (hidden 32) in code with random NON-zero LoRA weights, so an adapter that
were ignored, mis-routed, transposed or mis-scaled would change the numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from oppu.attention import LEAN_EAGER
from oppu.multilora import (
    IGNORE_INDEX,
    MultiLora,
    MultiLoraError,
    TrainExample,
    generate_ids,
    generate_multi,
    linear_schedule,
    make_batches,
    train_users_batched,
)

VOCAB = 96
USERS = ("ann", "ben", "cat")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def lora_config(r: int = 8, alpha: int = 8, targets=("q_proj", "v_proj"), dropout: float = 0.0):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                           bias="none", task_type="CAUSAL_LM")


def random_lora_state(model, r: int, seed: int, targets=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA state dict with non-zero A and B (B is zero at PEFT init, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.3
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.3
    return state


def peft_with(base, states: dict[str, dict[str, torch.Tensor]], r: int = 8, alpha: int = 8):
    """A PeftModel on a copy of `base` holding one adapter per user with the given weights."""
    import peft
    from peft.utils import set_peft_model_state_dict

    model = None
    for name, state in states.items():
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), lora_config(r, alpha), adapter_name=name)
        else:
            model.add_adapter(name, lora_config(r, alpha))
        set_peft_model_state_dict(model, state, adapter_name=name)
    return model.eval()


def multi_with(base, states, r: int = 8, alpha: int = 8, capacity: int = 2, dropout: float = 0.0) -> MultiLora:
    ml = MultiLora(copy.deepcopy(base), capacity=capacity, r=r, alpha=alpha, dropout=dropout)
    for name, state in states.items():
        ml.load_state_dict(name, state, alpha=alpha, r=r)
    return ml


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def states(base):
    return {u: random_lora_state(base, 8, seed=i + 1) for i, u in enumerate(USERS)}


# The training-equality tests run in float64. Two paths that do the same maths in a different order (rows in other
# chunks, other batch companions, other padding widths) differ by rounding, and AdamW turns a rounding difference
# in a gradient element that nearly cancels into a step difference of up to ~lr: in float32 one element of 256
# differed by 1.9e-4 at lr 5e-2 on an AMD Zen 5 CPU. float64's unit roundoff (1.1e-16) is 5e8 times smaller than
# float32's, which scales that worst case to ~4e-13 (measured: 2.6e-14 in float64 where float32 gave 1.2e-5), so
# EXACT_TOL (1e-9) holds on any CPU with a margin of 1000x or more, while each mutation these tests guard against
# (a step counter shared by all users, a global schedule step, one clip over all users, another user's data in my
# gradient) moves elements by ~lr (measured: 4e-3 for the global clip, 0.15 for the shared step counter).
EXACT_TOL = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(scope="module")
def base64(base):
    return copy.deepcopy(base).double()


@pytest.fixture(scope="module")
def states64(states):
    return {u: {k: v.double() for k, v in state.items()} for u, state in states.items()}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


# -- forward -------------------------------------------------------------------------------------------------
def test_mixed_batch_forward_matches_each_users_peft_forward(base, states):
    peft_model = peft_with(base, states)
    ml = multi_with(base, states)  # capacity 2 < 3 users: slots grow on demand
    ids = torch.randint(3, VOCAB, (4, 7))
    adapters = ["ben", None, "ann", "cat"]
    with torch.no_grad(), ml.route(adapters):
        mixed = ml.model(input_ids=ids).logits
    with torch.no_grad():
        for i, name in enumerate(adapters):
            if name is None:
                with peft_model.disable_adapter():
                    ref = peft_model(input_ids=ids[i:i + 1]).logits
            else:
                peft_model.set_adapter(name)
                ref = peft_model(input_ids=ids[i:i + 1]).logits
            # One float32 forward of a 2-layer model, the same maths in another order: rounding ~1e-7, and
            # nothing accumulates over steps; a mis-routed adapter changes logits by ~1e-1.
            torch.testing.assert_close(mixed[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    plain = base(input_ids=ids).logits.detach()
    assert not torch.allclose(mixed[0], plain[0], atol=1e-3), "the adapter had no effect: weights not applied"


def test_route_guards_misuse(base, states):
    ml = multi_with(base, states)
    with pytest.raises(MultiLoraError, match="no adapter named 'zed'"), ml.route(["zed"]):
        pass
    with pytest.raises(MultiLoraError, match="route was set for 1"), torch.no_grad(), ml.route(["ann"]):
        ml.model(input_ids=torch.randint(3, VOCAB, (2, 4)))
    with pytest.raises(MultiLoraError, match="rank 16"):
        ml.load_state_dict("big", random_lora_state(base, 16, seed=9), alpha=8, r=16)


# -- PEFT interchange ----------------------------------------------------------------------------------------
def test_export_loads_in_peft_and_peft_folder_loads_here(base, states, tmp_path):
    import peft

    ml = multi_with(base, states)
    ml.save("ben", tmp_path / "ben")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ben")).eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad(), ml.route(["ben", "ben"]):
        ours = ml.model(input_ids=ids).logits
    # one float32 forward each (rounding ~1e-7, no training steps), as in the forward test above
    torch.testing.assert_close(ours, loaded(input_ids=ids).logits.detach(), rtol=1e-5, atol=1e-5)

    # and back: a folder written by PEFT itself (rank 4, alpha 16: zero-padded into rank-8 slots)
    small = peft_with(base, {"dee": random_lora_state(base, 4, seed=7)}, r=4, alpha=16)
    small.save_pretrained(str(tmp_path / "peft"), selected_adapters=["dee"])
    folder = next(p.parent for p in (tmp_path / "peft").rglob("adapter_config.json"))
    ml.load("dee", folder)
    with torch.no_grad(), ml.route(["dee", "ann"]):
        ours = ml.model(input_ids=ids).logits
    torch.testing.assert_close(ours[:1], small(input_ids=ids[:1]).logits.detach(), rtol=1e-5, atol=1e-5)
    assert ml.alpha_of("dee") == pytest.approx(16 / 4 * 8)  # scale alpha/r = 4 kept in an r=8 slot


def test_remove_frees_the_slot_and_zeroes_it(base, states):
    ml = multi_with(base, states, capacity=4)
    slot = ml.slot("ann")
    ml.remove("ann")
    assert "ann" not in ml and all(float(layer.lora_A[slot].detach().abs().sum()) == 0 for layer in ml.layers.values())
    assert ml.add("new", seed=3) == slot


# -- generation -----------------------------------------------------------------------------------------------
def peft_greedy(peft_model, ids: list[int], adapter: str | None, max_new: int, eos: list[int]) -> list[int]:
    """Per-user reference: one prompt, no padding, PEFT's own generate."""
    inp = torch.tensor([ids])
    kwargs = {"input_ids": inp, "attention_mask": torch.ones_like(inp), "max_new_tokens": max_new,
              "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(**kwargs)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(**kwargs)
    new = out[0, inp.shape[1]:].tolist()
    return new[:next((i for i, t in enumerate(new) if t in eos), len(new))]


def test_generation_equals_per_user_peft_token_for_token(base, states):
    peft_model = peft_with(base, states)
    ml = multi_with(base, states)
    rows = prompts(7)
    adapters = ["ann", "ben", "cat", None, "ann", "cat", "ben"]
    max_new = 12
    # Pick end tokens the references actually emit mid-answer, so per-row early stop is exercised.
    free = [peft_greedy(peft_model, r, a, max_new, [VOCAB + 5]) for r, a in zip(rows, adapters, strict=True)]
    eos = sorted({free[0][3], free[2][5]})
    expected = [peft_greedy(peft_model, r, a, max_new, eos) for r, a in zip(rows, adapters, strict=True)]
    assert any(len(e) < max_new for e in expected) and any(len(e) == max_new for e in expected)
    got = generate_ids(ml, rows, adapters, max_new, eos, pad_id=0, batch_size=4)
    assert got == expected
    assert len({tuple(e) for e in expected}) > 1  # different users really answered differently


def test_shared_prefix_prefill_equals_per_user_peft_token_for_token(base64, states64):
    """Rows opening with the same 20 tokens: the prefix is prefilled once per distinct adapter (3 here, for 7
    rows) and every row still answers exactly as its own unpadded PEFT generate (float64: no near-tie can flip)."""
    peft_model = peft_with(base64, states64)
    ml = multi_with(base64, states64)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, VOCAB, (20,), generator=gen).tolist()
    rows = [prefix + rest for rest in prompts(6, seed=3)] + [prefix + [7]]
    adapters = [None, None, "ann", None, "ben", "ann", None]
    max_new = 10
    free = [peft_greedy(peft_model, r, a, max_new, [VOCAB + 5]) for r, a in zip(rows, adapters, strict=True)]
    eos = sorted({free[0][2], free[4][6]})
    expected = [peft_greedy(peft_model, r, a, max_new, eos) for r, a in zip(rows, adapters, strict=True)]
    assert any(len(e) < max_new for e in expected) and any(len(e) == max_new for e in expected)
    shapes = []
    hook = ml.model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        got = generate_ids(ml, rows, adapters, max_new, eos, pad_id=0, batch_size=len(rows))
    finally:
        hook.remove()
    assert shapes[0] == (3, 20)  # the shared prefix, once per distinct adapter (None, ann, ben)
    assert shapes[1] == (len(rows), max(len(r) for r in rows) - 20)  # then only each row's own rest
    assert got == expected
    assert got == generate_ids(ml, rows, adapters, max_new, eos, pad_id=0, batch_size=len(rows), share_prefix=False)


def test_shared_prefix_prefill_keeps_the_answers_of_chat_prompts(tiny_model, tiny_users):
    """Real task prompts on the chat-templated tiny model, no adapter (the `none` method): the chat header and
    the task instruction are one shared prefix, and the answers equal those of today's full prefill and of
    Hugging Face `generate` through oppu.generate."""
    from oppu.generate import encode_prompt, generate
    from oppu.multilora.decode import MIN_SHARED_PREFIX, shared_prefix
    from oppu.tasks import get_task

    model, tokenizer = tiny_model
    task = get_task("LaMP_2M")
    texts = [task.prompt(q.input) for user in (*tiny_users[0], *tiny_users[1]) for q in user.queries]
    assert shared_prefix([encode_prompt(tokenizer, t, 512) for t in texts]) >= MIN_SHARED_PREFIX
    expected = generate(copy.deepcopy(model), tokenizer, texts, None, max_new_tokens=8)
    ml = MultiLora(model, capacity=1, r=8, alpha=8)
    no_adapter = [None] * len(texts)
    full = generate_multi(ml, tokenizer, texts, no_adapter, max_new_tokens=8, share_prefix=False)
    shared = generate_multi(ml, tokenizer, texts, no_adapter, max_new_tokens=8)
    assert shared == full == expected
    assert len(set(expected)) > 1  # the prompts' own rests really change the answers


def test_generate_multi_matches_project_generate_with_peft_pool(tiny_model):
    """The string-level drop-in: same chat wrapping, end tokens and decoding as oppu.generate."""
    from oppu.config import GenerationConfig, PeftConfig
    from oppu.generate import generate
    from oppu.model import AdapterPool

    model, tokenizer = tiny_model
    cfg = PeftConfig(dropout=0.0)
    ml_model = copy.deepcopy(model)
    pool = AdapterPool(model)
    ml = MultiLora.from_peft_config(ml_model, cfg, capacity=2)
    from peft.utils import set_peft_model_state_dict

    names = []
    for i, user in enumerate(("u1", "u2")):
        name = pool.add(user, cfg)
        state = random_lora_state(ml_model, cfg.r, seed=20 + i)
        set_peft_model_state_dict(pool.model, state, adapter_name=name)
        ml.load_state_dict(name, state, alpha=cfg.alpha, r=cfg.r)
        names.append(name)
    texts = ["space ship love", "dragon war night river film", "old hero", "laugh city"]
    adapters = [names[0], names[1], None, names[1]]
    expected = generate(pool, tokenizer, texts, adapters, GenerationConfig(), max_new_tokens=10)
    assert generate_multi(ml, tokenizer, texts, adapters, max_new_tokens=10) == expected


# -- training -------------------------------------------------------------------------------------------------
def examples(seed: int, n: int, length: int | None = None) -> list[TrainExample]:
    """Prompt tokens carry no loss; the last 1-3 tokens are the answer. Rows of 5-13 tokens, or all `length`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        drawn = int(torch.randint(5, 14, (1,), generator=gen))  # drawn either way: the other draws stay the same
        size = length or drawn
        ids = torch.randint(3, VOCAB, (size,), generator=gen).tolist()
        answer = int(torch.randint(1, 4, (1,), generator=gen))
        out.append(TrainExample(tuple(ids), tuple([IGNORE_INDEX] * (size - answer) + ids[-answer:])))
    return out


def user_batches(seed: int, n: int, batch_size: int = 3, epochs: int = 2, length: int | None = None):
    data = examples(seed, n, length)
    return [[data[i] for i in batch] for batch in make_batches(n, batch_size, epochs, seed)]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss (shifted, mean over labels != IGNORE_INDEX) in the logits' own dtype: the
    library's own loss upcasts to float32, which would put float32 rounding back into a float64 reference."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def peft_train_alone(base, init_state, batches, lr, wd, warmup_ratio, max_norm):
    """The per-user reference: PEFT LoRA, HF's loss on padded batches, torch AdamW, clip, linear schedule."""
    peft_model = peft_with(base, {"u": init_state})
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    total, warmup = len(batches), int(warmup_ratio * len(batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, total, warmup))
    peft_model.train()
    for batch in batches:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([list(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([list(e.labels) + [IGNORE_INDEX] * (width - len(e.labels)) for e in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in batch])[:, None]).long()
        loss = causal_lm_loss(peft_model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(peft_model, adapter_name="u").items()}


def test_batched_training_equals_training_each_user_alone(base64, states64):
    # Different numbers of batches per user, and cat joins three steps late (empty batches = sits out), so
    # users drop out of and into steps: per-user step counts and schedules must still match training alone.
    per_user = {"ann": user_batches(1, 7), "ben": user_batches(2, 3), "cat": [[], [], []] + user_batches(3, 5)}
    assert len({len(b) for b in per_user.values()}) == 3
    hp = {"lr": 5e-2, "wd": 0.01, "warmup_ratio": 0.34, "max_norm": 0.5}  # large lr: differences would show
    base, states = base64, states64  # float64: see EXACT_TOL
    ml = multi_with(base, states, capacity=4)
    ml.add("idle", seed=5)  # a slot that must not move
    idle_before = ml.state_dict("idle")
    history = train_users_batched(ml, per_user, lr=hp["lr"], weight_decay=hp["wd"], warmup_ratio=hp["warmup_ratio"],
                                  max_grad_norm=hp["max_norm"], tokens_per_forward=24, pad_id=0)  # several chunks
    for user, batches in per_user.items():
        batches = [b for b in batches if b]
        alone = peft_train_alone(base, states[user], batches, hp["lr"], hp["wd"], hp["warmup_ratio"], hp["max_norm"])
        ours = ml.state_dict(user)
        assert set(ours) == set(alone)
        for key in alone:
            torch.testing.assert_close(ours[key], alone[key], **EXACT_TOL, msg=f"{user} {key}")
            assert not torch.equal(ours[key], states[user][key]), "the adapter did not train"
        assert len(history[user]) == len(batches)
    for key, value in idle_before.items():
        assert torch.equal(ml.state_dict("idle")[key], value), "a user with no batches was updated"


COMPILE_TOL = {"rtol": 0.0, "atol": 1e-3}


def test_compiled_training_equals_eager_training(base64, states64, monkeypatch):
    """OPPU_COMPILE=1 (torch.compile of the decoder layers, dropout masks included) trains the same adapters as
    eager, and generation gets the eager layers back.

    Not to EXACT_TOL: Hugging Face's RMSNorm computes in float32 even in a float64 model, and Inductor's fused
    norm rounds that float32 differently (4.8e-7 on one norm), which AdamW's near-zero gradients turn into
    element differences (3.7e-7 on this data on a Zen 4 EPYC; up to 2.4e-5 on longer runs). COMPILE_TOL is 40x
    the larger, and 240x below what a wrong dropout mask (another seed, or none) moves an element here: 0.24.

    Every row has the same length and every pass the same two rows, so Inductor compiles the fewest graphs a
    training run needs (the first layer's, whose input needs no gradient, and the other layers'; forward and
    backward): with an empty Inductor cache each graph costs tens of seconds of C++ compiling on 2 cores. Rows
    of mixed lengths only add graphs of the same code (a padding mask, dynamic shapes)."""
    per_user = {"ann": user_batches(1, 4, batch_size=2, length=9), "ben": user_batches(2, 2, batch_size=2, length=9)}
    kwargs = {"lr": 5e-2, "weight_decay": 0.01, "max_grad_norm": 0.5, "tokens_per_forward": 18, "pad_id": 0}
    eager = multi_with(base64, states64, capacity=2, dropout=0.2)
    train_users_batched(eager, per_user, **kwargs)
    monkeypatch.setenv("OPPU_COMPILE", "1")
    ml = multi_with(base64, states64, capacity=2, dropout=0.2)
    seen = set()
    hook = ml.model.get_decoder().register_forward_pre_hook(
        lambda module, args: seen.add(type(module.layers[0]).__name__))
    try:
        train_users_batched(ml, per_user, **kwargs)
    finally:
        hook.remove()
    assert seen == {"OptimizedModule"}
    assert type(ml.model.get_decoder().layers[0]).__name__ == "LlamaDecoderLayer"
    for user in per_user:
        for key, value in eager.state_dict(user).items():
            torch.testing.assert_close(ml.state_dict(user)[key], value, **COMPILE_TOL, msg=f"{user} {key}")
            assert not torch.equal(value, states64[user][key]), "the adapter did not train"


def test_dropout_masks_do_not_depend_on_batch_companions(base64, states64):
    """With LoRA dropout on, a user trained among others (in any chunking) equals that user trained alone:
    its masks come from its own seed, step and row index. This is what lets Ray shares, resumed jobs and
    different chunk sizes give the same adapters."""
    base, states = base64, states64  # float64: see EXACT_TOL
    per_user = {"ann": user_batches(1, 7), "ben": user_batches(2, 3), "cat": [[], []] + user_batches(3, 5)}

    def train(batches, tokens_per_forward, dropout=0.3, seed=7):
        ml = multi_with(base, states, capacity=4, dropout=dropout)
        train_users_batched(ml, batches, lr=5e-2, max_grad_norm=1.0, tokens_per_forward=tokens_per_forward,
                            seed=seed, pad_id=0)
        return ml

    together = train(per_user, 24)
    for user, batches in per_user.items():
        alone = train({user: [b for b in batches if b]}, 10_000)
        for key, value in alone.state_dict(user).items():
            torch.testing.assert_close(together.state_dict(user)[key], value, **EXACT_TOL, msg=f"{user} {key}")
    # The masks are real (dropout changes the result) and seeded (another seed gives other masks).
    without = train({"ann": per_user["ann"]}, 10_000, dropout=0.0)
    reseeded = train({"ann": per_user["ann"]}, 10_000, seed=8)
    for other in (without, reseeded):
        assert any(not torch.allclose(other.state_dict("ann")[k], together.state_dict("ann")[k], atol=1e-5)
                   for k in together.state_dict("ann"))


def test_dropout_mask_is_per_row_and_ignores_padding_width(base):
    ml = MultiLora(copy.deepcopy(base), capacity=2, dropout=0.5)
    narrow = ml.dropout_mask([11, 12], [3, 5], width=5)
    wide = ml.dropout_mask([12, 11], [5, 3], width=9)
    assert torch.equal(narrow[0, :3], wide[1, :3]) and torch.equal(narrow[1, :5], wide[0, :5])
    assert bool(wide[1, 3:].all()), "padding positions are kept (never read)"
    assert 0.35 < float(narrow[1, :5].float().mean()) < 0.65, "about half of the inputs are dropped"
    assert MultiLora(copy.deepcopy(base), capacity=2).dropout_mask([1], [3], 3) is None


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_a_row_keep_mask_drops_at_the_rate_and_depends_on_its_seed_alone(p):
    """Over a million elements the drop rate is p within 5 standard errors (sqrt(p(1-p)/n) <= 5e-4); the same
    seed gives the same mask, another seed another one, and a shorter row is the longer one's start."""
    from oppu.multilora.model import row_keep_mask

    mask = row_keep_mask(7, 1000, 1000, p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert abs(1 - float(mask.float().mean()) - p) < 5 * (p * (1 - p) / 1e6) ** 0.5
    assert torch.equal(mask, row_keep_mask(7, 1000, 1000, p)) and not torch.equal(mask, row_keep_mask(8, 1000, 1000, p))
    assert torch.equal(row_keep_mask(7, 10, 1000, p), mask[:10])


def test_no_gradient_reaches_another_users_slice(base, states):
    ml = multi_with(base, states, capacity=4)
    batch = examples(4, 3)
    ml.model.train()
    for p in ml.parameters():
        p.requires_grad_(True)
        p.grad = None
    from oppu.multilora.train import _step_loss

    _step_loss(ml, batch, [ml.slot("ben")] * 3, torch.full((3,), 1 / 3), pad_id=0)
    ann, ben = ml.slot("ann"), ml.slot("ben")
    for p in ml.parameters():
        assert float(p.grad[ann].abs().max()) == 0.0
        assert float(p.grad[ben].abs().max()) > 0.0


def test_perturbing_another_users_data_leaves_my_adapter_unchanged(base64, states64):
    base, states = base64, states64  # float64: ben's rows change the padded width, hence the rounding (EXACT_TOL)
    ann_batches = user_batches(1, 6)

    def train(ben_seed: int):
        ml = multi_with(base, states, capacity=4)
        train_users_batched(ml, {"ann": ann_batches, "ben": user_batches(ben_seed, 6)}, lr=5e-2,
                            max_grad_norm=1.0, tokens_per_forward=10_000, pad_id=0)
        return ml.state_dict("ann"), ml.state_dict("ben")

    ann_a, ben_a = train(2)
    ann_b, ben_b = train(99)
    assert any(not torch.allclose(ben_a[k], ben_b[k]) for k in ben_a), "ben's data change had no effect on ben"
    for key in ann_a:
        torch.testing.assert_close(ann_a[key], ann_b[key], **EXACT_TOL)


def test_training_without_answer_tokens_is_refused(base, states):
    ml = multi_with(base, states)
    bad = TrainExample((5, 6, 7), (IGNORE_INDEX,) * 3)
    with pytest.raises(MultiLoraError, match="no answer tokens"):
        train_users_batched(ml, {"ann": [[bad]]}, lr=1e-3, pad_id=0)


def test_train_users_is_a_drop_in_for_the_per_user_loop(tiny_model, tiny_users):
    """Same examples, items, data hash and schedule length as oppu.train.train_users; B starts at zero in both,
    so each user's first-step loss (the base model on that user's first batch) must agree exactly."""
    from oppu.config import PeftConfig, TrainConfig
    from oppu.examples import PromptStyle
    from oppu.model import AdapterPool
    from oppu.multilora import train_users
    from oppu.tasks import get_task
    from oppu.train import train_users as train_users_per_user

    model, tokenizer = tiny_model
    task, (_, users) = get_task("LaMP_2M"), tiny_users
    peft_cfg = PeftConfig(dropout=0.0)
    train_cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=3, max_length=128, max_examples=5)
    ml = MultiLora.from_peft_config(copy.deepcopy(model), peft_cfg, capacity=len(users))
    events: dict[str, list] = {"ours": [], "theirs": []}
    ours = train_users(ml, tokenizer, task, users, PromptStyle(), peft_cfg, train_cfg,
                       progress=lambda *e: events["ours"].append(e[:3]))
    theirs = train_users_per_user(AdapterPool(model), tokenizer, task, users, PromptStyle(), peft_cfg, train_cfg,
                                  progress=lambda *e: events["theirs"].append(e[:3]))
    assert set(ours) == set(theirs) == {u.id for u in users}
    # Progress reads the same per user (its own step of its own total), only interleaved across users.
    assert sorted(events["ours"]) == sorted(events["theirs"])
    for uid, result in ours.items():
        ref = theirs[uid]
        assert (result.examples, result.item_ids, result.data_hash) == (ref.examples, ref.item_ids, ref.data_hash)
        assert [s for s, _ in result.curve] == [s for s, _ in ref.curve]
        # The first step's loss is one float32 forward before any update (B is zero), over other batch
        # companions and padding: rounding ~1e-7, not amplified by training steps.
        assert result.curve[0][1] == pytest.approx(ref.curve[0][1], rel=1e-5)
        assert any(float(v.abs().max()) > 0 for k, v in ml.state_dict(uid).items() if "lora_B" in k)


def test_save_is_atomic_with_manifest(base, states, tmp_path):
    import json

    ml = multi_with(base, states)
    folder = ml.save("ann", tmp_path / "ann", manifest={"user_id": "ann"})
    assert json.loads((folder / "manifest.json").read_text())["user_id"] == "ann"
    ml.save("ben", folder)  # overwrite in place
    again = MultiLora(copy.deepcopy(base), capacity=1)
    again.load("x", folder)
    for key, value in again.state_dict("x").items():
        torch.testing.assert_close(value, ml.state_dict("ben")[key], rtol=0, atol=0)  # a file round trip: exact
    assert [p.name for p in tmp_path.iterdir()] == ["ann"]  # no temporary folder left behind


def test_sampler_filters_like_hugging_face_and_is_seeded():
    from oppu.multilora import greedy, sampler

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler(1.0, 1, 1.0, seed=0)(logits), greedy(logits))  # top-k 1 = argmax
    assert torch.equal(sampler(1.0, 50, 1e-6, seed=0)(logits), greedy(logits))  # nucleus keeps >= 1 token
    top2 = logits.topk(2).indices
    picks = torch.stack([sampler(1.0, 2, 1.0, seed=s)(logits) for s in range(20)], 1)
    assert bool((picks[..., None] == top2[:, None]).any(-1).all()), "a token outside the top 2 was sampled"
    assert len(set(picks.flatten().tolist())) > 2
    assert torch.equal(sampler(0.7, 10, 0.9, seed=4)(logits), sampler(0.7, 10, 0.9, seed=4)(logits))


def test_factors_stay_fp32_over_a_bf16_base(base, states):
    """On a bf16 base (the GPU default) the stacked factors are fp32 master weights, as PEFT keeps adapters:
    training steps of ~lr must not round away, and the forward still runs in bf16 with the base."""
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    ml = MultiLora(bf16, capacity=2)
    ml.load_state_dict("ann", states["ann"], alpha=8, r=8)
    assert all(p.dtype == torch.float32 for p in ml.parameters())
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad(), ml.route(["ann", None]):
        logits = ml.model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    reference = peft_with(copy.deepcopy(base).to(torch.bfloat16), {"ann": states["ann"]})
    with torch.no_grad():
        ref = reference(input_ids=ids[:1]).logits
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op): two paths rounding in different places over 2 layers
    torch.testing.assert_close(logits[:1].float(), ref.float(), rtol=0.05, atol=0.05)
    before = ml.state_dict("ann")
    train_users_batched(ml, {"ann": user_batches(1, 4)}, lr=1e-3, pad_id=0)
    assert any(not torch.equal(before[k], ml.state_dict("ann")[k]) for k in before)


def test_bf16_training_on_a_cpu_runs_eager_attention_and_casts_each_layer_input_once(base, states):
    """A 16-bit model on a CPU trains with the lean eager attention (`oppu.attention`: the CPU flash backward
    was the slow part) and is back on its own attention after; q_proj and v_proj, reading the same
    hidden states, share one fp32 copy of them for the LoRA path instead of keeping one each for backward."""
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    own = bf16.config._attn_implementation
    ml = MultiLora(bf16, capacity=2)
    ml.load_state_dict("ann", states["ann"], alpha=8, r=8)
    seen, inputs = [], {}
    layer = bf16.model.layers[0]

    def keep_lora_input(name):
        def hook(module, args, out):  # returns None: the output stays the module's
            inputs.setdefault(name, ml.active_route.cast[1])
        return hook

    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))]
    hooks += [getattr(layer.self_attn, name).register_forward_hook(keep_lora_input(name))
              for name in ("q_proj", "v_proj")]
    train_users_batched(ml, {"ann": user_batches(1, 4)}, lr=1e-3, pad_id=0)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {LEAN_EAGER} and own != LEAN_EAGER
    assert bf16.config._attn_implementation == own
    assert inputs["q_proj"] is inputs["v_proj"] and inputs["q_proj"].dtype == torch.float32


def test_seeded_dropout_is_inverted_dropout_on_the_lora_input(base64, states64):
    """With a route's keep-mask, a layer adds scale * ((x * keep / (1 - p)) @ A) @ B: the 1/(1-p) rescale is moved
    onto the rank-r intermediate, which is the same product (float64: equal to rounding)."""
    ml = MultiLora(copy.deepcopy(base64), capacity=2, dropout=0.5)
    ml.load_state_dict("ann", states64["ann"], alpha=8, r=8)
    layer = next(module for name, module in ml.model.named_modules() if name.endswith("layers.1.self_attn.v_proj"))
    x = torch.randn(2, 5, layer.base.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    slot = ml.slot("ann")
    ml.model.train()
    ml.active_route = ml.make_route([slot, slot])
    ml.active_route.keep = ml.dropout_mask([21, 22], [5, 4], width=5)
    try:
        got = layer(x)
        keep = ml.active_route.keep[:, :, layer.offset:layer.offset + x.shape[-1]].double()
    finally:
        ml.active_route = None
        ml.model.eval()
    assert 0 < float(keep.mean()) < 1, "the mask drops some inputs and keeps others"
    a, b, scale = layer.lora_A[slot], layer.lora_B[slot], ml.scaling[slot]
    expected = layer.base(x) + scale * ((x * keep / 0.5) @ a) @ b
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 576), (7, 13), (1, 1)])
def test_a_row_keep_mask_is_the_bits_that_generator_bytes_draws(shape):
    """The raw SFC64 outputs read as 16-bit elements are the stream `Generator.bytes` hands out (as the masks
    were drawn before), also where the element count is not a multiple of four: a run resumed across the change
    draws the masks it would have drawn."""
    import numpy as np

    from oppu.multilora.model import DROP_RESOLUTION, row_keep_mask

    length, columns = shape
    raw = np.random.Generator(np.random.SFC64(11)).bytes(2 * length * columns)
    expected = np.frombuffer(raw, dtype=np.uint16) >= round(0.3 * DROP_RESOLUTION)
    assert torch.equal(row_keep_mask(11, length, columns, 0.3), torch.from_numpy(expected.reshape(shape)))
