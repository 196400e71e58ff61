import json

import pytest

from saeforge.atomic import atomic_dir, atomic_path, atomic_write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é"}
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é"}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")}, allow_nan=False)
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sae"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def writer_marks() -> tuple[str, str]:
    """(mark of a writer that has exited, mark of one that still runs: pytest's parent) as `host-pid`."""
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = socket.gethostname()
    return f"{host}-{int(dead.stdout)}", f"{host}-{os.getppid()}"


def test_atomic_dir_removes_leftovers_of_a_killed_writer_only(tmp_path):
    dead, alive = writer_marks()
    killed = tmp_path / f".sae.{dead}.abc123.tmp"
    killed_old = tmp_path / f".sae.{dead}.old-0123abcd"
    running = tmp_path / f".sae.{alive}.def456.tmp"
    foreign = tmp_path / ".sae.xyz789.tmp"  # no writer mark: left alone
    for folder in (killed, killed_old, running, foreign):
        folder.mkdir()
    with atomic_dir(tmp_path / "sae") as tmp:
        (tmp / "cfg.json").write_text("{}")
    assert not killed.exists() and not killed_old.exists()
    assert running.exists() and foreign.exists() and (tmp_path / "sae" / "cfg.json").is_file()


def test_atomic_write_removes_temp_files_of_a_killed_writer_only(tmp_path):
    """A kill -9 between a temp file's creation and its rename leaves the temp; the next write of the
    same file removes it when its writer (marked in the name) no longer runs."""
    from saeforge.atomic import atomic_write_text

    dead, alive = writer_marks()
    killed = tmp_path / f".maxact.json.{dead}.abc123.tmp"
    running = tmp_path / f".maxact.json.{alive}.def456.tmp"
    other_file = tmp_path / f".other.json.{dead}.abc123.tmp"
    for path in (killed, running, other_file):
        path.write_text("half")
    atomic_write_text(tmp_path / "maxact.json", "{}")
    assert not killed.exists()
    assert running.exists() and other_file.exists() and (tmp_path / "maxact.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other_file.name, "maxact.json"])
