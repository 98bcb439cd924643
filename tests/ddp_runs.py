"""Running `medfm pretrain|finetune fit` as real processes: one, or two gloo DDP ranks (shared by the DDP tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

TIMEOUT = 300  # seconds per run: fail, never hang


def medfm_script() -> str:
    """The installed ``medfm`` console script (DDP relaunches it in every rank), or skip."""
    found = Path(sys.executable).parent / "medfm"
    if found.is_file():
        return str(found)
    return shutil.which("medfm") or pytest.skip("the medfm console script is not installed")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: str, folder: Path, config: Path, devices: int, batch_size: int) -> subprocess.Popen:
    """Start ``medfm COMMAND fit`` for 2 steps, logging every step; ``devices > 1`` runs DDP over gloo."""
    argv = [medfm_script(), command, "fit", "--config", str(config), "--trainer.devices", str(devices)]
    argv += ["--trainer.accelerator", "cpu", "--trainer.sync_batchnorm", "true", "--data.batch_size", str(batch_size)]
    argv += ["--trainer.log_every_n_steps", "1", "--trainer.max_steps", "2"]
    argv += ["--verbose"]  # Lightning's notes ("GLOBAL_RANK: 1", the backend) show that two ranks really ran
    if devices > 1:
        argv += ["--trainer.strategy", "ddp"]
    env = {
        **os.environ,
        "MEDFM_HOME": str(folder / "home"),
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",  # the same arithmetic in every process of both runs
    }
    log = (folder / "log.txt").open("wb")
    # A session of its own: on a timeout the whole group goes, the rank Lightning's launcher started included.
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)


def finish(proc: subprocess.Popen, folder: Path) -> None:
    """Wait for a run; fail with its log on a timeout or a non-zero exit."""
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run in {folder} took over {TIMEOUT} s:\n{(folder / 'log.txt').read_text()[-3000:]}")
    assert proc.returncode == 0, f"run in {folder} failed:\n{(folder / 'log.txt').read_text()[-3000:]}"


def metrics(folder: Path) -> pd.DataFrame:
    """The run's metrics.csv."""
    (csv,) = (folder / "run").rglob("metrics.csv")
    return pd.read_csv(csv)


def step_losses(folder: Path) -> dict[int, float]:
    """Logged ``train/loss_step`` by step."""
    rows = metrics(folder).dropna(subset=["train/loss_step"])
    return dict(zip(rows["step"].astype(int), rows["train/loss_step"].astype(float)))
