"""Atomic writes: all-or-nothing, and files readable like any other (not mkstemp's 0600)."""

from __future__ import annotations

import pytest

from kdens.artifacts import atomic_write_json, atomic_write_text, read_json


def test_atomic_write_gives_the_mode_open_gives(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "plain").write_text("x")
    assert read_json(path) == {"x": 1}
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """A write that dies after its temp file was made and partly written: old file kept, temp removed."""
    import os

    path = atomic_write_text(tmp_path / "r.md", "old")
    seen = []
    real_fsync = os.fsync

    def dying_fsync(fd):  # the new bytes are in the temp file when this runs
        seen.append([p.name for p in tmp_path.iterdir()])
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new content")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(seen) == 1 and len(seen[0]) == 2  # the temp file existed beside r.md
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.md"]
