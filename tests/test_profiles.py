"""PAG profiles: data profiles win, generated ones are cached per (user, model, task, history)."""

from __future__ import annotations

from oppu.profiles import build_profiles, cache_path, history_hash, profile_for, profile_items
from oppu.tasks import get_task

TASK = get_task("LaMP_2M")


def _counting_generate(monkeypatch):
    import oppu.generate
    import oppu.profiles

    monkeypatch.setattr(oppu.profiles, "PROFILE_MAX_NEW_TOKENS", 6)  # the tiny model never ends a turn: keep it short

    calls = []
    real = oppu.generate.generate

    def counting(model, tok, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(oppu.generate, "generate", counting)
    return calls


def test_data_profile_is_used_as_is(tiny_model, tiny_users, tmp_path, monkeypatch):
    model, tok = tiny_model
    calls = _counting_generate(monkeypatch)
    carol = tiny_users[1][2]
    assert profile_for(carol, TASK, model, tok, tmp_path, model_name="tiny") == "most popular tag: comedy"
    assert calls == []


def test_generated_profiles_are_cached_per_history(tiny_model, tiny_users, tmp_path, monkeypatch):
    model, tok = tiny_model
    calls = _counting_generate(monkeypatch)
    alice, bob, carol = tiny_users[1]
    first = build_profiles([alice, bob], TASK, model, tok, tmp_path, model_name="tiny")
    assert set(first) == {"alice", "bob"} and len(calls) == 1 and len(calls[0]) == 2  # one batched call
    assert "description:" in calls[0][0] and alice.history[0].fields["description"] in calls[0][0]
    assert cache_path(tmp_path, TASK.id, "tiny", "alice", history_hash(alice.history)).is_file()
    assert build_profiles([alice, bob], TASK, model, tok, tmp_path, model_name="tiny") == first
    assert len(calls) == 1  # served from the cache
    shorter = profile_for(alice, TASK, model, tok, tmp_path, model_name="tiny", items=alice.history[:3])
    assert len(calls) == 2 and isinstance(shorter, str)  # a changed history is a new entry
    cut = build_profiles([carol], TASK, model, tok, tmp_path, model_name="tiny",
                         histories={"carol": carol.history[:2]})
    assert len(calls) == 3 and len(calls[2]) == 1  # a cutoff history is summarised anew, not the data profile
    assert carol.history[2].fields["description"] not in calls[2][0] or \
        carol.history[2].fields["description"] == carol.history[0].fields["description"]
    assert isinstance(cut["carol"], str)


def test_profile_items_keep_the_most_recent(tiny_users):
    alice = tiny_users[1][0]
    assert profile_items(alice.history, 3) == list(alice.history[-3:])
    assert profile_items(alice.history, 100) == list(alice.history)
