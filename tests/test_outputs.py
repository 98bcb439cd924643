"""``medfm.data.outputs``: finished rows kept with their input digests; a table and its sidecar as one pair."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfm.data import outputs
from medfm.data.outputs import FinishedRows, check_output, output_lock, read_sidecar, write_feature_table
from medfm.errors import OutputError


def test_finished_rows_are_kept_only_for_the_same_inputs(tmp_path):
    kept = FinishedRows(tmp_path / "x.partial", {"model": "a"}, resume=False)
    kept.put("row-000001", {"value": 1.5}, digest="d1")
    again = FinishedRows(tmp_path / "x.partial", {"model": "a"}, resume=True)
    assert again.get("row-000001", "d1") == {"value": 1.5}
    assert again.get("row-000001", "d2") is None  # the row's inputs changed since: computed again
    assert again.get("row-000002", "d1") is None
    fresh = FinishedRows(tmp_path / "x.partial", {"model": "a"}, resume=False)
    assert fresh.get("row-000001", "d1") is None


def _pair(folder: Path, n: int, run: str) -> Path:
    table = pd.DataFrame({"id": [f"r{i}" for i in range(n)]})
    features = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return write_feature_table(table, features, ["feat_0", "feat_1"], folder / "f.parquet", {"run": run})


def test_table_and_sidecar_are_one_pair(tmp_path):
    path = _pair(tmp_path, 3, "first")
    sidecar = read_sidecar(path)
    assert sidecar == {"run": "first", "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.parquet"]


def test_disk_full_while_writing_the_sidecar_keeps_the_earlier_pair(tmp_path, monkeypatch):
    path = _pair(tmp_path, 3, "first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(data, where):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(outputs, "_dump_json", full)
    with pytest.raises(OutputError) as info:
        _pair(tmp_path, 5, "second")
    assert str(info.value) == f"cannot write {tmp_path / 'f.json'}: the disk is full"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file, nothing stale
    assert read_sidecar(path)["run"] == "first" and len(pd.read_parquet(path)) == 3


def test_disk_full_while_writing_the_table(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def full(*args, **kwargs):
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OutputError, match=r"f\.parquet: the disk is full$"):
        _pair(tmp_path, 3, "first")
    assert list(tmp_path.iterdir()) == []


def test_a_crash_between_the_renames_never_leaves_an_old_sidecar_beside_a_new_table(tmp_path, monkeypatch):
    path = _pair(tmp_path, 3, "first")
    real = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the table was renamed, before the sidecar
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _pair(tmp_path, 5, "second")
    assert len(pd.read_parquet(path)) == 5
    assert read_sidecar(path) is None  # the earlier run's sidecar was removed first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet"]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    lock = tmp_path / ".f.parquet.lock"
    lock.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "earlier"}))
    with output_lock(tmp_path / "f.parquet") as held:
        assert held == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputError, match=rf"being written by process {os.getpid()} on "):
            with output_lock(tmp_path / "f.parquet"):
                pass
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": dead_pid, "host": "another-host", "started": "earlier"}))
    with pytest.raises(OutputError, match=rf"being written by process {dead_pid} on another-host \(since earlier\)"):
        with output_lock(tmp_path / "f.parquet"):  # another machine's process: whether it runs cannot be known
            pass


def test_check_output_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(OutputError, match=r"^--out .*dir\.parquet is a folder; name a file to write$"):
        check_output(tmp_path / "dir.parquet")
    assert check_output(tmp_path / "new" / "deeper" / "f.parquet") == tmp_path / "new" / "deeper" / "f.parquet"
    assert not (tmp_path / "new").exists()  # checked, nothing made

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match=r"^cannot write .*f\.parquet: the file system is read-only$"):
        check_output(tmp_path / "f.parquet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_in_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"^cannot write .*ro/out: permission denied$"):
            check_output(folder / "out", folder=True)
    finally:
        folder.chmod(0o755)
