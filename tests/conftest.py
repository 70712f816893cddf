"""Shared fixtures: the tiny config with seeded random weights, and small test-only modes."""

import pytest
import torch

from dsocr.configs import CONFIGS, Mode
from dsocr.model import build_model

torch.set_num_threads(2)

# Modes scaled for the tiny config: same rules as the real ones, smaller pixels.
TEST_BASE = Mode("test-base", 128, 128)
TEST_SMALL = Mode("test-small", 64, 64)
TEST_GUNDAM = Mode("test-gundam", 128, 64, crop_mode=True, crop_threshold=64)


@pytest.fixture(scope="session")
def tiny_cfg():
    return CONFIGS["tiny"]


@pytest.fixture()
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg, seed=0).eval()
