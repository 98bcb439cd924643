"""Start-up fits the command: `medfm crop` and `medfm probe` run end to end without importing torch or MONAI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# Runs one command through medfm.cli.main in a fresh interpreter, then reports which heavy packages it imported.
SCRIPT = """
import json, sys
import medfm.cli
status = medfm.cli.main(sys.argv[1:])
print(json.dumps({"status": status, "heavy": sorted(m for m in ("torch", "monai", "lightning") if m in sys.modules)}))
"""


def _run(*argv: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_crop_runs_without_torch_or_monai(small_ct, tmp_path):
    centre = small_ct.geometry.index_to_world(np.array([20.0, 18.0, 12.0]))
    manifest = tmp_path / "seeds.csv"
    pd.DataFrame({"image_path": [str(small_ct.path)], "coordX": [centre[0]], "coordY": [centre[1]], "coordZ": [centre[2]]}).to_csv(manifest, index=False)  # fmt: skip
    out = tmp_path / "patches"
    result = _run("crop", str(manifest), "--out", str(out), "--quiet")
    assert result == {"status": 0, "heavy": []}
    assert any(out.iterdir())  # it did crop


def test_probe_runs_without_torch(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    table = pd.DataFrame(rng.normal(size=(80, 4)) + y[:, None], columns=[f"feat_{i}" for i in range(4)])
    table["label"] = y
    features = tmp_path / "features.parquet"
    table.to_parquet(features)
    result = _run("probe", str(features), "--label", "label", "--out", str(tmp_path / "probe"), "--trials", "2")
    assert result["status"] == 0
    assert "torch" not in result["heavy"] and "lightning" not in result["heavy"]
