"""Which engine a run's `batching` setting picks (oppu/banks.py)."""

from __future__ import annotations

import pytest

from oppu.banks import AUTO_ENGINE, MultiLoraBank, PeftBank, make_bank, resolve_batching
from oppu.config import ConfigError, PeftConfig, RunConfig


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_takes_the_engine_measured_faster_on_the_device(device):
    assert resolve_batching("auto", PeftConfig(), device) == AUTO_ENGINE[device]
    assert resolve_batching("per_user", PeftConfig(), device) == "per_user"
    assert resolve_batching("multi_lora", PeftConfig(), device) == "multi_lora"


@pytest.mark.parametrize("kind", ["ia3", "prompt"])
def test_kinds_peft_cannot_batch_always_run_per_user(kind):
    assert resolve_batching("auto", PeftConfig(kind=kind), "cpu") == "per_user"
    assert resolve_batching("multi_lora", PeftConfig(kind=kind), "cuda") == "per_user"


def test_unknown_batching_is_refused():
    with pytest.raises(ValueError, match="use auto or one of"):
        resolve_batching("magic", PeftConfig(), "cpu")
    with pytest.raises(ConfigError, match="batching"):
        RunConfig(batching="magic")
    assert RunConfig(batching="auto").batching == "auto"


def test_make_bank_builds_what_auto_resolves_to(tiny_model):
    model, _ = tiny_model
    expected = MultiLoraBank if AUTO_ENGINE["cpu"] == "multi_lora" else PeftBank
    bank = make_bank(model, PeftConfig(), "auto")
    assert isinstance(bank, expected)
    if isinstance(bank, MultiLoraBank):
        bank.ml.unwrap()
    assert isinstance(make_bank(model, PeftConfig(kind="ia3", target_modules=("q_proj", "v_proj")), "auto"),
                      PeftBank)
