"""Atomic writes fsync the temp file before the rename and the folder after it."""

from __future__ import annotations

import os
import stat

from saeforge.atomic import atomic_write_json


def test_atomic_write_fsyncs_file_then_folder(tmp_path, monkeypatch) -> None:
    calls: list[tuple[str, bool]] = []  # (event, is_dir) in order
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})
    assert calls == [("fsync", False), ("replace", False), ("fsync", True)]
    assert path.read_text().strip() == '{\n  "a": 1\n}'
