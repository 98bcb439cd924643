"""medfm analyze on real chest X-rays (../shared/data/chest_xray_nih; skipped when absent)."""

from __future__ import annotations

import pandas as pd
import pytest

from medfm.analyze.models import load_analysis_model
from medfm.analyze.perceptual import run_perceptual
from medfm.analyze.saliency import run_saliency


def test_real_xrays_perceptual_distance_and_occlusion(need_shared, tmp_path):
    folder = need_shared("chest_xray_nih")
    images = sorted(str(p) for p in folder.glob("*.png"))
    assert len(images) == 2
    model = load_analysis_model("resnet18", "random")  # imagenet-224: grey repeated to RGB, ImageNet mean/std
    pairs = pd.DataFrame({"a": [images[0], images[0]], "b": [images[0], images[1]], "same": [0, 1]})
    distances = run_perceptual([model], pairs).table["distance"].to_numpy()
    assert distances[0] == pytest.approx(0.0, abs=1e-12) and distances[1] > 0.01
    pd.DataFrame({"image_path": images}).to_csv(tmp_path / "xrays.csv", index=False)
    result = run_saliency([model], tmp_path / "xrays.csv", tmp_path / "out", window=56, limit=1, progress=False)
    assert len(result.table) == 1 and 0 < result.table["attentive_diffusion"].iloc[0] < 1
    assert (tmp_path / "out" / "overlays" / "resnet18_random_row00000.png").is_file()
