"""Shared test setup: PyNative by default (graph compile is tested where it is the point), fixed seeds."""
import os
import sys

import numpy as np
import pytest
import mindspore as ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
ULTRA_TINY = os.path.join(ROOT, "yaml_configs", "pangu_ultra_moe", "tiny.yaml")
ULTRA_718B = os.path.join(ROOT, "yaml_configs", "pangu_ultra_moe", "718b.yaml")


@pytest.fixture(autouse=True)
def pynative_mode():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
