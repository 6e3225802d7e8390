"""Training loops: answer-only loss, per-user examples from the user's own history, seeding, stop, caching."""

from __future__ import annotations

import math

import pytest

from oppu.attention import LEAN_EAGER, training_attention
from oppu.config import PeftConfig, TrainConfig
from oppu.examples import Example, PromptStyle, user_examples
from oppu.model import AdapterPool
from oppu.retrieval import get_retriever
from oppu.tasks import get_task
from oppu.train import (
    TOKENS_PER_FORWARD,
    TOKENS_PER_FORWARD_16BIT,
    StopRequested,
    answer_end_ids,
    encode_example,
    tokens_per_forward_for,
    train_user,
    train_users,
)

TASK = get_task("LaMP_2M")
FAST = TrainConfig(epochs=2, lr=1e-2, batch_size=4, max_length=128)
RAG = PromptStyle(retrieval=True, k=1)


def _weights(pool, key):
    return [p.detach().clone() for p in pool.trainable_parameters(key)]


def test_encode_masks_the_prompt_and_ends_with_the_turn_end(tiny_model):
    _, tok = tiny_model
    ids, labels = encode_example(tok, Example("description: space\ntag:", "comedy", "x"), 128, answer_end_ids(tok))
    answer = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(answer[:-1]) == "comedy"
    long_ids, long_labels = encode_example(tok, Example("word " * 400, "comedy", "x"), 64, answer_end_ids(tok))
    assert len(long_ids) <= 64 and [t for t in long_labels if t != -100] == answer  # the prompt is cut, not the answer


def test_user_examples_use_only_that_users_items_and_earlier_retrievals(tiny_users):
    _, test = tiny_users
    alice = test[0]
    plain = user_examples(TASK, alice.history, PromptStyle())
    assert [e.source_id for e in plain] == [i.id for i in alice.history]
    assert [e.target for e in plain] == [i.fields["tag"] for i in alice.history]
    seen = []

    class Recording:
        def retrieve(self, query_text, items, k, before=None):
            seen.append([i.id for i in items])
            return get_retriever("bm25", TASK.format_item).retrieve(query_text, items, k, before)

    rag = user_examples(TASK, alice.history, RAG, Recording())
    assert "Past items" not in rag[0].prompt  # the first item has nothing earlier to retrieve
    assert all("Past items" in e.prompt for e in rag[1:])
    ids = [i.id for i in alice.history]
    assert seen == [ids[:n] for n in range(1, len(ids))]  # only strictly earlier items of the same user


def test_train_user_learns_is_seeded_and_reports_progress(tiny_model, tiny_users):
    model, tok = tiny_model
    _, test = tiny_users
    pool = AdapterPool(model)
    events = []
    result = train_user(pool, tok, TASK, test[0], PromptStyle(), PeftConfig(), FAST,
                        progress=lambda *e: events.append(e))
    assert len(result.curve) == 4 and result.examples == 8  # 8 items, batch 4, 2 epochs
    assert events[-1][:3] == ("user:alice:plain", 4, 4) and events[-1][3] == result.curve[-1][1]
    assert result.item_ids == [i.id for i in test[0].history] and len(result.data_hash) == 16
    first = _weights(pool, "alice")
    again = train_user(pool, tok, TASK, test[0], PromptStyle(), PeftConfig(), FAST)
    assert again.curve == result.curve
    assert all((a == b).all() for a, b in zip(first, _weights(pool, "alice")))
    longer = train_user(pool, tok, TASK, test[0], PromptStyle(), PeftConfig(), TrainConfig(
        epochs=8, lr=1e-2, batch_size=8, max_length=128))
    assert longer.curve[-1][1] < longer.curve[0][1]  # it fits the user's items


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["ia3", "prompt"])
def test_other_peft_kinds_train(tiny_model, tiny_users, kind, dtype):
    """IA3 and prompt tuning train in both dtypes (in bf16 on a CPU through the lean eager training attention, with
    prompt tuning's virtual tokens in front of the mask)."""
    import torch

    model, tok = tiny_model
    model.to(getattr(torch, dtype))
    pool = AdapterPool(model)
    pool.add("probe", PeftConfig(kind=kind, num_virtual_tokens=4))
    pool.delete("probe")
    result = train_user(pool, tok, TASK, tiny_users[1][1], PromptStyle(), PeftConfig(kind=kind, num_virtual_tokens=4),
                        FAST)
    assert result.curve and all(math.isfinite(loss) for _, loss in result.curve)


