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


def test_injected_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """$SAEFORGE_FAULT_ENOSPC (a glob or a substring of the final path) fails the matching write at commit
    time: DiskFullError (an OSError, ENOSPC) naming the file, the temp's size and the free bytes."""
    import errno
    import shutil

    from saeforge.atomic import FAULT_ENOSPC, DiskFullError, atomic_write_text

    path = tmp_path / "out.json"
    atomic_write_text(path, "old")
    for pattern in ("*/out.json", "out.js"):
        monkeypatch.setenv(FAULT_ENOSPC, pattern)
        with pytest.raises(DiskFullError) as caught:
            atomic_write_text(path, "new content")
        err = caught.value
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC
        free = shutil.disk_usage(tmp_path).free
        assert abs(err.free - free) < 1 << 30  # other writers on the disk meanwhile
        assert str(err) == f"no space left on device writing {path} (needs ~11 bytes, {err.free} bytes free on {tmp_path})"
        assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write_text(tmp_path / "other.json", "x")  # not matched
    monkeypatch.delenv(FAULT_ENOSPC)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_injected_full_disk_keeps_the_old_folder(tmp_path, monkeypatch):
    from saeforge.atomic import FAULT_ENOSPC, DiskFullError

    out = tmp_path / "sae"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    monkeypatch.setenv(FAULT_ENOSPC, str(out))
    with pytest.raises(DiskFullError, match=r"writing .*/sae \(needs ~2 bytes, \d+ bytes free on "), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("22")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_enospc_reported_inside_a_library_error_is_a_disk_full_error(tmp_path):
    """torch's zip writer raises RuntimeError with the OSError as its context; safetensors and h5py put
    the OS message in their own error. Other errors pass through unchanged."""
    import errno
    import os

    from saeforge.atomic import DiskFullError, disk_full_error

    path = tmp_path / "last.ckpt"
    with pytest.raises(DiskFullError, match=r"^no space left on device writing .*last\.ckpt \(\d+ bytes free on "):
        with atomic_path(path):  # an empty temp: the bytes needed are unknown, so left out
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(DiskFullError, match=r"needs ~4 bytes"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise ValueError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError, match="other"), atomic_path(path):
        raise ValueError("other")
    assert list(tmp_path.iterdir()) == []
    bare = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    assert str(disk_full_error(bare)).startswith(f"no space left on device writing {path} (")
    assert disk_full_error(OSError(errno.EACCES, "denied")) is None
    worker = RuntimeError(f"extraction process 2 of 2 failed: saeforge.atomic.DiskFullError: no space left on device "
                          f"writing {tmp_path / 'shard-00001.safetensors'} (needs ~12 bytes, 5 bytes free on {tmp_path})")
    rebuilt = disk_full_error(worker)
    assert rebuilt is not None and (rebuilt.path, rebuilt.needed) == (tmp_path / "shard-00001.safetensors", 12)


def test_reserve_blocks_allocates_a_sparse_file_or_fails_as_disk_full(tmp_path, monkeypatch):
    """Before a file is memory-mapped: its blocks exist (a full disk would otherwise be a SIGBUS later)."""
    from saeforge.atomic import FAULT_ENOSPC, DiskFullError, reserve_blocks

    path = tmp_path / "cache.npy"
    with open(path, "wb") as handle:
        handle.truncate(1 << 20)
    reserve_blocks(path)
    assert path.stat().st_blocks * 512 >= 1 << 20
    monkeypatch.setenv(FAULT_ENOSPC, "*.npy")
    with pytest.raises(DiskFullError, match=rf"writing {path} \(needs ~{1 << 20} bytes, \d+ bytes free"):
        reserve_blocks(path)
