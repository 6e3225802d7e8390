"""oppu.paths: hostile ids become one safe, distinct path component; nothing escapes its root."""

from __future__ import annotations

import pytest

from oppu.paths import safe_component, user_adapter_dir, within

HOSTILE = ["../../etc/passwd", "/etc/passwd", "a\0b", ".", "..", "", "a/b", "a\\b", "C:\\x", " ", "~root",
           "x" * 1000, "日本語", ".hidden", "a_b", "a_b-1234abcd"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_ids_become_one_safe_component(value, tmp_path):
    component = safe_component(value)
    assert component not in ("", ".", "..") and not component.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in component)
    assert len(component) <= 100
    assert within(tmp_path, component).parent == tmp_path.resolve()


def test_safe_ids_are_kept_and_distinct_ids_never_collide():
    assert safe_component("user_42.v1") == "user_42.v1"
    encoded = [safe_component(v) for v in HOSTILE]
    assert len(set(encoded)) == len(HOSTILE)
    assert safe_component("a/b") != safe_component("a_b") != safe_component(safe_component("a/b"))
    assert safe_component(12) == "12"


def test_within_refuses_escapes(tmp_path):
    assert within(tmp_path, "a/b") == tmp_path.resolve() / "a" / "b"
    for bad in ("../x", "/etc", "a/../../x"):
        with pytest.raises(ValueError, match="escapes"):
            within(tmp_path, bad)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(ValueError):
        within(tmp_path, "link/etc")


def test_user_adapter_dir_stays_under_root(tmp_path):
    folder = user_adapter_dir(tmp_path, "LaMP_2M", "../run", "../../../etc")
    assert folder.parent.parent.parent == tmp_path.resolve() and folder.parts[-3] == "LaMP_2M"


def test_atomic_folder_swaps_in_whole_and_keeps_the_old_one_on_error(tmp_path):
    from oppu.paths import atomic_folder

    target = tmp_path / "adapter"
    with atomic_folder(target) as tmp:
        (tmp / "a.json").write_text("1")
    assert (target / "a.json").read_text() == "1"

    with pytest.raises(OSError, match="disk full"), atomic_folder(target) as tmp:
        (tmp / "a.json").write_text("2")
        raise OSError("disk full")
    assert (target / "a.json").read_text() == "1"  # the previous content, untouched

    with atomic_folder(target) as tmp:
        (tmp / "b.json").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.json"]  # replaced as a whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
