"""Run configs the dashboard submits: the Train form's, the quick demo's and an analysis sweep's base.

Every one is built by `oppu.config.build_config` (defaults <- preset <- overrides, checked and validated there)
on this dashboard's data, store and artifact folders; the form's defaults are `RunConfig()`'s own. A bad value
comes back in the form's language: the message names the form field, where the core's message may name a CLI
flag or a config key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from dashboard.state import default_model, paths
from oppu.config import ConfigError, RunConfig, build_config

# The Train form's fields: the dotted RunConfig key each one sets -> its label on the form, in form order.
FIELDS: dict[str, str] = {
    "users": "N most active",
    "user_ids": "…or these users (overrides N)",
    "methods": "Methods",
    "user_peft.kind": "PEFT type",
    "retrieval.retriever": "Retriever",
    "retrieval.k": "Retrieved items k",
    "user_train.epochs": "Epochs",
    "user_train.lr": "Learning rate",
    "user_peft.r": "LoRA rank",
    "model.name": "Base model",
    "task_adaptation": "Task adaptation first",
    "batching": "Users together",
}
# Keys the form sets without a field of their own, named after the field that sets them.
_SET_BY: dict[str, str] = {"user_peft.alpha": "user_peft.r"}
# CLI flags the core's messages may suggest -> the config key they set (as `oppu run` maps them).
_FLAGS: dict[str, str] = {
    "--users": "users", "--user-ids": "user_ids", "--methods": "methods", "--peft": "user_peft.kind",
    "--retriever": "retrieval.retriever", "--k": "retrieval.k", "--epochs": "user_train.epochs",
    "--lr": "user_train.lr", "--rank": "user_peft.r", "--alpha": "user_peft.alpha", "--model": "model.name",
    "--no-adapt": "task_adaptation", "--batching": "batching",
}


class FormError(ConfigError):
    """A ConfigError told in the form's terms; `field` is the dotted key of the field at fault, when one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def default(key: str) -> Any:
    """The run default at a dotted key, e.g. `default("user_train.epochs")`: the form starts from RunConfig()."""
    return functools.reduce(getattr, key.split("."), RunConfig())


def run_config(task: str, overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> RunConfig:
    """`build_config` on this dashboard's folders and base model for `task`; `overrides` (dotted keys) win."""
    where = paths()
    here = {"task": task, "data_dir": str(where.data), "db": str(where.db), "artifacts_dir": str(where.artifacts),
            "model.name": default_model()}
    return build_config(preset, {**here, **(overrides or {})})


def demo_config(task: str) -> RunConfig:
    """The Overview page's quick demo: the project's `quick` preset (the same as `oppu run --preset quick`: two
    most active users, the paper's four core methods, short bounded training) on this dashboard's folders."""
    return run_config(task, {"tag": "quick-demo"}, preset="quick")


def train_config(task: str, form: Mapping[str, Any]) -> RunConfig:
    """The Train form's RunConfig from its values by dotted key (`FIELDS`); the rank field also sets LoRA alpha,
    as `oppu run --rank` does. Every check is the config's own; a bad value raises FormError naming the field."""
    overrides = dict(form)
    if "user_peft.r" in overrides:
        overrides.setdefault("user_peft.alpha", overrides["user_peft.r"])
    try:
        return run_config(task, overrides)
    except ConfigError as exc:
        field = _field_at_fault(task, overrides, str(exc))
        message = in_form_terms(str(exc))
        raise FormError(f"{_label(field)}: {message}" if field else message, field) from exc


SEEDS_LABEL = "Seeds (replicates)"
"""The Train form's seeds field: a comma list; each seed is one job, all in one seed group (`oppu run --seeds`)."""


def train_configs(task: str, form: Mapping[str, Any], seeds: str = "") -> list[RunConfig]:
    """The Train form's configs: `train_config` once, or with `seeds` ("0,1,2") one replicate per seed sharing a
    new seed group (`oppu.replicates.seed_configs`: the seed sets the personal adapters' initialisation, dropout,
    example order and sampling; the task-adapted base is shared). A bad seed list raises FormError naming it."""
    from oppu.replicates import parse_seeds, seed_configs

    cfg = train_config(task, form)
    if not str(seeds).strip():
        return [cfg]
    try:
        return seed_configs(cfg, parse_seeds(str(seeds)))
    except ConfigError as exc:
        raise FormError(f"**{SEEDS_LABEL}**: {exc}", "seeds") from exc


def _field_at_fault(task: str, overrides: Mapping[str, Any], message: str) -> str | None:
    """The form field whose value alone, over the defaults, fails with this same message (None when only a
    combination of values fails)."""
    for key, value in overrides.items():
        try:
            run_config(task, {key: value})
        except ConfigError as lone:
            if str(lone) == message:
                return _SET_BY.get(key, key)
    return None


def _label(key: str) -> str:
    return f"**{FIELDS[_SET_BY.get(key, key)]}**" if _SET_BY.get(key, key) in FIELDS else key


_FLAG = re.compile(r"--[a-z][a-z-]*(?: [A-Z]+\b)?")
_KEY = re.compile(r"\b[a-z]+(?:[._][a-z]+)+\b")


def in_form_terms(message: str) -> str:
    """A core message with the CLI flags and config keys of the form's fields replaced by those fields' labels."""

    def flag(match: re.Match) -> str:
        key = _FLAGS.get(match.group(0).split(" ")[0])
        return _label(key) if key else match.group(0)

    def key(match: re.Match) -> str:
        name = match.group(0)
        return _label(name) if _SET_BY.get(name, name) in FIELDS else name

    return _KEY.sub(key, _FLAG.sub(flag, message))
