"""The run config: the paper preset is the official protocol, the default differs from it only in sizes, and every
caller builds a config the same way."""

from __future__ import annotations

import pytest

from oppu.config import (
    METHODS,
    PAPER_METHODS,
    ConfigError,
    RunConfig,
    build_config,
    list_presets,
    load_preset,
    method_label,
)

# The official values, read from github TamSiuhin/OPPU at its current head (task_LoRA.py: LoraConfig ~99-105 and
# TrainingArguments ~107-122, argparse defaults ~17-24; OPPU.py: LoraConfig ~96-103, TrainingArguments ~105-121,
# argparse ~18-26, generate() ~342-350). task_LoRA.py's target list also names `out_proj`, which Llama lacks.
OFFICIAL = {
    "users": 100,
    "methods": ("none", "rag", "pag", "oppu", "oppu+rag", "oppu+pag"),
    "task_adaptation": True,
    "adaptation_peft.kind": "lora", "adaptation_peft.r": 8, "adaptation_peft.alpha": 8,
    "adaptation_peft.dropout": 0.05, "adaptation_peft.target_modules": ("q_proj", "k_proj", "v_proj"),
    "adaptation_train.epochs": 3, "adaptation_train.lr": 1e-4, "adaptation_train.batch_size": 16,
    "adaptation_train.max_length": 2048, "adaptation_train.max_examples": None,
    "adaptation_train.weight_decay": 0.01, "adaptation_train.warmup_ratio": 0.1,
    "adaptation_train.max_grad_norm": 0.3,
    "user_peft.kind": "lora", "user_peft.r": 8, "user_peft.alpha": 8, "user_peft.dropout": 0.05,
    "user_peft.target_modules": ("q_proj", "v_proj"),
    "user_train.epochs": 2, "user_train.lr": 1e-4, "user_train.batch_size": 16, "user_train.max_length": 2048,
    "user_train.max_examples": None, "user_train.weight_decay": 0.01, "user_train.warmup_ratio": 0.1,
    "user_train.max_grad_norm": 0.3,
    "retrieval.retriever": "bm25", "retrieval.k": 1,
    "generation.greedy": False, "generation.temperature": 0.1, "generation.top_k": 10, "generation.top_p": 0.9,
    "generation.max_new_tokens": 200,
    "history_format": "full", "history_cutoff": None,
}

# What the CPU-sized default may change, each listed with its reason in docs/PROTOCOL.md: how many users, items,
# tokens and steps, the learning rate that goes with that step budget, and reproducible greedy decoding.
CPU_SIZES = {
    "users", "methods", "adaptation_train.epochs", "adaptation_train.lr", "adaptation_train.batch_size",
    "adaptation_train.max_length", "adaptation_train.max_examples", "user_train.epochs", "user_train.lr",
    "user_train.batch_size", "user_train.max_length", "user_train.max_examples", "generation.greedy",
    "generation.max_new_tokens",
}


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_the_paper_preset_resolves_to_exactly_the_official_values():
    cfg = build_config("paper")
    wrong = {key: (_get(cfg, key), want) for key, want in OFFICIAL.items() if _get(cfg, key) != want}
    assert not wrong, f"paper preset differs from the official code: {wrong}"


def test_the_default_differs_from_the_official_protocol_only_in_listed_sizes():
    default, paper = RunConfig(), build_config("paper")
    differing = {key for key in OFFICIAL if _get(default, key) != _get(paper, key)}
    assert differing <= CPU_SIZES, f"not a size: {sorted(differing - CPU_SIZES)}"
    assert default.user_train.max_grad_norm == 0.3 and default.user_train.weight_decay == 0.01


def test_methods_are_the_papers_rows_with_pag_retrieving_as_the_official_code():
    assert PAPER_METHODS == ("none", "rag", "pag", "oppu", "oppu+rag", "oppu+pag")
    assert METHODS["pag"].retrieval and METHODS["pag"].profile and not METHODS["pag"].adapter
    assert METHODS["oppu+pag"].retrieval and METHODS["oppu+pag"].profile and METHODS["oppu+pag"].adapter
    assert not METHODS["profile-only"].retrieval and METHODS["profile-only"].profile
    assert [method_label(m) for m in PAPER_METHODS] == ["Non-personalized", "RAG", "PAG", "OPPU", "OPPU+RAG",
                                                        "OPPU+PAG"]


def test_the_old_three_lever_name_points_at_its_new_name():
    with pytest.raises(ConfigError, match=r"oppu\+rag\+pag.*now called oppu\+pag"):
        RunConfig(methods=("oppu+rag+pag",))


def test_dotted_overrides_layer_over_a_preset():
    cfg = build_config("quick", {"user_train.epochs": 5, "retrieval": {"k": 3}, "task": "LaMP_3"})
    quick = load_preset("quick")
    assert cfg.user_train.epochs == 5 and cfg.retrieval.k == 3 and cfg.task == "LaMP_3"
    assert cfg.user_train.max_examples == quick["user_train"]["max_examples"]  # the preset's other keys stay
    assert cfg.user_train.max_grad_norm == RunConfig().user_train.max_grad_norm  # and the defaults under them


@pytest.mark.parametrize("overrides, words", [
    ({"user_train.epoch": 3}, r"unknown setting user_train\.'epoch'"),
    ({"retrievel.k": 3}, r"unknown setting 'retrievel'"),
    ({"user_train.max_grad_norm": 0}, r"max_grad_norm must be > 0"),
])
def test_a_bad_override_names_the_setting(overrides, words):
    with pytest.raises(ConfigError, match=words):
        build_config(None, overrides)


def test_every_shipped_preset_builds():
    assert {"paper", "quick"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(build_config(name), RunConfig)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="use one of .*paper"):
        build_config("papr")
