"""The Train form's seeds field: empty submits one job as before; a seed list submits one replicate per seed in
one seed group (dashboard.forms.train_configs, pages/train.py); a bad list is told in the form's terms."""

from __future__ import annotations

import pytest
from test_pages import page

from dashboard import forms
from oppu.config import RunConfig


def test_train_configs_one_per_seed_in_one_group(env):
    (single,) = forms.train_configs("LaMP_2M", {"users": 2}, "")
    assert single.seed_group == "" and single.user_train.seed == RunConfig().user_train.seed
    configs = forms.train_configs("LaMP_2M", {"users": 2}, "3, 4")
    assert [c.user_train.seed for c in configs] == [3, 4] and [c.generation.seed for c in configs] == [3, 4]
    assert len({c.seed_group for c in configs}) == 1 and configs[0].seed_group
    assert {c.adaptation_train.seed for c in configs} == {RunConfig().adaptation_train.seed}
    with pytest.raises(forms.FormError, match=r"\*\*Seeds \(replicates\)\*\*: seed 'x' is not an integer") as err:
        forms.train_configs("LaMP_2M", {"users": 2}, "1,x")
    assert err.value.field == "seeds"


def test_the_train_page_submits_one_job_per_seed(env, monkeypatch):
    from oppu import jobs

    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda cfg, root: submitted.append(cfg) or f"job-{len(submitted)}")
    at = page("train")
    at.text_input(key="train-seeds").set_value("0,1,2")
    at.button[0].click()
    at.run()
    assert [c.user_train.seed for c in submitted] == [0, 1, 2]
    assert len({c.seed_group for c in submitted}) == 1
    assert "Submitted 3 jobs, one per seed" in at.success[0].value

    submitted.clear()
    at = page("train")
    at.text_input(key="train-seeds").set_value("1,1")
    at.button[0].click()
    at.run()
    assert not submitted and "seed 1 is repeated" in at.error[0].value
