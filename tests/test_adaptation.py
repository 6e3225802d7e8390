"""Task adaptation: one task LoRA per prompt style on other users' gold queries, cached, never merged into the
caller's model; task-adapted bases switched in place, exactly, also under the multi-LoRA engine's wrappers."""

from __future__ import annotations

import pytest

from oppu.adaptation import TASK_ADAPTER_FORMAT, TaskBases, adapt_task, adaptation_key
from oppu.config import ModelConfig, PeftConfig, TrainConfig
from oppu.examples import PromptStyle
from oppu.retrieval import get_retriever
from oppu.tasks import get_task

TASK = get_task("LaMP_2M")
PLAIN, RAG = PromptStyle(), PromptStyle(retrieval=True, k=1)
PEFT = PeftConfig(target_modules=("q_proj", "k_proj", "v_proj"))
FAST = TrainConfig(epochs=2, lr=5e-2, batch_size=4, max_length=512)  # long enough to keep the retrieved item


def _adapt(model, tok, users, style, cache, **extra):
    kwargs = {"model_name": "tiny", "data_fingerprint": "fp", "retriever": get_retriever("bm25", TASK.format_item),
              "retriever_name": "bm25", **extra}
    return adapt_task(model, tok, TASK, users, style, PEFT, FAST, cache, **kwargs)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(model, tok):
    import torch

    ids = tok(["a dragon and a space ship"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _merged(model_dir, folder):
    import peft

    from oppu.model import load_model

    fresh, _ = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    return peft.PeftModel.from_pretrained(fresh, str(folder)).merge_and_unload()


def test_adapt_task_trains_one_style_caches_it_and_leaves_the_model_untouched(tiny_model, tiny_users, tmp_path):
    import torch

    model, tok = tiny_model
    train, _ = tiny_users
    before = _state(model)
    events = []
    first = _adapt(model, tok, train, RAG, tmp_path, progress=lambda *e: events.append(e))
    assert not first.cached and first.curve and first.examples == sum(len(u.queries) for u in train)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    stages = {stage for stage, *_ in events}
    assert stages == {"adapt:LaMP_2M:rag"}
    assert events[0][1] == 0 and events[0][2] == events[-1][2] == events[-1][1] == len(first.curve)
    manifest = (first.folder / "manifest.json").read_text()
    assert '"style_key": "rag"' in manifest and f'"format": {TASK_ADAPTER_FORMAT}' in manifest
    again = _adapt(model, tok, train, RAG, tmp_path)
    assert again.cached and again.folder == first.folder and not again.curve
    plain = _adapt(model, tok, train, PLAIN, tmp_path)
    assert not plain.cached and plain.folder != first.folder  # one task LoRA per style
    other = _adapt(model, tok, train, RAG, tmp_path, data_fingerprint="changed")
    assert not other.cached and other.folder not in (first.folder, plain.folder)


def test_adaptation_key_covers_the_style():
    base = {"model": "m", "task": "LaMP_2M", "data": "fp"}
    assert adaptation_key(**base, style={"k": 0}) != adaptation_key(**base, style={"k": 1})


def test_stopped_adaptation_saves_nothing_and_restores_the_model(tiny_model, tiny_users, tmp_path):
    import torch

    from oppu.train import StopRequested

    model, tok = tiny_model
    before = _state(model)
    with pytest.raises(StopRequested):
        _adapt(model, tok, tiny_users[0], PLAIN, tmp_path, should_stop=lambda: True)
    assert not list((tmp_path / "task_adapters").rglob("adapter_model.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


@pytest.fixture()
def two_bases(tiny_model, tiny_users, tmp_path):
    model, tok = tiny_model
    folders = {style.key: _adapt(model, tok, tiny_users[0], style, tmp_path).folder for style in (PLAIN, RAG)}
    return model, tok, folders


def test_bases_switch_to_each_merged_style_and_back_to_the_exact_original(two_bases, tiny_model_dir):
    import torch

    model, tok, folders = two_bases
    original = _state(model)
    bases = TaskBases(model, folders)
    expected = {key: _merged(tiny_model_dir, folder) for key, folder in folders.items()}
    for key in ("rag", "plain", "rag", None, "plain"):
        bases.use(key)
        if key is None:
            assert all(torch.equal(original[k], v) for k, v in _state(model).items())
            continue
        assert torch.equal(model.model.layers[1].self_attn.v_proj.weight,
                           expected[key].model.layers[1].self_attn.v_proj.weight)
        assert torch.allclose(_logits(model, tok), _logits(expected[key], tok), atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(model, tok), _logits(expected["rag"], tok))  # the styles do differ
    bases.use(RAG)  # a PromptStyle finds its base by key
    assert bases.current == "rag"
    bases.use(None)
    assert all(torch.equal(original[k], v) for k, v in _state(model).items())
    with pytest.raises(KeyError, match="plain"):
        bases.use("pag")


def test_bases_switch_under_the_multi_lora_wrappers(two_bases, tiny_model_dir):
    import torch

    from oppu.multilora import MultiLora, MultiLoraLinear

    model, tok, folders = two_bases
    bases = TaskBases(model, folders)  # built from the plain model, before the engine wraps it
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    engine = MultiLora(model, capacity=2, r=8, target_modules=("q_proj", "v_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, MultiLoraLinear)
    bases.use("rag")
    expected = _merged(tiny_model_dir, folders["rag"])
    assert torch.allclose(_logits(model, tok), _logits(expected, tok), atol=1e-6, rtol=0)
    bases.use(None)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, original)
    engine.unwrap()
    bases.use("plain", model)
    assert torch.allclose(_logits(model, tok), _logits(_merged(tiny_model_dir, folders["plain"]), tok),
                          atol=1e-6, rtol=0)


def test_bases_switch_under_peft_wrappers(two_bases, tiny_model_dir):
    import torch

    from oppu.model import AdapterPool

    model, _, folders = two_bases
    bases = TaskBases(model, folders)
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig())
    bases.use("rag", pool.model)
    expected = _merged(tiny_model_dir, folders["rag"])
    layer = pool.model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, expected.model.layers[0].self_attn.q_proj.weight)