def test_training_b_does_not_touch_a(tiny_model, tiny_users):
    model, tok = tiny_model
    _, test = tiny_users
    pool = AdapterPool(model)
    train_user(pool, tok, TASK, test[0], PromptStyle(), PeftConfig(), FAST)
    before = _weights(pool, "alice")
    results = train_users(pool, tok, TASK, [test[1], test[2]], PromptStyle(), PeftConfig(), FAST)
    assert all((a == b).all() for a, b in zip(before, _weights(pool, "alice")))
    assert results["bob"].item_ids == [i.id for i in test[1].history]
    assert results["carol"].item_ids == [i.id for i in test[2].history]


def test_should_stop_raises_between_steps(tiny_model, tiny_users):
    model, tok = tiny_model
    pool = AdapterPool(model)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(StopRequested, match="step 2"):
        train_user(pool, tok, TASK, tiny_users[1][0], PromptStyle(), PeftConfig(), FAST, should_stop=stop)


def test_sampled_examples_and_manifest_items_cover_targets_and_context(tiny_model, tiny_users):
    model, tok = tiny_model
    alice = tiny_users[1][0]
    sample = user_examples(TASK, alice.history, PromptStyle(), max_examples=3, seed=5)
    assert len(sample) == 3 and sample == user_examples(TASK, alice.history, PromptStyle(), max_examples=3, seed=5)
    newest = sorted(alice.history, key=lambda item: item.date or "")[-3:]  # a bound keeps the most recent items
    assert {e.source_id for e in sample} == {str(item.id) for item in newest}
    pool = AdapterPool(model)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_length=128, max_examples=2, seed=1)
    result = train_user(pool, tok, TASK, alice, RAG, PeftConfig(), cfg, retriever=get_retriever("bm25"))
    examples = user_examples(TASK, alice.history, RAG, get_retriever("bm25"), max_examples=2, seed=1)
    expected = {e.source_id for e in examples} | {i for e in examples for i in e.context_ids}
    assert set(result.item_ids) == expected and result.examples == 2
    assert all(i.startswith("alice-") for i in result.item_ids)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_answer_only_loss_in_chunks_equals_the_full_forward_loss(tiny_model, tiny_users, kind):
    """The memory-saving path (logits at answer positions only, a batch cut into length chunks) computes the same
    mean answer-token loss and the same gradients as Hugging Face's full-vocabulary forward."""
    import torch

    from oppu.train import _accumulate, right_pad

    model, tok = tiny_model
    pool = AdapterPool(model)
    pool.add("a", PeftConfig(kind=kind, dropout=0.0))
    params = pool.trainable_parameters("a")
    with torch.no_grad():  # non-zero LoRA B, so the adapter path is exercised too
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    end = answer_end_ids(tok)
    history = tiny_users[1][0].history
    examples = user_examples(TASK, history, PromptStyle())[:2] + user_examples(TASK, history, RAG,
                                                                                get_retriever("bm25"))[2:5]
    batch = [encode_example(tok, ex, 1024, end) for ex in examples]
    assert len({len(ids) for ids, _ in batch}) > 1  # rows of different lengths, so chunks and padding differ
    ids, mask, labels = right_pad(batch, tok.pad_token_id, "cpu")
    reference = pool.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    reference.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = _accumulate(pool.model, batch, tok.pad_token_id, "cpu", tokens_per_forward=2 * len(batch[0][0]))
    # One float32 forward and backward, the same sums in other chunks: rounding ~1e-7 relative, with no optimizer
    # step to amplify it; a loss that counted prompt or padding tokens would be off by far more than 1e-5.
    assert loss == pytest.approx(float(reference), rel=1e-5)
    for got, want in zip([p.grad for p in params], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_16bit_model_trains_on_a_cpu_with_eager_attention_in_larger_passes(tiny_model, tiny_users):
    """bf16 on a CPU: the per-user loop's training forwards run the lean eager attention (the CPU flash backward is slow
    there) in passes of `TOKENS_PER_FORWARD_16BIT`; the model keeps its own attention outside training. A float32
    model keeps both defaults (measured no faster)."""
    import torch

    model, tok = tiny_model
    assert training_attention(model) is None and tokens_per_forward_for(model) == TOKENS_PER_FORWARD
    model.to(torch.bfloat16)
    own = model.config._attn_implementation
    assert training_attention(model) == LEAN_EAGER and tokens_per_forward_for(model) == TOKENS_PER_FORWARD_16BIT
    seen = []
    attention = model.get_decoder().layers[0].self_attn
    hook = attention.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    pool = AdapterPool(model)
    train_user(pool, tok, TASK, tiny_users[1][0], PromptStyle(), PeftConfig(), FAST)
    hook.remove()
    assert seen and set(seen) == {LEAN_EAGER} and own != LEAN_EAGER
    assert model.config._attn_implementation == own
