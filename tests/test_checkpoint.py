"""Training checkpoints: every training loop stopped mid-way and continued from its checkpoint ends with exactly
the adapter of an uninterrupted run, reports the step it continues from, and never trusts a foreign or cut file."""

from __future__ import annotations

import copy

import pytest

from oppu.checkpoint import Checkpoint
from oppu.config import PeftConfig, TrainConfig
from oppu.examples import PromptStyle
from oppu.model import AdapterPool
from oppu.retrieval import get_retriever
from oppu.tasks import get_task
from oppu.train import StopRequested, train_user

TASK = get_task("LaMP_2M")
FAST = TrainConfig(epochs=3, lr=1e-2, batch_size=2, max_length=128)


def _stop_after(n):
    """should_stop that turns true once `n` progress reports with a loss were seen."""
    seen = []

    def progress(stage, step, total, loss):
        if loss is not None:
            seen.append(step)

    return progress, lambda: len(seen) >= n


def _weights(pool, key):
    return [p.detach().clone() for p in pool.trainable_parameters(key)]


def test_per_user_loop_continues_from_its_checkpoint_exactly(tiny_model, tiny_users, tmp_path):
    import torch

    model, tok = tiny_model
    alice = tiny_users[1][0]
    peft_cfg = PeftConfig(dropout=0.1)  # dropout draws from the RNG: the restored stream must be the same
    reference = train_user(AdapterPool(copy.deepcopy(model)), tok, TASK, alice, PromptStyle(), peft_cfg, FAST)
    ref_pool = AdapterPool(copy.deepcopy(model))
    train_user(ref_pool, tok, TASK, alice, PromptStyle(), peft_cfg, FAST)

    ckpt = Checkpoint(tmp_path / "ckpt", every=1)
    progress, stop = _stop_after(5)
    with pytest.raises(StopRequested):
        train_user(AdapterPool(copy.deepcopy(model)), tok, TASK, alice, PromptStyle(), peft_cfg, FAST,
                   progress=progress, should_stop=stop, checkpoint=ckpt)
    assert ckpt.path.is_file()
    torch.manual_seed(123)  # another process's RNG: the checkpoint's stream must take over
    events = []
    pool = AdapterPool(copy.deepcopy(model))
    resumed = train_user(pool, tok, TASK, alice, PromptStyle(), peft_cfg, FAST,
                         progress=lambda *e: events.append(e), checkpoint=Checkpoint(tmp_path / "ckpt", every=1))
    total = len(reference.curve)
    assert events[0] == ("user:alice:plain", 0, total, None)
    assert events[1] == ("user:alice:plain", 5, total, None)  # continues at step 5, not 0
    assert [e[1] for e in events[2:]] == list(range(6, total + 1))
    assert resumed.curve == reference.curve
    assert all(torch.equal(a, b) for a, b in zip(_weights(pool, "alice"), _weights(ref_pool, "alice")))


def test_multi_user_trainer_continues_from_its_checkpoint_exactly(tiny_model, tiny_users, tmp_path):
    import torch

    from oppu.multilora import MultiLora, train_users

    model, tok = tiny_model
    users = tiny_users[1]
    peft_cfg = PeftConfig(dropout=0.1)

    def fresh():
        return MultiLora.from_peft_config(copy.deepcopy(model), peft_cfg, capacity=len(users) + 1)

    ref_ml = fresh()
    reference = train_users(ref_ml, tok, TASK, users, PromptStyle(), peft_cfg, FAST)
    ckpt = Checkpoint(tmp_path / "ml", every=1)
    progress, stop = _stop_after(4)
    with pytest.raises(StopRequested):
        train_users(fresh(), tok, TASK, users, PromptStyle(), peft_cfg, FAST, progress=progress, should_stop=stop,
                    checkpoint=ckpt)
    ml = fresh()
    ml.add("someone-else", seed=7)  # slots differ from the first attempt's: state follows the user, not the slot
    events = []
    resumed = train_users(ml, tok, TASK, users, PromptStyle(), peft_cfg, FAST, progress=lambda *e: events.append(e),
                          checkpoint=Checkpoint(tmp_path / "ml", every=1))
    announced = {e[0]: e[1] for e in events if e[3] is None}
    assert any(step > 0 for step in announced.values())  # at least one user continues past step 0
    for uid, result in reference.items():
        assert resumed[uid].curve == result.curve
        for a, b in zip(ml.parameters(), ref_ml.parameters()):
            assert torch.equal(a[ml.slot(result.adapter)], b[ref_ml.slot(result.adapter)])


def test_task_adaptation_continues_from_its_checkpoint_and_removes_it(tiny_model, tiny_users, tmp_path):
    from oppu.adaptation import adapt_task

    model, tok = tiny_model
    train = tiny_users[0]
    retriever = get_retriever("bm25", TASK.format_item)
    peft_cfg = PeftConfig(target_modules=("q_proj", "v_proj"))
    kwargs = {"model_name": "tiny", "data_fingerprint": "fp", "retriever": retriever, "retriever_name": "bm25"}
    ref = adapt_task(copy.deepcopy(model), tok, TASK, train, PromptStyle(), peft_cfg, FAST, tmp_path / "ref",
                     **kwargs)
    progress, stop = _stop_after(3)
    import oppu.checkpoint as ck

    old = ck.CHECKPOINT_EVERY
    ck.CHECKPOINT_EVERY = 1
    try:
        with pytest.raises(StopRequested):
            adapt_task(copy.deepcopy(model), tok, TASK, train, PromptStyle(), peft_cfg, FAST, tmp_path / "run",
                       progress=progress, should_stop=stop, **kwargs)
        ckpts = list((tmp_path / "run").rglob("state.pt"))
        assert len(ckpts) == 1
        events = []
        again = adapt_task(copy.deepcopy(model), tok, TASK, train, PromptStyle(), peft_cfg, FAST, tmp_path / "run",
                           progress=lambda *e: events.append(e), **kwargs)
    finally:
        ck.CHECKPOINT_EVERY = old
    assert events[1][1] == 3 and events[1][3] is None  # continues at step 3
    assert again.curve == ref.curve
    assert (again.folder / "adapter_model.safetensors").read_bytes() == \
        (ref.folder / "adapter_model.safetensors").read_bytes()
    assert not list((tmp_path / "run").rglob("state.pt"))  # removed once the LoRA is saved


def test_a_foreign_or_cut_checkpoint_is_ignored(tmp_path):
    import torch

    ckpt = Checkpoint(tmp_path / "c", every=1)
    ckpt.save({"stage": "a"}, {"step": 3, "params": [torch.ones(2)]})
    assert Checkpoint(tmp_path / "c").load({"stage": "a"})["step"] == 3
    assert Checkpoint(tmp_path / "c").load({"stage": "b"}) is None
    ckpt.path.write_bytes(ckpt.path.read_bytes()[:20])
    assert Checkpoint(tmp_path / "c").load({"stage": "a"}) is None
    assert [p.name for p in ckpt.folder.iterdir()] == ["state.pt"]  # no temp file left behind


def test_checkpoint_is_due_every_n_steps_at_the_end_and_after_a_while(tmp_path):
    ckpt = Checkpoint(tmp_path, every=10, every_s=3600)
    assert [s for s in range(1, 26) if ckpt.due(s, 25)] == [10, 20, 25]
    assert Checkpoint(tmp_path, every=10, every_s=0).due(3, 25)
