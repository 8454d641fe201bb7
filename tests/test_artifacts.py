"""Atomic writes: all-or-nothing, and files readable like any other (not mkstemp's 0600)."""

from __future__ import annotations

import pytest

from kdens.artifacts import atomic_write_json, atomic_write_text, read_json


def test_atomic_write_gives_the_mode_open_gives(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "plain").write_text("x")
    assert read_json(path) == {"x": 1}
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "r.md", "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": Boom()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.md"]
