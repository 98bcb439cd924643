"""``--device``: one resolver for every command that runs a network (extract, predict, detect/segment predict)."""

from __future__ import annotations

import pytest
import torch

from medfm.device import resolve_device
from medfm.errors import ConfigError


def test_auto_takes_a_gpu_only_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_bad_device_is_refused_plainly():
    with pytest.raises(ConfigError, match="not a device; use auto, cpu, cuda"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU on this machine"):
            resolve_device("cuda:1")
