"""``medfm cache list|clean``: what the cache folder holds, and removing it by kind and age."""

from __future__ import annotations

import os
import time

import pytest

from medfm.cache import cache_entries, clean_cache, human_size
from medfm.cli import main
from medfm.errors import ConfigError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A cache with a finished store (2 files, 3000 bytes), an interrupted one, a weight file and a model card."""
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    store = tmp_path / "stores" / "abc123"
    store.mkdir(parents=True)
    (store / "store.json").write_bytes(b"{}" + b" " * 998)
    (store / "patches.npy").write_bytes(b"\0" * 2000)
    (tmp_path / "stores" / "def456.tmp").mkdir()
    (tmp_path / "stores" / "def456.tmp" / "patches.npy").write_bytes(b"\0" * 500)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"\0" * 4000)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.json").write_text("{}")
    return tmp_path


def test_entries_by_kind_with_sizes(home):
    entries = {e.path.name: (e.kind, e.size) for e in cache_entries()}
    assert entries == {
        "abc123": ("store", 3000),
        "def456.tmp": ("unfinished-store", 500),
        "model.safetensors": ("weights", 4000),
        "mine.json": ("model", 2),
    }
    assert human_size(3000) == "3.0 kB" and human_size(999) == "999 B" and human_size(4.2e12) == "4.2 TB"


def test_clean_removes_stores_by_default_and_other_kinds_only_when_asked(home, capsys):
    assert main(["cache", "clean", "--dry-run"]) == 0
    assert "would remove 2 entries, 3.5 kB" in capsys.readouterr().out
    assert (home / "stores" / "abc123").is_dir()
    assert main(["cache", "clean", "--unfinished"]) == 0
    assert sorted(p.name for p in (home / "stores").iterdir()) == ["abc123"]
    assert main(["cache", "clean"]) == 0
    assert not list((home / "stores").iterdir())
    assert (home / "weights" / "model.safetensors").is_file() and (home / "models" / "mine.json").is_file()
    assert main(["cache", "clean", "--weights"]) == 0
    assert not (home / "weights" / "model.safetensors").exists() and (home / "models" / "mine.json").is_file()
    assert main(["cache", "list"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"1 entries, 2 B in {home}")


def test_clean_older_than_keeps_recent_entries(home):
    old = time.time() - 10 * 86400
    for path in (home / "stores" / "abc123").rglob("*"):
        os.utime(path, (old, old))
    os.utime(home / "stores" / "abc123", (old, old))
    removed = clean_cache(older_than_days=5)
    assert [e.path.name for e in removed] == ["abc123"]
    assert (home / "stores" / "def456.tmp").is_dir()
    with pytest.raises(ConfigError, match=r"unknown cache kind\(s\) \['stuff'\]"):
        clean_cache(["stuff"])
