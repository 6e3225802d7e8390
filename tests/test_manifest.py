"""The adapter manifest: one writer (atomic, stable bytes) and one reader (clear errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oppu.manifest import MANIFEST_NAME, ManifestError, read_manifest, stamp_created, write_manifest


def test_written_manifest_reads_back_sorted_and_leaves_no_temporary_file(tmp_path):
    path = write_manifest(tmp_path, {"user_id": "ann", "b": [1, 2], "a": {"z": 1, "y": Path("p")}})
    assert path == tmp_path / MANIFEST_NAME
    assert read_manifest(tmp_path) == {"a": {"y": "p", "z": 1}, "b": [1, 2], "user_id": "ann"}
    assert list(json.loads(path.read_text())) == ["a", "b", "user_id"]  # same inputs, same bytes
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]


def test_missing_and_corrupt_manifests_are_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete OPPU adapter"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"user_id": "ann"')  # truncated by a crash or an editor
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="not an object"):
        read_manifest(tmp_path)


def test_stamp_created_keeps_a_given_time():
    assert stamp_created({"created": "2024-01-01T00:00:00Z"})["created"] == "2024-01-01T00:00:00Z"
    assert stamp_created({})["created"].endswith("Z")
