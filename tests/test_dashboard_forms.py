"""dashboard/forms.py without Streamlit running: every config goes through build_config on the dashboard's
folders, the form's defaults are RunConfig()'s, and a bad value is told in the form's terms."""

from __future__ import annotations

import argparse

import pytest

from dashboard import forms
from oppu.config import ConfigError, RunConfig, build_config, load_preset


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    where = {"OPPU_DATA": tmp_path / "data", "OPPU_DB": tmp_path / "x.duckdb", "OPPU_ARTIFACTS": tmp_path / "art"}
    for name, value in where.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("OPPU_MODEL", raising=False)
    return where


def test_every_field_is_a_run_config_key_and_starts_at_its_default():
    defaults = RunConfig()
    assert forms.default("user_train.epochs") == defaults.user_train.epochs
    assert forms.default("retrieval.k") == defaults.retrieval.k
    assert forms.default("methods") == defaults.methods
    for key in forms.FIELDS:
        forms.default(key)  # an AttributeError here is a field naming a key RunConfig does not have


def test_the_flags_the_form_translates_are_the_cli_flags():
    from oppu.commands.run import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    assert set(forms._FLAGS) <= set(parser._option_string_actions)
    assert all(key in forms.FIELDS or key in forms._SET_BY for key in forms._FLAGS.values())


def test_demo_is_the_quick_preset_on_the_dashboard_folders(folders):
    cfg = forms.demo_config("LaMP_2M")
    expected = build_config("quick", {"task": "LaMP_2M", "data_dir": str(folders["OPPU_DATA"]),
                                      "db": str(folders["OPPU_DB"]), "artifacts_dir": str(folders["OPPU_ARTIFACTS"]),
                                      "tag": "quick-demo"})
    assert cfg == expected
    assert cfg.users == load_preset("quick")["users"]


def test_rank_sets_alpha_and_untouched_fields_keep_the_defaults(folders):
    cfg = forms.train_config("LaMP_2M", {"user_peft.r": 16, "user_train.epochs": 1})
    defaults = RunConfig()
    assert (cfg.user_peft.r, cfg.user_peft.alpha) == (16, 16)
    assert cfg.user_train.epochs == 1 and cfg.user_train.lr == defaults.user_train.lr
    assert cfg.retrieval == defaults.retrieval and cfg.methods == defaults.methods


@pytest.mark.parametrize(("form", "field"), [
    ({"user_train.epochs": 0}, "user_train.epochs"),
    ({"user_peft.r": 0}, "user_peft.r"),
    ({"users": 0}, "users"),
    ({"methods": []}, "methods"),
    ({"retrieval.k": 99}, "retrieval.k"),
])
def test_a_bad_value_names_its_field(folders, form, field):
    with pytest.raises(ConfigError) as info:
        forms.train_config("LaMP_2M", {"users": 2, **form})
    assert isinstance(info.value, forms.FormError) and info.value.field == field
    assert str(info.value).startswith(f"**{forms.FIELDS[field]}**: ")
    assert "_" not in str(info.value).split(":", 1)[1]  # no config keys left in the message


def test_a_bad_value_of_a_valid_field_is_still_blamed_when_another_value_is_odd(folders):
    # users = 0 is ignored when user ids are chosen; the epochs are what fails
    with pytest.raises(forms.FormError) as info:
        forms.train_config("LaMP_2M", {"users": 0, "user_ids": ["u1"], "user_train.epochs": 0})
    assert info.value.field == "user_train.epochs"


def test_cli_flags_and_config_keys_read_as_field_labels():
    text = forms.in_form_terms("user_ids is empty: pass at least one user id or use --users N")
    assert text == "**…or these users (overrides N)** is empty: pass at least one user id or use **N most active**"
    assert forms.in_form_terms("pass --methods none,rag") == "pass **Methods** none,rag"
    # what the form has no field for stays as it was
    assert forms.in_form_terms("use --device cpu or history_format") == "use --device cpu or history_format"
